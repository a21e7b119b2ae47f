"""Step times our runtime measured on real GPUs (data: measured.toml), looked up per preset and GPU, and the cost
of a preset's low-RAM mode.

Why data and not a constant: the guide's ~70 s per step was the OFFICIAL code on a 4090; our runtime is several
times faster, and an estimate or a "this is too slow" warning built on the wrong number misleads both ways. The
low-RAM mode had three different stories (doctor, advice, README); `LowRamMode.statement` is now the one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from itk.runtime.toml import read_toml

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


@dataclass(frozen=True)
class LowRamMode:
    """A preset's low-RAM mode (ITK_PIN=0): its measured peak RAM and step time against the pinned default."""

    preset: str
    peak_rss_gb: float  # whole run, GB of 10^9 bytes
    pinned_peak_rss_gb: float
    step_factor: float  # its step time over the pinned one
    gpu: str
    source: str
    measured: str

    @property
    def statement(self) -> str:
        """The one sentence the doctor, the advice rules and the README use."""
        return (f"its low-RAM mode (ITK_PIN=0; the runtime also picks it by itself when RAM is short) peaks at about "
                f"{self.peak_rss_gb:.0f} GB of RAM instead of about {self.pinned_peak_rss_gb:.0f} GB, at about "
                f"{self.step_factor:.1f}x the step time (measured on an {self.gpu})")


@cache
def load_low_ram_modes(path: Path = DATA) -> tuple[LowRamMode, ...]:
    return tuple(LowRamMode(**row) for row in read_toml(path).get("low_ram", []))


def low_ram_mode(preset_name: str) -> LowRamMode | None:
    """The preset's measured low-RAM mode, or None (a resident DiT has none; nothing is invented for the rest)."""
    return next((m for m in load_low_ram_modes() if m.preset == preset_name), None)
