"""LoRA files: every key convention merged against a reference computed here, bf16 and FP8 paths, the
official pairing of files and scales, and files that do not fit the model."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_dit import golden_config
from test_generate import _tiny_args, _video_facts, job, weights  # noqa: F401 - fixtures reused

from itk.runtime.lora import apply_loras
from itk.runtime.models.dit import InfiniteTalkDiT, load_dit, load_dit_fp8
from itk.runtime.offload import DiTRunner
from itk.runtime.protocol import BadInput, pair_loras
from itk.runtime.quant import FP8Kernel, FP8Linear, linear_names, write_quantized

from golden import golden_weights_file, weights_of

D, FFN = 64, 128  # dit_A's dim and ffn_dim
GEN = torch.Generator().manual_seed(7)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * 0.05


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """dit_A's weights as a float32 file and as an official-layout FP8 file + map."""
    folder = tmp_path_factory.mktemp("dit")
    plain = folder / "dit_A.safetensors"
    meta, tensors = golden_weights_file("dit_A", plain)
    with torch.device("meta"):
        names = linear_names(InfiniteTalkDiT(golden_config(meta)))
    fp8 = folder / "fp8.safetensors"
    write_quantized(weights_of(meta, tensors), names, fp8, folder / "fp8.json")
    return meta, tensors, plain, fp8


def plain_model(files) -> InfiniteTalkDiT:
    meta, _, plain, _ = files
    return load_dit([plain], golden_config(meta), dtype=torch.float32)


def fp8_model(files) -> InfiniteTalkDiT:
    meta, _, _, fp8 = files
    return load_dit_fp8(fp8, fp8.with_suffix(".json"), golden_config(meta), dtype=torch.float32, device="cpu",
                        kernel=FP8Kernel())[0]


def run(model, t) -> torch.Tensor:
    with torch.no_grad():
        return model(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                     t["input.audio"])


def write(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


# (convention, file keys -> tensors, {our tensor: expected delta before the scale})
def conventions() -> list[tuple[str, dict, dict]]:
    down, up = rand(4, D), rand(D, 4)
    a, b = rand(8, D), rand(FFN, 8)
    diff, diff_b, norm, c = rand(D, D), rand(D), rand(D), rand(4, FFN)
    return [
        ("official lora_down/lora_up", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                                        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up},
         {"blocks.0.self_attn.q.weight": up @ down}),
        ("official with an alpha (ignored by default)", {
            "diffusion_model.blocks.1.cross_attn.k_img.lora_down.weight": down,
            "diffusion_model.blocks.1.cross_attn.k_img.lora_up.weight": up,
            "diffusion_model.blocks.1.cross_attn.k_img.alpha": torch.tensor(2.0)},
         {"blocks.1.cross_attn.k_img.weight": up @ down}),
        ("diff and diff_b", {"diffusion_model.blocks.0.self_attn.o.diff": diff,
                             "diffusion_model.blocks.0.self_attn.o.diff_b": diff_b,
                             "diffusion_model.blocks.1.cross_attn.norm_k_img.diff": norm},
         {"blocks.0.self_attn.o.weight": diff, "blocks.0.self_attn.o.bias": diff_b,
          "blocks.1.cross_attn.norm_k_img.weight": norm}),
        ("PEFT lora_A/lora_B, our names, no prefix", {"blocks.1.ffn.0.lora_A.weight": a,
                                                      "blocks.1.ffn.0.lora_B.weight": b},
         {"blocks.1.ffn.0.weight": b @ a}),
        ("diffusers names with transformer. prefix", {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": down, "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
            "transformer.blocks.0.attn2.add_v_proj.lora_A.weight": down,
            "transformer.blocks.0.attn2.add_v_proj.lora_B.weight": up,
            "transformer.blocks.1.ffn.net.0.proj.lora_A.weight": a,
            "transformer.blocks.1.ffn.net.0.proj.lora_B.weight": b,
            "transformer.blocks.1.attn2.to_out.0.lora_A.weight": down,
            "transformer.blocks.1.attn2.to_out.0.lora_B.weight": up,
            "transformer.blocks.0.norm2.diff": norm},
         {"blocks.0.self_attn.q.weight": up @ down, "blocks.0.cross_attn.v_img.weight": up @ down,
          "blocks.1.ffn.0.weight": b @ a, "blocks.1.cross_attn.o.weight": up @ down,
          "blocks.0.norm3.weight": norm}),
        ("diffusers names with diffusion_model. prefix", {
            "diffusion_model.blocks.0.ffn.net.2.lora_A.weight": c,
            "diffusion_model.blocks.0.ffn.net.2.lora_B.weight": up},
         {"blocks.0.ffn.2.weight": up @ c}),
    ]


