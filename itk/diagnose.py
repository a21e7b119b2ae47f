"""`itk diagnose LOG`: the advice rules on any log (an itk run's, or one from the official
generate_infinitetalk.py / app.py), and the one renderer of a verdict that `itk run` shares."""

from __future__ import annotations

import json
import re
from pathlib import Path

from itk.advice import Verdict, diagnose, machine_facts
from itk.atomic import atomic_write_text
from itk.console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UserError, console, print_json

MAX_LOG_BYTES = 8 * 2**20  # the end of a log holds the failure; tqdm-heavy logs can be huge
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def read_log(path: Path) -> str:
    """The log's last MAX_LOG_BYTES as text, colour codes removed and tqdm's carriage returns made lines."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - MAX_LOG_BYTES))
            raw = f.read()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", "give the path of a log file", EXIT_USAGE) from None
    return ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\r\n", "\n").replace("\r", "\n")


def render(verdict: Verdict) -> None:
    colour = {"ok": "green", "unknown": "yellow"}.get(verdict.rule, "red")
    console.print(f"[bold {colour}]{verdict.title}[/] [dim]({verdict.rule})[/]", highlight=False, soft_wrap=True)
    console.print(f"  {verdict.diagnosis}", highlight=False, soft_wrap=True)
    if verdict.evidence and verdict.rule != "unknown":
        console.print(f"  [dim]seen: {verdict.evidence[:200]}[/]", highlight=False, soft_wrap=True)
    for line in verdict.details:
        console.print(f"  [dim]•[/] {line}", highlight=False, soft_wrap=True)
    if verdict.fixes:
        console.print("[bold]what to do:[/]")
        for i, fix in enumerate(verdict.fixes, 1):
            console.print(f"  {i}. {fix}", highlight=False, soft_wrap=True)
    if verdict.check:
        console.print(f"[bold]check:[/] itk doctor --only {verdict.check}", highlight=False, soft_wrap=True)
    for hint in verdict.hints:
        console.print(f"[yellow]also noticed ({hint['rule']}):[/] {hint['diagnosis']}", highlight=False, soft_wrap=True)
    if verdict.log:
        console.print(f"[dim]log: {verdict.log}[/]", highlight=False, soft_wrap=True)


def write_verdict(verdict: Verdict, path: Path) -> None:
    atomic_write_text(path, json.dumps(verdict.to_json(), indent=2))


def run_diagnose(logfile: str, exit_code: int | None, preset: str | None, as_json: bool) -> int:
    """Exit 0 when the log's failure is recognised (or there is none), 1 when it is not."""
    path = Path(logfile)
    facts = machine_facts()
    if preset:
        from itk.doctor import resolve_preset

        facts["preset"] = resolve_preset(preset)[0].name
    verdict = diagnose(read_log(path), exit_code, facts, str(path))
    if as_json:
        print_json(verdict.to_json())
    else:
        render(verdict)
    return EXIT_FAILED if verdict.rule == "unknown" else EXIT_OK
