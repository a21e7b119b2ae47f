"""The Wan2.1 causal 3D VAE (the manifest's vae file), loaded under its official key names.

Video is processed in time chunks (encode: 1 frame, then 4 at a time; decode: one latent frame at a time).
Every causal convolution remembers the last frames of the chunk before (`ChunkMemory`), so chunked
processing equals running the causal network on the whole clip while holding only a few frames of
activations. The first chunk is special in the resamplers: the temporal downsampler keeps its single
frame as is, and the temporal upsampler does not double it (1 latent frame -> 1 video frame).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from itk.runtime.configs import VAEConfig
from itk.runtime.loading import load_strict, read_state_dict

# Per-channel statistics of the 16 latent channels, fixed by the Wan2.1 release (latent = (mu - mean) / std).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
MEMORY_FRAMES = 2  # a kernel-3 causal conv needs the 2 frames before a chunk
FIRST_CHUNK = "first"  # memory marker of a temporal upsampler that has seen only the first chunk


class ChunkMemory:
    """What each causal conv kept from the previous chunk, addressed by the order of the calls."""

    def __init__(self) -> None:
        self.slots: list[object] = []
        self.index = 0

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

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """Run `conv` on this chunk with the previous chunk's frames in front; keep this chunk's tail."""
        past = self.read()
        keep = x[:, :, -MEMORY_FRAMES:]
        if keep.shape[2] < MEMORY_FRAMES and isinstance(past, torch.Tensor):
            keep = torch.cat([past[:, :, -1:], keep], dim=2)
        out = conv(x, past if isinstance(past, torch.Tensor) else None)
        self.write(keep.clone())
        return out


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded only on the past side in time (by twice the given time padding)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        front = self.time_pad
        if past is not None and front > 0:
            x = torch.cat([past.to(x), x], dim=2)
            front -= past.shape[2]
        return super().forward(F.pad(x, (*self.space_pad, front, 0)))


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain; the norm in float32 whatever the dtype
    (a bf16 VAE keeps its weights and convolutions in bf16; float32 runs are unchanged bit for bit)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).type_as(x) * self.scale * self.gamma


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of [B, C, T, H, W]."""
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
        h = self.shortcut(x)
        for layer in self.residual:
            x = memory.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


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


class Resample(nn.Module):
    """Spatial x2 up/down (per frame) plus, in the '3d' modes, temporal x2 through a causal time conv."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "up3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _upsample_time(self, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
        past = memory.read()
        if past is None:  # the first chunk (one frame) is not doubled in time
            memory.write(FIRST_CHUNK)
            return x
        keep = x[:, :, -MEMORY_FRAMES:]
        if keep.shape[2] < MEMORY_FRAMES:
            before = past[:, :, -1:] if isinstance(past, torch.Tensor) else torch.zeros_like(keep)
            keep = torch.cat([before, keep], dim=2)
        y = self.time_conv(x, past if isinstance(past, torch.Tensor) else None)
        memory.write(keep.clone())
        b, c2, t, h, w = y.shape
        # channels [0:c] are the even output frames, [c:2c] the odd ones
        return y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

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
        x = per_frame(self.resample, x)
        if self.mode == "down3d":
            x = self._downsample_time(x, memory)
        return x


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


def _run(stages: nn.Sequential, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
    for layer in stages:
        x = layer(x, memory)
    return x


def _run_head(head: nn.Sequential, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
    for layer in head:
        x = memory.conv(layer, x) if isinstance(layer, CausalConv3d) else layer(x)
    return x


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
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(LATENT_STD, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """[3, T, H, W] in [-1, 1] -> normalised latent [z_dim, 1 + (T-1)//4, H/8, W/8] (float32)."""
        x = video.unsqueeze(0).to(self.conv1.weight)
        memory = ChunkMemory()
        # Frame 0 alone, then whole chunks of 4; frames past the last whole chunk are dropped, as officially.
        chunks = [x[:, :, :1]] + [x[:, :, 1 + 4 * i : 5 + 4 * i] for i in range((x.shape[2] - 1) // 4)]
        outs = []
        for chunk in chunks:
            memory.next_chunk()
            outs.append(self.encoder(chunk, memory))
        mu = self.conv1(torch.cat(outs, dim=2))[:, : self.cfg.z_dim]
        if normalise:
            mean, std = self._stats(mu)
            mu = (mu - mean) * (1.0 / std)
        return mu[0].float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latent [z_dim, T, h, w] -> video [3, 1 + 4(T-1), 8h, 8w], clamped to [-1, 1]."""
        z = latent.unsqueeze(0).to(self.conv2.weight)
        mean, std = self._stats(z)
        x = self.conv2(z / (1.0 / std) + mean)
        memory = ChunkMemory()
        outs = []
        for t in range(x.shape[2]):
            memory.next_chunk()
            outs.append(self.decoder(x[:, :, t : t + 1], memory))
        video = torch.cat(outs, dim=2)[0].float()
        return video.clamp_(-1, 1) if clamp else video


def load_vae(path: str | Path, cfg: VAEConfig, dtype: torch.dtype = torch.float32, device="cpu") -> WanVAE:
    """The VAE with weights (and so convolutions and activations) in `dtype`; encode/decode take and return
    float32 either way. float32 is the official choice and the default; bfloat16 halves the activation
    memory and runs the convolutions on the tensor cores, at about 1e-2 relative error (tests/test_vae.py)."""
    with torch.device("meta"):
        model = WanVAE(cfg)
    load_strict(model, read_state_dict(path), str(path), dtype=dtype, device=device)
    return model.eval().requires_grad_(False)