CASES = conventions()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,keys,expected", CASES, ids=IDS)
def test_every_key_convention_merges_scale_times_the_delta_into_the_plain_weights(files, tmp_path, name, keys,
                                                                                 expected):
    model, before = plain_model(files), dict(plain_model(files).state_dict())
    apply_loras(model, [(write(tmp_path / "l.safetensors", keys), 0.7)])
    after = model.state_dict()
    for target, delta in expected.items():
        torch.testing.assert_close(after[target], before[target] + 0.7 * delta.reshape(before[target].shape))
    untouched = [k for k in before if k not in expected]
    assert all(torch.equal(after[k], before[k]) for k in untouched)


@pytest.mark.parametrize("name,keys,expected", CASES, ids=IDS)
@pytest.mark.parametrize("method", ["side", "merge"])
def test_every_key_convention_on_the_fp8_model_gives_the_merged_output(files, tmp_path, name, keys, expected,
                                                                      method):
    """Reference: the float model on the dequantised FP8 weights with the delta added (a bf16 merge, in
    float32 here). Side path: the same math, 1e-5 (a full `.diff` of an FP8 layer is merged even then).
    Merge: re-quantised, within the FP8 tolerance (cosine >= 0.999), each weight within one rounding."""
    _, t, _, _ = files
    lora = write(tmp_path / "l.safetensors", keys)
    reference = plain_model(files)
    fp8 = fp8_model(files)
    layers = {n: m for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    with torch.no_grad():
        for n, m in layers.items():
            reference.get_submodule(n).weight.copy_(m.dequantized(torch.float32))
    apply_loras(reference, [(lora, 1.3)])
    apply_loras(fp8, [(lora, 1.3)], fp8_method=method)
    ours, ref = run(fp8, t), run(reference, t)
    full_fp8 = any(k.endswith(".diff") and k.split("model.")[-1].removesuffix(".diff") in layers for k in keys)
    if method == "side" and not full_fp8:
        assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5
        return
    assert F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) >= 0.999
    touched = {k.rpartition(".")[0] for k in expected if k.endswith(".weight")} & set(layers)
    for n in touched:  # one FP8 rounding: at most half the top binade's step (16 units of the row's scale)
        exact = reference.get_submodule(n).weight
        unit = exact.abs().amax(dim=1, keepdim=True) / 448
        assert ((layers[n].dequantized(torch.float32) - exact).abs() <= 17 * unit).all()


def test_alpha_scale_multiplies_by_alpha_over_rank_and_says_which_convention_applied(files, tmp_path, caplog):
    down, up = rand(4, D), rand(D, 4)
    keys = {"diffusion_model.blocks.0.self_attn.k.lora_down.weight": down,
            "diffusion_model.blocks.0.self_attn.k.lora_up.weight": up,
            "diffusion_model.blocks.0.self_attn.k.alpha": torch.tensor(2.0)}
    lora = write(tmp_path / "alpha.safetensors", keys)
    before = plain_model(files).state_dict()["blocks.0.self_attn.k.weight"]
    for mode, factor in (("ignore", 1.0), ("scale", 2.0 / 4)):
        model = plain_model(files)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            apply_loras(model, [(lora, 1.0)], alpha_mode=mode)
        torch.testing.assert_close(model.state_dict()["blocks.0.self_attn.k.weight"], before + factor * up @ down)
        assert "alpha 2 differs from rank 4" in caplog.text and ("ignored" if mode == "ignore" else "alpha/rank") \
            in caplog.text


def test_several_files_are_applied_each_with_its_scale(files, tmp_path):
    d1, u1, d2, u2 = rand(4, D), rand(D, 4), rand(8, D), rand(D, 8)
    k = "diffusion_model.blocks.0.self_attn.v"
    one = write(tmp_path / "1.safetensors", {f"{k}.lora_down.weight": d1, f"{k}.lora_up.weight": u1})
    two = write(tmp_path / "2.safetensors", {f"{k}.lora_down.weight": d2, f"{k}.lora_up.weight": u2})
    model, before = plain_model(files), plain_model(files).blocks[0].self_attn.v.weight.clone()
    apply_loras(model, pair_loras([one, two], [0.5, 2.0]))
    torch.testing.assert_close(model.blocks[0].self_attn.v.weight, before + 0.5 * u1 @ d1 + 2.0 * u2 @ d2)
    side, merged, ref = fp8_model(files), fp8_model(files), fp8_model(files).blocks[0].self_attn.v
    apply_loras(side, pair_loras([one, two], [0.5, 2.0]), fp8_method="side")
    apply_loras(merged, pair_loras([one, two], [0.5, 2.0]))  # the default: merged, re-quantised once
    x = torch.randn(3, D, generator=GEN)
    expected = F.linear(x, ref.dequantized(torch.float32) + 0.5 * u1 @ d1 + 2.0 * u2 @ d2, ref.bias)
    torch.testing.assert_close(side.blocks[0].self_attn.v(x), expected, rtol=1e-5, atol=1e-6)
    assert F.cosine_similarity(merged.blocks[0].self_attn.v(x).flatten(), expected.flatten(), dim=0) >= 0.999


