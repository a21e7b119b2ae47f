"""GPU: model, VRAM, driver, the CUDA version the driver supports, compute capability, and every other
process holding VRAM (the guide's "several processes compete for VRAM" behind most CUDA OOMs).

Facts come from NVML (nvidia-ml-py), which needs no torch and answers in milliseconds.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from itk.checks.base import Context, Result, Status, gathered_once

FP8_MIN_CC = 8.9  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
BF16_MIN_CC = 8.0


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_mib: int


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_mib: int
    free_mib: int
    compute_capability: float
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuFacts:
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # highest CUDA version the driver supports, e.g. "12.4"
    gpus: tuple[Gpu, ...] = ()
    error: str | None = None  # why NVML could not answer

    @property
    def best(self) -> Gpu | None:
        return max(self.gpus, key=lambda g: g.total_mib, default=None)

    def to_json(self) -> dict:
        return asdict(self)


def _process_name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"


@gathered_once
def gather() -> GpuFacts:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuFacts(error=f"{type(exc).__name__}: {exc}")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            procs = {}
            for getter in (
                pynvml.nvmlDeviceGetComputeRunningProcesses,
                pynvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                try:
                    for p in getter(h):
                        used = (p.usedGpuMemory or 0) // 2**20
                        procs[p.pid] = GpuProcess(p.pid, _process_name(p.pid), int(used))
                except pynvml.NVMLError:
                    pass
            gpus.append(
                Gpu(
                    index=i,
                    name=str(pynvml.nvmlDeviceGetName(h)),
                    total_mib=int(mem.total // 2**20),
                    free_mib=int(mem.free // 2**20),
                    compute_capability=float(f"{major}.{minor}"),
                    processes=tuple(procs.values()),
                )
            )
        return GpuFacts(
            driver_version=str(driver),
            cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
            gpus=tuple(gpus),
        )
    except pynvml.NVMLError as exc:
        return GpuFacts(error=f"{type(exc).__name__}: {exc}")
    finally:
        pynvml.nvmlShutdown()


@dataclass
class _Verdict:
    status: Status = Status.OK
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def add(self, status: Status, problem: str, fix: str) -> None:
        order = [Status.OK, Status.SKIP, Status.WARN, Status.FAIL]
        self.status = max(self.status, status, key=order.index)
        self.problems.append(problem)
        self.fixes.append(fix)


def judge(facts: GpuFacts, min_vram_gb: float, own_pid: int | None = None) -> Result:
    """The gpu verdict for recorded facts: a pure function, so any machine's facts can be tested."""
    if facts.error or not facts.gpus:
        why = "no NVIDIA driver" if facts.error else "the NVIDIA driver sees no GPU"
        return Result(
            "gpu",
            Status.FAIL,
            f"{why}: only `itk selftest` can run here",
            details=[facts.error] if facts.error else [],
            fix="install the NVIDIA driver on a machine with an NVIDIA GPU (check with `nvidia-smi`)",
            facts=facts.to_json(),
        )
    own_pid = os.getpid() if own_pid is None else own_pid
    gpu = facts.best
    assert gpu is not None
    details = [
        f"GPU {g.index}: {g.name}, {g.total_mib / 1024:.1f} GiB total, {g.free_mib / 1024:.1f} GiB free, "
        f"compute capability {g.compute_capability}"
        for g in facts.gpus
    ]
    details.append(f"driver {facts.driver_version}, supports CUDA up to {facts.cuda_driver_version}")
    verdict = _Verdict()
    total_gb = gpu.total_mib / 1024
    if total_gb < min_vram_gb:
        verdict.add(
            Status.FAIL,
            f"{gpu.name} has {total_gb:.1f} GiB, the preset needs {min_vram_gb:.0f} GiB",
            "use a card with more VRAM; `itk presets` lists what each preset needs",
        )
    if gpu.compute_capability < BF16_MIN_CC:
        verdict.add(
            Status.FAIL,
            f"compute capability {gpu.compute_capability} has no bf16 support (needs {BF16_MIN_CC}+)",
            "use an Ampere (RTX 30xx, A100) or newer GPU",
        )
    elif gpu.compute_capability < FP8_MIN_CC:
        verdict.add(
            Status.WARN,
            f"compute capability {gpu.compute_capability}: no FP8 tensor cores (needs {FP8_MIN_CC}+), "
            "FP8 weights are dequantised to bf16 per layer (slower)",
            "nothing to do; an Ada (RTX 40xx) or Hopper GPU runs FP8 matmuls natively",
        )
    others = [p for p in gpu.processes if p.pid != own_pid]
    held = sum(p.used_mib for p in others)
    if others:
        listing = ", ".join(f"{p.pid} {p.name} ({p.used_mib} MiB)" for p in others)
        details.append(f"other processes on GPU {gpu.index}: {listing}")
        if (gpu.free_mib / 1024) < min_vram_gb:
            verdict.add(
                Status.WARN,
                f"other processes hold {held} MiB; {gpu.free_mib / 1024:.1f} GiB free < {min_vram_gb:.0f} GiB",
                "close them before `itk run`: " + "; ".join(f"kill {p.pid}  # {p.name}" for p in others),
            )
    summary = "; ".join(verdict.problems) if verdict.problems else (
        f"{gpu.name}, {total_gb:.1f} GiB, CUDA {facts.cuda_driver_version}, cc {gpu.compute_capability}"
    )
    if len(facts.gpus) > 1:  # `itk run --gpus auto` uses them all (itk/launch.py)
        summary = f"{len(facts.gpus)} GPUs, the best: {summary}"
    return Result("gpu", verdict.status, summary, details, "; ".join(verdict.fixes), facts.to_json())


def check(ctx: Context) -> Result:
    return judge(gather(), ctx.min_vram_gb)
