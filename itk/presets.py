"""Tested generator settings per hardware class (data in presets/*.toml), and the choice for a machine.

Every command that needs a preset (doctor, fetch, run, diagnose, presets, selftest) picks it here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from itk.machine import MachineFacts
from itk.measured import Measurement, for_preset
from itk.runtime.sampling import Sampling
from itk.runtime.toml import read_toml

PRESETS_DIR = Path(__file__).with_name("presets")
FALLBACK = "rtx4090-24g"


@dataclass(frozen=True)
class Lora:
    """A LoRA a preset merges into the DiT: one of its manifest files (`repo:path`, role lora) and its
    multiplier (the generator's --lora_dir / --lora_scale, paired in the order the preset lists them)."""

    file: str
    scale: float


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
    paths: dict[str, str] = field(default_factory=dict)  # generator flag -> "repo" or "repo:file"
    expected_step_s: float | None = None  # measured, where a preset has been run
    auto: bool = True  # False: only with --preset (fast presets trade fidelity; the default stays faithful)
    trade: str = ""  # what a preset gives up for its speed, in words
    long_video_warning: str = ""  # said by `itk run` when the video is past a minute
    loras: tuple[Lora, ...] = ()
    gpus: int = 1  # GPUs of its class one video runs on (`itk run --gpus` defaults to this)

    @property
    def sampling(self) -> Sampling:
        """The preset's settings as the generator samples with them."""
        return Sampling.from_flags(self.generator)

    @property
    def steps(self) -> int:
        return self.sampling.steps

    @property
    def passes(self) -> int:
        return len(self.sampling.passes)

    @property
    def cost(self) -> str:
        """"40 steps x 3 passes": the DiT calls per clip, the number a step time multiplies."""
        return f"{self.steps} steps x {self.passes} passes"

    def lora_files(self, weights_dir: Path) -> list[tuple[Path, float]]:
        """This preset's LoRA files under `weights_dir` with their scales, in the preset's order."""
        from itk.runtime.manifest import load_manifest

        files = {f"{f.repo.key}:{f.path}": f for f in load_manifest().files_for(self.components)}
        return [(files[lora.file].local_path(weights_dir), lora.scale) for lora in self.loras]

    @property
    def requirements(self) -> str:
        gpus = f"{self.gpus} GPUs of " if self.gpus > 1 else ""
        return (f"{gpus}{self.min_vram_gb:.0f} GB VRAM, {self.min_ram_gb:.0f} GB RAM, "
                f"compute capability {self.min_compute_capability}")

    def path_flags(self, weights_dir: Path) -> dict[str, Path]:
        """The generator's path flags (--ckpt_dir ...) under `weights_dir`, from the manifest: a bare repo key
        names the repo's folder, `repo:file` one file of this preset's weights (checked, so a typo in a preset
        fails here and not an hour into a run)."""
        from itk.runtime.manifest import load_manifest

        manifest = load_manifest()
        files = {(f.repo.key, f.path): f for f in manifest.files_for(self.components)}
        flags = {}
        for flag, ref in self.paths.items():
            repo, _, file = ref.partition(":")
            if not file:
                flags[flag] = weights_dir / manifest.repos[repo].local_dir
            elif (repo, file) in files:
                flags[flag] = files[(repo, file)].local_path(weights_dir)
            else:
                raise KeyError(f"preset {self.name}: {ref} is not among its weight files")
        return flags

    @property
    def measured(self) -> list[Measurement]:
        """Step times our runtime measured with this preset on real GPUs (itk/measured.toml)."""
        return for_preset(self.name)

    @property
    def shown_status(self) -> str:
        """"measured" once a device run has timed it, else the data's own "tested" / "derived"."""
        return "measured" if self.measured and self.status != "tested" else self.status

    @property
    def shown_provenance(self) -> str:
        """"derived, not yet tested" only until a device run has tested it; then that run's step time."""
        if not self.measured:
            return self.provenance
        runs = "; ".join(m.label for m in self.measured)
        return f"{runs} (itk's runtime)" + (f"; {self.provenance}" if self.status == "tested" else "")

    @property
    def download_bytes(self) -> int:
        """What `itk fetch --preset NAME` downloads into an empty folder (the manifest's approximate sizes)."""
        from itk.runtime.manifest import load_manifest

        return sum(f.size for f in load_manifest().files_for(self.components))

    def unmet(self, facts: MachineFacts) -> list[str]:
        """What this machine lacks for the preset, in words; empty when it fits."""
        if facts.vram_gb is None:
            return ["no NVIDIA GPU"]
        lacks = []
        if facts.vram_gb < self.min_vram_gb:
            lacks.append(f"{facts.vram_gb:.0f} GB VRAM < {self.min_vram_gb:.0f} GB")
        if facts.compute_capability is not None and facts.compute_capability < self.min_compute_capability:
            lacks.append(f"compute capability {facts.compute_capability} < {self.min_compute_capability}")
        if facts.usable_ram_gb is not None and facts.usable_ram_gb < self.min_ram_gb:
            lacks.append(f"{facts.usable_ram_gb:.0f} GB RAM < {self.min_ram_gb:.0f} GB")
        big_enough = sum(1 for size in facts.gpu_sizes_gb if size >= self.min_vram_gb)
        if self.gpus > 1 and big_enough < self.gpus:
            lacks.append(f"{big_enough} GPU{'s' * (big_enough != 1)} of {self.min_vram_gb:.0f} GB < {self.gpus}")
        return lacks


@cache
def load_presets(folder: Path = PRESETS_DIR) -> dict[str, Preset]:
    presets = {}
    for path in sorted(folder.glob("*.toml")):
        data = read_toml(path)
        hw = data["hardware"]
        _check_settings(path, data["generator"])
        components = tuple(data["weights"]["components"])
        loras = tuple(Lora(str(item["file"]), float(item["scale"])) for item in data.get("lora", []))
        _check_loras(path, loras, components)
        gpus = int(hw.get("gpus", 1))
        _check_gpus(path, gpus, len(Sampling.from_flags(data["generator"]).passes))
        presets[data["name"]] = Preset(
            name=data["name"],
            summary=data["summary"],
            status=data["status"],
            provenance=data["provenance"],
            rank=int(data["rank"]),
            min_vram_gb=float(hw["min_vram_gb"]),
            min_ram_gb=float(hw["min_ram_gb"]),
            min_compute_capability=float(hw["min_compute_capability"]),
            components=components,
            generator=dict(data["generator"]),
            paths=dict(data.get("paths", {})),
            expected_step_s=data.get("expected_step_s"),
            auto=bool(data.get("auto", True)),
            trade=data.get("trade", ""),
            long_video_warning=data.get("long_video_warning", ""),
            loras=loras,
            gpus=gpus,
        )
    return presets


def _check_gpus(path: Path, gpus: int, passes: int) -> None:
    """[hardware] gpus splits the official model's heads (runtime/layout.py), or the data is wrong."""
    from itk.runtime.configs import DiTConfig
    from itk.runtime.layout import LayoutError, choose_layout

    try:
        choose_layout(gpus, passes, DiTConfig().num_heads)
    except LayoutError as exc:
        raise ValueError(f"{path.name}: [hardware] {exc}") from None


def _check_settings(path: Path, generator: dict[str, Any]) -> None:
    """A preset's [generator] table holds only settings `--set` could give, in range: a typo in the data
    fails when the presets load, not in the generator an hour into a download."""
    from itk.runtime.protocol import BadInput, check_values, settable

    unknown = sorted(set(generator) - set(settable()))
    if unknown:
        raise ValueError(f"{path.name}: [generator] {unknown[0]} is not a generator setting itk passes on")
    try:
        check_values(generator)
    except BadInput as exc:
        raise ValueError(f"{path.name}: [generator] {exc.message}") from None


def _check_loras(path: Path, loras: tuple[Lora, ...], components: tuple[str, ...]) -> None:
    """Each [[lora]] names a LoRA file of the preset's own components, with a finite scale."""
    from itk.runtime.manifest import load_manifest

    files = {f"{f.repo.key}:{f.path}": f for f in load_manifest().files_for(components)}
    for lora in loras:
        f = files.get(lora.file)
        if f is None or f.role != "lora":
            raise ValueError(f"{path.name}: [[lora]] {lora.file} is not a LoRA file of its [weights] components")
        if not math.isfinite(lora.scale):
            raise ValueError(f"{path.name}: [[lora]] {lora.file}: scale {lora.scale} is not a finite number")


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(presets)})")
    return presets[name]