def test_the_official_pairing_zips_files_with_scales_defaulting_to_1_2(caplog):
    assert pair_loras(["a"], None) == [(__import__("pathlib").Path("a"), 1.2)]
    with caplog.at_level(logging.WARNING):
        pairs = pair_loras(["a", "b"], None)
    assert [p.name for p, _ in pairs] == ["a"] and "only the first 1 applied" in caplog.text
    assert [s for _, s in pair_loras(["a", "b"], [1.0, 0.5, 9.0])] == [1.0, 0.5]
    assert pair_loras(None, None) == []


def test_a_lora_matching_no_key_is_an_error_naming_its_keys(files, tmp_path):
    lora = write(tmp_path / "other.safetensors", {"diffusion_model.unet.down.0.lora_down.weight": rand(4, D),
                                                  "diffusion_model.unet.down.0.lora_up.weight": rand(D, 4)})
    with pytest.raises(BadInput, match="no key matches this model.*unet.down.0"):
        apply_loras(plain_model(files), [(lora, 1.0)])


def test_a_partial_match_warns_with_the_counts_and_the_first_unmatched_modules(files, tmp_path, caplog):
    k = "diffusion_model.blocks.0.self_attn.q"
    lora = write(tmp_path / "partial.safetensors", {
        f"{k}.lora_down.weight": rand(4, D), f"{k}.lora_up.weight": rand(D, 4),
        "diffusion_model.blocks.7.self_attn.q.lora_down.weight": rand(4, D),
        "diffusion_model.blocks.7.self_attn.q.lora_up.weight": rand(D, 4)})
    with caplog.at_level(logging.WARNING):
        apply_loras(plain_model(files), [(lora, 1.0)])
    assert "1 of 2 modules match this model; not in it: blocks.7.self_attn.q" in caplog.text


def test_diff_m_and_unknown_suffixes_are_reported_not_dropped_silently(files, tmp_path, caplog):
    k = "diffusion_model.blocks.0.self_attn.q"
    lora = write(tmp_path / "m.safetensors", {f"{k}.lora_down.weight": rand(4, D), f"{k}.lora_up.weight": rand(D, 4),
                                              "diffusion_model.blocks.0.diff_m": rand(1, 6, D),
                                              "diffusion_model.blocks.0.self_attn.q.dora_scale": rand(D)})
    with caplog.at_level(logging.WARNING):
        apply_loras(plain_model(files), [(lora, 1.0)])
    assert "2 keys with a suffix itk does not apply" in caplog.text and "diff_m" in caplog.text


@pytest.mark.parametrize("keys,words", [
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": rand(4, 32),
      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rand(D, 4)}, "blocks.0.self_attn.q has down [4, 32]"),
    ({"diffusion_model.blocks.0.self_attn.o.diff": rand(32, 32)}, "blocks.0.self_attn.o.diff has shape [32, 32]"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": rand(4, D)}, "has lora_down but no lora_up"),
])
def test_a_file_that_does_not_fit_the_model_is_refused_by_name(files, tmp_path, keys, words):
    lora = write(tmp_path / "bad.safetensors", keys)
    with pytest.raises(BadInput, match="bad.safetensors") as err:
        apply_loras(plain_model(files), [(lora, 1.0)])
    assert words in str(err.value)


def test_a_file_that_is_not_safetensors_is_refused_by_name(files, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BadInput, match="x.safetensors: not a readable safetensors"):
        apply_loras(plain_model(files), [(tmp_path / "x.safetensors", 1.0)])


