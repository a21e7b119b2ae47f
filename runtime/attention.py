"""Attention in one place: flash-attn where it is installed and the faster choice, else torch SDPA.

Layout everywhere: [B, L, heads, head_dim]; non-causal; scale 1/sqrt(head_dim); the same math either way.
On Ampere/Ada (compute capability 8.x) the flash-attn package is used when it imports. On Hopper SDPA's
cuDNN kernel beats the FlashAttention-2 that the flash-attn package ships (40 vs 66 ms per 480p block on
an H100, perf-limit.md), so SDPA stays. The engine calls `configure_attention` once with the run's choice
(RuntimeOptions.attention: ITK_ATTENTION=flash|sdpa overrides "auto").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from itk.runtime.options import ATTENTION_CHOICES

_choice = "auto"


def configure_attention(choice: str) -> None:
    """Use flash-attn ("flash", where it imports), torch SDPA ("sdpa"), or pick per GPU ("auto")."""
    global _choice
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    _choice = choice
    _flash_attn_for.cache_clear()


@cache
def _flash_attn_for(device_index: int) -> Callable | None:
    if _choice == "sdpa":
        return None
    major, _ = torch.cuda.get_device_capability(device_index)
    if _choice == "auto" and major != 8:
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
