"""The InfiniteTalk DiT: Wan2.1 I2V-14B with InfiniteTalk's audio adapter.

Attribute names are the official checkpoint keys, so `load_state_dict(strict=True)` is the whole loader.
Shapes: B = 1 sample, L = visual tokens (T * H/2 * W/2), D = dim, N = heads, d = head dim.
Numerics kept from the official model because the outputs depend on them: the timestep embedding and RoPE
run in float64; norms, modulation, gating and the head in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from itk.runtime.attention import SDPA, Attention
from itk.runtime.configs import DiTConfig
from itk.runtime.loading import (
    MappedFile,
    WeightsError,
    assign_quantized,
    load_strict,
    map_file,
    quantized_state,
    read_quant_map,
    read_state_dicts,
)
from itk.runtime.quant import FP8Kernel, FP8Linear, shared_input, swap_linears

if TYPE_CHECKING:
    from itk.runtime.parallel import Parallel, Shard

# (tokens, e0, context, audio tokens, grid, rope, speaker masks) -> tokens: what runs the blocks of one forward.
BlockRunner = Callable[..., torch.Tensor]

# Two-speaker L-RoPE: each visual token gets a 1-D position inside its speaker's range
# (from the reference-target map), the background sits between them, and each speaker's audio tokens sit at
# the centre of their range, so a query attends most to the audio of the speaker it belongs to.
SPEAKER_RANGES = ((0.0, 4.0), (20.0, 24.0))
BACKGROUND_POSITION = 12.0
# Visual queries per chunk of the reference-target map: bounds its transient (the official code holds the
# whole [heads/2, L, N_h*N_w] softmax: 2-11 GB at 480p-720p); at 480p this is ~84 MB per chunk in bf16.
MAP_QUERY_CHUNK = 8192


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters upcast too) whatever the activation dtype.

    Inside a compiled graph it is written out as mean, then the mean square of the centred values: Inductor
    lowers F.layer_norm to a Welford reduction, a division per element, and the block's four norm kernels
    were bound by those instructions. Same statistics up to float32 rounding; eager runs keep F.layer_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if not torch.compiler.is_compiling():
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        out = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + self.eps)
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out.type_as(x)


def fp32(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear, or a Sequential of Linears and activations, in float32 whatever the weights' dtype.

    The official model runs the time embedding and the head under float32 autocast; bf16 weights are
    upcast per call (FP8Linear dequantises to the input's dtype by itself).
    """
    for layer in layers if isinstance(layers, nn.Sequential) else (layers,):
        if isinstance(layer, nn.Linear):
            bias = layer.bias.float() if layer.bias is not None else None
            x = F.linear(x.float(), layer.weight.float(), bias)
        else:
            x = layer(x.float())
    return x


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] timesteps -> [B, dim] as [cos | sin], in float64 like the official model."""
    half = dim // 2
    t = t.double()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_table(head_dim: int, max_len: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Complex128 rotation tables for the (time, height, width) axes; 22/21/21 pairs at head dim 128."""

    def table(dim: int) -> torch.Tensor:
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return torch.polar(torch.ones(max_len, dim // 2, dtype=torch.float64), torch.outer(torch.arange(max_len), inv))

    d6 = head_dim // 6
    return table(head_dim - 4 * d6), table(2 * d6), table(2 * d6)


def rope_angles(
    grid: tuple[int, int, int], tables: tuple[torch.Tensor, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, 1, d/2] of every token's (t, h, w) rotation: built once per forward, in float64 from
    the complex tables, then float32 (the official float64 complex product costs ~1/3 of a block on a GPU
    and changes results by ~1e-7 relative)."""
    f, h, w = grid
    ft, fh, fw = tables
    freqs = torch.cat(
        [
            ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return freqs.real.float().to(device), freqs.imag.float().to(device)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of x [B, L, N, d] as complex numbers; float32 math.

    Written as pairs * cos + swapped pairs * (-sin, sin), (a, b) -> (b, a) being an index flip: a compiled
    block then fuses the rotation into the norm before it and the cast after it, where stacking the two
    rotated halves of the big tensor made Inductor write it out in float32 and cast it in another pass."""
    pairs = x.float().unflatten(-1, (-1, 2))
    turn = torch.stack([-sin, sin], dim=-1)  # [L, 1, d/2, 2]: small, built per call
    return (pairs * cos[..., None] + pairs.flip(-1) * turn).flatten(3)


def qk_norm(dim: int, eps: float, on: bool) -> nn.Module:
    """The official `qk_norm` switch: an RMSNorm, or Identity (no weight) when off."""
    return RMSNorm(dim, eps) if on else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, eps: float, norm: bool, attention: Attention = SDPA):
        super().__init__()
        self.num_heads = num_heads
        self.attention = attention
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = qk_norm(dim, eps, norm)
        self.norm_k = qk_norm(dim, eps, norm)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], speaker_masks: torch.Tensor | None = None,
        shard: Shard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output [B, L, D], and with `speaker_masks` [3, N_h*N_w] the reference-target map
        [3, L] of the rotated q and k (None otherwise: one speaker does no extra work).

        shard (sequence parallel, runtime/parallel.py): x holds this rank's tokens; q, k, v are traded for
        all tokens of this rank's heads around the attention (Ulysses), and the map covers all L tokens."""
        b, seq, dim = x.shape
        q, k, v = shared_input(x, (self.q, self.k, self.v))
        q = self.norm_q(q).view(b, seq, self.num_heads, -1)
        k = self.norm_k(k).view(b, seq, self.num_heads, -1)
        v = v.view(b, seq, self.num_heads, -1)
        q, k = rope_apply(q, *rope).type_as(v), rope_apply(k, *rope).type_as(v)
        if shard is not None:
            q, k, v = shard.scatter_heads(q), shard.scatter_heads(k), shard.scatter_heads(v)
        out = self.attention(q, k, v)
        ref_map = None if speaker_masks is None else reference_target_map(q, k, speaker_masks,
                                                                          attention=self.attention)
        if shard is not None:
            out = shard.gather_heads(out)
            ref_map = None if ref_map is None else shard.mean_over_heads(ref_map)
        return self.o(out.flatten(2)), ref_map


def reference_target_map(q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor, chunk: int = MAP_QUERY_CHUNK, *,
                         attention: Attention = SDPA) -> torch.Tensor:
    """[3, L] float32: for every visual token and class c of `masks` [3, F] (speaker 1, speaker 2,
    background over the F = N_h*N_w tokens of latent frame 0), the softmax mass its query puts on the class's
    keys of frame 0, divided by the class size and averaged over the heads.

    q, k: [1, L, N, d] after RoPE. The official code materialises softmax(q k^T) per half of the heads;
    the sum of softmax weights over masked keys is an attention whose values are the masks, so this runs
    the ordinary attention kernel with values [F, N, d] holding the three masks in channels 0..2 (zero
    elsewhere: kernels want one head size), over chunks of `chunk` queries. Its transient is the chunk's
    output, and the head split of the official code (a mean of per-half means) is the same mean.
    A class without tokens gets 0 (the official code divides by zero).
    """
    frame0 = masks.shape[1]
    n, d = q.shape[2], q.shape[3]
    values = masks.new_zeros(1, frame0, n, d, dtype=q.dtype)
    values[..., :3] = masks.T.to(q.dtype)[None, :, None, :]
    keys = k[:, :frame0]
    size = masks.float().sum(dim=1).clamp_min(1)
    parts = [attention(part, keys, values)[0, :, :, :3].float().mean(dim=1) for part in q.split(chunk, dim=1)]
    return (torch.cat(parts) / size).T


class ImageTextCrossAttention(nn.Module):
    """Queries attend to the text tokens and, separately, to the CLIP image tokens; the two are summed."""

    def __init__(self, dim: int, num_heads: int, *, eps: float, image_tokens: int, norm: bool,
                 attention: Attention = SDPA):
        super().__init__()
        self.num_heads = num_heads
        self.attention = attention
        self.image_tokens = image_tokens
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = qk_norm(dim, eps, norm)
        self.norm_k = qk_norm(dim, eps, norm)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = qk_norm(dim, eps, norm)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.num_heads
        image, text = context[:, : self.image_tokens], context[:, self.image_tokens :]
        q = self.norm_q(self.q(x)).view(b, -1, n, x.shape[-1] // n)
        heads = lambda t: t.view(b, -1, n, q.shape[-1])  # noqa: E731
        out = self.attention(q, heads(self.norm_k(self.k(text))), heads(self.v(text)))
        out_img = self.attention(q, heads(self.norm_k_img(self.k_img(image))), heads(self.v_img(image)))
        return self.o((out + out_img).flatten(2))


class AudioCrossAttention(nn.Module):
    """InfiniteTalk's per-latent-frame attention: frame i's visual tokens attend to frame i's audio tokens."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int, *, attention: Attention = SDPA):
        super().__init__()
        self.num_heads = num_heads
        self.attention = attention
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor, frame_tokens: int,
                ref_map: torch.Tensor | None = None, shard: Shard | None = None) -> torch.Tensor:
        """x [1, L, D]: whole latent frames of `frame_tokens` tokens each; audio_tokens [1, T, M, audio_dim]:
        their frames' tokens. ref_map: the reference-target map [3, L] of a two-speaker call (audio_tokens
        then hold speaker 1's tokens followed by speaker 2's in each frame); None for one speaker (no
        positional terms). shard (sequence parallel): x holds this rank's tokens, which may begin and end
        inside a frame, audio_tokens every frame they touch, ref_map all tokens (the positions scale over all
        of them). Only the attention groups by frame: the queries are padded with zeros to whole frames
        around it (one call for all frames; the padding is at most two frames' queries, dropped after)."""
        b, seq, dim = x.shape
        n, d = self.num_heads, dim // self.num_heads
        af = audio_tokens.flatten(0, 1)  # [T, M, audio_dim]
        q = self.q_linear(x).view(b, seq, n, d)
        kv = self.kv_linear(af).view(af.shape[0], af.shape[1], 2, n, d)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if ref_map is not None:
            positions = query_positions(ref_map)
            if shard is not None:
                positions = shard.local_tokens(positions)
            q = rope_1d(q, positions[None]).type_as(v)
            k = rope_1d(k, key_positions(af.shape[1], k.device)[None]).type_as(v)
        before, after = (0, 0) if shard is None else shard.frame_padding
        if before or after:
            q = F.pad(q, (0, 0, 0, 0, before, after))
        out = self.attention(q.view(-1, frame_tokens, n, d), k, v)  # [T, frame_tokens, N, d]
        out = out.reshape(b, -1, dim)[:, before : before + seq]
        return self.proj(out)


def query_positions(ref_map: torch.Tensor) -> torch.Tensor:
    """[L] float32 L-RoPE positions of the visual tokens from the reference-target map [3, L]: the speaker
    maps min-max scaled to their ranges (over all tokens, eps 1e-8 as officially), the background fixed;
    each token takes the value of the class with the largest raw map value."""
    ref_map = ref_map.float()
    scaled = []
    for values, (low, high) in zip(ref_map[:2], SPEAKER_RANGES, strict=True):
        lo, hi = values.min(), values.max()
        scaled.append((values - lo) / (hi - lo + 1e-8) * (high - low) + low)
    scaled.append(torch.full_like(ref_map[0], BACKGROUND_POSITION))
    return torch.stack(scaled, dim=1).gather(1, ref_map.argmax(dim=0, keepdim=True).T)[:, 0]


def key_positions(tokens_per_frame: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[M] L-RoPE positions of one frame's audio tokens: speaker 1's half at the centre of its range (2),
    speaker 2's half at the centre of its own (22)."""
    centres = [(low + high) / 2 for low, high in SPEAKER_RANGES]
    half = tokens_per_frame // 2
    return torch.tensor([centres[0]] * half + [centres[1]] * (tokens_per_frame - half), device=device)


def rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The official 1-D RoPE (base 10000, over the whole head, interleaved pairs), float32.

    x [..., S, N, d]; positions [..., S] broadcastable to x's leading dims. Pair j of a token at position p
    turns by p * 10000^(-2j/d), the same rotation `rope_apply` does for the 3-D case.
    """
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    angles = (positions.float()[..., None] * inv)[..., None, :]  # [..., S, 1, d/2]
    return rope_apply(x, torch.cos(angles), torch.sin(angles))


class FeedForward(nn.Sequential):
    """Linear, GELU (tanh form), Linear: the official `ffn.0` / `ffn.2` keys.

    When the second Linear is an FP8 matmul inside a compiled block, GELU goes into its activation
    quantisation (runtime/quant.py quantize_gelu): one kernel reads the first matmul's output and computes
    GELU once per element instead of twice (the row absmax comes from the pre-activation's row max).
    """

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        down = self[2]
        if isinstance(down, FP8Linear) and down.kernel.fuses(down, h):
            return down.after_gelu(h)
        return down(self[1](h))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, *, attention: Attention = SDPA):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, eps=eps, norm=cfg.qk_norm, attention=attention)
        self.norm3 = LayerNorm(dim, eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = ImageTextCrossAttention(dim, cfg.num_heads, eps=eps, image_tokens=cfg.image_tokens,
                                                  norm=cfg.qk_norm, attention=attention)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.audio_cross_attn = AudioCrossAttention(dim, cfg.audio_output_dim, cfg.num_heads, attention=attention)
        self.norm_x = LayerNorm(dim, eps) if cfg.norm_input_visual else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,  # [1, L, D]
        e0: torch.Tensor,  # [1, 6, D] float32
        context: torch.Tensor,  # [1, image_tokens + text_len, D]
        audio_tokens: torch.Tensor,  # [1, T, M, audio_dim] (sequence parallel: the frames x touches)
        grid: tuple[int, int, int],
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [L, 1, d/2]
        speaker_masks: torch.Tensor | None = None,  # [3, N_h*N_w] for two speakers, else None
        shard: Shard | None = None,  # sequence parallel: x and rope hold this rank's tokens (grid: all of them)
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        y, ref_map = self.self_attn((self.norm1(x).float() * (1 + scale1) + shift1).type_as(x), rope,
                                    speaker_masks=speaker_masks, shard=shard)
        x = (x.float() + y.float() * gate1).type_as(x)
        x = x + self.cross_attn(self.norm3(x), context)
        x = x + self.audio_cross_attn(self.norm_x(x), audio_tokens, frame_tokens=grid[1] * grid[2], ref_map=ref_map,
                                      shard=shard)
        y = self.ffn((self.norm2(x).float() * (1 + scale2) + shift2).type_as(x))
        return (x.float() + y.float() * gate2).type_as(x)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.float().unsqueeze(1)).chunk(2, dim=1)
        return fp32(self.head, self.norm(x).float() * (1 + scale) + shift)


class AudioProjModel(nn.Module):
    """wav2vec2 windows -> `audio_context_tokens` tokens per latent frame.

    The first latent frame (one video frame) sees its full window; every later latent frame sees 8 vectors
    gathered from its 4 video frames. Flatten order is (window slot, layer, channel).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        per_vector = cfg.audio_blocks * cfg.audio_channels
        later_vectors = cfg.audio_window + cfg.vae_scale - 1  # what gather_audio_windows takes per latent frame
        self.context_tokens = cfg.audio_context_tokens
        self.output_dim = cfg.audio_output_dim
        self.proj1 = nn.Linear(cfg.audio_window * per_vector, cfg.audio_intermediate_dim)
        self.proj1_vf = nn.Linear(later_vectors * per_vector, cfg.audio_intermediate_dim)
        self.proj2 = nn.Linear(cfg.audio_intermediate_dim, cfg.audio_intermediate_dim)
        self.proj3 = nn.Linear(cfg.audio_intermediate_dim, cfg.audio_context_tokens * cfg.audio_output_dim)
        self.norm = LayerNorm(cfg.audio_output_dim) if cfg.norm_output_audio else nn.Identity()

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        # first [H, 1, window, blocks, C]; later [H, T-1, 8, blocks, C] -> [H, T, tokens, output_dim]
        h = first.shape[0]
        a = F.relu(self.proj1(first.flatten(2)))
        b = F.relu(self.proj1_vf(later.flatten(2)))
        tokens = F.relu(self.proj2(torch.cat([a, b], dim=1)))
        tokens = self.proj3(tokens).view(h, -1, self.context_tokens, self.output_dim)
        return self.norm(tokens)


def gather_audio_windows(audio: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, F, window, blocks, C] per-video-frame windows -> the AudioProjModel's two inputs.

    Later latent frames take, from their `vae_scale` video frames: the first half-window (up to the centre)
    of the first frame, the centre of each middle frame, and the second half of the last frame.
    """
    window = audio.shape[2]
    mid = window // 2
    first = audio[:, :1]
    later = audio[:, 1:].unflatten(1, (-1, vae_scale))  # [H, T-1, vae_scale, window, blocks, C]
    head = later[:, :, 0, : mid + 1]
    middle = later[:, :, 1:-1, mid]
    tail = later[:, :, -1, mid:]
    return first, torch.cat([head, middle, tail], dim=2)


class InfiniteTalkDiT(nn.Module):
    """The denoiser. attention: the kernel every attention of its blocks runs (runtime/attention.py; SDPA by
    default). parallel: on several GPUs, this rank's place (runtime/parallel.py: under sequence parallel each
    rank runs the blocks on its share of the tokens); None on one."""

    def __init__(self, cfg: DiTConfig, *, attention: Attention = SDPA, parallel: Parallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.attention = attention
        self.parallel = parallel
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg, attention=attention) for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim * math.prod(cfg.patch_size), cfg.eps)
        self.img_emb = nn.Module()
        self.img_emb.proj = nn.Sequential(
            nn.LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, cfg.clip_dim), nn.GELU(),
            nn.Linear(cfg.clip_dim, dim), nn.LayerNorm(dim),
        )
        self.audio_proj = AudioProjModel(cfg)
        self.rope = rope_table(cfg.head_dim)
        self.rope_cache: dict[tuple[tuple[int, int, int], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_for(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """rope_angles of this grid, built on the first forward and kept: every pass of a run has the same grid,
        and building them on the host then copying them left the GPU idle 23 ms per 480p pass on an H200
        (the timeline in bench/results/dit-step-fa4-prefetch-h200.json)."""
        key = (grid, torch.device(device))
        if key not in self.rope_cache:
            self.rope_cache[key] = rope_angles(grid, self.rope, device)
        return self.rope_cache[key]

    def embed(self, x, t, context, clip_fea, y, audio):
        """Everything before the blocks: tokens, time modulation, text+image context, audio tokens."""
        cfg = self.cfg
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(torch.cat([x, y[0]], dim=0).unsqueeze(0).to(dtype))
        grid = tuple(tokens.shape[2:])
        # [1, L, D] made contiguous: a compiled block lays its outputs out like its input, and the transposed
        # view of the convolution's output made every block's norms read the residual stream by columns.
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()
        e = fp32(self.time_embedding, sinusoidal_embedding(cfg.freq_dim, t.to(tokens.device)).float())
        e0 = fp32(self.time_projection, e).unflatten(1, (6, cfg.dim))
        text = torch.cat([context, context.new_zeros(cfg.text_len - context.shape[0], context.shape[1])])
        image = self.img_emb.proj(clip_fea.to(dtype))
        ctx = torch.cat([image, self.text_embedding(text.unsqueeze(0).to(dtype))], dim=1)  # [1, 257 + text_len, D]
        first, later = gather_audio_windows(audio.to(dtype), cfg.vae_scale)
        audio_tokens = self.audio_proj(first, later)  # [H, T, M, C]
        audio_tokens = torch.cat(audio_tokens.split(1), dim=2)  # speakers side by side: [1, T, H*M, C]
        return tokens, grid, e, e0, ctx, audio_tokens

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        c = self.cfg.out_dim
        u = out[0].view(f, h, w, pt, ph, pw, c)
        return torch.einsum("fhwpqrc->cfphqwr", u).reshape(c, f * pt, h * ph, w * pw)

    def run_blocks(self, tokens: torch.Tensor, *args) -> torch.Tensor:
        """Every block in place, in order (args: e0, context, audio tokens, grid, rope, speaker masks)."""
        for block in self.blocks:
            tokens = block(tokens, *args)
        return tokens

    def forward(self, x, t, context, clip_fea, y, audio, *, speaker_masks: torch.Tensor | None = None,
                run_blocks: BlockRunner | None = None) -> torch.Tensor:
        """One denoising prediction. `run_blocks` runs the blocks instead of `self.run_blocks` when given
        (runtime/offload.py's streamer, which moves and compiles them from outside the model).

        audio: [H, F, window, blocks, C] for H = 1 or 2 speakers (speaker 1 first). speaker_masks:
        [3, N_h*N_w] (speaker 1, speaker 2, background on the token grid of one latent frame, from
        runtime/speakers.py), needed when H = 2 and ignored when H = 1: a one-speaker call, including the
        single zero speaker of a two-speaker run's uncond / drop-audio pass, takes the one-speaker path
        and computes no reference-target map.
        """
        tokens, grid, e, e0, ctx, audio_tokens = self.embed(x, t, context, clip_fea, y, audio)
        masks = two_speaker_masks(audio.shape[0], speaker_masks, grid, tokens.device)
        rope = self.rope_for(grid, tokens.device)
        shard = None if self.parallel is None else self.parallel.shard(grid)
        if shard is None:
            tokens = (run_blocks or self.run_blocks)(tokens, e0, ctx, audio_tokens, grid, rope, masks)
            return self.unpatchify(self.head(tokens, e).float(), grid)
        local_rope = (shard.local_tokens(rope[0]), shard.local_tokens(rope[1]))
        tokens = (run_blocks or self.run_blocks)(shard.local_tokens(tokens, dim=1), e0, ctx,
                                                 shard.local_frames(audio_tokens), grid, local_rope, masks, shard)
        return self.unpatchify(shard.gather_tokens(self.head(tokens, e).float()), grid)


def two_speaker_masks(speakers: int, masks: torch.Tensor | None, grid: tuple[int, int, int],
                      device: torch.device) -> torch.Tensor | None:
    """The masks the blocks get: None for one speaker, the checked [3, N_h*N_w] masks for two."""
    if speakers == 1:
        return None
    if speakers != 2:
        raise ValueError(f"audio for {speakers} speakers: InfiniteTalk takes one or two")
    expected = (3, grid[1] * grid[2])
    if masks is None or tuple(masks.shape) != expected:
        got = "none" if masks is None else list(masks.shape)
        raise ValueError(f"two speakers need speaker_masks of shape {list(expected)} (got {got});"
                         " build them with itk.runtime.speakers")
    return masks.to(device)


def load_dit(paths: list[Path], cfg: DiTConfig, *, dtype: torch.dtype = torch.bfloat16,
             device: torch.device | str = "cpu", attention: Attention = SDPA,
             parallel: Parallel | None = None) -> InfiniteTalkDiT:
    """The InfiniteTalk DiT from its official files (the base model's shards, then the InfiniteTalk adapter),
    its attentions run by `attention`, on this rank's share of a multi-GPU run (`parallel`)."""
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg, attention=attention, parallel=parallel)
    source = ", ".join(str(p) for p in paths)
    load_strict(model, read_state_dicts(paths), source, dtype=dtype, device=device)
    model.rope = rope_table(cfg.head_dim)
    return model.eval()


def load_dit_fp8(
    path: Path, map_path: Path, cfg: DiTConfig, *, dtype: torch.dtype, device: torch.device | str,
    kernel: FP8Kernel, attention: Attention = SDPA, parallel: Parallel | None = None,
) -> tuple[InfiniteTalkDiT, MappedFile]:
    """The complete InfiniteTalk DiT from the official FP8 file (the manifest's fp8 DiT) + its map.

    Returns the model and the file behind it (for a streamer to pread the bytes of CPU-resident blocks).
    On the CPU the FP8 weights stay views of the memory-mapped file until something reads them. Every FP8
    layer computes with `kernel`, every attention with `attention`; `parallel` as for `load_dit`. The caller
    resolves `map_path` (through the manifest).
    """
    path = Path(path)
    qmap = read_quant_map(map_path)
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg, attention=attention, parallel=parallel)
    modules = dict(model.named_modules())
    for name in qmap:
        if not isinstance(modules.get(name), nn.Linear):
            raise WeightsError(f"{path}: the map names {name}, which is not a Linear layer of this model")
    swap_linears(model, qmap, kernel)
    raw, mapped = map_file(path)
    assign_quantized(model, quantized_state(raw, qmap, str(path)), str(path), dtype=dtype, device=device)
    model.rope = rope_table(cfg.head_dim)
    return model.eval().requires_grad_(False), mapped
