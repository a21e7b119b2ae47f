"""Rendering for people (rich) and machines (--json); exit codes; one-line errors instead of tracebacks.

Commands return results (itk.doctor.DoctorReport, itk.presets.PresetListing, itk.advice.Verdict, itk.run.Plan
and RunResult); the `show_*` functions here render one and return the exit code.
Result modules are imported where used, so `itk --help` stays light.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from itk.runtime.protocol import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UserError, stage_words

if TYPE_CHECKING:
    from itk.advice import Verdict
    from itk.doctor import DoctorReport
    from itk.presets import PresetListing
    from itk.run import Plan, RunResult

console = Console(emoji=False)  # a user's :name: is printed as it is, never as an emoji
err_console = Console(stderr=True, emoji=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: str, fix: str = "") -> None:
    # soft_wrap: never break a path or a command at the console width (it must stay copy-pasteable)
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if fix:
        err_console.print(f"[bold]fix:[/] {escape(fix)}", highlight=False, soft_wrap=True)


def show_error(message: str, fix: str, exit_code: int, as_json: bool = False) -> int:
    """One error, for people (two lines on stderr) or, with --json, as JSON on stdout; returns the exit code."""
    if as_json:
        print_json({"error": message, "fix": fix, "exit_code": exit_code})
    else:
        print_error(message, fix)
    return exit_code


def say(line: str, out: Console | None = None) -> None:
    (out or console).print(line, highlight=False, soft_wrap=True)


@contextmanager
def friendly_errors(debug: bool, as_json: bool = False) -> Iterator[None]:
    """Turn UserError (the protocol's BadInput among them; without --debug, any exception) into a one-line
    message and an exit code; with --json the error is JSON on stdout: {"error", "fix", "exit_code"}."""
    try:
        yield
        return
    except UserError as exc:
        error = (exc.message, exc.fix, exc.exit_code)
    except KeyboardInterrupt:
        error = ("interrupted", "", EXIT_INTERRUPTED)
    except (SystemExit, Exception) as exc:
        if isinstance(exc, SystemExit) or debug:
            raise
        error = (f"{type(exc).__name__}: {exc}", "rerun with --debug for the full traceback", EXIT_FAILED)
    raise SystemExit(show_error(*error, as_json=as_json))


def run_friendly(fn: Callable[[], int | None], debug: bool, as_json: bool = False) -> None:
    with friendly_errors(debug, as_json):
        code = fn() or EXIT_OK
    raise SystemExit(code)


def table_or_lines(columns: list[str], rows: list[list[str]], out: Console | None = None,
                   whole: tuple[int, ...] = ()) -> None:
    """A table in a terminal; outside one (a pipe, a CI log, tee) each row as one soft-wrapped line, so no
    cell (a path, a fix) is folded mid-word at rich's default 80 columns: "✓ check | result". `whole`: the
    columns (indices) whose cells are never wrapped in a table either (names a person copies)."""
    out = out or console
    if not out.is_terminal:
        marked = columns[0] == ""  # a first column of symbols (✓, →) leads the line
        for row in rows:
            lead = f"{row[0]} " if marked and row[0] else ""
            say(lead + " | ".join(cell for cell in row[int(marked):] if cell), out)  # cells: markup, escaped
        return
    from rich.table import Table

    table = Table(show_header=any(columns), header_style="bold", box=None, pad_edge=False)
    for i, column in enumerate(columns):
        # fold wraps on whitespace first; only a too-long word folds
        table.add_column(column, overflow="fold", no_wrap=i in whole, min_width=len(max(
            (row[i] for row in rows), key=len, default="")) if i in whole else None)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def clip_words(text: str, width: int) -> str:
    """`text` cut to at most `width` characters at a word boundary, with an ellipsis when cut."""
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    head = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return head.rstrip() + "…"


def took(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# --- itk doctor ------------------------------------------------------------------------------------------
SYMBOLS = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]", "skip": "[dim]-[/]"}


DETAIL_LINES = 5  # details shown per problem without -v; the rest are counted


def show_doctor(report: DoctorReport, as_json: bool, verbose: bool = False) -> int:
    """flutter doctor's shape: one line per check, details only where something is wrong (all with -v; a
    long list, such as missing weight files, summarised), every fix, and a closing summary line."""
    if as_json:
        print_json(report.to_json())
        return report.exit_code
    say(f"[bold]preset[/] {escape(report.preset_reason)}")
    rows = [[SYMBOLS[r.status.value], r.id, escape(r.summary)] for r in report.results]
    table_or_lines(["", "check", "result"], rows)
    problems = [r for r in report.results if r.status.value in ("warn", "fail")]
    for r in report.results:
        if verbose or r in problems:
            shown = r.details if verbose else r.details[:DETAIL_LINES]
            for line in shown:
                say(f"  [dim]{r.id}:[/] {escape(line)}")
            if len(shown) < len(r.details):
                say(f"  [dim]{r.id}: ... and {len(r.details) - len(shown)} more (itk doctor -v lists them all)[/]")
    for r in problems:
        if r.fix:
            say(f"{SYMBOLS[r.status.value]} [bold]{r.id}[/] fix: {escape(r.fix)}")
    say(f"[bold]{report.summary}[/] [dim]({report.elapsed_s:.1f} s)[/]")
    return report.exit_code


# --- itk presets -----------------------------------------------------------------------------------------
def show_presets(listing: PresetListing, as_json: bool) -> int:
    if as_json:
        print_json(listing.to_json())
        return EXIT_OK
    rows = []
    for row in listing.rows:
        fits = "fits" if not row["unmet"] else "does not fit: " + "; ".join(row["unmet"])
        rows.append(["→" if row["chosen"] else "", row["name"], row["status"], row["requirements"],
                     f"{row['download_gb']:.1f} GB", fits, row["summary"]])
    table_or_lines(["", "preset", "status", "needs", "download", "this machine", "what it is"], rows, whole=(1,))
    for row in listing.rows:
        say(f"[dim]{row['name']}: {row['provenance']}[/]")
    say(f"[bold]this machine gets:[/] {listing.reason}")
    for line in listing.alternatives:
        say(f"  [dim]•[/] {line}")
    say("[dim]two speakers (itk run --audio2): every preset runs them on its multi-speaker DiT; "
        "`itk fetch --preset NAME --variant multi` adds it[/]")
    return EXIT_OK


# --- verdicts (itk diagnose, a failed itk run) -----------------------------------------------------------
def render_verdict(verdict: Verdict) -> None:
    colour = {"ok": "green", "unknown": "yellow"}.get(verdict.rule, "red")
    say(f"[bold {colour}]{verdict.title}[/] [dim]({verdict.rule})[/]")
    say(f"  {escape(verdict.diagnosis)}")
    if verdict.evidence and verdict.rule != "unknown":
        say(f"  [dim]seen: {escape(clip_words(verdict.evidence, 200))}[/]")
    for line in verdict.details:
        say(f"  [dim]•[/] {escape(line)}")
    if verdict.fixes:
        console.print("[bold]what to do:[/]")
        for i, fix in enumerate(verdict.fixes, 1):
            say(f"  {i}. {escape(fix)}")
    if verdict.check:
        say(f"[bold]check:[/] itk doctor --only {verdict.check}")
    for hint in verdict.hints:
        say(f"[yellow]also noticed ({hint['rule']}):[/] {escape(hint['diagnosis'])}")
    if verdict.log:
        say(f"[dim]log: {escape(verdict.log)}[/]")


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
    return [
        f"preset {escape(plan.preset_reason)}",
        f"input: {m.kind} {m.width}x{m.height}, audio {audio} -> {m.video_s:.1f} s of video, "
        f"{m.clips} clip(s) x {plan.steps} steps; {escape(plan.estimate)}",
        *map(escape, plan.speaker_layout),
        *([escape(plan.resume)] if plan.resume else []),
        *(f"[yellow]warning:[/] {escape(w)}" for w in m.warnings),
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
    if plan.weights_problem:
        say(f"[yellow]note:[/] {escape(plan.weights_problem)}; {escape(plan.weights_fix)}", err_console)
    say(escape(plan.command_line))
    return EXIT_OK


def show_run(plan: Plan, as_json: bool) -> int:
    """Run the plan with progress bars (on stderr with --json, whose stdout is the result alone)."""
    from itk.progress import ProgressView
    from itk.run import run_job

    plan.require_gpus()
    plan.require_weights()
    out = err_console if as_json else console
    for line in plan_lines(plan):
        say(line, out)
    say(f"log: {escape(str(plan.log_path))}", out)
    with ProgressView(out, plan.media.clips, plan.steps, plan.expected_step_s) as view:
        view.resume_told = plan.resume is not None  # said above, with the plan: once is enough
        result = run_job(plan, on_event=view.handle)
    return show_run_result(result, as_json, out)


def show_run_result(result: RunResult, as_json: bool, out: Console | None = None) -> int:
    if as_json:
        print_json(result.to_json())
    if result.interrupted:
        again = "; the same command resumes from the last finished clip" if result.resumable else ""
        say(f"[yellow]interrupted:[/] the generator and all its processes were stopped{again}; log: "
            f"{escape(str(result.log))}",
            out)
    elif result.ok and not as_json:
        length = f"{result.video_s:.1f} s" if result.video_s else "unknown length"
        peak = f", GPU peak {result.gpu_peak_gb:.1f} GB" if result.gpu_peak_gb else ""
        say(f"[green]done:[/] {escape(str(result.output))} ({length} of video) in {took(result.elapsed_s)}{peak}")
    elif result.verdict is not None and not as_json:
        render_verdict(result.verdict)
    return result.exit_code


# --- itk selftest ----------------------------------------------------------------------------------------
def show_selftest(workdir: str | None, as_json: bool, two_speakers: bool = False) -> int:
    """Run the selftest with its stages on a status line; passed: what was checked, the mp4's path, and last
    the closing line (what works on this machine, what does not, what to do next)."""
    from itk import machine
    from itk.selftest import closing_line, run_selftest

    out = err_console if as_json else console
    with out.status("selftest: starting", spinner="dots") as status:
        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "step":
                clip = f"clip {event.get('clip')}, " if event.get("clip") else ""
                line = f"selftest: generator {clip}step {event.get('step')} of {event.get('steps')}"
            elif event.get("stage"):
                line = f"selftest: {stage_words(event['stage'])}"
            else:
                return
            if out.is_terminal:
                status.update(line)
            else:  # a pipe or a CI log gets no live status line: one line per stage instead
                say(f"[dim]{line}[/]", out)

        result = run_selftest(workdir, on_event, two_speakers)
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
    say(f"checked in {result.seconds} s: {video['frames']} frames at {video['fps']:g} fps, {video['audio_s']} s of "
        "audio")
    say(f"video: {escape(str(result.run.output))}")
    say(escape(closing_line(machine.gather())))
    return EXIT_OK


# --- itk batch -----------------------------------------------------------------------------------------
STATE_WORDS = {"done": "[green]done[/]", "failed": "[red]failed[/]", "queued": "waiting", "running": "[cyan]running[/]",
               "cancelled": "[yellow]cancelled[/]"}


def batch_headline(counts: dict[str, int], eta: float | None = None) -> str:
    """"12 done, 1 failed, 7 left (2 running) · ETA 14 min 10 s"."""
    left = counts.get("queued", 0) + counts.get("running", 0)
    parts = [f"{counts.get('done', 0)} done", f"{counts.get('failed', 0)} failed", f"{left} left"]
    running = f" ({counts['running']} running)" if counts.get("running") else ""
    cancelled = f", {counts['cancelled']} cancelled" if counts.get("cancelled") else ""
    return ", ".join(parts) + running + cancelled + (f" · ETA {took(eta)}" if eta is not None else "")


def batch_board(batch: Any) -> Any:
    """The live view of a batch: the counts and ETA, then each worker's job with its clip and step."""
    from rich.console import Group
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_header=False)
    for column in ("worker", "job", "where"):
        table.add_column(column, overflow="fold")
    for view in batch.views:
        where = (f"clip {max(view.clip, 1)} of {view.clips or '?'} · step {view.step} of {view.steps or '?'}"
                 if view.steps else escape(stage_words(view.stage)))
        restarts = f" (restarted {view.restarts}x)" if view.restarts else ""
        table.add_row(f"[bold]{view.label}[/]{restarts}", escape(view.job or "-"), where)
    counts = batch.counts()
    eta = batch.eta_s(counts)
    note = "" if eta is not None or not counts["queued"] else " · ETA after the first job"
    return Group(f"[bold]batch[/] {escape(str(batch.folder))}: {batch_headline(counts, eta)}{note}", table)


