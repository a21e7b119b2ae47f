"""The fast weights check `itk run` does before launching: every file of the preset present, non-empty, and
each safetensors file exactly as long as its own header says (a truncated download fails here in
milliseconds instead of after minutes of loading). Hashing is the doctor's `--deep` job, not this one's."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from itk.manifest import load_manifest


@dataclass(frozen=True)
class WeightProblem:
    label: str  # repo folder / file, as fetch names it
    problem: str


def safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the data it describes ends exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return "truncated or not a safetensors file (header longer than the file)"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "not a safetensors file (unreadable header)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"truncated: {size} bytes, its header describes {expected}"
    return None


def weight_problems(components: tuple[str, ...], weights_dir: Path) -> list[WeightProblem]:
    problems = []
    for f in load_manifest().files_for(components):
        path = f.local_path(weights_dir)
        if not path.is_file():
            problems.append(WeightProblem(f.label, "missing"))
        elif path.stat().st_size == 0:
            problems.append(WeightProblem(f.label, "empty"))
        elif path.suffix == ".safetensors" and (why := safetensors_problem(path)):
            problems.append(WeightProblem(f.label, why))
    return problems
