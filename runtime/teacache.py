"""TeaCache (`--use_teacache`): skip the DiT's blocks on calls whose time modulation barely moved.

As the official `teacache_init` + `WanModel.forward` compute it (use_ret_steps=True; the teacache_A golden
records it): each call compares its modulated time input e0 with the previous one of its slot (the
relative L1 change, rescaled by a 4th-order polynomial per size) and accumulates that; while the sum stays
below the threshold the call skips all blocks and adds the residual (blocks output - input) its slot last
computed. The first 5 steps always compute, so a 4-step run never skips. The head always runs.

Slots. The official code cycles three slots by call count (cond, drop_text, uncond) whatever the guidance
runs. With text guidance 1 a step has two calls, so the slots drift across passes: a slot compares e0 1.5
steps apart and a skipped cond call may reuse a drop_audio residual (the teacache_2pass_A golden records
it). We cycle as many slots as the guidance runs passes (`cycle`), so every slot is one pass: each pass
compares with its own previous step and reuses its own residual. With three passes this is the official
behaviour exactly; with two, the decisions differ (per pass instead of drifting), and `cycle=3` reproduces
the official ones (tests/test_teacache.py checks both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import MappingProxyType

import numpy as np
import torch

log = logging.getLogger(__name__)

# teacache_init's coefficients with use_ret_steps=True, per --size.
COEFFICIENTS = MappingProxyType({
    "infinitetalk-480": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "infinitetalk-720": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
})
RET_STEPS = 5  # steps that always compute


class TeaCache:
    """The skip decisions and cached residuals of one run (kept across its clips, as officially)."""

    def __init__(self, size: str, *, thresh: float, steps: int, cycle: int = 3):
        self.rescale = np.poly1d(COEFFICIENTS[size])
        self.thresh = thresh
        self.cycle = cycle
        self.ret_calls = RET_STEPS * cycle
        self.num_calls = steps * cycle  # also the official cutoff, never reached before the counter wraps
        self.cnt = 0
        self.accumulated = [0.0] * cycle
        self.previous_e0: list[torch.Tensor | None] = [None] * cycle
        self.residual: list[torch.Tensor | None] = [None] * cycle
        self.computed: list[bool] = []  # per call, for tests and the log
        if steps <= RET_STEPS:
            log.warning("TeaCache: never skips within the first %d steps, so with %d steps it changes nothing",
                     RET_STEPS, steps)

    def should_compute(self, e0: torch.Tensor) -> bool:
        """The official decision for this call's slot; records e0 as the slot's previous one."""
        slot = self.cnt % self.cycle
        if self.cnt < self.ret_calls or self.cnt >= self.num_calls:
            compute = True
            self.accumulated[slot] = 0.0
        else:
            prev = self.previous_e0[slot]
            rel = ((e0 - prev).abs().mean() / prev.abs().mean()).cpu().item()
            self.accumulated[slot] += float(self.rescale(rel))
            compute = self.accumulated[slot] >= self.thresh
            if compute:
                self.accumulated[slot] = 0.0
        self.previous_e0[slot] = e0.clone()
        return compute

    def wrap(self, run_blocks: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A block runner (the DiT's `run_blocks` hook) that skips per the decision."""

        def run(tokens: torch.Tensor, e0: torch.Tensor, *args) -> torch.Tensor:
            slot = self.cnt % self.cycle
            compute = self.should_compute(e0)
            if compute:
                out = run_blocks(tokens, e0, *args)
                self.residual[slot] = out - tokens
            else:
                out = tokens + self.residual[slot]
            self.computed.append(compute)
            self.cnt = (self.cnt + 1) % self.num_calls
            return out

        return run


class TeaCachedDiT:
    """A DiT (`model`, with `blocks` running its blocks: model.run_blocks or a streamer) behind TeaCache."""

    def __init__(self, model, blocks: Callable[..., torch.Tensor], cache: TeaCache):
        self.model = model
        self.cache = cache
        self.blocks = cache.wrap(blocks)

    def __call__(self, x, t, context, clip_fea, y, audio, *, speaker_masks=None) -> torch.Tensor:
        return self.model(x, t, context, clip_fea, y, audio, speaker_masks=speaker_masks, run_blocks=self.blocks)
