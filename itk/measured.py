"""Step times our runtime measured on real GPUs (data: measured.toml), looked up per preset and GPU.

Why data and not a constant: the guide's ~70 s per step was the OFFICIAL code on a 4090; our runtime is several
times faster, and an estimate or a "this is too slow" warning built on the wrong number misleads both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from itk.toml import read_toml

DATA = Path(__file__).with_name("measured.toml")


@dataclass(frozen=True)
class Measurement:
    preset: str
    gpu: str  # GPU class, matched as a substring of the GPU's name
    seconds: float  # per denoising step, all guidance passes
    mode: str
    source: str
    measured: str

    @property
    def label(self) -> str:
        return f"{self.seconds:g} s per step measured on an {self.gpu} ({self.measured})"


@cache
def load_measurements(path: Path = DATA) -> tuple[Measurement, ...]:
    return tuple(Measurement(**row) for row in read_toml(path).get("step", []))


def for_preset(preset_name: str) -> list[Measurement]:
    return [m for m in load_measurements() if m.preset == preset_name]


def expected_step_s(preset_name: str, gpu_name: str | None) -> Measurement | None:
    """This preset's measured step time on this GPU's class, or None when nobody has measured it there."""
    if not gpu_name:
        return None
    return next((m for m in for_preset(preset_name) if m.gpu.lower() in gpu_name.lower()), None)
