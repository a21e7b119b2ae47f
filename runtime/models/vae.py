"""The Wan2.1 causal 3D VAE (the manifest's vae file), loaded under its official key names.

Video is processed in time chunks (encode: 1 frame, then 4 at a time; decode: one latent frame at a time).
Every causal convolution remembers the last frames of the chunk before (`ChunkMemory`), so chunked
processing equals running the causal network on the whole clip while holding only a few frames of
activations. The first chunk is special in the resamplers: the temporal downsampler keeps its single
frame as is, and the temporal upsampler does not double it (1 latent frame -> 1 video frame).

Each causal convolution's input is built once, in one buffer: the frames kept from the chunk before (zeros
before the first chunk) in front, then the chunk itself, written there by the norm+SiLU before the conv (no
separate activation tensor, no torch.cat, no F.pad copy).

Two layouts of the same network (`load_vae(..., fast=)`):
- official (the default off CUDA, and `fast=False`): NCDHW tensors and the official op sequence; the
  buffer also holds the spatial zero border, so each conv sees exactly the tensor the official
  F.pad(torch.cat(...)) built: on the CPU the results are those of the op-by-op code before the fast
  layout, bit for bit (the goldens hold them within 1e-4 of the official implementation).
- fast (the default on CUDA): channels-last (NDHWC) activations and weights, which cuDNN's 3D convolutions
  take as they are instead of transposing in and out around every call; a per-frame 2D op then sees
  [B*T, C, H, W] channels-last 2D as a view (no copy); cuDNN pads space itself; and RMSNorm+SiLU is one
  Triton kernel writing straight into the conv's buffer: one read and one write of the activations where
  the official ops make five reads and four writes (norm, division, two products, SiLU) and then a copy.
  Fewer passes over the activations still: torch adds a convolution's bias in a pass of its own after
  cuDNN (a broadcast add, which its element-wise kernels do not vectorise), so in the residual blocks the
  first conv's bias is added by the Triton norm+SiLU that reads its output, and the second's by one Triton
  pass computing (conv + bias) + shortcut, the official order. And the nearest x2 spatial upsample before a
  3x3 conv (the decoder's resamplers) is one 2x2 conv on the low-resolution frame with 4 outputs per
  channel, one per output pixel phase (`phase_weights`), then one interleaving pass that adds the bias:
  4/9 of the multiply-adds and no upsampled tensor.
  What changes numerically on the GPU: float32 stays float32 (TF32 convolutions as before), but the kernel
  sums the squares of the norm in its own order, the upsample conv multiplies by summed weights, and cuDNN
  picks other algorithms for the new layout: about 1e-6 relative at the output (bench/bench_vae.py measures
  it). In bfloat16 the kernel computes in float32 and rounds once, where the official sequence rounds after
  normalise, scale, gain and SiLU each.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from itk.runtime.configs import VAEConfig
from itk.runtime.loading import load_strict, read_state_dict

try:  # Triton ships with torch's CUDA builds; without it the fast layout keeps the eager norm and SiLU
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Per-channel statistics of the 16 latent channels, fixed by the Wan2.1 release (latent = (mu - mean) / std).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
FIRST_CHUNK = "first"  # memory marker of a temporal upsampler that has seen only the first chunk
FAST_FORMAT = torch.channels_last_3d
NORM_ELEMENTS = 4096  # values per Triton program of the norm+SiLU kernel (rows of C contiguous channels)
log = logging.getLogger(__name__)

if triton is not None:
    @triton.jit
    def _norm_silu_kernel(x_ptr, bias_ptr, gamma_ptr, out_ptr, frames, height, width, channels,
                          xs_b, xs_t, xs_h, xs_w, os_b, os_t, os_h, os_w, scale,
                          HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """out = SiLU(x / max(|x|, 1e-12) * scale * gamma), |x| over the channels of each pixel of a
        [B, C, T, H, W] whose channels are contiguous (stride 1) in both x and out; with HAS_BIAS, x is first
        x + bias (the bias of the conv that made x, added in x's dtype as torch does). Program (r, j): pixels
        j*BLOCK_W... of image row r (over B, T, H), so only one scalar division per program."""
        row = tl.program_id(0)
        h = row % height
        t = (row // height) % frames
        b = row // (height * frames)
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.arange(0, BLOCK_C)
        mask = (w < width)[:, None] & (c < channels)[None, :]
        x_row = b.to(tl.int64) * xs_b + t.to(tl.int64) * xs_t + h.to(tl.int64) * xs_h
        x = tl.load(x_ptr + x_row + (w * xs_w)[:, None] + c[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            x = x + tl.load(bias_ptr + c, mask=c < channels, other=0.0)[None, :]
        x = x.to(tl.float32)
        # IEEE square root and division as torch's (Triton's defaults are approximate)
        norm = tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), 1e-12)  # F.normalize's eps
        gamma = tl.load(gamma_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
        y = tl.div_rn(x, norm[:, None]) * scale * gamma[None, :]
        y = y * tl.sigmoid(y)
        out_row = b.to(tl.int64) * os_b + t.to(tl.int64) * os_t + h.to(tl.int64) * os_h
        tl.store(out_ptr + out_row + (w * os_w)[:, None] + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _residual_sum_kernel(x_ptr, bias_ptr, h_ptr, n, channels, BLOCK: tl.constexpr):
        """x = (x + bias) + h over n values of two tensors of one dense channels-last layout (bias: per
        channel, the fastest-varying index)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask) + tl.load(bias_ptr + i % channels, mask=mask)
        tl.store(x_ptr + i, x + tl.load(h_ptr + i, mask=mask), mask=mask)


