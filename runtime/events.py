"""The generator's progress protocol: one `ITK-EVENT {json}` line on stderr per stage, clip and step.

`itk run` supervises the generator as a subprocess and draws these lines; everything else on stderr is
ordinary log text. Fields (DESIGN.md, generator protocol): event (stage | clip | step | done | error),
stage, clip/clips, step/steps, elapsed_s, and gpu_peak_gb where a GPU is in use.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

PREFIX = "ITK-EVENT "
KINDS = ("stage", "clip", "step", "done", "error")


class Events:
    """Writes events to a stream (stderr by default), each stamped with the seconds since the start."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.start = time.monotonic()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        if event not in KINDS:
            raise ValueError(f"unknown event {event!r}")
        record = {"event": event, **fields, "elapsed_s": round(time.monotonic() - self.start, 3)}
        peak = _gpu_peak_gb()
        if peak is not None:
            record["gpu_peak_gb"] = peak
        stream = self.stream or sys.stderr
        stream.write(PREFIX + json.dumps(record, ensure_ascii=False) + "\n")
        stream.flush()
        return record

    def stage(self, name: str, **fields: Any) -> None:
        self.emit("stage", stage=name, **fields)


def _gpu_peak_gb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def parse(line: str) -> dict[str, Any] | None:
    """The event of one stderr line, or None when the line is not an event."""
    if not line.startswith(PREFIX):
        return None
    try:
        record = json.loads(line[len(PREFIX):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("event") in KINDS else None
