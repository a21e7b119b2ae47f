"""An 8-bit attention written in Triton for Hopper, as a candidate against FlashAttention-4 (issue 28, item 3).

SageAttention2's recipe: K mean-centred over the tokens (exact: softmax ignores a per-query constant), Q
quantised to int8 per block of BLOCK_M tokens and head, K to int8 per token and head, QK^T on int8 tensor cores
into int32; P = exp2(s - m) computed pre-multiplied by 448 (the row maximum shifted by log2 448, so no extra
multiply) and cast to float8 e4m3, V quantised to e4m3 per channel and head and stored transposed (Hopper's
8-bit matmul reads its second operand along the reduction axis), PV accumulated in float32; the 448 cancels
in the final division by the row sum. Padded keys get a -inf bias folded into the dequantising multiply-add.

Layout [B, L, N, d] bf16 in and out, non-causal, scale 1/sqrt(d). Forward only; CUDA only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 128  # queries per program; L is padded to a multiple of it (and of the key tile, 64 or 128)
E4M3_MAX = 448.0


@triton.jit
def _attention_kernel(q_ptr, k_ptr, vt_ptr, qs_ptr, kscale_ptr, kbias_ptr, vs_ptr, out_ptr,
                      seq, padded, heads,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    row_stride = heads * HEAD_DIM
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b * padded * row_stride + h * HEAD_DIM
    k_base = k_ptr + b * padded * row_stride + h * HEAD_DIM
    vt_base = vt_ptr + bh * HEAD_DIM * padded
    q = tl.load(q_base + offs_m[:, None] * row_stride + offs_d[None, :])
    q_scale = tl.load(qs_ptr + bh * (padded // BLOCK_M) + block)  # includes 1/sqrt(d) * log2(e)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    shift = 8.807354922057604  # log2(448): p comes out of exp2 already scaled to e4m3's range
    for start in range(0, padded, BLOCK_N):
        cols = start + offs_n
        k = tl.load(k_base + cols[:, None] * row_stride + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        k_scale = tl.load(kscale_ptr + bh * padded + cols) * q_scale
        s = s * k_scale[None, :] + tl.load(kbias_ptr + cols)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - (m_new - shift)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        vt = tl.load(vt_base + offs_d[:, None] * padded + cols[None, :])
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
        m_i = m_new
    v_scale = tl.load(vs_ptr + bh * HEAD_DIM + offs_d)
    out = acc * v_scale[None, :] / l_i[:, None]
    out_base = out_ptr + b * seq * row_stride + h * HEAD_DIM
    tl.store(out_base + offs_m[:, None] * row_stride + offs_d[None, :], out.to(tl.bfloat16),
             mask=(offs_m < seq)[:, None])


def quantise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The kernel's inputs from [B, L, N, d] tensors: int8 Q (per BLOCK_M tokens and head) and K (per token and
    head, after centring), the transposed e4m3 V (per channel and head), their scales and the key bias."""
    batch, seq, heads, dim = q.shape
    padded = -(-seq // BLOCK_M) * BLOCK_M
    pad = (0, 0, 0, 0, 0, padded - seq)
    qf = F.pad(q.float(), pad)
    kf = F.pad(k.float() - k.float().mean(dim=1, keepdim=True), pad)
    vf = F.pad(v.float(), pad)
    q_amax = qf.view(batch, padded // BLOCK_M, BLOCK_M, heads, dim).abs().amax(dim=(2, 4)).clamp_min(1e-8)
    q_scale = q_amax / 127.0  # [B, blocks, N]
    q8 = (qf.view(batch, padded // BLOCK_M, BLOCK_M, heads, dim) / q_scale[:, :, None, :, None]).round()
    k_scale = kf.abs().amax(dim=3).clamp_min(1e-8) / 127.0  # [B, L, N]
    k8 = (kf / k_scale[..., None]).round()
    v_scale = vf.abs().amax(dim=1).clamp_min(1e-8) / E4M3_MAX  # [B, N, d]
    vt8 = (vf / v_scale[:, None]).permute(0, 2, 3, 1).contiguous().to(torch.float8_e4m3fn)  # [B, N, d, L]
    bias = torch.zeros(padded, device=q.device, dtype=torch.float32)
    bias[seq:] = -float("inf")
    return {
        "q": q8.to(torch.int8).view(batch, padded, heads, dim).contiguous(),
        "k": k8.to(torch.int8).contiguous(),
        "vt": vt8,
        "q_scale": (q_scale * (dim**-0.5 * math.log2(math.e))).permute(0, 2, 1).contiguous(),  # [B, N, blocks]
        "k_scale": k_scale.permute(0, 2, 1).contiguous(),  # [B, N, L]
        "k_bias": bias,
        "v_scale": v_scale.contiguous(),
        "seq": seq, "padded": padded,
    }


def attend(x: dict[str, torch.Tensor], shape: torch.Size, *, block_n: int = 128, num_warps: int = 8,
           num_stages: int = 2) -> torch.Tensor:
    """The kernel alone on `quantise`'s output for inputs of `shape` [B, L, N, d]; bf16 [B, L, N, d] out."""
    batch, seq, heads, dim = shape
    if BLOCK_M % block_n:
        raise ValueError(f"block_n {block_n}: must divide {BLOCK_M}")
    out = torch.empty(batch, seq, heads, dim, device=x["q"].device, dtype=torch.bfloat16)
    grid = (x["padded"] // BLOCK_M, batch * heads)
    _attention_kernel[grid](x["q"], x["k"], x["vt"], x["q_scale"], x["k_scale"], x["k_bias"], x["v_scale"], out,
                            seq, x["padded"], heads, BLOCK_M=BLOCK_M, BLOCK_N=block_n, HEAD_DIM=dim,
                            num_warps=num_warps, num_stages=num_stages)
    return out


def int8_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **config: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, L, N, d] tensors through the 8-bit kernel (quantising first); bf16
    out. `config`: attend's block_n, num_warps, num_stages."""
    return attend(quantise(q, k, v), q.shape, **config)
