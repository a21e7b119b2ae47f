"""Attention in one place: the fastest installed kernel for this GPU class, else torch SDPA.

Layout everywhere: [B, L, heads, head_dim]; non-causal; scale 1/sqrt(head_dim). "auto" is
options.preferred_attention, the one choice per GPU class that `itk doctor` reports too (SageAttention on
Ada, flash-attn on Ampere, SDPA's cuDNN kernel on Hopper). The engine calls `configure_attention` once with
the run's choice (RuntimeOptions.attention: ITK_ATTENTION=flash|sage|sdpa overrides "auto"); a kernel that
does not import falls back to SDPA, as the doctor says.

SageAttention quantises Q and K to INT8 per block: it is used only for long key sequences (the video
self-attention, ~95% of the attention time); the cross-attentions (<= 769 keys) stay on SDPA, where an 8-bit
kernel gains nothing. K is mean-centred first (exact: softmax ignores a per-query constant), which is
SageAttention's own smoothing done out of place so the caller's K is never modified.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from itk.runtime.options import ATTENTION_CHOICES, ATTENTION_MODULES, attention_order

EIGHT_BIT_MIN_KEYS = 1024  # shorter key sequences (text, image, audio cross-attention) go to SDPA

_choice = "auto"


def configure_attention(choice: str) -> None:
    """Use flash-attn ("flash"), SageAttention ("sage"), torch SDPA ("sdpa") or pick per GPU ("auto")."""
    global _choice
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    _choice = choice
    kernel_for.cache_clear()


def _import(kernel: str) -> Callable | None:
    """The kernel's function, or None when it does not import (absent, or built for another torch)."""
    try:
        module = importlib.import_module(ATTENTION_MODULES[kernel])
    except Exception:  # noqa: BLE001 - ImportError, or an undefined symbol: the doctor reports it
        return None
    return module.flash_attn_func if kernel == "flash" else module.sageattn


@cache
def kernel_for(device_index: int) -> tuple[str, Callable | None]:
    """(name, function) of the kernel used on this CUDA device: "sdpa" with None when SDPA runs."""
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, L, N, d] tensors."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        name, fn = kernel_for(q.device.index or 0)
        if name == "flash":
            return fn(q, k, v)
        if name == "sage" and k.shape[1] >= EIGHT_BIT_MIN_KEYS:
            return torch.compiler.disable(_sage)(fn, q, k, v)  # Triton launched from Python: outside the graph
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
