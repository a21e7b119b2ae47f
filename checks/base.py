"""What every doctor check returns. Checks never print; itk.doctor renders."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Status(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class Result:
    id: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    fix: str = ""
    # Machine-readable facts the check gathered (VRAM, RAM, processes...): advice rules and presets read them.
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


@dataclass(frozen=True)
class Context:
    """What the checks share: the preset they judge against and where the weights are."""

    preset_name: str
    preset_components: tuple[str, ...]
    min_ram_gb: float
    min_vram_gb: float
    weights_dir: Path
    deep: bool = False
    # The preset's measured low-RAM mode (itk.measured): its peak RAM in GB and the sentence that states its cost.
    low_ram_gb: float | None = None
    low_ram_note: str = ""


def gathered_once(fn: Callable[..., T]) -> Callable[..., T]:
    """Cache a fact-gathering function for the process, safely across the doctor's check threads
    (several checks ask for the GPU facts or the import probe at the same moment; one answer serves all)."""
    cached = functools.cache(fn)
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: Any) -> T:
        with lock:
            return cached(*args)

    return wrapper
