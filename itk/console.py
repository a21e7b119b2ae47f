"""Rendering for people (rich) and machines (--json); exit codes; one-line errors instead of tracebacks.

Commands return results (itk.doctor.DoctorReport, itk.presets.PresetListing, itk.advice.Verdict, itk.run.Plan
and RunResult); the `show_*` functions here render one and return the exit code.
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

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: str, fix: str = "") -> None:
    # soft_wrap: never break a path or a command at the console width (it must stay copy-pasteable)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if fix:
        err_console.print(f"[bold]fix:[/] {fix}", highlight=False, soft_wrap=True)


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
    """Turn UserError / the protocol's BadInput (and, without --debug, any exception) into a one-line
    message and an exit code; with --json the error is JSON on stdout: {"error", "fix", "exit_code"}."""
    try:
        yield
        return
    except UserError as exc:
        error = (exc.message, exc.fix, exc.exit_code)
    except BadInput as exc:
        error = (exc.message, exc.fix, EXIT_USAGE)
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


def table_or_lines(columns: list[str], rows: list[list[str]], out: Console | None = None) -> None:
    """A table in a terminal; outside one (a pipe, a CI log, tee) each row as one soft-wrapped line, so no
    cell (a path, a fix) is folded mid-word at rich's default 80 columns: "✓ check | result"."""
    out = out or console
    if not out.is_terminal:
        marked = columns[0] == ""  # a first column of symbols (✓, →) leads the line
        for row in rows:
            lead = f"{row[0]} " if marked and row[0] else ""
            say(lead + " | ".join(cell for cell in row[int(marked):] if cell), out)
        return
    from rich.table import Table

    table = Table(show_header=any(columns), header_style="bold", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")  # fold wraps on whitespace first; only a too-long word folds
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
    say(f"[bold]preset[/] {report.preset_reason}")
    table_or_lines(["", "check", "result"], [[SYMBOLS[r.status.value], r.id, r.summary] for r in report.results])
    problems = [r for r in report.results if r.status.value in ("warn", "fail")]
    for r in report.results:
        if verbose or r in problems:
            shown = r.details if verbose else r.details[:DETAIL_LINES]
            for line in shown:
                say(f"  [dim]{r.id}:[/] {line}")
            if len(shown) < len(r.details):
                say(f"  [dim]{r.id}: ... and {len(r.details) - len(shown)} more (itk doctor -v lists them all)[/]")
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
    rows = []
    for row in listing.rows:
        fits = "fits" if not row["unmet"] else "lacks " + "; ".join(row["unmet"])
        rows.append(["→" if row["chosen"] else "", row["name"], row["status"], row["requirements"],
                     f"{row['download_gb']:.1f} GB", fits, row["summary"]])
    table_or_lines(["", "preset", "status", "needs", "download", "this machine", "what it is"], rows)
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
    say(f"  {verdict.diagnosis}")
    if verdict.evidence and verdict.rule != "unknown":
        say(f"  [dim]seen: {clip_words(verdict.evidence, 200)}[/]")
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
    return [
        f"preset {plan.preset_reason}",
        f"input: {m.kind} {m.width}x{m.height}, audio {audio} -> {m.video_s:.1f} s of video, "
        f"{m.clips} clip(s) x {plan.steps} steps; {plan.estimate}",
        *plan.speaker_layout,
        *([plan.resume] if plan.resume else []),
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
    if plan.weights_problem:
        say(f"[yellow]note:[/] {plan.weights_problem}; {plan.weights_fix}", err_console)
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
        again = "; the same command resumes from the last finished clip" if result.resumable else ""
        say(f"[yellow]interrupted:[/] the generator and all its processes were stopped{again}; log: {result.log}",
            out)
    elif result.ok and not as_json:
        length = f"{result.video_s:.1f} s" if result.video_s else "unknown length"
        peak = f", GPU peak {result.gpu_peak_gb:.1f} GB" if result.gpu_peak_gb else ""
        say(f"[green]done:[/] {result.output} ({length} of video) in {took(result.elapsed_s)}{peak}")
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
                line = f"selftest: generator step {event.get('step')} of {event.get('steps')}"
            elif event.get("stage"):
                line = f"selftest: {event['stage']}"
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
    say(f"video: {result.run.output}")
    say(closing_line(machine.gather()))
    return EXIT_OK