def job_line(job: Any) -> str:
    """One finished job for people: what it made, or why not."""
    name = escape(job.name)
    if job.state == "done":
        length = f"{job.video_s:.1f} s of video" if job.video_s else "video"
        note = f"; {escape(job.note)}" if job.note else ""
        return f"[green]done[/] {name}: {length} in {took(job.busy_s)} -> {escape(str(job.output))}{note}"
    if job.state == "failed":
        fix = f" [bold]fix:[/] {escape(job.fix)}" if job.fix else ""
        return f"[red]failed[/] {name}: {escape(job.error or 'unknown error')}{fix}"
    if job.state == "cancelled":
        return f"[yellow]cancelled[/] {name}"
    return f"{STATE_WORDS.get(job.state, job.state)} {name}" + (f": {escape(job.note)}" if job.note else "")


def show_batch_jobs(jobs: list[Any], out: Console) -> None:
    """The closing table: every job with its state, video length, time and video or error + fix."""
    rows = []
    for job in jobs:
        what = escape(str(job.output)) if job.state == "done" else escape(job.error or job.note or "")
        if job.state == "failed" and job.fix:
            what += f" [bold]fix:[/] {escape(job.fix)}"
        if job.state == "running":
            what = f"{escape(job.worker or '')}: clip {job.clip or '?'} of {job.clips or '?'}, step {job.step or 0}"
        video = f"{job.video_s:.1f} s" if job.video_s else ""
        rows.append([escape(job.name), STATE_WORDS.get(job.state, job.state), video,
                     took(job.busy_s) if job.busy_s else "", str(job.attempts), what])
    table_or_lines(["job", "state", "video", "time", "tries", "video or reason"], rows, out)


