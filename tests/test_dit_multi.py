"""The two-speaker DiT against the official WanModel (golden dit_multi_A): reference-target map, L-RoPE
routing, per-block outputs, and the uncond pass's single zero speaker."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_quant import dequantised_reference

from itk.runtime.configs import DiTConfig
from itk.runtime.models import dit as dit_module
from itk.runtime.models.dit import (
    InfiniteTalkDiT,
    key_positions,
    load_dit,
    query_positions,
    reference_target_map,
    rope_1d,
)

from golden import load_golden, rel_err, weights_of

TOL = 1e-5


def golden_config(meta: dict) -> DiTConfig:
    kw, hard = meta["constructor_kwargs"], list(meta["hardcoded_dims"].values())
    return DiTConfig(
        dim=kw["dim"], ffn_dim=kw["ffn_dim"], num_heads=kw["num_heads"], num_layers=kw["num_layers"],
        freq_dim=kw["freq_dim"], text_dim=kw["text_dim"], text_len=kw["text_len"],
        audio_intermediate_dim=kw["intermediate_dim"], audio_output_dim=kw["output_dim"],
        audio_context_tokens=kw["context_tokens"], clip_dim=hard[0], audio_blocks=hard[1],
        audio_channels=hard[2], image_tokens=hard[3],
    )


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    meta, tensors = load_golden("dit_multi_A")
    path = tmp_path_factory.mktemp("dit_multi") / "dit_multi_A.safetensors"
    save_file(weights_of(meta, tensors), str(path))
    return meta, tensors, load_dit([path], golden_config(meta), dtype=torch.float32)


def call(model: InfiniteTalkDiT, t: dict, audio: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"], audio,
                     speaker_masks=masks)


def token_masks(t: dict) -> torch.Tensor:
    return t["intermediate.token_ref_target_masks"]


@pytest.fixture(scope="module")
def recorded(golden):
    """Call 1 with every block's module outputs (self_attn: output and map) recorded by hooks."""
    _, t, model = golden
    seen: dict[str, object] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: out}))
               for name, m in model.named_modules() if name.startswith("blocks.") or name == "head"]
    try:
        out = call(model, t, t["input.audio"], token_masks(t))
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_the_two_speaker_output_matches_the_official_model(golden, recorded):
    _, t, _ = golden
    assert rel_err(recorded[0], t["output.noise_pred"][0]) < TOL


def test_the_uncond_pass_with_one_zero_speaker_takes_the_one_speaker_path_and_matches(golden, monkeypatch):
    _, t, model = golden
    monkeypatch.setattr(dit_module, "reference_target_map", lambda *a: pytest.fail("map computed for 1 speaker"))
    out = call(model, t, torch.zeros_like(t["input.audio"])[-1:], token_masks(t))
    assert rel_err(out, t["output.noise_pred_null_audio"][0]) < TOL


@pytest.mark.parametrize("block", [0, 1])
def test_every_block_matches_the_official_intermediates(golden, recorded, block):
    _, t, _ = golden
    seen = recorded[1]
    attn, ref_map = seen[f"blocks.{block}.self_attn"]
    assert rel_err(attn, t[f"intermediate.blocks.{block}.self_attn"]) < TOL
    assert rel_err(ref_map, t[f"intermediate.blocks.{block}.self_attn.x_ref_attn_map"]) < TOL
    for name in ("cross_attn", "audio_cross_attn"):
        ref = t[f"intermediate.blocks.{block}.{name}"]
        assert rel_err(seen[f"blocks.{block}.{name}"].reshape(ref.shape), ref) < TOL
    assert rel_err(seen[f"blocks.{block}"], t[f"intermediate.blocks.{block}"]) < TOL


@pytest.mark.parametrize("block", [0, 1])
def test_the_l_rope_positions_match_the_official_routing(golden, block):
    _, t, _ = golden
    ref_map = t[f"intermediate.blocks.{block}.self_attn.x_ref_attn_map"]
    assert torch.allclose(query_positions(ref_map), t[f"intermediate.blocks.{block}.audio_cross_attn.q_pos"],
                          rtol=0, atol=1e-5)
    k_pos = t[f"intermediate.blocks.{block}.audio_cross_attn.k_pos"]
    frames = t["input.x"].shape[1]
    assert torch.equal(key_positions(k_pos.numel() // frames).repeat(frames), k_pos)


def test_each_token_is_routed_to_the_class_with_the_largest_map_value():
    ref_map = torch.tensor([[0.9, 0.1, 0.2, 0.5], [0.1, 0.8, 0.2, 0.3], [0.0, 0.0, 0.6, 0.1]])
    # speaker 1 min-max to [0, 4]: 0.9 -> 4, 0.5 -> 2; speaker 2 to [20, 24]: 0.8 -> 24; background 12
    assert torch.allclose(query_positions(ref_map), torch.tensor([4.0, 24.0, 12.0, 2.0]), atol=1e-5)


def test_the_map_does_not_depend_on_the_query_chunk_size(golden):
    _, t, model = golden
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 288, 4, 16, generator=g), torch.randn(1, 288, 4, 16, generator=g)
    masks = token_masks(t)
    whole = reference_target_map(q, k, masks, chunk=288)
    assert torch.allclose(reference_target_map(q, k, masks, chunk=7), whole, atol=1e-7)


def test_the_map_is_the_head_mean_of_the_softmax_mass_on_each_class_over_its_size(golden):
    _, t, _ = golden
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 288, 4, 16, generator=g), torch.randn(1, 288, 4, 16, generator=g)
    masks = token_masks(t)
    probs = torch.softmax(torch.einsum("bqnd,bknd->bnqk", q, k[:, :96]) / 4.0, dim=-1)  # [1, N, L, 96]
    expected = torch.einsum("bnqk,ck->cq", probs, masks) / probs.shape[1] / masks.sum(1, keepdim=True)
    assert torch.allclose(reference_target_map(q, k, masks), expected, atol=1e-6)


