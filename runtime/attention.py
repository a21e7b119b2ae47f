"""Attention in one place: flash-attn where it is installed and the faster choice, else torch SDPA.

Layout everywhere: [B, L, heads, head_dim]; non-causal; scale 1/sqrt(head_dim); the same math either way.
On Ampere/Ada (compute capability 8.x) the flash-attn package is used when it imports. On Hopper SDPA's
cuDNN kernel beats the FlashAttention-2 that the flash-attn package ships (40 vs 66 ms per 480p block on
an H100, perf-limit.md), so SDPA stays. ITK_ATTENTION=flash|sdpa overrides the choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F


@cache
def _flash_attn_for(device_index: int) -> Callable | None:
    choice = os.environ.get("ITK_ATTENTION", "auto")
    if choice == "sdpa":
        return None
    major, _ = torch.cuda.get_device_capability(device_index)
    if choice == "auto" and major != 8:
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:  # absent, or built for another torch (undefined symbol): the doctor reports it
        return None
    return flash_attn_func


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, L, N, d] tensors."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_for(q.device.index or 0)
        if flash is not None:
            return flash(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