def show_batch(jobs_file: str, *, out_dir: str | None, gpus: str | None, preset: str | None,
               weights_dir: str | None, as_json: bool, ray: str | None = None, evaluate: bool = False) -> int:
    """Run a batch with a live board (in a terminal; elsewhere one line per finished job), then the table of
    every job and a summary line; with --json the result alone on stdout."""
    from pathlib import Path

    from rich.live import Live

    from itk.batch import run_batch

    out = err_console if as_json else console
    folder = Path(out_dir) if out_dir else Path(jobs_file).with_suffix("")
    seen: dict[str, str] = {}

    def report(batch: Any) -> None:
        """Outside a terminal: a line per job as it ends (the jobs already ended when the batch started are not
        said again)."""
        for job in batch.store.jobs(names=batch.jobs):
            if seen.get(job.name) != job.state and job.state in ("done", "failed", "cancelled") and job.name in seen:
                say(job_line(job), out)
            seen[job.name] = job.state

    live = Live(console=out, refresh_per_second=4, transient=True) if out.is_terminal else None
    on_change = (lambda batch: live.update(batch_board(batch))) if live is not None else report
    with live if live is not None else contextlib.nullcontext():
        result = run_batch(Path(jobs_file), out=folder, gpus=gpus, preset=preset,
                           weights_dir=Path(weights_dir) if weights_dir else None, on_change=on_change, ray=ray,
                           evaluate=evaluate)
    if as_json:
        print_json(result.to_json())
        return result.exit_code
    show_batch_jobs(result.jobs, out)
    stopped = "[yellow]stopped:[/] " if result.interrupted else ""
    again = "; the same command carries on where it stopped" if result.counts["queued"] else ""
    say(f"{stopped}batch {escape(str(result.folder))}: {batch_headline(result.counts)} in {took(result.elapsed_s)}"
        f"{again}", out)
    return result.exit_code