def choose_preset(facts: MachineFacts) -> tuple[Preset, str]:
    """The best-ranked preset this machine meets, and one line saying why. Presets with auto = false (the fast
    ones: fewer steps, a distill LoRA) are never chosen here, only with --preset."""
    presets = sorted((p for p in load_presets().values() if p.auto), key=lambda p: -p.rank)
    for preset in presets:
        if not preset.unmet(facts):
            return preset, f"{preset.name}: this machine meets its requirements ({preset.summary})"
    fallback = load_presets()[FALLBACK]
    lacks = "; ".join(fallback.unmet(facts))
    return fallback, f"{fallback.name} (fallback): no preset fits this machine ({lacks})"


def resolve_preset(name: str | None, facts: MachineFacts | None = None) -> tuple[Preset, str]:
    """The preset named with --preset (UserError, exit 2, for an unknown name), else the choice for this
    machine (`facts`, gathered when not given); and one line saying why."""
    if name:
        try:
            return get_preset(name), f"{name} (chosen with --preset)"
        except KeyError as exc:
            from itk.runtime.protocol import EXIT_BAD_INPUT, UserError

            raise UserError(str(exc.args[0]), "`itk presets` lists them", EXIT_BAD_INPUT) from None
    from itk import machine

    return choose_preset(facts or machine.gather())


