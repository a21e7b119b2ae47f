"""Colour correction against the official `color_correction` golden (strengths 1, 0.5, 0 and a flat channel)."""

from __future__ import annotations

import pytest
import torch

from itk.runtime.color import match_colors

from golden import load_golden

META, T = load_golden("color_correction")


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lab_transfer_toward_the_reference_matches_the_official_output(strength):
    ours = match_colors(T["input.source"], T["input.reference"], strength)
    assert ours.dtype == torch.float32 and ours.shape == T["input.source"].shape
    assert (ours - T[f"output.strength_{strength}"]).abs().max().item() == 0.0


def test_strength_zero_returns_the_clip_unchanged():
    ours = match_colors(T["input.source"], T["input.reference"], 0.0)
    assert torch.equal(ours, T["output.strength_0.0"])


def test_a_flat_channel_takes_the_reference_mean():
    ours = match_colors(T["input.source_flat_channel"], T["input.reference"], 1.0)
    assert (ours - T["output.flat_channel_strength_1.0"]).abs().max().item() == 0.0


def test_a_strength_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="strength"):
        match_colors(T["input.source"], T["input.reference"], 1.5)
