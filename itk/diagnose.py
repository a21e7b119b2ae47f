"""`itk diagnose LOG`: the advice rules on any log (an itk run's, or one from the official
generate_infinitetalk.py / app.py). itk.console renders the verdict, the same way for `itk run`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from itk.advice import Verdict, diagnose
from itk.runtime.atomic import atomic_write_text
from itk.runtime.protocol import EXIT_BAD_INPUT, UserError

MAX_LOG_BYTES = 8 * 2**20  # the end of a log holds the failure; tqdm-heavy logs can be huge
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


STDIN = "-"


def read_log(path: Path) -> str:
    """The log's last MAX_LOG_BYTES as text (`-`: standard input, e.g. `... 2>&1 | itk diagnose -`), colour
    codes removed and tqdm's carriage returns made lines."""
    if str(path) == STDIN:
        raw = sys.stdin.buffer.read()[-MAX_LOG_BYTES:]
    else:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                f.seek(max(0, size - MAX_LOG_BYTES))
                raw = f.read()
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}", "give the path of a log file, or - for standard "
                            "input", EXIT_BAD_INPUT) from None
    return ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\r\n", "\n").replace("\r", "\n")


def write_verdict(verdict: Verdict, path: Path) -> None:
    atomic_write_text(path, json.dumps(verdict.to_json(), indent=2))


def run_diagnose(logfile: str | Path, exit_code: int | None = None, preset: str | None = None) -> Verdict:
    """The verdict for a log, with this machine's facts (and the preset's, when named); prints nothing."""
    from itk import machine
    from itk.presets import resolve_preset

    path = Path(logfile)
    facts = machine.gather().to_json()
    if preset:
        facts["preset"] = resolve_preset(preset)[0].name
    return diagnose(read_log(path), exit_code, facts, "" if str(path) == STDIN else str(path))