def test_a_class_without_tokens_gets_a_zero_map_instead_of_a_division_by_zero():
    q, k = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)
    masks = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    ref_map = reference_target_map(q, k, masks)
    assert torch.isfinite(ref_map).all() and torch.equal(ref_map[2], torch.zeros(8))


def test_the_1d_rope_rotates_interleaved_pairs_by_position_times_frequency():
    x = torch.randn(2, 3, 1, 8)
    positions = torch.tensor([[0.0, 1.0, 2.5], [22.0, 2.0, 12.0]])
    out = rope_1d(x, positions)
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    angles = (positions[..., None] * inv).repeat_interleave(2, dim=-1)[:, :, None]  # official: repeat (n r)
    pairs = x.unflatten(-1, (-1, 2))
    rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    assert torch.allclose(out, x * angles.cos() + rotated_half * angles.sin(), atol=1e-6)
    assert torch.equal(rope_1d(x, torch.zeros(2, 3)), x)


def test_two_speakers_without_masks_are_refused_with_the_shape_needed(golden):
    _, t, model = golden
    with pytest.raises(ValueError, match=r"speaker_masks of shape \[3, 96\].*itk.runtime.speakers"):
        call(model, t, t["input.audio"], None)
    with pytest.raises(ValueError, match=r"got \[3, 95\]"):
        call(model, t, t["input.audio"], token_masks(t)[:, :95])


def test_the_one_speaker_call_is_unchanged_by_masks_given_or_not(golden):
    _, t, model = golden
    one = t["input.audio"][:1]
    assert torch.equal(call(model, t, one, token_masks(t)), call(model, t, one, None))


def test_a_streamed_runner_passes_the_masks_to_every_block_like_the_resident_model(golden):
    from itk.runtime.offload import BlockStreamer

    _, t, model = golden
    reference = call(model, t, t["input.audio"], token_masks(t))
    copy = load_dit_copy(model)
    streamer = BlockStreamer(copy.blocks, [False, False], device=torch.device("cpu"), pin=False)
    with torch.no_grad():
        out = copy(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                   t["input.audio"], speaker_masks=token_masks(t), run_blocks=streamer)
    assert torch.equal(out, reference)


def test_the_engines_runner_takes_the_masks_and_streams_like_the_resident_model(golden):
    from itk.runtime.offload import DiTRunner

    _, t, model = golden
    reference = call(model, t, t["input.audio"], token_masks(t))
    runner = DiTRunner(load_dit_copy(model), device=torch.device("cpu"), budget=0, pin=False)
    with torch.no_grad():
        out = runner(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                     t["input.audio"], speaker_masks=token_masks(t))
    assert runner.mode != "resident"  # budget 0: every block streamed
    assert torch.equal(out, reference)


def load_dit_copy(model: InfiniteTalkDiT) -> InfiniteTalkDiT:
    clone = InfiniteTalkDiT(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def test_bf16_weights_take_the_same_two_speaker_path_and_agree_with_float32(golden, tmp_path):
    meta, t, _ = golden
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in weights_of(meta, t).items()}, str(path))
    bf16 = load_dit([path], golden_config(meta), dtype=torch.bfloat16)
    out = call(bf16, t, t["input.audio"], token_masks(t))
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), t["output.noise_pred"].flatten().double(), 0)
    assert out.dtype == torch.float32 and cos > 0.99


def test_fp8_blocks_take_the_same_two_speaker_path_and_equal_float_on_dequantised_weights(golden, tmp_path):
    from itk.runtime.quant import FP8Kernel, linear_names, write_quantized

    meta, t, _ = golden
    cfg = golden_config(meta)
    with torch.device("meta"):
        names = [n for n in linear_names(InfiniteTalkDiT(cfg)) if n.startswith("blocks.")]
    path = tmp_path / "multi_fp8.safetensors"
    write_quantized(weights_of(meta, t), names, path, tmp_path / "multi_fp8.json")
    fp8 = dit_module.load_dit_fp8(path, tmp_path / "multi_fp8.json", cfg, dtype=torch.float32, device="cpu",
                                    kernel=FP8Kernel())[0]
    ref = dequantised_reference(meta, t, cfg, names)
    ours = call(fp8, t, t["input.audio"], token_masks(t))
    assert rel_err(ours, call(ref, t, t["input.audio"], token_masks(t))) < 1e-5