def show_batch_status(folder: str, as_json: bool) -> int:
    """A batch's jobs as its store holds them, from any terminal (also while it runs)."""
    from pathlib import Path

    from itk.batch import batch_status

    jobs = batch_status(Path(folder))
    if as_json:
        print_json({"folder": folder, "jobs": [job.to_json() for job in jobs]})
        return EXIT_OK
    show_batch_jobs(jobs, console)
    counts = {state: sum(1 for j in jobs if j.state == state) for state in STATE_WORDS}
    say(f"batch {escape(folder)}: {batch_headline(counts)}")
    return EXIT_OK


# --- itk eval ------------------------------------------------------------------------------------------
def show_eval(video: str, *, reference: str | None, audio: str | None, boxes: tuple[str, ...], first_clip: int,
              clip_step: int, plot_file: str | None, weights_dir: str | None, as_json: bool) -> int:
    """The per-clip table (drift, seam, lip-sync) and the whole-video lines; --json: the numbers alone."""
    from pathlib import Path

    from itk.evaluate import ClipLayout, EvalRequest, evaluate, plot, syncnet_weights
    from itk.runtime.paths import weights_dir as resolve_weights_dir
    from itk.spec import parse_box

    request = EvalRequest(video=Path(video), reference=Path(reference) if reference else None,
                          audio=Path(audio) if audio else None, layout=ClipLayout(first_clip, clip_step),
                          syncnet=syncnet_weights(resolve_weights_dir(weights_dir)),
                          boxes=tuple(tuple(parse_box(b, "--bbox")) for b in boxes))
    result = evaluate(request)
    drawn = plot(result, plot_file) if plot_file else None
    if as_json:
        print_json({**result.to_json(), **({"plot": str(drawn)} if drawn else {})})
        return EXIT_OK
    rows = []
    for clip in result.clips:
        seam = "" if clip.seam_ratio is None else f"{clip.seam_ratio:.2f}" + (" [red]seam[/]" if clip.seam_flagged
                                                                              else "")
        sync = "" if clip.sync_c is None else f"{clip.sync_c:.2f} / {clip.sync_d:.2f}"
        ref = "" if clip.delta_e_vs_reference is None else f"{clip.delta_e_vs_reference:.2f}"
        outside = "" if clip.outside_mad is None else f"{clip.outside_mad:.2f}"
        rows.append([str(clip.index), f"{clip.start_s:.1f} s", f"{clip.delta_e_vs_first:.2f}", ref, seam, outside,
                     sync])
    columns = ["clip", "starts", "ΔE vs first", "ΔE vs reference", "seam ratio", "outside MAD", "Sync-C / Sync-D"]
    keep = [i for i, name in enumerate(columns) if i < 3 or any(row[i] for row in rows)]
    table_or_lines([columns[i] for i in keep], [[row[i] for i in keep] for row in rows])
    say(f"[bold]{escape(result.video)}[/]: {result.duration_s:.1f} s, {len(result.clips)} clip(s) of "
        f"{result.layout.first} then {result.layout.step} new frames")
    if result.drift_vs_first_per_minute is not None:
        say(f"colour drift: {result.drift_vs_first_per_minute:+.2f} ΔE per minute against the first clip"
            + (f", {result.drift_vs_reference_per_minute:+.2f} against the reference"
               if result.drift_vs_reference_per_minute is not None else ""))
    seams = ", ".join(map(str, result.seams))
    say(f"seams: {'flagged at the start of clip ' + seams if seams else 'none flagged'} (median change between "
        f"frames {result.median_change:.2f})")
    if result.outside is not None:
        o = result.outside
        say(f"outside the speaker ({o.region}): mean difference {o.mad:.2f} to the source, codec floor {o.floor:.2f}, "
            f"drift {o.drift:.2f}")
    if result.sync is not None:
        s = result.sync
        say(f"lip-sync: Sync-C {s.confidence:.2f}, Sync-D {s.distance:.2f}, offset {s.offset:+d} frames "
            f"({s.windows} windows)")
    for note in result.notes:
        say(f"[dim]note:[/] {escape(note)}")
    if drawn:
        say(f"plot: {escape(str(drawn))}")
    return EXIT_OK
