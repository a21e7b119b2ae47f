"""CLIP vision tower: the clip_A golden, the full-CLIP file taken as is, strict visual keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from itk.runtime.configs import CLIPConfig
from itk.runtime.loading import WeightsError
from itk.runtime.models.clip import CLIP_KEY_MAP, CLIPVision, load_clip, official_clip_visual_keys
from itk.runtime.models.keymap import remap

from golden import load_golden, rel_err, weights_of

TINY = CLIPConfig(width=32, heads=4, layers=3)
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return load_golden("clip_A")


@pytest.fixture(scope="module")
def clip_file(golden, tmp_path_factory) -> Path:
    """The golden's full CLIP state dict (visual.*, textual.*, log_scale) as an official-style .pth."""
    path = tmp_path_factory.mktemp("clip") / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(weights_of(*golden), path)
    return path


@pytest.fixture(scope="module")
def clip(clip_file) -> CLIPVision:
    return load_clip(clip_file, TINY, dtype=torch.float32, device="cpu")


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_clip_A_frame_is_resized_and_normalised_like_the_official_code(golden, clip):
    _, tensors = golden
    pixels = clip.preprocess(tensors["input.image"])
    assert pixels.shape == (1, 3, 224, 224)
    assert rel_err(pixels, tensors["intermediate.preprocessed"]) < TOL


def test_clip_A_features_are_the_second_to_last_block_output(golden, clip):
    _, tensors = golden
    features = clip.encode(tensors["input.image"])
    assert features.shape == (1, TINY.tokens, TINY.width) == (1, 257, 32)
    assert rel_err(features, tensors["output.features"]) < TOL
    assert len(clip.model.encoder.layers) == TINY.layers - 1


def test_the_text_tower_is_not_needed_but_every_visual_key_is(golden, tmp_path):
    visual_only = {k: v for k, v in weights_of(*golden).items() if k.startswith("visual.")}
    load_clip(_save(visual_only, tmp_path / "visual.pth"), TINY, dtype=torch.float32, device="cpu")
    for key in ("visual.head", "visual.transformer.2.mlp.2.bias"):
        state = dict(visual_only)
        del state[key]
        path = _save(state, tmp_path / "clip.pth")
        with pytest.raises(WeightsError, match=r"clip\.pth: missing key " + re.escape(key)):
            load_clip(path, TINY, dtype=torch.float32, device="cpu")


def test_a_renamed_visual_key_is_named_with_the_file_in_the_error(golden, tmp_path):
    state = weights_of(*golden)
    state["visual.pre_ln.weight"] = state.pop("visual.pre_norm.weight")
    path = _save(state, tmp_path / "renamed.pth")
    with pytest.raises(WeightsError) as err:
        load_clip(path, TINY, dtype=torch.float32, device="cpu")
    message = str(err.value)
    assert str(path) in message
    assert "missing key visual.pre_norm.weight" in message
    assert "unexpected key visual.pre_ln.weight" in message


def test_a_checkpoint_of_another_width_is_refused_naming_the_key(clip_file):
    with pytest.raises(WeightsError, match=r"\.pth: visual\.\S+ has shape"):
        load_clip(clip_file, CLIPConfig(width=48, heads=4, layers=3), dtype=torch.float32, device="cpu")


def test_the_key_map_fits_the_full_size_vit_h_14_checkpoint():
    cfg = CLIPConfig()
    w, grid = cfg.width, cfg.image_size // cfg.patch_size
    shapes = {
        "visual.patch_embedding.weight": (w, 3, cfg.patch_size, cfg.patch_size),
        "visual.cls_embedding": (1, 1, w),
        "visual.pos_embedding": (1, grid * grid + 1, w),
        "visual.head": (w, 1024),
        "attn.to_qkv.weight": (3 * w, w),
        "attn.to_qkv.bias": (3 * w,),
        "attn.proj.weight": (w, w),
        "mlp.0.weight": (w * cfg.mlp_ratio, w),
        "mlp.0.bias": (w * cfg.mlp_ratio,),
        "mlp.2.weight": (w, w * cfg.mlp_ratio),
    }
    keys = official_clip_visual_keys(cfg)
    state = {}
    for key in keys:
        short = key.split(".", 3)[-1] if key.startswith("visual.transformer.") else key
        state[key] = torch.empty(shapes.get(short, (w,)), device="meta")
    with torch.device("meta"):
        clip = CLIPVision(cfg)
    mapped = remap(state, CLIP_KEY_MAP, expected=keys, module=clip.model, source="full-size", hint="hint")
    assert len(keys) == 5 + 32 * 12 + 3
    assert set(mapped) == set(clip.model.state_dict())
    assert mapped["embeddings.position_embedding.weight"].shape == (257, 1280)


def test_pipeline_A_reference_frame_gives_the_recorded_clip_context():
    from golden import GOLDENS

    _, tensors = load_golden("pipeline_A")
    clip = load_clip(GOLDENS / "pipeline_A.clip.safetensors", CLIPConfig(width=24, heads=4, layers=3),
                     dtype=torch.float32, device="cpu")
    features = clip.encode(tensors["intermediate.clip_input"][:, :, -1:])
    assert rel_err(features, tensors["intermediate.clip_context"]) < TOL