@dataclass
class PresetListing:
    """`itk presets`: every preset (best rank first) with what this machine lacks for it, and the choice."""

    machine: MachineFacts
    rows: list[dict[str, Any]]
    chosen: Preset
    reason: str
    alternatives: list[str] = field(default_factory=list)  # other presets that fit, and what each costs

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine.to_json(), "presets": self.rows, "chosen": self.chosen.name,
                "reason": self.reason, "alternatives": self.alternatives}


def cost_versus(other: Preset, chosen: Preset) -> str:
    """What `other` costs next to the chosen preset: its download, and its step time on a GPU class where
    both were measured."""
    line = (f"{other.name} also fits: a {other.download_bytes / 1e9:.1f} GB download "
            f"(vs {chosen.download_bytes / 1e9:.1f} GB)")
    if other.cost != chosen.cost:
        line += f", {other.cost} (vs {chosen.cost})"
    theirs = {m.gpu: m for m in chosen.measured}
    for m in other.measured:
        if m.gpu in theirs:
            line += f", {m.seconds:g} vs {theirs[m.gpu].seconds:g} s per step on an {m.gpu}"
            break
    if other.trade:
        line += f"; trades: {other.trade}"
    return f"{line}: --preset {other.name}"


def listing(facts: MachineFacts) -> PresetListing:
    """Every preset with its requirements and what this machine lacks for it, best rank first; and the choice."""
    chosen, why = choose_preset(facts)
    rows = [
        {
            "name": p.name,
            "status": p.shown_status,
            "summary": f"{p.summary}; {p.cost}",  # the table's one text column says what a clip costs
            "requirements": p.requirements,
            "download_gb": round(p.download_bytes / 1e9, 1),
            "provenance": p.shown_provenance + (f"; trades: {p.trade}" if p.trade else ""),
            "measured_step_s": {m.gpu: m.seconds for m in p.measured},
            "steps": p.steps,
            "passes": p.passes,
            "gpus": p.gpus,
            "cost": p.cost,
            "trade": p.trade,
            "auto": p.auto,
            "loras": [{"file": lora.file, "scale": lora.scale} for lora in p.loras],
            "unmet": p.unmet(facts),
            "chosen": p.name == chosen.name,
        }
        for p in sorted(load_presets().values(), key=lambda p: -p.rank)
    ]
    others = [cost_versus(p, chosen) for p in sorted(load_presets().values(), key=lambda p: -p.rank)
              if p.name != chosen.name and not p.unmet(facts)]
    return PresetListing(facts, rows, chosen, why, others)


def run_presets(facts: MachineFacts | None = None) -> PresetListing:
    """`itk presets` without printing: the listing for this machine (or for recorded `facts`)."""
    from itk import machine

    return listing(facts or machine.gather())
