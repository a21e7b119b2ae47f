"""FP8: the official quanto file layout read without optimum-quanto, against dit_A and a tiny T5."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_dit import golden_config

from itk.runtime.loading import WeightsError, load_strict
from itk.runtime.models.dit import InfiniteTalkDiT, load_dit_fp8, rope_table
from itk.runtime.quant import (
    FP8,
    FP8_MAX,
    GELU_DIP,
    FP8Kernel,
    FP8Linear,
    fp8_matmul,
    gelu_tanh,
    linear_names,
    quantize_activations,
    quantize_gelu,
    quantize_rowwise,
    shared_input,
    write_quantized,
)

from golden import load_golden, rel_err, weights_of


def load_fp8(path, cfg, dtype=torch.float32):
    """The DiT of an FP8 file whose map sits beside it as <name>.json (as `write_quantized` is called here)."""
    return load_dit_fp8(path, path.with_suffix(".json"), cfg, dtype=dtype, device="cpu", kernel=FP8Kernel())[0]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    meta, tensors = load_golden("dit_A")
    cfg = golden_config(meta)
    with torch.device("meta"):
        names = linear_names(InfiniteTalkDiT(cfg))
    folder = tmp_path_factory.mktemp("quant_models")
    path = folder / "infinitetalk_single_fp8.safetensors"
    write_quantized(weights_of(meta, tensors), names, path, folder / "infinitetalk_single_fp8.json")
    return meta, tensors, cfg, names, path


def run(model, t):
    with torch.no_grad():
        return model(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                     t["input.audio"])


def test_the_file_has_the_official_quanto_layout(quantized):
    from safetensors import safe_open

    _, _, _, names, path = quantized
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.self_attn.q.weight._data").dtype == FP8
        assert f.get_tensor("blocks.0.self_attn.q.weight._scale").shape[1] == 1
    q = "blocks.0.self_attn.q"
    assert {f"{q}.input_scale", f"{q}.output_scale", f"{q}.bias"} <= keys
    assert "blocks.0.self_attn.q.weight" not in keys and "blocks.0.norm_x.weight" in keys
    qmap = json.loads(path.with_suffix(".json").read_text())
    assert set(qmap) == set(names) and qmap[names[0]] == {"weights": "qfloat8_e4m3fn", "activations": "none"}


def dequantised_reference(meta: dict, t: dict[str, torch.Tensor], cfg, names: list[str]) -> InfiniteTalkDiT:
    """The float model on the golden's weights with the Linears `names` rounded onto the FP8 grid and back:
    what an FP8 model of those weights must compute."""
    state = weights_of(meta, t)
    for name in names:
        data, scale = quantize_rowwise(state[f"{name}.weight"])
        state[f"{name}.weight"] = data.float() * scale.float()
    with torch.device("meta"):
        ref = InfiniteTalkDiT(cfg)
    load_strict(ref, state, "dequantised", dtype=torch.float32)
    ref.rope = rope_table(cfg.head_dim)
    return ref.eval()


def test_the_fp8_model_equals_the_float_model_on_the_dequantised_weights(quantized):
    meta, t, cfg, names, path = quantized
    fp8 = load_fp8(path, cfg)
    assert isinstance(fp8.blocks[0].ffn[0], FP8Linear)
    assert rel_err(run(fp8, t), run(dequantised_reference(meta, t, cfg, names), t)) < 1e-5


@pytest.mark.parametrize(("scope", "min_cosine"), [("blocks", 0.999), ("all", 0.998)])
def test_fp8_stays_close_to_the_official_float_output(quantized, tmp_path, scope, min_cosine):
    # "blocks": the 15 Linears of every block, 98% of the 14B weights: DESIGN's cosine >= 0.999 holds
    # (0.99957). "all": every Linear as in the official file; on this tiny model's random weights (the
    # 46080-wide audio projection, 64-wide layers) it measures 0.99872, a property of these random weights.
    meta, t, cfg, names, _ = quantized
    chosen = [n for n in names if scope == "all" or n.startswith("blocks.")]
    path = tmp_path / f"{scope}_fp8.safetensors"
    write_quantized(weights_of(meta, t), chosen, path, tmp_path / f"{scope}_fp8.json")
    out = run(load_fp8(path, cfg), t).flatten()
    cos = F.cosine_similarity(out.double(), t["output.noise_pred"].flatten().double(), dim=0)
    assert cos >= min_cosine


def test_fp8_weights_stay_one_byte_per_element_in_memory(quantized):
    _, _, cfg, _, path = quantized
    model = load_fp8(path, cfg, torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == FP8
    assert model.blocks[0].norm_x.weight.dtype == torch.bfloat16


def _rewrite(path, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    edit(state)
    out = tmp_path / "quant_models" / path.name
    out.parent.mkdir(exist_ok=True)
    save_file(state, str(out))
    out.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    return out


def test_a_missing_scale_is_named_with_its_file(quantized, tmp_path):
    _, _, cfg, _, path = quantized
    broken = _rewrite(path, tmp_path, lambda s: s.pop("blocks.1.ffn.2.weight._scale"))
    expected = r"infinitetalk_single_fp8\.safetensors: missing key blocks\.1\.ffn\.2\.weight\._scale"
    with pytest.raises(WeightsError, match=expected):
        load_fp8(broken, cfg)


def test_a_missing_plain_tensor_is_named_not_left_uninitialised(quantized, tmp_path):
    _, _, cfg, _, path = quantized
    broken = _rewrite(path, tmp_path, lambda s: s.pop("blocks.0.norm_x.bias"))
    with pytest.raises(WeightsError, match=r"missing key blocks\.0\.norm_x\.bias"):
        load_fp8(broken, cfg)


def test_weights_of_the_wrong_dtype_are_refused(quantized, tmp_path):
    _, _, cfg, _, path = quantized

    def to_bf16(state):
        key = "blocks.0.cross_attn.k.weight._data"
        state[key] = state[key].to(torch.bfloat16)

    broken = _rewrite(path, tmp_path, to_bf16)
    expected = r"blocks\.0\.cross_attn\.k\.weight\._data is torch\.bfloat16, expected float8"
    with pytest.raises(WeightsError, match=expected):
        load_fp8(broken, cfg)


def test_a_missing_map_says_where_it_was_expected(quantized, tmp_path):
    _, _, cfg, _, path = quantized
    lonely = tmp_path / "infinitetalk_single_fp8.safetensors"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(WeightsError, match=r"infinitetalk_single_fp8\.json: quantisation map not found"):
        load_fp8(lonely, cfg)


def test_the_fp8_t5_loads_dequantised_and_matches_the_float_t5(tmp_path):
    from itk.runtime.configs import T5Config
    from itk.runtime.models.t5 import load_t5, load_t5_fp8, official_t5_keys

    meta, t = load_golden("t5_A")
    ov = meta["umt5_xxl_overrides"]
    cfg = T5Config(vocab_size=ov["vocab_size"], dim=ov["dim"], dim_attn=ov["dim_attn"], dim_ffn=ov["dim_ffn"],
                   num_heads=ov["num_heads"], num_layers=ov["encoder_layers"], text_len=meta["text_len"])
    state = weights_of(meta, t)
    linears = sorted({k[: -len(".weight")] for k in official_t5_keys(cfg)
                      if k.endswith(".weight") and (".attn." in k or ".ffn." in k)})
    write_quantized(state, linears, tmp_path / "t5_fp8.safetensors", tmp_path / "t5_map_fp8.json")
    fp8 = load_t5_fp8(tmp_path / "t5_fp8.safetensors", tmp_path / "t5_map_fp8.json", cfg, dtype=torch.float32,
                      device="cpu")
    for name in linears:
        data, scale = quantize_rowwise(state[f"{name}.weight"])
        state[f"{name}.weight"] = data.float() * scale.float()
    torch.save(state, tmp_path / "dequantised.pth")
    ref = load_t5(tmp_path / "dequantised.pth", cfg, dtype=torch.float32, device="cpu")
    ids, mask = t["input.ids"], t["input.mask"]
    for ours, theirs in zip(fp8.encode(ids, mask), ref.encode(ids, mask), strict=True):
        assert rel_err(ours, theirs) < 1e-6


def test_fp8_weights_are_views_of_the_memory_mapped_file_not_copies(quantized):
    _, _, cfg, _, path = quantized
    model = load_fp8(path, cfg)
    weight = model.blocks[1].ffn[2].weight
    # One storage spanning the whole file: the bytes were mapped, not read into process memory.
    assert weight.untyped_storage().nbytes() == path.stat().st_size


def test_activations_are_quantised_per_token_to_the_fp8_range():
    x = torch.randn(7, 64, dtype=torch.bfloat16) * torch.logspace(-3, 3, 7).unsqueeze(1).bfloat16()
    data, scale = quantize_activations(x)
    assert data.dtype == FP8 and scale.shape == (7, 1) and scale.dtype == torch.float32
    assert torch.equal(data.float().abs().amax(dim=1), torch.full((7,), FP8_MAX))
    assert rel_err(data.float() * scale, x.float()) < 2**-4  # e4m3: 3 mantissa bits


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")
def test_the_fp8_matmul_path_agrees_with_the_dequantised_path():
    # The GPU path's arithmetic (per-token activation scales, per-row weight scales, one FP8 matmul),
    # run here through torch's CPU _scaled_mm without the compiled quantiser.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 256, generator=g).bfloat16()
    layer = FP8Linear(256, 96, bias=True, kernel=FP8Kernel())
    data, scale = quantize_rowwise(torch.randn(96, 256, generator=g) / 16)
    layer.weight, layer.scale = data, scale.float()
    layer.bias = torch.nn.Parameter(torch.randn(96, generator=g).bfloat16(), requires_grad=False)
    try:
        fast = fp8_matmul(x, layer.weight, layer.scale, layer.bias)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU FP8 matmul: {exc}")
    slow = layer(x)  # CPU: the dequantised path
    assert fast.shape == slow.shape == (2, 40, 96) and fast.dtype == torch.bfloat16
    cos = F.cosine_similarity(fast.double().flatten(), slow.double().flatten(), dim=0)
    assert cos >= 0.999 and rel_err(fast, slow) < 0.05


def test_a_scale_of_integer_dtype_is_refused(quantized, tmp_path):
    _, _, cfg, _, path = quantized

    def to_int(state):
        key = "blocks.0.ffn.0.weight._scale"
        state[key] = state[key].to(torch.int32)

    with pytest.raises(WeightsError, match=r"blocks\.0\.ffn\.0\.weight\._scale is torch\.int32, expected a float"):
        load_fp8(_rewrite(path, tmp_path, to_int), cfg)


def test_a_mapped_tensor_is_read_back_byte_for_byte_with_pread(quantized):
    from itk.runtime.loading import map_file

    _, _, _, _, path = quantized
    tensors, mapped = map_file(path)
    for key in ("blocks.0.ffn.0.weight._data", "blocks.1.norm_x.bias", "blocks.0.self_attn.q.input_scale"):
        src = tensors[key]
        dst = torch.empty_like(src)
        mapped.read_into(dst, mapped.offset_of(src))
        assert torch.equal(dst.view(torch.uint8) if dst.dim() else dst, src.view(torch.uint8) if src.dim() else src)
    assert mapped.offset_of(tensors["blocks.0.ffn.0.weight._data"].clone()) is None


def test_every_fp8_layer_of_a_loaded_dit_computes_with_the_one_kernel_given(quantized):
    import copy

    _, _, cfg, _, path = quantized
    kernel = FP8Kernel(matmul=False)
    model, mapped = load_dit_fp8(path, path.with_suffix(".json"), cfg, dtype=torch.float32, device="cpu", kernel=kernel)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert layers and all(layer.kernel is kernel for layer in layers)
    assert mapped.path == path
    # A copy of a block (a streaming slot) shares the run's kernel instead of forking its state.
    assert copy.deepcopy(model.blocks[0]).ffn[0].kernel is kernel


def test_a_kernel_that_was_asked_not_to_use_fp8_matmuls_never_does():
    layer = FP8Linear(64, 64, bias=False, kernel=FP8Kernel(matmul=False))
    assert not layer.kernel.uses_matmul(layer, torch.zeros(2, 64, dtype=torch.bfloat16))


def test_a_refused_fp8_matmul_is_remembered_by_the_kernel_and_the_layer_still_computes(monkeypatch):
    import itk.runtime.quant as quant

    calls = []

    def refuse(x, weight, scale, bias, quantize, bias_in_matmul, fast_accum):
        calls.append(bias_in_matmul)
        raise RuntimeError("no FP8 here")

    monkeypatch.setattr(quant, "fp8_matmul", refuse)
    kernel = FP8Kernel()
    layer = FP8Linear(64, 32, bias=True, kernel=kernel)
    data, scale = quantize_rowwise(torch.randn(32, 64))
    layer.weight, layer.scale, layer.bias = data, scale.float(), torch.nn.Parameter(torch.zeros(32))
    assert kernel.matmul_or_none(layer, torch.randn(3, 64).bfloat16()) is None
    assert calls == [True, False]  # first without the bias in the matmul, then given up
    assert not kernel.bias_in_matmul and kernel.matmul_error == "RuntimeError: no FP8 here"
    assert not kernel.matmul_active and not kernel.uses_matmul(layer, torch.zeros(2, 64, dtype=torch.bfloat16))


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float(), approximate="tanh")


def fp8_layer(in_features: int, out_features: int, seed: int = 0) -> FP8Linear:
    g = torch.Generator().manual_seed(seed)
    layer = FP8Linear(in_features, out_features, bias=True, kernel=FP8Kernel())
    data, scale = quantize_rowwise(torch.randn(out_features, in_features, generator=g) / 16)
    layer.weight, layer.scale = data, scale.float()
    layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=g).bfloat16(), requires_grad=False)
    return layer


def cpu_scaled_mm_or_skip(fn):
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU FP8 matmul: {exc}")


def test_the_tanh_gelu_never_dips_below_the_bound_the_folded_quantiser_assumes():
    x = torch.linspace(-12, 0, 1_200_001, dtype=torch.float64)
    low = F.gelu(x, approximate="tanh").min().item()
    assert -GELU_DIP < low < -0.17  # the dip is -0.17004 at x = -0.7518


def test_the_sigmoid_form_of_the_gelu_is_the_tanh_gelu_to_float32_rounding():
    x = torch.linspace(-30, 30, 600_001)
    assert (gelu_tanh(x) - gelu(x)).abs().max() < 1e-6
    low = gelu_tanh(torch.linspace(-12, 0, 1_200_001, dtype=torch.float64)).min().item()
    assert -GELU_DIP < low < -0.17


def test_gelu_folded_into_the_quantiser_equals_gelu_then_quantise_on_every_row_above_the_dip():
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(32, 1000, generator=g) * torch.logspace(-0.5, 1.5, 32).unsqueeze(1)).bfloat16()
    data, scale = quantize_gelu(h)
    ref_data, ref_scale = quantize_activations(gelu_tanh(h.float()))
    assert torch.equal(scale, ref_scale) and torch.equal(data.float(), ref_data.float())


def test_a_row_that_stays_below_the_gelu_dip_gets_a_larger_scale_and_nothing_clips():
    h = torch.tensor([[-0.75, -3.0, 0.1, -0.2], [-0.75, -0.75, -0.75, -0.75]], dtype=torch.bfloat16)
    data, scale = quantize_gelu(h)
    assert torch.all(scale * FP8_MAX >= gelu(h).abs().amax(dim=1, keepdim=True))
    # Nothing clipped: every value comes back within e4m3's rounding (3 mantissa bits) of its GELU.
    assert torch.all((data.float() * scale - gelu(h)).abs() <= gelu(h).abs() * 2**-4)


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")
def test_an_fp8_layer_given_the_pre_activation_computes_itself_on_its_gelu():
    h = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(2)).bfloat16() * 2
    layer = fp8_layer(128, 48)
    folded = cpu_scaled_mm_or_skip(lambda: layer.after_gelu(h))
    apart = fp8_matmul(gelu(h).bfloat16(), layer.weight, layer.scale, layer.bias)
    assert folded.shape == apart.shape == (2, 24, 48)
    assert F.cosine_similarity(folded.double().flatten(), apart.double().flatten(), dim=0) > 0.9995


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")
def test_q_k_and_v_share_one_quantised_input_when_their_kernel_fuses(monkeypatch):
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    layers = [fp8_layer(64, 64, seed) for seed in range(3)]
    for layer in layers[1:]:
        layer.kernel = layers[0].kernel
    monkeypatch.setattr(FP8Kernel, "fuses", lambda self, layer, x: True)  # as inside a compiled graph on a GPU
    shared = cpu_scaled_mm_or_skip(lambda: shared_input(x, layers))
    for layer, out in zip(layers, shared, strict=True):
        assert torch.equal(out, fp8_matmul(x, layer.weight, layer.scale, layer.bias))


def test_layers_outside_a_compiled_graph_each_take_the_plain_input():
    x = torch.randn(1, 6, 64).bfloat16()
    layers = [fp8_layer(64, 32, seed) for seed in range(2)] + [torch.nn.Linear(64, 32).bfloat16()]
    assert not layers[0].kernel.fuses(layers[0], x)  # eager, and on a CPU: the dequantised path
    for layer, out in zip(layers, shared_input(x, layers), strict=True):
        assert torch.equal(out, layer(x))


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="torch without _scaled_mm")
@pytest.mark.parametrize("fast", [True, False])
def test_every_fp8_matmul_of_a_kernel_accumulates_as_the_kernel_says(monkeypatch, fast):
    seen = []
    real = torch._scaled_mm

    def recording(*args, use_fast_accum=False, **kwargs):
        seen.append(use_fast_accum)
        return real(*args, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    monkeypatch.setattr(FP8Kernel, "fuses", lambda self, layer, x: True)  # as inside a compiled graph on a GPU
    layers = [fp8_layer(64, 64, seed) for seed in range(2)]
    layers[0].kernel = layers[1].kernel = FP8Kernel(fast_accum=fast)
    x = torch.randn(1, 8, 64).bfloat16()
    cpu_scaled_mm_or_skip(lambda: (shared_input(x, layers), layers[0].after_gelu(x)))
    assert seen == [fast] * 3


def test_fast_accumulation_is_on_unless_the_environment_turns_it_off():
    from itk.runtime.options import RuntimeOptions

    assert RuntimeOptions.from_env({}).fp8_fast_accum and FP8Kernel().fast_accum
    assert not RuntimeOptions.from_env({"ITK_FP8_FAST_ACCUM": "0"}).fp8_fast_accum