def test_a_side_path_on_some_blocks_streams_with_every_block_the_same_shape(files, tmp_path):
    """Block 0 gets rank 4, block 1 none: the streamed copies need one shape, so block 1 gets zero factors,
    and streaming every block (budget 0) gives the resident output."""
    _, t, _, _ = files
    k = "diffusion_model.blocks.0.cross_attn.q"
    lora = write(tmp_path / "b0.safetensors", {f"{k}.lora_down.weight": rand(4, D), f"{k}.lora_up.weight": rand(D, 4)})
    resident, streamed = fp8_model(files), fp8_model(files)
    for model in (resident, streamed):
        apply_loras(model, [(lora, 1.0)], fp8_method="side")
    assert streamed.blocks[1].cross_attn.q.lora_down.abs().sum() == 0
    assert streamed.blocks[1].cross_attn.q.lora_down.shape == (4, D)
    runner = DiTRunner(streamed, device=torch.device("cpu"), budget=0)
    assert runner.mode == "mmap"
    torch.testing.assert_close(run(runner, t), run(resident, t), rtol=0, atol=0)



def test_a_merged_fp8_layer_keeps_its_place_and_streams_like_any_other_block(files, tmp_path):
    """The default FP8 method merges: no side factors, the merged weight is FP8 on the layer's own device,
    and the streamed model (budget 0) computes exactly what the resident merged model does."""
    _, t, _, _ = files
    k = "diffusion_model.blocks.0.cross_attn.q"
    lora = write(tmp_path / "b0.safetensors", {f"{k}.lora_down.weight": rand(4, D), f"{k}.lora_up.weight": rand(D, 4)})
    resident, streamed = fp8_model(files), fp8_model(files)
    for model in (resident, streamed):
        applied = apply_loras(model, [(lora, 1.0)], device="cpu")
        assert (applied.merged_fp8, applied.side) == (1, 0)
    layer = streamed.blocks[0].cross_attn.q
    assert layer.lora_down is None and layer.weight.dtype == torch.float8_e4m3fn and layer.weight.device.type == "cpu"
    runner = DiTRunner(streamed, device=torch.device("cpu"), budget=0)
    torch.testing.assert_close(run(runner, t), run(resident, t), rtol=0, atol=0)

# --- the generator end to end on tiny weights (itk.runtime.tiny) with a tiny LoRA file -----------------------


def tiny_lora(path, dim: int = 64, ffn: int = 128):
    return write(path, {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": rand(4, dim),
                        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rand(dim, 4),
                        "transformer.blocks.1.ffn.net.0.proj.lora_A.weight": rand(4, dim),
                        "transformer.blocks.1.ffn.net.0.proj.lora_B.weight": rand(ffn, 4),
                        "diffusion_model.blocks.9.self_attn.q.lora_down.weight": rand(4, dim),
                        "diffusion_model.blocks.9.self_attn.q.lora_up.weight": rand(dim, 4)})


FAST = ("--sample_text_guide_scale", "1", "--sample_audio_guide_scale", "2", "--sample_shift", "2",
        "--lora_scale", "1", "--use_teacache", "--mode", "streaming")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-streamed"])
def test_a_fast_preset_run_on_tiny_weights_applies_the_lora_and_writes_the_video(weights, job, fp8):  # noqa: F811
    import subprocess

    tmp_path, _ = job
    lora = tiny_lora(tmp_path / "tiny_lora.safetensors")
    args = _tiny_args(weights, tmp_path, *FAST, "--lora_dir", str(lora))
    if fp8:
        args.remove("--infinitetalk_dir")
        args.remove(str(weights.infinitetalk))
        args += ["--quant", "fp8", "--quant_dir", str(weights.fp8_dit), "--num_persistent_param_in_dit", "0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of 3 modules match this model; not in it: blocks.9.self_attn.q" in proc.stderr
    assert "TeaCache: never skips within the first 5 steps" in proc.stderr
    assert _video_facts(tmp_path / "out" / "talk.mp4")[:2] == (25.0, 25)


def test_a_lora_for_another_model_stops_the_generator_with_exit_2_naming_the_file(weights, job):  # noqa: F811
    import subprocess

    tmp_path, _ = job
    lora = tiny_lora(tmp_path / "big_lora.safetensors", dim=96)
    proc = subprocess.run(_tiny_args(weights, tmp_path, "--lora_dir", str(lora)), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2 and "big_lora.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "talk.mp4").exists()


# --- the diffusers name map, checked against the official conversion (issue 31, item 20) ------------------------
# diffusers' own Wan2.1 -> diffusers key conversion (scripts/convert_wan_to_diffusers.py, TRANSFORMER_KEYS_RENAME_DICT,
# the entries of the I2V model), applied the way that script applies it: every rule, in order, as a substring
# replacement. A LoRA written in diffusers' names is named through exactly this.
OFFICIAL_DIFFUSERS_RENAMES = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"), ("head.head", "proj_out"), ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"), ("norm3", "norm2"), ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
    ("attn2.to_k_img", "attn2.add_k_proj"), ("attn2.to_v_img", "attn2.add_v_proj"),
    ("attn2.norm_k_img", "attn2.norm_added_k"),
)
INFINITETALK_ONLY = ("audio_proj.", "audio_cross_attn.", "norm_x.")  # not in Wan2.1, so not in diffusers' layout


