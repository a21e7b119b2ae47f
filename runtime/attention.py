"""Attention in one place: the fastest installed kernel for this GPU class, else torch SDPA.

Layout everywhere: [B, L, heads, head_dim]; non-causal; scale 1/sqrt(head_dim). "auto" is
options.preferred_attention, the one choice per GPU class that `itk doctor` reports too (SageAttention on
Ada, flash-attn on Ampere, FlashAttention-4 on Hopper and Blackwell). The engine calls `configure_attention`
once with the run's choice (RuntimeOptions.attention: ITK_ATTENTION=fa4|flash|sage|sdpa overrides "auto"); a
kernel that does not import falls back to SDPA, as the doctor says.

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

import torch
import torch.nn.functional as F

from itk.runtime.options import ATTENTION_CHOICES, ATTENTION_MODULES, attention_order

LONG_KEYS = 1024  # shorter key sequences (text, image, audio cross-attention) go to SDPA
# FlashAttention-4's own switch for keeping its compiled kernels on disk (a run's first attention then loads
# instead of compiling); set before its import, unless the user set it.
FA4_DISK_CACHE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
FUNCTIONS = {"fa4": "flash_attn_func", "flash": "flash_attn_func", "sage": "sageattn"}

_choice = "auto"
_kernels: dict[int, tuple[str, Callable | None]] = {}  # CUDA device index -> the kernel resolved for it


def configure_attention(choice: str) -> None:
    """Use FlashAttention-4 ("fa4"), flash-attn ("flash"), SageAttention ("sage"), torch SDPA ("sdpa") or pick
    per GPU ("auto"). On a GPU the kernel is resolved (imported) here, before any block is compiled: a
    compiled block then reads a resolved entry instead of tracing an import, which would split its graph."""
    global _choice
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    _choice = choice
    _kernels.clear()
    if torch.cuda.is_available():
        kernel_for(torch.cuda.current_device())


def _import(kernel: str) -> Callable | None:
    """The kernel's function, or None when it does not import (absent, built for another torch, or only the
    other half of the `flash_attn` namespace: FlashAttention-4 ships flash_attn.cute alone)."""
    if kernel == "fa4":
        os.environ.setdefault(FA4_DISK_CACHE, "1")
    try:
        return getattr(importlib.import_module(ATTENTION_MODULES[kernel]), FUNCTIONS[kernel])
    except Exception:  # noqa: BLE001 - ImportError, AttributeError or an undefined symbol: the doctor reports it
        return None


def kernel_for(device_index: int) -> tuple[str, Callable | None]:
    """(name, function) of the kernel used on this CUDA device: "sdpa" with None when SDPA runs."""
    found = _kernels.get(device_index)
    if found is None:
        found = _kernels[device_index] = _resolve(device_index)
    return found


def _resolve(device_index: int) -> tuple[str, Callable | None]:
    if _choice == "auto":
        major, minor = torch.cuda.get_device_capability(device_index)
        candidates = attention_order(major + minor / 10)
    else:
        candidates = (_choice, "sdpa")
    for name in candidates:
        if name == "sdpa":
            return "sdpa", None
        fn = _import(name)
        if fn is not None:
            return name, fn
    return "sdpa", None


def _sage(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return fn(q, k - k.mean(dim=1, keepdim=True), v, tensor_layout="NHD", is_causal=False, smooth_k=False)


@torch.library.custom_op("itk::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-4 over [B, L, N, d] bf16/fp16 CUDA tensors (its own layout: no transposes)."""
    name, fn = kernel_for(q.device.index or 0)
    assert name == "fa4" and fn is not None, "fa4_attention runs only once FlashAttention-4 is the configured kernel"
    out = fn(q.contiguous(), k.contiguous(), v.contiguous())
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in its autograd form


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, L, N, d] tensors."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        name, fn = kernel_for(q.device.index or 0)
        if name == "flash":
            return fn(q, k, v)
        if name == "fa4" and k.shape[1] >= LONG_KEYS:
            return fa4_attention(q, k, v)
        if name == "sage" and k.shape[1] >= LONG_KEYS:
            return torch.compiler.disable(_sage)(fn, q, k, v)  # Triton launched from Python: outside the graph
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
