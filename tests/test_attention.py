"""The attention backend is chosen once, explicitly, by the engine."""

from __future__ import annotations

import pytest
import torch

from itk.runtime.attention import attention, configure_attention


def test_an_unknown_attention_choice_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="attention 'xformers': expected one of auto, flash, sdpa"):
        configure_attention("xformers")


@pytest.mark.parametrize("choice", ["auto", "flash", "sdpa"])
def test_every_choice_computes_softmax_attention_on_the_cpu(choice):
    configure_attention(choice)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
        weights = torch.softmax(torch.einsum("blnd,bmnd->bnlm", q, k) / 8**0.5, dim=-1)
        expected = torch.einsum("bnlm,bmnd->blnd", weights, v)
        assert torch.allclose(attention(q, k, v), expected, atol=1e-6)
    finally:
        configure_attention("auto")
