"""The attention backend is chosen once, explicitly, by the engine."""

from __future__ import annotations

import pytest
import torch

from itk.runtime.attention import attention, configure_attention


def test_an_unknown_attention_choice_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="attention 'xformers': expected one of auto, fa4, flash, sage, sdpa"):
        configure_attention("xformers")


@pytest.mark.parametrize("choice", ["auto", "fa4", "flash", "sage", "sdpa"])
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


def test_each_gpu_class_prefers_its_fastest_kernel_and_falls_back_to_what_is_installed():
    from itk.runtime.options import attention_order, preferred_attention

    assert [preferred_attention(cc) for cc in (8.0, 8.6, 8.9, 9.0, 10.0, 12.0, 7.5, None)] == [
        "flash", "flash", "sage", "fa4", "fa4", "sdpa", "sdpa", "sdpa"]
    assert preferred_attention(8.9, installed={"flash"}) == "flash"
    assert preferred_attention(8.9, installed=()) == "sdpa"
    assert preferred_attention(9.0, installed={"flash", "sage"}) == "sdpa"
    assert preferred_attention(9.0, installed={"fa4"}) == "fa4"
    assert all(attention_order(cc)[-1] == "sdpa" for cc in (7.5, 8.0, 8.9, 9.0, None))


def test_itk_attention_accepts_sage_and_refuses_unknown_kernels():
    from itk.runtime.options import RuntimeOptions

    assert RuntimeOptions.from_env({"ITK_ATTENTION": "sage"}).attention == "sage"
    with pytest.raises(ValueError, match="auto, fa4, flash, sage, sdpa"):
        RuntimeOptions.from_env({"ITK_ATTENTION": "fa9"})


def test_compile_threads_default_to_one_and_take_a_positive_count():
    from itk.runtime.options import RuntimeOptions

    assert RuntimeOptions.from_env({}).compile_threads == 1
    assert RuntimeOptions.from_env({"ITK_COMPILE_THREADS": "4"}).compile_threads == 4
    with pytest.raises(ValueError, match="ITK_COMPILE_THREADS=0: expected a whole number of at least 1"):
        RuntimeOptions.from_env({"ITK_COMPILE_THREADS": "0"})
