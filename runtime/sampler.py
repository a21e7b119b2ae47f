"""InfiniteTalk's sampler: shifted flow-matching timesteps, Euler steps and the text+audio guidance.

InfiniteTalk does not use Wan's UniPC/DPM++ solvers. It integrates the rectified flow with plain Euler
steps on a shifted grid, and guides with up to three DiT passes per step (runtime-spec §5.3-5.4). Every
value is computed in float32 in the official operation order, so the timesteps match to the bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

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


def add_noise(original: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow-matching re-noising at timestep t: (1 - t/1000) * original + t/1000 * noise."""
    s = (t.float() / NUM_TIMESTEPS).reshape((-1,) + (1,) * (noise.dim() - 1))
    return (1 - s) * original + s * noise


def two_pass(text_scale: float) -> bool:
    """The official switch: a text scale of exactly 1 (math.isclose) drops the text guidance pass."""
    return math.isclose(text_scale, 1.0)


def one_pass(text_scale: float, audio_scale: float) -> bool:
    """Both scales 1 (math.isclose, as the official text-scale switch): no guidance term remains."""
    return two_pass(text_scale) and math.isclose(audio_scale, 1.0)


def guide(
    cond: torch.Tensor,
    text_scale: float,
    audio_scale: float,
    drop_text: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    drop_audio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine the passes into the guided velocity (three-pass, or two-pass when text_scale is 1)."""
    if two_pass(text_scale):
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


@dataclass
class Guidance:
    """Scales and options of one sampling run. parallel: on several GPUs, which of a step's passes this
    rank runs and where the others come from (runtime/parallel.py); None on one."""

    text_scale: float = 5.0
    audio_scale: float = 4.0
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    parallel: Parallel | None = None


class Sampler:
    """The guidance of one clip: which DiT passes each step runs, and how their predictions combine into
    the velocity (APG's momentum carried from step to step)."""

    def __init__(self, guidance: Guidance) -> None:
        self.g = guidance
        self.text_buffer = MomentumBuffer(guidance.apg_momentum) if guidance.use_apg else None
        self.audio_buffer = MomentumBuffer(guidance.apg_momentum) if guidance.use_apg else None

    def passes(self) -> tuple[str, ...]:
        """The DiT calls this process runs per step: all of `every_pass()`, or under guidance parallel its
        group's share (`velocity` then gathers the other groups' predictions)."""
        every = self.every_pass()
        return every if self.g.parallel is None else self.g.parallel.local_passes(every)

    def every_pass(self) -> tuple[str, ...]:
        """The DiT calls of one step. Both scales 1: the guided velocity is `cond` itself (two-pass rule:
        drop_audio + 1 * (cond - drop_audio); APG: cond + 0 * ...), so one call. The official code still
        runs cond and drop_audio there and throws the second away. Text scale 1: two; otherwise three."""
        if one_pass(self.g.text_scale, self.g.audio_scale):
            return ("cond",)
        return ("cond", "drop_audio") if two_pass(self.g.text_scale) else ("cond", "drop_text", "uncond")

    def velocity(self, preds: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self.g
        if g.parallel is not None:
            preds = g.parallel.gather_passes(preds, self.every_pass())
        if one_pass(g.text_scale, g.audio_scale):
            return preds["cond"]
        if not g.use_apg:
            return guide(preds["cond"], g.text_scale, g.audio_scale, preds.get("drop_text"),
                         preds.get("uncond"), preds.get("drop_audio"))
        cond, th = preds["cond"], g.apg_norm_threshold
        if two_pass(g.text_scale):
            return cond + (g.audio_scale - 1) * apg(cond - preds["drop_audio"], cond, self.audio_buffer, th)
        text = apg(cond - preds["drop_text"], cond, self.text_buffer, th)
        audio = apg(preds["drop_text"] - preds["uncond"], cond, self.audio_buffer, th)
        return cond + (g.text_scale - 1) * text + (g.audio_scale - 1) * audio