def _fused_norm_silu(x: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, scale: float,
                     out: torch.Tensor) -> None:
    """Launch _norm_silu_kernel on a channels-last [B, C, T, H, W] (bias, gamma: C values, contiguous)."""
    b, c, t, h, w = x.shape
    block_c = triton.next_power_of_2(c)
    block_w = min(triton.next_power_of_2(w), max(1, NORM_ELEMENTS // block_c))
    xs, os_ = x.stride(), out.stride()
    _norm_silu_kernel[(b * t * h, triton.cdiv(w, block_w))](
        x, gamma if bias is None else bias, gamma, out, t, h, w, c, xs[0], xs[2], xs[3], xs[4],
        os_[0], os_[2], os_[3], os_[4], scale, HAS_BIAS=bias is not None, BLOCK_W=block_w, BLOCK_C=block_c)


def _with_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + bias over the channels of [B, C, T, H, W], as the convolution that made x would have added it."""
    return x if bias is None else x + bias.view(-1, 1, 1, 1)


def _eager_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """The official RMSNorm then SiLU, op by op."""
    return F.silu(F.normalize(x.float(), dim=1).type_as(x) * scale * gamma, inplace=True)


def residual_sum(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, fuse: bool) -> torch.Tensor:
    """(x + bias) + h written into x: a residual block's second conv output x (made without its bias), in
    the official order; one Triton pass when `fuse` and both tensors are dense channels-last."""
    if fuse and x.shape == h.shape and all(v.is_contiguous(memory_format=FAST_FORMAT) for v in (x, h)):
        block = 4096
        _residual_sum_kernel[(triton.cdiv(x.numel(), block),)](x, bias, h, x.numel(), x.shape[1], BLOCK=block)
        return x
    return x.add_(bias.view(-1, 1, 1, 1)).add_(h)


@functools.cache
def fused_kernels_ready(device: torch.device) -> bool:
    """Whether the Triton kernels (norm+SiLU with and without a bias, the residual sum) compile and agree
    with the eager ops on `device`, tried once per process and device: with no Triton, no C compiler for
    its launcher, or a Triton too old for this GPU, the fast layout keeps the eager ops (with a warning
    naming why)."""
    if triton is None or device.type != "cuda":
        return False
    try:
        g = torch.Generator(device).manual_seed(0)  # its own generator: the run's random stream stays as it was
        x, h = (torch.randn(2, 24, 3, 5, 7, device=device, generator=g).contiguous(memory_format=FAST_FORMAT)
                for _ in range(2))
        gamma = torch.rand(24, 1, 1, 1, device=device, generator=g) + 0.5
        bias = torch.randn(24, device=device, generator=g)
        error = 0.0
        for b in (None, bias):
            out = torch.empty_like(x)
            _fused_norm_silu(x, b, gamma, 24**0.5, out)
            error = max(error, (out - _eager_norm_silu(_with_bias(x, b), gamma, 24**0.5)).abs().max().item())
        expected = _with_bias(x, bias) + h
        error = max(error, (residual_sum(x, bias, h, fuse=True) - expected).abs().max().item())
    except Exception as exc:  # noqa: BLE001 - any failure to build or run a kernel means: stay eager
        log.warning("VAE: the Triton kernels do not run here (%s); using the eager ops",
                    f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        return False
    if error > 1e-4:
        log.warning("VAE: the Triton kernels are off by %.2g here; using the eager ops", error)
        return False
    return True


class ChunkMemory:
    """What each causal conv kept from the previous chunk, addressed by the order of the calls, and the
    layout of this pass: fast (channels-last) or official, fuse (the Triton norm+SiLU, fast layout only)."""

    def __init__(self, fast: bool = False, fuse: bool = False) -> None:
        self.slots: list[object] = []
        self.index = 0
        self.fast = fast
        self.fuse = fuse
        self.format = FAST_FORMAT if fast else torch.contiguous_format

    def next_chunk(self) -> None:
        self.index = 0

    def read(self) -> object:
        return self.slots[self.index] if self.index < len(self.slots) else None

    def write(self, value: object) -> None:
        if self.index < len(self.slots):
            self.slots[self.index] = value
        else:
            self.slots.append(value)
        self.index += 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor, norm: RMSNorm | None = None, bias: bool = True,
             x_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Run `conv` on this chunk (after norm+SiLU when given) with the previous chunk's frames in front;
        keep the last frames of that input for the next chunk. bias=False leaves conv's bias to the caller;
        x_bias: the bias still owed to x, added by the norm."""
        past = self.read()
        out, keep = conv.chunk(x, past if isinstance(past, torch.Tensor) else None, self, norm, bias, x_bias)
        self.write(keep)
        return out


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded only on the past side in time (by twice the given time padding)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space = (ph, pw)

    def chunk(self, x: torch.Tensor, past: torch.Tensor | None, memory: ChunkMemory,
              norm: RMSNorm | None = None, bias: bool = True,
              x_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this chunk's output, the last `time_pad` frames of its time-padded input for the next chunk).

        The input is one buffer written once: `past` (zeros before the first chunk) in front, then `x`
        (plus `x_bias`, which needs `norm`), through `norm` and SiLU when given. Official layout: the buffer
        holds the spatial zero border too; fast layout: channels-last, and the convolution pads space
        itself. bias=False: the output without this conv's bias (the caller adds it in a later pass)."""
        b, c, t, h, w = x.shape
        front, (ph, pw) = self.time_pad, self.space
        if memory.fast:
            buf = torch.empty((b, c, front + t, h, w), dtype=x.dtype, device=x.device, memory_format=FAST_FORMAT)
            body, padding = buf[:, :, front:], (0, ph, pw)
        else:
            buf = x.new_zeros((b, c, front + t, h + 2 * ph, w + 2 * pw))
            body, padding = buf[:, :, front:, ph : ph + h, pw : pw + w], (0, 0, 0)
        if past is not None:
            buf[:, :, :front].copy_(past)
        elif memory.fast:
            buf[:, :, :front].zero_()
        if norm is None:
            body.copy_(x)
        else:
            norm.silu_into(x, body, memory.fuse, x_bias)
        keep = buf[:, :, t:].clone()
        return F.conv3d(buf, self.weight, self.bias if bias else None, self.stride, padding, self.dilation,
                        self.groups), keep


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain; the norm in float32 whatever the dtype
    (a bf16 VAE keeps its weights and convolutions in bf16; float32 runs are unchanged bit for bit)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).type_as(x) * self.scale * self.gamma

    def silu_into(self, x: torch.Tensor, out: torch.Tensor, fuse: bool, bias: torch.Tensor | None = None) -> None:
        """SiLU(self(x + bias)) written into `out` (a view of a convolution's input buffer): one Triton kernel
        when `fuse` and both keep their channels contiguous (channels-last), else the official ops and a copy."""
        if fuse and x.stride(1) == 1 and out.stride(1) == 1:
            _fused_norm_silu(x, bias, self.gamma, self.scale, out)
        else:
            out.copy_(_eager_norm_silu(_with_bias(x, bias), self.gamma, self.scale))


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of [B, C, T, H, W] (a view, no copy, when x is channels-last)."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin, images=False), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(cout, cout, 3, padding=1),
        )
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual  # the SiLUs run inside the convs' input buffers
        h = self.shortcut(x)
        if not memory.fast:
            return memory.conv(conv2, memory.conv(conv1, x, norm1), norm2).add_(h)
        # Each conv's bias is added by the pass that reads its output: norm2, then the residual sum.
        x = memory.conv(conv2, memory.conv(conv1, x, norm1, bias=False), norm2, bias=False, x_bias=conv1.bias)
        return residual_sum(x, conv2.bias, h, memory.fuse)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [n, 1, h*w, c]
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        return x + per_frame(self._frame, x)


# Which of the 3 rows (or columns) of a 3x3 kernel fall on each of the 2 low-resolution rows a 2x2 kernel
# sees, per output phase, for a nearest x2 upsample: output row 2i reads input rows i-1, i, i (kernel rows
# 0 | 1, 2), output row 2i+1 reads rows i, i, i+1 (kernel rows 0, 1 | 2). [phase, 2x2 row, 3x3 row]
PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv's weight [O, I, 3, 3] applied after a nearest x2 upsample, as a 2x2 conv's weight
    [4*O, I, 2, 2] on the low-resolution input padded by 1: output channel (2a + b)*O + o at (i + a, j + b)
    is output pixel (2i + a, 2j + b). The zero border of the upsampled image is the low-resolution one.
    The summed weights are rounded once (summed in float64)."""
    taps = torch.tensor(PHASE_TAPS, dtype=torch.float64, device=weight.device)
    out, cin = weight.shape[:2]
    summed = torch.einsum("ayk,oikl,bxl->aboiyx", taps, weight.double(), taps).reshape(4 * out, cin, 2, 2)
    return summed.to(weight.dtype).contiguous(memory_format=torch.channels_last)


class Resample(nn.Module):
    """Spatial x2 up/down (per frame) plus, in the '3d' modes, temporal x2 through a causal time conv."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.register_buffer("phase_weight", None, persistent=False)  # the fast layout's upsample conv
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "up3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def use_fast_layout(self, fast: bool) -> None:
        self.phase_weight = phase_weights(self.resample[1].weight) if fast and self.mode.startswith("up") else None

    def _upsample_space(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest x2 upsample then the 3x3 conv of [N, C, H, W] channels-last, as the 2x2 conv of
        `phase_weights` on the low-resolution input, then one pass that interleaves its 4 phases and adds
        the bias."""
        bias = self.resample[1].bias
        phases = F.conv2d(x, self.phase_weight, None, padding=1).contiguous(memory_format=torch.channels_last)
        n, c, h, w = phases.shape[0], phases.shape[1] // 4, phases.shape[2] - 1, phases.shape[3] - 1
        s = phases.stride()  # output (2i + a, 2j + b) of channel o is phases[:, (2a + b)*c + o, i + a, j + b]
        src = phases.as_strided((n, h, 2, w, 2, c), (s[0], s[2], s[2] + 2 * c, s[3], s[3] + c, 1),
                                phases.storage_offset())
        out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        torch.add(src, bias, out=out.permute(0, 2, 3, 1).unflatten(1, (h, 2)).unflatten(3, (w, 2)))
        return out

    def _upsample_time(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        past = memory.read()
        if past is None:  # the first chunk (one frame) is not doubled in time
            memory.write(FIRST_CHUNK)
            return x
        # fast layout: the conv's bias is added by the interleaving pass below, not by a pass of its own
        y, keep = self.time_conv.chunk(x, past if isinstance(past, torch.Tensor) else None, memory,
                                       bias=not memory.fast)
        memory.write(keep)
        b, c2, t, h, w = y.shape
        # channels [0:c] are the even output frames, [c:2c] the odd ones
        out = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=memory.format)
        frames = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)
        if memory.fast:
            bias = self.time_conv.bias.view(2, -1).t()[:, None, :, None, None]  # [c, 1, 2, 1, 1] as frames
            torch.add(frames, bias, out=out.unflatten(2, (t, 2)))
        else:
            out.unflatten(2, (t, 2)).copy_(frames)
        return out

    def _downsample_time(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        past = memory.read()
        if past is None:  # the first chunk keeps its single frame
            memory.write(x.clone())
            return x
        memory.write(x[:, :, -1:].clone())
        return self.time_conv(torch.cat([past[:, :, -1:], x], dim=2))

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        if self.mode == "up3d":
            x = self._upsample_time(x, memory)
        x = per_frame(self._upsample_space if memory.fast and self.phase_weight is not None else self.resample, x)
        if self.mode == "down3d":
            x = self._downsample_time(x, memory)
        return x


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


def encode_chunks(x: torch.Tensor) -> list[torch.Tensor]:
    """[B, C, T, H, W] -> the encoder's chunks along T: frame 0 alone, then whole chunks of 4; frames past the
    last whole chunk are dropped, as officially."""
    return [x[:, :, :1]] + [x[:, :, 1 + 4 * i : 5 + 4 * i] for i in range((x.shape[2] - 1) // 4)]


def _run(stages: nn.Sequential, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
    for layer in stages:
        x = layer(x, memory)
    return x


def _run_head(head: nn.Sequential, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
    norm, _, conv = head  # the SiLU runs inside the conv's input buffer
    return memory.conv(conv, x, norm)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0  # the resolution of this stage relative to the input, for attn_scales
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(cout, "down3d" if cfg.temporal_downsample[i] else "down2d"))
                scale /= 2
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        x = memory.conv(self.conv1, x)
        x = _run(self.middle, _run(self.downsamples, x, memory), memory)
        return _run_head(self.head, x, memory)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(mult) - 2)  # this stage's resolution relative to the output, for attn_scales
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                cin //= 2  # the resampler before this stage halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if i < len(mult) - 1:
                layers.append(Resample(cout, "up3d" if temporal_upsample[i] else "up2d"))
                scale *= 2
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        x = memory.conv(self.conv1, x)
        x = _run(self.upsamples, _run(self.middle, x, memory), memory)
        return _run_head(self.head, x, memory)


class WanVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.fast = False  # the official layout until use_fast_layout(True)
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def use_fast_layout(self, fast: bool) -> WanVAE:
        """Channels-last convolution weights and the fast op sequence (True), or the official ones (False);
        see the module docstring for what changes."""
        formats = {5: FAST_FORMAT, 4: torch.channels_last} if fast else {}
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.Conv2d):
                weight = module.weight.data
                module.weight.data = weight.contiguous(memory_format=formats.get(weight.dim(),
                                                                                 torch.contiguous_format))
            elif isinstance(module, Resample):
                module.use_fast_layout(fast)
        self.fast = fast
        return self

    def _memory(self, device: torch.device) -> ChunkMemory:
        return ChunkMemory(self.fast, self.fast and fused_kernels_ready(device))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(LATENT_STD, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """[3, T, H, W] in [-1, 1] -> normalised latent [z_dim, 1 + (T-1)//4, H/8, W/8] (float32)."""
        x = video.unsqueeze(0).to(self.conv1.weight)
        memory = self._memory(x.device)
        outs = []
        for chunk in encode_chunks(x):
            memory.next_chunk()
            outs.append(self.encoder(chunk, memory))
        mu = self.conv1(torch.cat(outs, dim=2))[:, : self.cfg.z_dim]
        if normalise:
            mean, std = self._stats(mu)
            mu = (mu - mean) * (1.0 / std)
        return mu[0].float().contiguous()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latent [z_dim, T, h, w] -> video [3, 1 + 4(T-1), 8h, 8w], clamped to [-1, 1]."""
        z = latent.unsqueeze(0).to(self.conv2.weight)
        memory = self._memory(z.device)
        mean, std = self._stats(z)
        x = self.conv2((z / (1.0 / std) + mean).contiguous(memory_format=memory.format))
        # The first latent frame gives one video frame, every later one 2 per temporal upsampler.
        frames = 1 + (x.shape[2] - 1) * 2 ** sum(self.cfg.temporal_downsample)
        video, done = None, 0
        for t in range(x.shape[2]):
            memory.next_chunk()
            out = self.decoder(x[:, :, t : t + 1], memory)[0]
            if video is None:  # written chunk by chunk: no list of chunks and no torch.cat copy of the clip
                video = out.new_empty((out.shape[0], frames, *out.shape[2:]), dtype=torch.float32)
            video[:, done : done + out.shape[1]].copy_(out)
            done += out.shape[1]
        return video.clamp_(-1, 1) if clamp else video


def load_vae(path: str | Path, cfg: VAEConfig, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", fast: bool | None = None) -> WanVAE:
    """The VAE with weights (and so convolutions and activations) in `dtype`; encode/decode take and return
    float32 either way. float32 is the official choice and the default; bfloat16 halves the activation
    memory and runs the convolutions on the tensor cores, at about 1e-2 relative error (tests/test_vae.py).
    fast: the channels-last layout with the fused norm+SiLU (module docstring); None = on CUDA devices only,
    so the CPU keeps the official op sequence bit for bit; False on a GPU is the official layout there (the
    baseline of bench/bench_vae.py)."""
    with torch.device("meta"):
        model = WanVAE(cfg)
    load_strict(model, read_state_dict(path), str(path), dtype=dtype, device=device)
    fast = torch.device(device).type == "cuda" if fast is None else fast
    return model.use_fast_layout(fast).eval().requires_grad_(False)
