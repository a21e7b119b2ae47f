"""Several GPUs on one host, on PyTorch's own primitives: guidance parallel and Ulysses sequence parallel.

Launched by torchrun (`python -m torch.distributed.run --standalone --nproc_per_node N -m
itk.runtime.generate ...`, see itk/launch.py); every rank runs the whole generator: the speech, text and
image encoders and the VAE on every rank (a few seconds each, no broadcast of their outputs to get wrong),
the DiT passes split as runtime/layout.py chooses, and only rank 0 writes the mp4, the resume state and the
events.

Guidance parallel: group g runs pass g of each step; the predictions are all-gathered across the groups
(`Parallel.gather_passes`) so every rank takes the same Euler step. Sequence parallel (Ulysses): the visual
tokens are split evenly across the `sp` ranks of a group (L // sp each, one more for the first L % sp), so a
rank's share may begin and end inside a latent frame: the per-frame audio attention takes the audio of every
frame the share touches and pads the share's queries to whole frames. Around every self-attention
`torch.distributed.all_to_all_single` trades the local tokens of all heads for all tokens of `heads / sp`
heads and back (uneven shares included). The two-speaker reference-target map is a mean over heads: each rank
computes it for its heads over all tokens (frame 0's keys included) and an all-reduce completes the mean, so
two speakers work under both.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from itk.runtime.layout import Layout
from itk.runtime.options import Launch


@functools.cache
def _outside_graphs(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compiler.disable(fn)


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` outside torch.compile's graphs (a collective breaks the graph anyway; this makes it one clean
    break). The wrapping waits for the first call: importing torch._dynamo costs 1.5 s."""

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        return _outside_graphs(fn)(*args)

    return call


