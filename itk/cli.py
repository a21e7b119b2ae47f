"""The `itk` command: thin click commands that parse, call one module, and render.

Nothing heavy is imported here: each command imports its module when it runs, so `itk --help` stays fast.
"""

from __future__ import annotations

import click

from itk import __version__

WEIGHTS_DIR = click.option(
    "--weights-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the weights live (default: $ITK_WEIGHTS, else ./weights).",
)
PRESET = click.option("--preset", default=None, help="Preset name (default: the one itk picks for this machine).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
DEBUG = click.option("--debug", is_flag=True, help="Show full tracebacks.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="itk")
def cli() -> None:
    """From a bare GPU box to an InfiniteTalk talking-head video: doctor, fetch, run."""


@cli.command()
@click.option("--only", default=None, help="Comma-separated check ids: gpu,torch,ram,disk,flash_attn,numpy,...")
@click.option("--deep", is_flag=True, help="Re-hash every weight file instead of trusting recorded verdicts.")
@PRESET
@WEIGHTS_DIR
@JSON
@click.option("-v", "--verbose", is_flag=True, help="Show details of every check, not only of problems.")
@DEBUG
def doctor(only, deep, preset, weights_dir, as_json, verbose, debug) -> None:
    """Check this machine against a preset; every problem comes with its fix."""
    from itk.console import run_friendly
    from itk.doctor import run_doctor

    only_ids = [s.strip() for s in only.split(",") if s.strip()] if only else None
    run_friendly(lambda: run_doctor(only_ids, deep, preset, weights_dir, as_json, verbose), debug)


def main() -> None:
    cli()


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to write the tiny weights and the video (default: a new temp folder).")
@DEBUG
def selftest(workdir, debug) -> None:
    """Generate a short video on tiny random weights through the real generator; print the mp4 path."""
    from itk.console import run_friendly
    from itk.selftest import selftest_command

    run_friendly(lambda: selftest_command(workdir), debug)
