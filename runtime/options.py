"""The generator's environment policy, read once: every `ITK_*` switch the runtime honours lives here.

Modules never read the environment themselves; the engine reads `RuntimeOptions.from_env()` at start and
passes what each part needs (the FP8 kernel, the attention backend, compilation, pinning) explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

ATTENTION_CHOICES = ("auto", "fa4", "flash", "sage", "sdpa")
# The optional kernels and the Python module each needs (torch SDPA is always there).
ATTENTION_MODULES = MappingProxyType({"fa4": "flash_attn.cute", "flash": "flash_attn", "sage": "sageattention"})


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    return default if value is None or value == "" else value.strip().lower() not in ("0", "false", "no", "off")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value}: expected a whole number") from None


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise ValueError(f"{name}={value}: expected a whole number of at least 1")
    return value


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-GPU run, as torchrun (torch.distributed.run) tells its workers:
    RANK, WORLD_SIZE and LOCAL_RANK (MASTER_ADDR/MASTER_PORT are read by torch's own `env://` setup)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        env = os.environ if env is None else env
        return cls(rank=_int(env, "RANK", 0), world_size=_int(env, "WORLD_SIZE", 1),
                   local_rank=_int(env, "LOCAL_RANK", 0))


@dataclass(frozen=True)
class RuntimeOptions:
    """compile: torch.compile the DiT blocks on a GPU (ITK_COMPILE, default on).
    fp8_matmul: FP8 tensor-core matmuls where the GPU has them (ITK_FP8_MATMUL, default on); off = weights
    dequantised per layer. fp8_fast_accum: those matmuls accumulate at the tensor cores' own precision,
    without Hopper's periodic promotion to float32 (ITK_FP8_FAST_ACCUM, default on: 2.4-2.9% faster per 480p
    block and pass on an H200, the block's cosine to bf16 unchanged at 0.99923, bench/results/fusion-
    fastaccum-h200.json). attention: ITK_ATTENTION auto | fa4 | flash | sage | sdpa. pin: ITK_PIN forces (1) or forbids
    (0) pinning the streamed DiT blocks in host memory; unset = decided from free RAM. compile_threads:
    ITK_COMPILE_THREADS, torch.compile's worker processes (default 1: compile in the generator itself, since
    each worker holds ~0.45 GB for the whole run, 7 GB on a 16-core machine (bench/results/whole-run-h200.json);
    the compiled kernels are cached on disk, so only a machine's first run compiles at all). launch: this
    process's place in a multi-GPU run (torchrun's variables)."""

    compile: bool = True
    fp8_matmul: bool = True
    fp8_fast_accum: bool = True
    attention: str = "auto"
    pin: bool | None = None
    compile_threads: int = 1
    launch: Launch = Launch()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RuntimeOptions:
        env = os.environ if env is None else env
        attention = env.get("ITK_ATTENTION", "auto").strip().lower() or "auto"
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"ITK_ATTENTION={attention}: expected one of {', '.join(ATTENTION_CHOICES)}")
        pin = env.get("ITK_PIN")
        return cls(
            compile=_switch(env, "ITK_COMPILE", True),
            fp8_matmul=_switch(env, "ITK_FP8_MATMUL", True),
            fp8_fast_accum=_switch(env, "ITK_FP8_FAST_ACCUM", True),
            attention=attention,
            pin=None if pin in (None, "") else _switch(env, "ITK_PIN", True),
            compile_threads=_count(env, "ITK_COMPILE_THREADS", 1),
            launch=Launch.from_env(env),
        )


def attention_order(compute_capability: float | None) -> tuple[str, ...]:
    """The kernels worth using on a GPU of this compute capability, fastest first; always ends in "sdpa".

    Ada (8.9, the RTX 4090): SageAttention (pip `sageattention`, Triton, INT8 Q.K^T with fp16 P.V; about
    2x FlashAttention-2 on a 4090 as published), then flash-attn. Ampere (8.0, 8.6): flash-attn beats SDPA
    there. Hopper (9.x) and Blackwell (10.x): FlashAttention-4 (pip `flash-attn-4`, CuTe DSL kernels
    compiled at first use, nothing to build at install): 33.9 ms per 480p attention on an H200 against
    SDPA's cuDNN kernel at 40.4 ms, FlashAttention-2 at 65 ms and SageAttention 1's Triton kernel at 52 ms,
    at bf16 rounding (cosine 0.999995 to SDPA). No GPU or older GPUs: SDPA."""
    if compute_capability is None:
        return ("sdpa",)
    if round(compute_capability, 1) == 8.9:
        return ("sage", "flash", "sdpa")
    if int(compute_capability) in (9, 10):
        return ("fa4", "sdpa")
    return ("flash", "sdpa") if int(compute_capability) == 8 else ("sdpa",)


def preferred_attention(compute_capability: float | None, installed: Collection[str] | None = None) -> str:
    """The kernel the runtime's "auto" attention uses on a GPU of this compute capability: the first of
    `attention_order` that is `installed` (None: as if every optional kernel were). Torch-free, so the
    runtime (runtime/attention.py) and the doctor (checks/flash_attn.py) share this ONE choice."""
    return next(k for k in attention_order(compute_capability) if k == "sdpa" or installed is None or k in installed)