def split_tokens(tokens: int, parts: int) -> list[int]:
    """Visual tokens per sequence-parallel rank, as even as tokens go (the first `tokens % parts` ranks get one
    more), wherever the latent frames' boundaries fall: a whole-frame split caps 21 frames on 2 GPUs at
    21/11 = 1.91x, this one at 2x."""
    return [tokens // parts + (i < tokens % parts) for i in range(parts)]


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the layout and the process groups it talks through (None: the whole world)."""

    rank: int
    layout: Layout
    sp_group: dist.ProcessGroup | None
    guidance_group: dist.ProcessGroup | None  # the ranks at this sequence position in every guidance group

    @property
    def group(self) -> int:
        return self.rank // self.layout.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.layout.sp

    # --- guidance parallel ---------------------------------------------------------------------------------
    def local_passes(self, passes: tuple[str, ...]) -> tuple[str, ...]:
        return passes if self.layout.groups == 1 else (passes[self.group],)

    def gather_passes(self, preds: dict[str, torch.Tensor], passes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Every pass's prediction on every rank, from the one(s) this rank computed."""
        if self.layout.groups == 1:
            return preds
        (mine,) = preds.values()
        parts = [torch.empty_like(mine) for _ in passes]
        dist.all_gather(parts, mine.contiguous(), group=self.guidance_group)
        return dict(zip(passes, parts, strict=True))

    # --- sequence parallel ---------------------------------------------------------------------------------
    def shard(self, grid: tuple[int, int, int]) -> Shard | None:
        """How one forward's tokens of this (frames, h, w) grid split; None without sequence parallel."""
        if self.layout.sp == 1:
            return None
        frame_tokens = grid[1] * grid[2]
        return Shard(self, tuple(split_tokens(grid[0] * frame_tokens, self.layout.sp)), frame_tokens)


@dataclass(frozen=True)
class Shard:
    """One forward's split of the visual tokens: sequence rank i holds the `tokens[i]` consecutive tokens from
    `offsets[i]`, a range that may begin and end inside a latent frame of `frame_tokens` tokens."""

    parallel: Parallel
    tokens: tuple[int, ...]
    frame_tokens: int

    @property
    def sp(self) -> int:
        return len(self.tokens)

    @property
    def offsets(self) -> list[int]:
        return list(itertools.accumulate(self.tokens, initial=0))[:-1]

    @property
    def start(self) -> int:
        """This rank's first token."""
        return self.offsets[self.parallel.sp_rank]

    @property
    def stop(self) -> int:
        """One past this rank's last token."""
        return self.start + self.tokens[self.parallel.sp_rank]

    @property
    def frames(self) -> tuple[int, int]:
        """The latent frames [first, end) this rank's tokens touch, wholly or in part."""
        return self.start // self.frame_tokens, -(-self.stop // self.frame_tokens)

    @property
    def frame_padding(self) -> tuple[int, int]:
        """The tokens of the touched frames before this rank's first token and after its last (other ranks'
        tokens): what pads the local tokens to whole frames."""
        first, end = self.frames
        return self.start - first * self.frame_tokens, end * self.frame_tokens - self.stop

    def local_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The frames this rank's tokens touch, of a per-frame tensor (the audio tokens [1, T, M, C])."""
        first, end = self.frames
        return x.narrow(dim, first, end - first)

    def local_tokens(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's tokens of a per-token tensor (tokens [1, L, D] with dim 1, RoPE [L, 1, d/2])."""
        return x.narrow(dim, self.start, self.stop - self.start)

    @eager
    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[1, l, N, d] (this rank's tokens, all heads) -> [1, L, N/sp, d] (all tokens, this rank's heads)."""
        _, local, heads, d = x.shape
        send = x[0].reshape(local, self.sp, heads // self.sp, d).transpose(0, 1).contiguous()
        out = x.new_empty(sum(self.tokens), heads // self.sp, d)
        dist.all_to_all_single(out, send.view(self.sp * local, heads // self.sp, d), list(self.tokens),
                               [local] * self.sp, group=self.parallel.sp_group)
        return out[None]

    @eager
    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `scatter_heads`: [1, L, N/sp, d] -> [1, l, N, d]."""
        _, _, part, d = x.shape
        local = self.tokens[self.parallel.sp_rank]
        out = x.new_empty(self.sp * local, part, d)
        dist.all_to_all_single(out, x[0].contiguous(), [local] * self.sp, list(self.tokens),
                               group=self.parallel.sp_group)
        return out.view(self.sp, local, part, d).transpose(0, 1).reshape(1, local, self.sp * part, d)

    @eager
    def mean_over_heads(self, ref_map: torch.Tensor) -> torch.Tensor:
        """The reference-target map [3, L] averaged over this rank's heads -> averaged over all heads."""
        total = ref_map.contiguous()
        dist.all_reduce(total, group=self.parallel.sp_group)
        return total / self.sp

    @eager
    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[1, l, C] of every sequence rank -> [1, L, C] in token order (padded to the largest share: the
        gather wants equal sizes)."""
        most = max(self.tokens)
        padded = x.new_zeros(1, most, x.shape[2])
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in self.tokens]
        dist.all_gather(parts, padded, group=self.parallel.sp_group)
        return torch.cat([part[:, :n] for part, n in zip(parts, self.tokens, strict=True)], dim=1)


def _groups(ranks: Sequence[Sequence[int]], mine: int) -> dist.ProcessGroup | None:
    """Create every group (each rank must create all of them, in the same order); return the one holding
    `mine` (None when that is the whole world)."""
    found = None
    for members in ranks:
        if len(members) == dist.get_world_size():
            return None
        group = dist.new_group(list(members)) if len(members) > 1 else None
        if mine in members:
            found = group
    return found


def start(launch: Launch, layout: Layout) -> Parallel | None:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU) and build this rank's `Parallel` in
    `layout` (which must span the world); None for a single process."""
    if launch.world_size == 1:
        return None
    if layout.world != launch.world_size:
        raise ValueError(f"layout {layout.flag} spans {layout.world} processes, torchrun started {launch.world_size}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(launch.local_rank)  # "cuda" is this rank's GPU from here on
    dist.init_process_group("nccl" if cuda else "gloo", rank=launch.rank, world_size=launch.world_size)
    return arrange(launch, layout)


def arrange(launch: Launch, layout: Layout) -> Parallel:
    """This rank's `Parallel` for `layout` in the joined process group (its subgroups created here)."""
    sp, groups = layout.sp, layout.groups
    sp_group = _groups([range(g * sp, (g + 1) * sp) for g in range(groups)], launch.rank)
    guidance_group = _groups([range(s, groups * sp, sp) for s in range(sp)], launch.rank)
    return Parallel(launch.rank, layout, sp_group, guidance_group)


def agree(value: int, parallel: Parallel | None) -> int:
    """Rank 0's value of an int on every rank (the seed a negative --base_seed draws at random)."""
    if parallel is None:
        return value
    box = torch.tensor([value], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(box, src=0)
    return int(box.item())


def stop(parallel: Parallel | None, wait: bool = False) -> None:
    """Leave the process group (every rank, also on the way out of an error). wait: first meet every other
    rank (a finished run): a rank that tears its gloo connections down while a peer still uses them makes that
    peer abort ("terminate called without an active exception", seen with 8 processes), which would fail a
    finished video. Never on the way out of an error: the crashed rank would never arrive."""
    if parallel is not None and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def writes(parallel: Parallel | None) -> bool:
    """Whether this process writes the output, the resume state and the events (rank 0, or a single process)."""
    return parallel is None or parallel.rank == 0
