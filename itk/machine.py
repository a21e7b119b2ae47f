"""This machine's facts, gathered once and typed: what the preset choice, the doctor, `itk run` and the
advice rules all read. NVML and /proc and the cgroup files only (no torch): cheap enough for `itk --help`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from itk.checks.gpu import GpuFacts, GpuProcess
    from itk.checks.ram import RamFacts

GiB = 2**30


@dataclass(frozen=True)
class MachineFacts:
    """Sizes in GB. The field names are the fact names advice.toml reads ({usable_ram_gb}, {gpu_name}, ...).
    GPU fields describe the largest GPU and are None without one; RAM fields None when not measured."""

    vram_gb: float | None = None
    compute_capability: float | None = None
    usable_ram_gb: float | None = None  # min(total, the container's limit): the most a process here can get
    total_ram_gb: float | None = None
    available_ram_gb: float | None = None
    swap_gb: float | None = None
    cgroup_limit_gb: float | None = None
    oom_kills: int | None = None  # kills the container's OOM killer has made so far
    wsl: bool = False
    gpu_name: str | None = None
    gpu_free_gb: float | None = None
    gpu_processes: tuple[GpuProcess, ...] = ()  # other processes holding VRAM on that GPU
    gpu_sizes_gb: tuple[float, ...] = ()  # every GPU's memory, for presets that split one video over several

    def to_json(self) -> dict[str, Any]:
        """The facts as advice reads them (and `--json` prints them): unknown ones left out."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["gpu_processes"] = [dict(p) for p in data["gpu_processes"]]
        return data


def from_facts(gpu: GpuFacts, ram: RamFacts, wsl: bool) -> MachineFacts:
    """Pure: the typed facts from what the gpu and ram checks gathered (recorded ones in tests)."""
    best = gpu.best
    return MachineFacts(
        vram_gb=best.total_mib / 1024 if best else None,
        compute_capability=best.compute_capability if best else None,
        usable_ram_gb=ram.usable / GiB,
        total_ram_gb=ram.total / GiB,
        available_ram_gb=ram.available / GiB,
        swap_gb=ram.swap_total / GiB,
        cgroup_limit_gb=ram.cgroup_limit / GiB if ram.cgroup_limit else None,
        oom_kills=ram.oom_kills,
        wsl=wsl,
        gpu_name=best.name if best else None,
        gpu_free_gb=best.free_mib / 1024 if best else None,
        gpu_processes=best.processes if best else (),
        gpu_sizes_gb=tuple(g.total_mib / 1024 for g in gpu.gpus),
    )


def is_wsl(proc_version: Path = Path("/proc/version")) -> bool:
    try:
        return "microsoft" in proc_version.read_text().lower()
    except OSError:
        return False


def gather() -> MachineFacts:
    """This machine, now. The gpu and ram gatherers cache per process, so every caller shares one answer."""
    from itk.checks import gpu, ram

    return from_facts(gpu.gather(), ram.gather(), is_wsl())
