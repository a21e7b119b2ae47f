"""The `itk` command: thin click commands that parse, call one module, and render.

Nothing heavy is imported here: each command imports its module when it runs, so `itk --help` stays fast.
"""

from __future__ import annotations

import sys

import click

from itk import __version__
from itk.runtime.protocol import JOB_HELP

WEIGHTS_DIR = click.option(
    "--weights-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the weights live (default: $ITK_WEIGHTS, else ./weights).",
)
PRESET = click.option("--preset", default=None, help="Preset name (default: the one itk picks for this machine).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
DEBUG = click.option("--debug", is_flag=True, help="Show full tracebacks.")
RAY = click.option(
    "--ray", "ray_address", default=None, metavar="auto|ADDRESS",
    help="Run on a Ray cluster: one warm generator per GPU of the cluster (one per node without GPUs); this "
         "process keeps the job store and plans the jobs. auto: the cluster this machine joined with `ray start`; "
         "else the head's HOST:PORT. Every node must see the output folder, the inputs and the weights at the same "
         "paths (a shared filesystem): a job whose node dies then resumes on another node from its last finished "
         "clip (else from clip 1, said in the job's note). Needs: pip install 'itk[cluster]'.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="itk")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """From a bare GPU box to an InfiniteTalk talking-head video: doctor, fetch, run.

    Shell completion: eval "$(_ITK_COMPLETE=bash_source itk)" in ~/.bashrc (zsh_source, fish_source).
    """
    if ctx.invoked_subcommand is None:  # bare `itk` is a question, not a mistake: help, exit 0
        click.echo(ctx.get_help())
        ctx.exit(0)


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
    from itk.console import run_friendly, show_doctor
    from itk.doctor import run_doctor

    only_ids = [s.strip() for s in only.split(",") if s.strip()] if only else None
    run_friendly(lambda: show_doctor(run_doctor(only_ids, deep, preset, weights_dir), as_json, verbose), debug,
                 as_json)


@cli.command(context_settings={"max_content_width": 110})
@click.option("--image", type=click.Path(dir_okay=False), help="Portrait image (PNG/JPEG).")
@click.option("--video", type=click.Path(dir_okay=False), help="Source video to dub instead of an image.")
@click.option("--audio", type=click.Path(dir_okay=False), help="Speech track (wav/mp3/m4a, or a video's audio).")
@click.option("--audio2", type=click.Path(dir_okay=False),
              help="A second speaker's track: two people talk (uses the preset's multi-speaker weights: "
                   "itk fetch --variant multi). The video lasts until both are done: the official code stops at "
                   "speaker 1's end.")
@click.option("--audio-mode", type=click.Choice(["add", "para"]), default=None,
              help="Two speakers: add = taking turns, speaker 2 after speaker 1 (default); para = both tracks play "
                   "at once (a shorter one is padded with silence).")
@click.option("--bbox1", default=None, metavar="Y0,X0,Y1,X1",
              help="Two speakers: speaker 1's box in pixels of the image, ROWS FIRST: row_min,col_min,row_max,col_max "
                   "(the official bbox order); without boxes speaker 1 is the left half, speaker 2 the right.")
@click.option("--bbox2", default=None, metavar="Y0,X0,Y1,X1", help="Two speakers: speaker 2's box, as --bbox1.")
@click.option("--text", default=None, metavar='"WORDS"',
              help="Speech from text instead of --audio: Kokoro-82M speaks it (English), written beside the video as "
                   "VIDEO.speech.wav; tag turns (s1) ... (s2) ... for two speakers (itk fetch --component tts; "
                   "pip install 'itk[tts]').")
@click.option("--text-file", default=None, type=click.Path(dir_okay=False),
              help="As --text, from a UTF-8 file (a two-speaker script: (s1) Hello. (s2) Hi there.).")
@click.option("--voice", default=None, metavar="NAME",
              help="Kokoro voice of speaker 1 (default af_heart; any voices/NAME.pt of the Kokoro folder).")
@click.option("--voice2", default=None, metavar="NAME", help="Kokoro voice of speaker 2 (default am_adam).")
@click.option("--speed", default=None, type=float, help="Speech speed from text, 0.5 to 2 (default 1).")
@click.option("--dub-region", type=click.Choice(["full", "face", "bbox"]), default=None,
              help="For --video: where the generated frames replace the source. full (default, as officially): the "
                   "whole frame; face: the speaker's face and mouth, found and tracked, every other pixel the "
                   "source's own with a soft edge; bbox: the --bbox1 (and --bbox2) boxes.")
@click.option("--prompt", default=None, help="Text prompt (default: a neutral talking-person prompt).")
@click.option("--output", default=None, metavar="FILE.mp4", help="Video to write (default: outputs/itk-<time>.mp4).")
@PRESET
@click.option("--input-json", default=None, type=click.Path(dir_okay=False), help=JOB_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a generator setting, e.g. --set sample_steps=20 (repeatable).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Merge your own LoRA (.safetensors) into the DiT, after the preset's; scale default 1 (repeatable).")
@click.option("--gpus", default=None, metavar="N|auto",
              help="GPUs for one video (default: the preset's, 1 for most; auto: every usable one); more than 1 "
                   "runs the generator under torchrun.")
@click.option("--dry-run", is_flag=True,
              help="Check the inputs and print the exact generator command; run nothing (the job file the command "
                   "names is written, so it runs as printed; --text makes the speech first).")
@click.option("--restart", is_flag=True,
              help="Start over: delete the resume state an interrupted run of this --output left (<output>.itk-resume) "
                   "instead of continuing from it.")
@WEIGHTS_DIR
@JSON
@DEBUG
def run(image, video, audio, audio2, audio_mode, bbox1, bbox2, text, text_file, voice, voice2, speed, dub_region,
        prompt, output, preset, input_json, sets, loras, gpus, dry_run, restart, weights_dir, as_json, debug) -> None:
    """Generate a talking-head video: validate, launch the generator, show progress, explain failures."""
    from itk.console import run_friendly, show_dry_run, show_run
    from itk.run import plan_run
    from itk.spec import RunSpec

    def go() -> int:
        spec = RunSpec.from_options(image=image, video=video, audio=audio, audio2=audio2, audio_mode=audio_mode,
                                    bbox1=bbox1, bbox2=bbox2, prompt=prompt, input_json=input_json, output=output,
                                    preset=preset, sets=sets, loras=loras, gpus=gpus, weights_dir=weights_dir,
                                    text=text, text_file=text_file, voice=voice, voice2=voice2, speed=speed,
                                    dub_region=dub_region, restart=restart)
        plan = plan_run(spec)
        return show_dry_run(plan, as_json) if dry_run else show_run(plan, as_json)

    run_friendly(go, debug, as_json)


@cli.command(context_settings={"max_content_width": 110})
@click.argument("jobs_file", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output folder: each job's video, its run folder (log, verdict) and the job store "
                   "(default: the job file's name without .jsonl). On a shared filesystem for a cluster.")
@click.option("--gpus", default=None, metavar="all|N",
              help="GPUs to use, one warm generator each (default: all; on a machine without one: one on the CPU).")
@PRESET
@click.option("--status", "status_dir", default=None, type=click.Path(file_okay=False),
              help="Show the jobs of the batch in this folder (also while it runs, from another terminal) and exit.")
@click.option("--eval", "evaluate", is_flag=True,
              help="Also write each finished video's `itk eval` beside it (VIDEO.eval.json: colour drift, seams, "
                   "lip-sync when SyncNet's weights are here).")
@RAY
@WEIGHTS_DIR
@JSON
@DEBUG
def batch(jobs_file, out_dir, gpus, preset, status_dir, evaluate, ray_address, weights_dir, as_json, debug) -> None:
    """Make many videos: one job per line of JOBS_FILE, run by one warm generator per GPU that keeps its
    models loaded between jobs. The same command again skips finished jobs and resumes an interrupted one
    from its last finished clip; Ctrl-C stops cleanly (a second one at once).

    \b
    Job file (JSON Lines): the official job format plus optional output, preset, seed, settings (and text, voice,
    voice2, speed instead of cond_audio: speech from text):
    {"prompt": "A woman is talking.", "cond_video": "anna.png", "cond_audio": {"person1": "anna-01.wav"},
     "output": "anna-01.mp4", "preset": "rtx4090-24g-fast", "seed": 7, "settings": {"sample_steps": 6}}
    Relative paths: the current folder, then the job file's folder. A bad line is reported with its number
    before anything runs; a job whose input turns out unusable fails alone, with its fix.

    \b
    Exit codes: 0 every job done, 1 a job failed, 2 a bad job file or option, 130 stopped.
    """
    from itk.console import run_friendly, show_batch, show_batch_status

    def go() -> int:
        if status_dir:
            return show_batch_status(status_dir, as_json)
        if not jobs_file:
            from itk.runtime.protocol import EXIT_BAD_INPUT, UserError

            raise UserError("no job file given", "itk batch JOBS.jsonl (one job per line), or itk batch --status DIR",
                            EXIT_BAD_INPUT)
        return show_batch(jobs_file, out_dir=out_dir, gpus=gpus, preset=preset, weights_dir=weights_dir,
                          as_json=as_json, ray=ray_address, evaluate=evaluate)

    run_friendly(go, debug, as_json)


@cli.command("serve", context_settings={"max_content_width": 110})
@click.option("--port", default=8419, show_default=True, type=click.IntRange(0, 65535),
              help="Port to serve on (0: any free one; the first line printed says which).")
@click.option("--listen", is_flag=True,
              help="Serve on every network interface (default: 127.0.0.1 only); needs --token.")
@click.option("--token", default=None, envvar="ITK_SERVE_TOKEN", metavar="TOKEN",
              help="Every request must send `Authorization: Bearer TOKEN` (required with --listen). Default: "
                   "$ITK_SERVE_TOKEN, which keeps it out of the process list.")
@click.option("--out", "out_dir", default="outputs/serve", show_default=True, type=click.Path(file_okay=False),
              help="The job folder: its store, and per job ID its uploads (ID.inputs/), video (ID.mp4) and run "
                   "folder (ID.run/: log, verdict).")
@click.option("--allow-paths", default=None, type=click.Path(file_okay=False), metavar="FOLDER",
              help="Also take JSON jobs naming files on this machine, inside FOLDER only (default: uploads only).")
@click.option("--max-upload-mb", default=200, show_default=True, type=click.IntRange(1),
              help="The largest uploaded file (image, video or speech).")
@click.option("--gpus", default=None, metavar="all|N",
              help="GPUs to use, one warm generator each (default: all; on a machine without one: one on the CPU).")
@PRESET
@RAY
@WEIGHTS_DIR
@JSON
@DEBUG
def serve_(port, listen, token, out_dir, allow_paths, max_upload_mb, gpus, preset, ray_address, weights_dir, as_json,
           debug) -> None:
    """Serve the job queue over HTTP: POST /v1/videos (multipart image or video + speech + job JSON) returns a
    job id at once; GET /v1/videos/ID (state, progress, ETA, error + fix), GET /v1/videos/ID/content (the mp4),
    DELETE /v1/videos/ID (cancel; again once ended: delete), GET /v1/videos?state=... The API page is /docs.

    \b
    One warm generator per GPU takes the jobs from the folder's store (the same as itk batch: `itk batch
    --status DIR` shows them). Killed, the same command carries on: queued jobs wait, a running one resumes
    from its last finished clip. Ctrl-C stops it cleanly (running jobs go back to the queue).

    \b
    Exit codes: 0 stopped, 1 a worker could not start, 2 a bad option, a busy port or folder.
    """
    from itk.console import run_friendly
    from itk.serve import show_serve

    run_friendly(lambda: show_serve(out=out_dir, port=port, listen=listen, token=token, allow_paths=allow_paths,
                                    gpus=gpus, preset=preset, weights_dir=weights_dir, max_upload_mb=max_upload_mb,
                                    as_json=as_json, ray=ray_address), debug, as_json)


@cli.command("eval", context_settings={"max_content_width": 110})
@click.argument("video", type=click.Path(dir_okay=False))
@click.option("--reference", default=None, type=click.Path(dir_okay=False),
              help="The portrait or source video it was made from: colour drift against it, and for a video "
                   "(dubbing) the drift outside the speaker.")
@click.option("--audio", default=None, type=click.Path(dir_okay=False),
              help="The speech to score lip-sync against (default: the video's own sound).")
@click.option("--bbox", "boxes", multiple=True, metavar="Y0,X0,Y1,X1",
              help="A dub's speaker region in source pixels, rows first (repeatable; default: the face, found).")
@click.option("--first-clip", default=81, show_default=True, type=click.IntRange(1),
              help="Frames of the first clip (the generator's frame_num).")
@click.option("--clip-step", default=72, show_default=True, type=click.IntRange(1),
              help="New frames of each later clip (frame_num - motion_frame).")
@click.option("--plot", "plot_file", default=None, type=click.Path(dir_okay=False),
              help="Also draw colour drift, seams and lip-sync per clip over time into this PNG.")
@WEIGHTS_DIR
@JSON
@DEBUG
def eval_(video, reference, audio, boxes, first_clip, clip_step, plot_file, weights_dir, as_json, debug) -> None:
    """Measure a video per clip and whole: colour drift (CIEDE2000 against the first clip and the reference),
    seams at the joins between clips, drift outside the speaker for a dub, and lip-sync (SyncNet's Sync-C /
    Sync-D, once `itk fetch --component syncnet` has fetched its weights).

    \b
    Exit codes: 0 measured, 2 an unreadable video, no sound to score, or mismatched lengths.
    """
    from itk.console import run_friendly, show_eval

    run_friendly(lambda: show_eval(video, reference=reference, audio=audio, boxes=boxes, first_clip=first_clip,
                                   clip_step=clip_step, plot_file=plot_file, weights_dir=weights_dir,
                                   as_json=as_json), debug, as_json)


@cli.command()
@click.argument("logfile", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--exit-code", type=int, default=None, help="The run's exit status (137, -9, 1, ...) if known.")
@PRESET
@JSON
@DEBUG
def diagnose(logfile, exit_code, preset, as_json, debug) -> None:
    """Explain a failed run from its log (itk's, or the official generate_infinitetalk.py / app.py);
    LOGFILE `-` reads standard input.

    \b
    Exit codes:
      0  the failure is recognised (or the log shows none)
      1  itk does not recognise the failure (read the log's end)
      2  the log cannot be read, or a bad option
    """
    from itk.console import run_friendly, show_verdict
    from itk.diagnose import run_diagnose

    run_friendly(lambda: show_verdict(run_diagnose(logfile, exit_code, preset), as_json), debug, as_json)


@cli.command()
@JSON
@DEBUG
def presets(as_json, debug) -> None:
    """List the presets, what each needs, and which one this machine gets."""
    from itk.console import run_friendly, show_presets
    from itk.presets import run_presets

    run_friendly(lambda: show_presets(run_presets(), as_json), debug, as_json)


@cli.command()
@PRESET
@click.option("--component", "components", multiple=True, help="Fetch only this manifest component (repeatable).")
@click.option("--all", "all_files", is_flag=True, help="Every file of the three repos, like the guide's downloads.")
@click.option("--variant", type=click.Choice(["single", "multi"]), default="single", show_default=True,
              help="The InfiniteTalk DiT: single speaker, or multi for two speakers (itk run --audio2).")
@click.option("--dry-run", is_flag=True, help="Show the plan (files, sizes, what is missing, free disk) and stop.")
@WEIGHTS_DIR
@click.option("--jobs", default=4, show_default=True, type=click.IntRange(1, 32), help="Files downloaded at once.")
@JSON
@DEBUG
def fetch(preset, components, all_files, variant, dry_run, weights_dir, jobs, as_json, debug) -> None:
    """Download exactly the weights a preset needs from Hugging Face, verified; a rerun keeps finished files."""
    from itk.console import run_friendly
    from itk.fetch import run_fetch

    run_friendly(lambda: run_fetch(preset, components, all_files, dry_run, weights_dir, jobs, as_json, variant),
                 debug, as_json)


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to write the tiny weights and the video (default: ~/.cache/itk/selftest, reused).")
@click.option("--two-speakers", is_flag=True,
              help="Two speakers on tiny multi-speaker weights (itk run --audio2 ...), instead of one.")
@JSON
@DEBUG
def selftest(workdir, two_speakers, as_json, debug) -> None:
    """Generate a short video on tiny random weights the way `itk run` does (plan, supervisor, advice) with
    the real generator; print the mp4 path, and last what works on this machine and what to do next."""
    from itk.console import run_friendly, show_selftest

    run_friendly(lambda: show_selftest(workdir, as_json, two_speakers), debug, as_json)


@cli.command()
@click.option("--port", default=8418, show_default=True, type=click.IntRange(1, 65535), help="Port to serve on.")
@click.option("--listen", is_flag=True,
              help="Serve on every network interface (default: 127.0.0.1 only); needs --auth.")
@click.option("--auth", default=None, metavar="USER:PASS", help="Ask for this user name and password.")
@click.option("--output-dir", default="outputs", show_default=True, type=click.Path(file_okay=False),
              help="Where every job's uploads, job file, log and video go.")
@click.option("--queue", "queue_dir", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="Also show the jobs of the `itk batch`/`itk serve` writing to DIR (read-only, refreshed every "
                   "few seconds).")
@WEIGHTS_DIR
@DEBUG
def ui(port, listen, auth, output_dir, queue_dir, weights_dir, debug) -> None:
    """A web page for doctor, fetch and run: open it in a browser, drop in a portrait and speech, get a video."""
    from itk.console import run_friendly
    from itk.ui import serve

    run_friendly(lambda: serve(port, listen, auth, output_dir, weights_dir, queue_dir=queue_dir), debug)


def main(argv: list[str] | None = None) -> None:
    """click's own errors (a bad option, a missing argument) also come as JSON on stdout with --json."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args, prog_name="itk", standalone_mode=False)
    except click.ClickException as exc:
        if "--json" not in args:
            exc.show()
            raise SystemExit(exc.exit_code) from None
        from itk.console import show_error

        raise SystemExit(show_error(exc.format_message(), "itk COMMAND --help lists the options", exc.exit_code,
                                    as_json=True)) from None
    except click.exceptions.Abort:
        from itk.console import show_error
        from itk.runtime.protocol import EXIT_INTERRUPTED

        raise SystemExit(show_error("interrupted", "", EXIT_INTERRUPTED, as_json="--json" in args)) from None
    raise SystemExit(code or 0)