def official_diffusers_name(name: str) -> str:
    for ours, theirs in OFFICIAL_DIFFUSERS_RENAMES:
        name = name.replace(ours, theirs)
    return name


def test_every_wan_tensor_named_as_diffusers_names_it_gets_its_own_delta_and_no_other(files, tmp_path):
    from itk.runtime.lora import BLOCK, DIFFUSERS

    model = plain_model(files)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wan = [k for k in before if not any(part in k for part in INFINITETALK_ONLY) and not k.startswith("patch_")]
    keys, deltas = {}, {}
    for name in wan:
        module, _, leaf = name.rpartition(".")
        if leaf == "modulation":  # a parameter without a module: diffusers' scale_shift_table
            module, leaf = name, "weight"
        deltas[name] = rand(*before[name].shape)
        keys[f"transformer.{official_diffusers_name(module)}.{'diff' if leaf == 'weight' else 'diff_b'}"] = deltas[name]
    assert len(keys) == len(wan)  # the official conversion gives every Wan tensor a name of its own
    used = {BLOCK.sub("", key.removeprefix("transformer.")).rpartition(".")[0] for key in keys}
    assert {theirs for theirs, _ in DIFFUSERS if theirs != "proj_out"} <= used | {"norm2"}, "a rule left unchecked"
    apply_loras(model, [(write(tmp_path / "diffusers.safetensors", keys), 1.0)])
    after = model.state_dict()
    for name in wan:
        torch.testing.assert_close(after[name], before[name] + deltas[name], msg=lambda m, n=name: f"{n}: {m}")
    assert all(torch.equal(after[k], before[k]) for k in before if k not in deltas)


# --- a LoRA is applied once per layer on every placement the engine chooses -------------------------------------

def _tiny_engine(layout, job_dir, lora, *extra: str):
    from itk.runtime.engine import Engine, Placement, model_config, weight_paths
    from itk.runtime.options import RuntimeOptions
    from itk.runtime.protocol import Events, build_parser
    from itk.runtime.request import Request
    from itk.runtime.warm import WarmModels

    argv = _tiny_args(layout, job_dir, "--lora_dir", str(lora), "--lora_scale", "1", *extra)[3:]
    request = Request.from_flags(vars(build_parser().parse_args(argv)))
    return Engine(request=request, cfg=model_config(request), files=weight_paths(request),
                  place=Placement.choose(False), options=RuntimeOptions.from_env({}), events=Events(enabled=False),
                  models=WarmModels(keep=False))


def _applications(dit, clean) -> dict[str, int]:
    """Per FP8 layer: how many ways a LoRA reached it (a side path with non-zero factors, a changed weight)."""
    counts = {}
    for name, layer in dit.named_modules():
        if isinstance(layer, FP8Linear):
            side = layer.lora_down is not None and bool(layer.lora_down.abs().sum() > 0)
            base = clean.get_submodule(name)
            merged = not (torch.equal(layer.weight.view(torch.uint8), base.weight.view(torch.uint8))
                          and torch.equal(layer.scale, base.scale))
            counts[name] = int(side) + int(merged)
    return counts


@pytest.mark.parametrize("budget", ["0", None], ids=["streamed-mmap", "resident"])
def test_on_the_fp8_model_each_lora_layer_takes_its_delta_exactly_once(weights, job, budget):  # noqa: F811
    tmp_path, _ = job
    lora = tiny_lora(tmp_path / "tiny_lora.safetensors")
    args = ["--quant", "fp8", "--quant_dir", str(weights.fp8_dit)]
    args += ["--num_persistent_param_in_dit", budget] if budget is not None else []
    engine = _tiny_engine(weights, tmp_path, lora, *args)
    runner = engine.load_dit()
    assert runner.mode == ("mmap" if budget is not None else "resident")  # on the CPU nothing is pinned
    clean = load_dit_fp8(engine.files.dit.path, engine.files.dit.map, engine.cfg.dit, dtype=torch.float32,
                         device="cpu", kernel=FP8Kernel())[0]
    counts = _applications(runner.dit, clean)
    targets = {"blocks.0.self_attn.q", "blocks.1.ffn.0"}
    assert {n: c for n, c in counts.items() if c} == dict.fromkeys(targets, 1), counts
