"""Rendering for people (rich) and machines (--json); exit codes; one-line errors instead of tracebacks.

Commands return results (itk.doctor.DoctorReport, itk.presets.PresetListing, itk.advice.Verdict, itk.run.Plan
and RunResult, itk.selftest.SelftestResult); the `show_*` functions here render one and return the exit code.
Result modules are imported where used, so `itk --help` stays light.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

from itk.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UserError
from itk.runtime.protocol import BadInput

if TYPE_CHECKING:
    from itk.advice import Verdict
    from itk.doctor import DoctorReport
    from itk.presets import PresetListing
    from itk.run import Plan, RunResult
    from itk.selftest import SelftestResult

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: str, fix: str = "") -> None:
    # soft_wrap: never break a path or a command at the console width (it must stay copy-pasteable)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if fix:
        err_console.print(f"[bold]fix:[/] {fix}", highlight=False, soft_wrap=True)


def say(line: str, out: Console | None = None) -> None:
    (out or console).print(line, highlight=False, soft_wrap=True)


@contextmanager
def friendly_errors(debug: bool) -> Iterator[None]:
    """Turn UserError / the protocol's BadInput (and, without --debug, any exception) into a one-line
    message and an exit code."""
    try:
        yield
    except UserError as exc:
        print_error(exc.message, exc.fix)
        raise SystemExit(exc.exit_code) from None
    except BadInput as exc:
        print_error(exc.message, exc.fix)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print_error("interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (SystemExit, Exception) as exc:
        if isinstance(exc, SystemExit) or debug:
            raise
        print_error(f"{type(exc).__name__}: {exc}", "rerun with --debug for the full traceback")
        raise SystemExit(EXIT_FAILED) from None


def run_friendly(fn: Callable[[], int | None], debug: bool) -> None:
    with friendly_errors(debug):
        code = fn() or EXIT_OK
    raise SystemExit(code)


def took(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# --- itk doctor ------------------------------------------------------------------------------------------
SYMBOLS = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]", "skip": "[dim]-[/]"}


def show_doctor(report: DoctorReport, as_json: bool, verbose: bool = False) -> int:
    """flutter doctor's shape: one line per check, details only where something is wrong (all with -v),
    every fix, and a closing summary line."""
    if as_json:
        print_json(report.to_json())
        return report.exit_code
    from rich.table import Table

    say(f"[bold]preset[/] {report.preset_reason}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("", width=1)
    table.add_column("check")
    table.add_column("result", overflow="fold")
    for r in report.results:
        table.add_row(SYMBOLS[r.status.value], r.id, r.summary)
    console.print(table)
    problems = [r for r in report.results if r.status.value in ("warn", "fail")]
    for r in report.results:
        if verbose or r in problems:
            for line in r.details:
                say(f"  [dim]{r.id}:[/] {line}")
    for r in problems:
        if r.fix:
            say(f"{SYMBOLS[r.status.value]} [bold]{r.id}[/] fix: {r.fix}")
    say(f"[bold]{report.summary}[/] [dim]({report.elapsed_s:.1f} s)[/]")
    return report.exit_code


# --- itk presets -----------------------------------------------------------------------------------------
def show_presets(listing: PresetListing, as_json: bool) -> int:
    if as_json:
        print_json(listing.to_json())
        return EXIT_OK
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("", "preset", "status", "needs", "this machine", "what it is"):
        table.add_column(column, overflow="fold")
    for row in listing.rows:
        fits = "fits" if not row["unmet"] else "lacks " + "; ".join(row["unmet"])
        table.add_row("→" if row["chosen"] else "", row["name"], row["status"], row["requirements"], fits,
                      row["summary"])
    console.print(table)
    for row in listing.rows:
        say(f"[dim]{row['name']}: {row['provenance']}[/]")
    say(f"[bold]this machine gets:[/] {listing.reason}")
    return EXIT_OK


# --- verdicts (itk diagnose, a failed itk run) -----------------------------------------------------------
def render_verdict(verdict: Verdict) -> None:
    colour = {"ok": "green", "unknown": "yellow"}.get(verdict.rule, "red")
    say(f"[bold {colour}]{verdict.title}[/] [dim]({verdict.rule})[/]")
    say(f"  {verdict.diagnosis}")
    if verdict.evidence and verdict.rule != "unknown":
        say(f"  [dim]seen: {verdict.evidence[:200]}[/]")
    for line in verdict.details:
        say(f"  [dim]•[/] {line}")
    if verdict.fixes:
        console.print("[bold]what to do:[/]")
        for i, fix in enumerate(verdict.fixes, 1):
            say(f"  {i}. {fix}")
    if verdict.check:
        say(f"[bold]check:[/] itk doctor --only {verdict.check}")
    for hint in verdict.hints:
        say(f"[yellow]also noticed ({hint['rule']}):[/] {hint['diagnosis']}")
    if verdict.log:
        say(f"[dim]log: {verdict.log}[/]")


def show_verdict(verdict: Verdict, as_json: bool) -> int:
    """`itk diagnose`: exit 0 when the log's failure is recognised (or there is none), 1 when it is not."""
    if as_json:
        print_json(verdict.to_json())
    else:
        render_verdict(verdict)
    return EXIT_FAILED if verdict.rule == "unknown" else EXIT_OK


