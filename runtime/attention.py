"""Attention as one object: the fastest installed kernel for this GPU class, else torch SDPA.

Layout everywhere: [B, L, heads, head_dim]; non-causal; scale 1/sqrt(head_dim). "auto" is
options.preferred_attention, the one choice per GPU class that `itk doctor` reports too (SageAttention on
Ada, flash-attn on Ampere, FlashAttention-4 on Hopper and Blackwell). The engine resolves an `Attention` once
from the run's choice (RuntimeOptions.attention: ITK_ATTENTION=fa4|flash|sage|sdpa overrides "auto") and the
device, and hands it to the DiT it builds; a kernel that does not import falls back to SDPA, as the doctor says.

SageAttention and FlashAttention-4 are used only for long key sequences (the video self-attention, ~95% of the
attention time); the cross-attentions (<= 769 keys) stay on SDPA: an 8-bit kernel gains nothing there, and
FlashAttention-4 compiles a kernel per shape at first use (~3 s each; cached on disk across runs), which the
few-key shapes do not repay. FlashAttention-4 runs as a torch custom op, so a compiled block keeps one graph
around it. For SageAttention K is mean-centred first (exact: softmax ignores a per-query constant), which is
SageAttention's own smoothing done out of place so the caller's K is never modified.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from itk.runtime.options import ATTENTION_CHOICES, ATTENTION_MODULES, attention_order

LONG_KEYS = 1024  # shorter key sequences (text, image, audio cross-attention) go to SDPA
# FlashAttention-4's own switch for keeping its compiled kernels on disk (a run's first attention then loads
# instead of compiling); set before its import, unless the user set it.
FA4_DISK_CACHE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
FUNCTIONS = MappingProxyType({"fa4": "flash_attn_func", "flash": "flash_attn_func", "sage": "sageattn"})


def _import(kernel: str) -> Callable | None:
    """The kernel's function, or None when it does not import (absent, built for another torch, or only the
    other half of the `flash_attn` namespace: FlashAttention-4 ships flash_attn.cute alone)."""
    if kernel == "fa4":
        os.environ.setdefault(FA4_DISK_CACHE, "1")
    try:
        return getattr(importlib.import_module(ATTENTION_MODULES[kernel]), FUNCTIONS[kernel])
    except Exception:  # noqa: BLE001 - ImportError, AttributeError or an undefined symbol: the doctor reports it
        return None


def _sage(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return fn(q, k - k.mean(dim=1, keepdim=True), v, tensor_layout="NHD", is_causal=False, smooth_k=False)


@torch.library.custom_op("itk::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-4 over [B, L, N, d] bf16/fp16 CUDA tensors (its own layout: no transposes). The op finds
    its function by importing the module (a dictionary look-up once `Attention.resolve` imported it), so no
    module state holds it and a compiled block sees one opaque op."""
    fn = getattr(importlib.import_module(ATTENTION_MODULES["fa4"]), FUNCTIONS["fa4"])
    out = fn(q.contiguous(), k.contiguous(), v.contiguous())
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in its autograd form


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


@dataclass(frozen=True, kw_only=True)
class Attention:
    """softmax(q k^T / sqrt(d)) v over [B, L, N, d] tensors, computed by one resolved kernel: `name` "fa4",
    "flash", "sage" or "sdpa", `fn` its function (None for SDPA). Immutable, so a compiled block takes it as a
    constant. Half-precision CUDA tensors go to the kernel (fa4 and sage only from `long_keys` keys on);
    anything else to SDPA."""

    name: str = "sdpa"
    fn: Callable | None = None
    long_keys: int = LONG_KEYS

    @classmethod
    def resolve(cls, choice: str, device: torch.device | str) -> Attention:
        """The attention of `choice` ("auto" | "fa4" | "flash" | "sage" | "sdpa") on `device`: SDPA off CUDA,
        and where the chosen kernel does not import. The kernel is imported here, before any block is compiled:
        a compiled block then reads a resolved object instead of tracing an import, which would split its graph."""
        if choice not in ATTENTION_CHOICES:
            raise ValueError(f"attention {choice!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
        device = torch.device(device)
        if device.type != "cuda":
            return SDPA
        if choice == "auto":
            major, minor = torch.cuda.get_device_capability(device)
            candidates = attention_order(major + minor / 10)
        else:
            candidates = (choice, "sdpa")
        for name in candidates:
            if name == "sdpa":
                return SDPA
            fn = _import(name)
            if fn is not None:
                return cls(name=name, fn=fn)
        return SDPA

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            if self.name == "flash":
                return self.fn(q, k, v)
            if self.name == "fa4" and k.shape[1] >= self.long_keys:
                return fa4_attention(q, k, v)
            if self.name == "sage" and k.shape[1] >= self.long_keys:
                return torch.compiler.disable(_sage)(self.fn, q, k, v)  # Triton launched from Python: outside the graph
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


SDPA = Attention()  # torch's scaled_dot_product_attention: the CPU's, and a DiT's built without a choice
