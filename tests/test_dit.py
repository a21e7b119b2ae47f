"""Our DiT against the official InfiniteTalk WanModel on tiny random weights (golden dit_A, audio_proj_A)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from itk.runtime.configs import DiTConfig
from itk.runtime.loading import WeightsError, load_strict
from itk.runtime.models.dit import AudioProjModel, InfiniteTalkDiT, load_dit

from golden import golden_weights_file, load_golden, rel_err, weights_of

TOL = 1e-5


def golden_config(meta: dict) -> DiTConfig:
    kw = meta["constructor_kwargs"]
    return DiTConfig(
        dim=kw["dim"], ffn_dim=kw["ffn_dim"], num_heads=kw["num_heads"], num_layers=kw["num_layers"],
        freq_dim=kw["freq_dim"], text_dim=kw["text_dim"], text_len=kw["text_len"],
        audio_intermediate_dim=kw["intermediate_dim"], audio_output_dim=kw["output_dim"],
        audio_context_tokens=kw["context_tokens"],
    )


@pytest.fixture(scope="module")
def dit_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit_A.safetensors"
    meta, tensors = golden_weights_file("dit_A", path)
    model = load_dit([path], golden_config(meta), dtype=torch.float32)
    return meta, tensors, model, path


def record(seen: dict[str, object], name: str, args: tuple, out: object) -> None:
    """Keep a module's inputs and its output (for self_attn the attention output: it also returns the
    two-speaker reference-target map)."""
    seen[name] = (args, out[0] if name.endswith("self_attn") else out)


def run_with_hooks(model: InfiniteTalkDiT, tensors: dict) -> tuple[torch.Tensor, dict[str, object]]:
    seen: dict[str, object] = {}
    modules = dict(model.named_modules())
    modules["img_emb"] = model.img_emb.proj
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: record(seen, name, args, out))
        for name, m in modules.items()
    ]
    with torch.no_grad():
        out = model(tensors["input.x"], tensors["input.t"], tensors["input.context"], tensors["input.clip_fea"],
                    tensors["input.y"], tensors["input.audio"])
    for h in handles:
        h.remove()
    return out, seen


def test_the_dit_output_matches_the_official_model(dit_a):
    _, tensors, model, _ = dit_a
    out, _ = run_with_hooks(model, tensors)
    assert rel_err(out, tensors["output.noise_pred"][0]) < TOL


def test_the_time_embedding_and_its_projection_match(dit_a):
    _, t, model, _ = dit_a
    with torch.no_grad():
        _, _, e, e0, _, _ = model.embed(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"],
                                        t["input.y"], t["input.audio"])
    assert rel_err(e, t["intermediate.time_embedding"]) < TOL
    assert rel_err(e0.flatten(1), t["intermediate.time_projection"]) < TOL


@pytest.mark.parametrize("name", [
    "patch_embedding", "text_embedding", "img_emb",
    "blocks.0.self_attn", "blocks.0.cross_attn", "blocks.0.audio_cross_attn", "blocks.0",
    "blocks.1.self_attn", "blocks.1.cross_attn", "blocks.1.audio_cross_attn", "blocks.1", "head",
])
def test_every_recorded_intermediate_matches(dit_a, name):
    _, tensors, model, _ = dit_a
    _, seen = run_with_hooks(model, tensors)
    ref = tensors[f"intermediate.{name}"]
    assert rel_err(seen[name][1].reshape(ref.shape), ref) < TOL


def test_the_audio_windows_reach_the_projection_exactly_as_in_the_official_model(dit_a):
    _, tensors, model, _ = dit_a
    _, seen = run_with_hooks(model, tensors)
    (first, later), out = seen["audio_proj"]
    assert torch.equal(first, tensors["intermediate.audio_proj.in.0"])
    assert torch.equal(later, tensors["intermediate.audio_proj.in.1"])
    assert rel_err(out, tensors["intermediate.audio_proj.out"]) < TOL


def test_the_audio_projection_alone_matches_audio_proj_a():
    meta, tensors = load_golden("audio_proj_A")
    kw = meta["constructor_kwargs"]
    cfg = DiTConfig(
        audio_blocks=kw["blocks"], audio_channels=kw["channels"], audio_intermediate_dim=kw["intermediate_dim"],
        audio_output_dim=kw["output_dim"], audio_context_tokens=kw["context_tokens"],
    )
    with torch.device("meta"):
        proj = AudioProjModel(cfg)
    state = {k.removeprefix("audio_proj."): v for k, v in weights_of(meta, tensors).items()}
    load_strict(proj, state, "audio_proj_A")
    with torch.no_grad():
        out = proj(tensors["input.audio_embeds"], tensors["input.audio_embeds_vf"])
    assert rel_err(out, tensors["output.context_tokens"]) < TOL


def test_a_missing_key_is_named_with_its_file(dit_a, tmp_path):
    meta, tensors, _, _ = dit_a
    state = weights_of(meta, tensors)
    del state["blocks.1.audio_cross_attn.kv_linear.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    expected = r"broken\.safetensors: missing key blocks\.1\.audio_cross_attn\.kv_linear\.bias"
    with pytest.raises(WeightsError, match=expected):
        load_dit([path], golden_config(meta), dtype=torch.float32)


def test_a_renamed_key_is_named_as_unexpected(dit_a, tmp_path):
    meta, tensors, _, _ = dit_a
    state = weights_of(meta, tensors)
    state["blocks.0.norm_x.gamma"] = state.pop("blocks.0.norm_x.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"unexpected key blocks\.0\.norm_x\.gamma"):
        load_dit([path], golden_config(meta), dtype=torch.float32)


def test_later_files_override_earlier_ones_like_the_official_merge(dit_a, tmp_path):
    meta, tensors, _, base = dit_a
    override = tmp_path / "adapter.safetensors"
    save_file({"blocks.0.norm_x.bias": torch.full_like(tensors["blocks.0.norm_x.bias"], 7.0)}, str(override))
    model = load_dit([base, override], golden_config(meta), dtype=torch.float32)
    assert torch.all(model.blocks[0].norm_x.bias == 7.0)


def test_the_full_size_model_has_the_1633_official_keys_and_18_9_billion_parameters():
    with torch.device("meta"):
        model = InfiniteTalkDiT(DiTConfig())
    state = model.state_dict()
    assert len(state) == 1633
    assert sum(t.numel() for t in state.values()) == 18_882_046_784
    adapter = [k for k in state if k.startswith("audio_proj.") or ".audio_cross_attn." in k or ".norm_x." in k]
    assert len(adapter) == 330


def test_bf16_weights_load_as_bf16_without_an_fp32_copy(dit_a, tmp_path):
    meta, tensors, _, _ = dit_a
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in weights_of(meta, tensors).items()}, str(path))
    model = load_dit([path], golden_config(meta), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bf16_weights_with_float32_islands_run_and_agree_with_float32(dit_a, tmp_path):
    meta, tensors, model, path = dit_a
    bf16 = load_dit([path], golden_config(meta), dtype=torch.bfloat16)
    out, _ = run_with_hooks(bf16, tensors)
    ref = tensors["output.noise_pred"][0]
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
    assert out.dtype == torch.float32 and cos > 0.99


def test_the_tokens_enter_the_blocks_contiguous(dit_a):
    # A compiled block lays its outputs out like its input: the patch embedding's transposed view once made
    # every block read the residual stream by columns (bench/results/fusion-h200.json).
    meta, t, model, _ = dit_a
    with torch.no_grad():
        tokens = model.embed(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                             t["input.audio"])[0]
    assert tokens.is_contiguous()


def test_rope_turns_each_channel_pair_like_a_complex_product():
    from itk.runtime.models.dit import rope_angles, rope_apply, rope_table

    cos, sin = rope_angles((2, 3, 4), rope_table(12), "cpu")
    x = torch.randn(1, 24, 3, 12, dtype=torch.float64)
    turned = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.complex(cos, sin).to(torch.complex128)
    assert torch.allclose(rope_apply(x, cos, sin).double(), torch.view_as_real(turned).flatten(3), atol=1e-6)


def test_rope_angles_are_built_once_per_grid_and_reused_by_every_later_pass(dit_a):
    from itk.runtime.models.dit import rope_angles

    meta, t, model, _ = dit_a
    first = model.rope_for((2, 3, 4), torch.device("cpu"))
    assert model.rope_for((2, 3, 4), "cpu") is first
    assert all(torch.equal(a, b) for a, b in zip(first, rope_angles((2, 3, 4), model.rope, "cpu"), strict=True))
    assert model.rope_for((1, 3, 4), "cpu")[0].shape[0] == 12 != first[0].shape[0]
    with torch.no_grad():
        model(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"], t["input.audio"])
    grid = tuple(model.embed(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                             t["input.audio"])[1])
    assert (grid, torch.device("cpu")) in model.rope_cache


@pytest.mark.parametrize("affine", [True, False])
def test_the_layer_norm_a_compiled_graph_sees_equals_f_layer_norm_even_far_from_zero_mean(monkeypatch, affine):
    from itk.runtime.models.dit import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(512, 1e-6, elementwise_affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = (torch.randn(6, 512) * torch.tensor([1, 1, 5, 0.01, 1, 1e3]).unsqueeze(1)
         + torch.tensor([0, 1e3, -50, 3, 1e4, 0]).unsqueeze(1))
    with torch.no_grad():
        truth = F.layer_norm(x.double(), (512,), norm.weight.double() if affine else None,
                             norm.bias.double() if affine else None, 1e-6)
        eager = norm(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the branch Inductor traces
        written_out = norm(x)
        assert norm(x.bfloat16()).dtype == torch.bfloat16
    # Row by row within a quarter of a bf16 step (the blocks' activation dtype) of the float64 truth, like
    # F.layer_norm, also on rows whose mean is 300 to 10,000 times their spread (where a sum-of-squares
    # variance would lose every digit).
    bound = 2**-10 * truth.abs().amax(dim=1)
    error = lambda y: (y.double() - truth).abs().amax(dim=1)  # noqa: E731
    assert torch.all(error(eager) <= bound) and torch.all(error(written_out) <= bound)
