"""Attention in one place: flash-attn where it is installed and the faster choice, else torch SDPA.

Layout everywhere: [B, L, heads, head_dim]; non-causal; scale 1/sqrt(head_dim); the same math either way.
"auto" is options.preferred_attention, the one choice per GPU class that `itk doctor` reports too. The
engine calls `configure_attention` once with the run's choice (RuntimeOptions.attention:
ITK_ATTENTION=flash|sdpa overrides "auto").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from itk.runtime.options import ATTENTION_CHOICES, preferred_attention

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
    major, minor = torch.cuda.get_device_capability(device_index)
    if _choice == "auto" and preferred_attention(major + minor / 10) != "flash":
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
