"""The attention backend is one immutable object, resolved once by the engine and handed to the DiT it builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from itk.runtime.attention import SDPA, Attention


def test_an_unknown_attention_choice_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="attention 'xformers': expected one of auto, fa4, flash, sage, sdpa"):
        Attention.resolve("xformers", "cpu")


@pytest.mark.parametrize("choice", ["auto", "fa4", "flash", "sage", "sdpa"])
def test_every_choice_resolves_to_sdpa_on_the_cpu_and_computes_softmax_attention(choice):
    attention = Attention.resolve(choice, torch.device("cpu"))
    assert attention == SDPA and attention.name == "sdpa"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    weights = torch.softmax(torch.einsum("blnd,bmnd->bnlm", q, k) / 8**0.5, dim=-1)
    expected = torch.einsum("bnlm,bmnd->blnd", weights, v)
    assert torch.allclose(attention(q, k, v), expected, atol=1e-6)


def test_a_resolved_attention_cannot_be_changed_afterwards():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SDPA.name = "flash"  # type: ignore[misc]


class Counting:
    """SDPA that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return SDPA(q, k, v)


def test_the_dit_runs_every_attention_of_every_block_with_the_attention_it_was_built_with(tmp_path):
    from test_dit import golden_config

    from itk.runtime.models.dit import load_dit

    from golden import golden_weights_file

    meta, tensors = golden_weights_file("dit_A", tmp_path / "dit_A.safetensors")
    counting = Counting()
    built = load_dit([tmp_path / "dit_A.safetensors"], golden_config(meta), dtype=torch.float32, attention=counting)
    plain = load_dit([tmp_path / "dit_A.safetensors"], golden_config(meta), dtype=torch.float32)
    assert plain.attention is SDPA and all(b.self_attn.attention is SDPA for b in plain.blocks)
    inputs = [tensors[f"input.{name}"] for name in ("x", "t", "context", "clip_fea", "y", "audio")]
    with torch.no_grad():
        ours, reference = built(*inputs), plain(*inputs)
    # per block: the self-attention, the text and the image cross-attention, the audio cross-attention
    assert counting.calls == 4 * len(built.blocks)
    assert torch.equal(ours, reference)


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
