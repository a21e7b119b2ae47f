"""InfiniteTalk's sampler: shifted flow-matching timesteps, Euler steps and the text+audio guidance.

InfiniteTalk does not use Wan's UniPC/DPM++ solvers. It integrates the rectified flow with plain Euler
steps on a shifted grid (`shift * s / (1 + (shift - 1) * s)` of a linear grid from 1000 to 1), and guides
with up to three DiT passes per step (which ones: `sampling.passes_per_step`). Every value is computed in
float32 in the official operation order, so the timesteps match to the bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from itk.runtime.sampling import PASSES_ONE, Sampling, drops_text_pass

if TYPE_CHECKING:
    from itk.runtime.parallel import Parallel

NUM_TIMESTEPS = 1000


def shifted_timesteps(steps: int, shift: float) -> list[torch.Tensor]:
    """`steps + 1` one-element float32 tensors from 1000 down to 0, each shifted by `shift`.

    The raw grid is numpy's float32 linspace(1000, 1, steps) plus a final 0; the shift
    `shift*s/(1+(shift-1)*s)` with s = t/1000 is applied to each one-element tensor, as the model
    receives them.
    """
    raw = [*np.linspace(NUM_TIMESTEPS, 1, steps, dtype=np.float32), np.float32(0.0)]
    out = []
    for value in raw:
        s = torch.tensor([value], dtype=torch.float32) / NUM_TIMESTEPS
        out.append(shift * s / (1 + (shift - 1) * s) * NUM_TIMESTEPS)
    return out


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the rectified flow: x <- x - v * (t - t_next) / 1000."""
    dt = (t - t_next) / NUM_TIMESTEPS
    return latent + (-velocity) * dt.reshape((-1,) + (1,) * (latent.dim() - 1))


def guide(
    cond: torch.Tensor,
    *,
    text_scale: float,
    audio_scale: float,
    drop_text: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    drop_audio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine the passes into the guided velocity (three-pass, or two-pass when text_scale is 1)."""
    if drops_text_pass(text_scale):
        assert drop_audio is not None
        return drop_audio + audio_scale * (cond - drop_audio)
    assert drop_text is not None and uncond is not None
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


class MomentumBuffer:
    """APG's running average of a guidance difference: avg = new + momentum * avg."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.average = value + self.momentum * self.average
        return self.average


def apg(
    diff: torch.Tensor, cond: torch.Tensor, buffer: MomentumBuffer | None, norm_threshold: float
) -> torch.Tensor:
    """Adaptive projected guidance of one difference: momentum, norm clip, drop the part along `cond`.

    Norms are over the last four dims (C, T, H, W); the projection runs in float64 (eta = 0).
    """
    if buffer is not None:
        diff = buffer.update(diff)
    dims = [-1, -2, -3, -4]
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    d64, c64 = diff.double(), cond.double()
    unit = torch.nn.functional.normalize(c64, dim=dims)
    parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
    return (d64 - parallel).to(diff.dtype)


def local_passes(sampling: Sampling, parallel: Parallel | None = None) -> tuple[str, ...]:
    """The DiT calls this process runs per step: all of `sampling.passes`, or under guidance parallel its
    group's share."""
    return sampling.passes if parallel is None else parallel.local_passes(sampling.passes)


class Sampler:
    """The guidance of one clip: which DiT passes each step runs, and how their predictions combine into
    the velocity (APG's momentum carried from step to step). parallel: on several GPUs, which of a step's
    passes this rank runs and where the others come from (runtime/parallel.py); None on one."""

    def __init__(self, sampling: Sampling, parallel: Parallel | None = None) -> None:
        self.sampling = sampling
        self.parallel = parallel
        self.text_buffer = MomentumBuffer(sampling.apg_momentum) if sampling.use_apg else None
        self.audio_buffer = MomentumBuffer(sampling.apg_momentum) if sampling.use_apg else None

    def passes(self) -> tuple[str, ...]:
        """`local_passes` of this clip (under guidance parallel `velocity` gathers the other groups' ones)."""
        return local_passes(self.sampling, self.parallel)

    def velocity(self, preds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guided velocity of one step from its passes' predictions. Both scales 1: `cond` itself (the
        two-pass rule drop_audio + 1 * (cond - drop_audio), and APG's cond + 0 * ..., are `cond`)."""
        s = self.sampling
        if self.parallel is not None:
            preds = self.parallel.gather_passes(preds, s.passes)
        if s.passes == PASSES_ONE:
            return preds["cond"]
        if not s.use_apg:
            return guide(preds["cond"], text_scale=s.text_scale, audio_scale=s.audio_scale,
                         drop_text=preds.get("drop_text"), uncond=preds.get("uncond"),
                         drop_audio=preds.get("drop_audio"))
        cond, th = preds["cond"], s.apg_norm_threshold
        if s.drops_text_pass:
            return cond + (s.audio_scale - 1) * apg(cond - preds["drop_audio"], cond, self.audio_buffer, th)
        text = apg(cond - preds["drop_text"], cond, self.text_buffer, th)
        audio = apg(preds["drop_text"] - preds["uncond"], cond, self.audio_buffer, th)
        return cond + (s.text_scale - 1) * text + (s.audio_scale - 1) * audio
