"""Tested generator settings per hardware class (data in presets/*.toml), and the choice for a machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from itk.toml import read_toml

PRESETS_DIR = Path(__file__).with_name("presets")
FALLBACK = "rtx4090-24g"


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    status: str  # "tested" or "derived"
    provenance: str
    rank: int
    min_vram_gb: float
    min_ram_gb: float
    min_compute_capability: float
    components: tuple[str, ...]
    generator: dict[str, Any] = field(default_factory=dict)

    def unmet(self, facts: MachineFacts) -> list[str]:
        """What this machine lacks for the preset, in words; empty when it fits."""
        if facts.vram_gb is None:
            return ["no NVIDIA GPU"]
        lacks = []
        if facts.vram_gb < self.min_vram_gb:
            lacks.append(f"{facts.vram_gb:.0f} GB VRAM < {self.min_vram_gb:.0f} GB")
        if facts.compute_capability is not None and facts.compute_capability < self.min_compute_capability:
            lacks.append(f"compute capability {facts.compute_capability} < {self.min_compute_capability}")
        if facts.ram_gb is not None and facts.ram_gb < self.min_ram_gb:
            lacks.append(f"{facts.ram_gb:.0f} GB RAM < {self.min_ram_gb:.0f} GB")
        return lacks


@dataclass(frozen=True)
class MachineFacts:
    """What the choice depends on: the largest GPU's VRAM and capability, usable host RAM (GB)."""

    vram_gb: float | None
    compute_capability: float | None
    ram_gb: float | None


@cache
def load_presets(folder: Path = PRESETS_DIR) -> dict[str, Preset]:
    presets = {}
    for path in sorted(folder.glob("*.toml")):
        data = read_toml(path)
        hw = data["hardware"]
        presets[data["name"]] = Preset(
            name=data["name"],
            summary=data["summary"],
            status=data["status"],
            provenance=data["provenance"],
            rank=int(data["rank"]),
            min_vram_gb=float(hw["min_vram_gb"]),
            min_ram_gb=float(hw["min_ram_gb"]),
            min_compute_capability=float(hw["min_compute_capability"]),
            components=tuple(data["weights"]["components"]),
            generator=dict(data["generator"]),
        )
    return presets


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(presets)})")
    return presets[name]


def choose_preset(facts: MachineFacts) -> tuple[Preset, str]:
    """The best-ranked preset this machine meets, and one line saying why."""
    presets = sorted(load_presets().values(), key=lambda p: -p.rank)
    for preset in presets:
        if not preset.unmet(facts):
            return preset, f"{preset.name}: this machine meets its requirements ({preset.summary})"
    fallback = load_presets()[FALLBACK]
    lacks = "; ".join(fallback.unmet(facts))
    return fallback, f"{fallback.name} (fallback): no preset fits this machine ({lacks})"
