"""The generator's environment policy, read once: every `ITK_*` switch the runtime honours lives here.

Modules never read the environment themselves; the engine reads `RuntimeOptions.from_env()` at start and
passes what each part needs (the FP8 kernel, the attention backend, compilation, pinning) explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ATTENTION_CHOICES = ("auto", "flash", "sdpa")


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    return default if value is None or value == "" else value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class RuntimeOptions:
    """compile: torch.compile the DiT blocks on a GPU (ITK_COMPILE, default on).
    fp8_matmul: FP8 tensor-core matmuls where the GPU has them (ITK_FP8_MATMUL, default on); off = weights
    dequantised per layer. attention: ITK_ATTENTION auto | flash | sdpa. pin: ITK_PIN forces (1) or forbids
    (0) pinning the streamed DiT blocks in host memory; unset = decided from free RAM."""

    compile: bool = True
    fp8_matmul: bool = True
    attention: str = "auto"
    pin: bool | None = None

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
            attention=attention,
            pin=None if pin in (None, "") else _switch(env, "ITK_PIN", True),
        )


def preferred_attention(compute_capability: float | None) -> str:
    """"flash" or "sdpa": the kernel the runtime's "auto" attention uses on a GPU of this compute capability.

    flash-attn on Ampere and Ada (8.x), where it beats SDPA. SDPA elsewhere: on Hopper (9.0) SDPA's cuDNN
    kernel beats the FlashAttention-2 the flash-attn package ships (40 vs 65 ms per 480p attention on an H200);
    other GPUs FlashAttention-2 does not support, or no GPU."""
    if compute_capability is None:
        return "sdpa"
    return "flash" if int(compute_capability) == 8 else "sdpa"