# --- itk run ---------------------------------------------------------------------------------------------
def plan_lines(plan: Plan) -> list[str]:
    m = plan.media
    audio = ", ".join(f"{k} {v:.1f} s" for k, v in m.audio_s.items())
    estimate = (f" (about {took(m.clips * plan.steps * plan.expected_step_s)} at the {plan.expected_step_s:.0f} s "
                "per step measured for this preset)") if plan.expected_step_s else ""
    return [
        f"preset {plan.preset_reason}",
        f"input: {m.kind} {m.width}x{m.height}, audio {audio} -> {m.video_s:.1f} s of video, "
        f"{m.clips} clip(s) x {plan.steps} steps{estimate}",
        *(f"[yellow]warning:[/] {w}" for w in m.warnings),
    ]


def show_dry_run(plan: Plan, as_json: bool) -> int:
    """The plan on stderr and the exact command alone on stdout (or the plan as JSON); the job file is
    written so the printed command runs as printed."""
    plan.write_job()
    if as_json:
        print_json(plan.to_json())
        return EXIT_OK
    for line in plan_lines(plan):
        say(line, err_console)
    if plan.missing:
        say(f"[yellow]note:[/] {len(plan.missing)} weight file(s) missing; {plan.fetch_command}", err_console)
    say(plan.command_line)
    return EXIT_OK


def show_run(plan: Plan, as_json: bool) -> int:
    """Run the plan with progress bars (on stderr with --json, whose stdout is the result alone)."""
    from itk.progress import ProgressView
    from itk.run import run_job

    plan.require_weights()
    out = err_console if as_json else console
    for line in plan_lines(plan):
        say(line, out)
    say(f"log: {plan.log_path}", out)
    with ProgressView(out, plan.media.clips, plan.steps, plan.expected_step_s) as view:
        result = run_job(plan, on_event=view.handle)
    return show_run_result(result, as_json, out)


def show_run_result(result: RunResult, as_json: bool, out: Console | None = None) -> int:
    if as_json:
        print_json(result.to_json())
    if result.interrupted:
        say(f"[yellow]interrupted:[/] the generator and all its processes were stopped; log: {result.log}", out)
    elif result.ok and not as_json:
        length = f"{result.video_s:.1f} s" if result.video_s else "unknown length"
        peak = f", GPU peak {result.gpu_peak_gb:.1f} GB" if result.gpu_peak_gb else ""
        say(f"[green]done:[/] {result.output} ({length} of video) in {took(result.elapsed_s)}{peak}")
    elif result.verdict is not None and not as_json:
        render_verdict(result.verdict)
    return result.exit_code


# --- itk selftest ----------------------------------------------------------------------------------------
def show_selftest(result: SelftestResult, as_json: bool) -> int:
    """Passed: one line of what was checked, then the mp4's path alone as the last line of stdout."""
    if as_json:
        print_json(result.to_json())
        return result.exit_code
    if not result.ok:
        if result.run.verdict is not None:
            render_verdict(result.run.verdict)
        print_error(f"selftest failed (exit {result.run.exit_code})",
                    f"the generator's log is {result.run.log}; the files are in {result.workdir}")
        return result.exit_code
    video = result.video or {}
    say(f"[green]selftest passed[/] in {result.seconds} s: {video['frames']} frames at {video['fps']:g} fps, "
        f"{video['audio_s']} s of audio")
    print(result.run.output)
    return EXIT_OK
