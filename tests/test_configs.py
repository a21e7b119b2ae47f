"""Every structural argument of the official constructors is built as officially or refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from itk.runtime.configs import DiTConfig, VAEConfig, load_model_config
from itk.runtime.models.dit import AudioProjModel, InfiniteTalkDiT
from itk.runtime.models.vae import AttentionBlock, WanVAE

TINY_DIT = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 16, "text_len": 8,
            "clip_dim": 16, "audio_blocks": 2, "audio_channels": 4, "audio_intermediate_dim": 8,
            "audio_output_dim": 8, "audio_context_tokens": 2}
TINY_VAE = {"dim": 4}


def keys_of(cfg: DiTConfig) -> set[str]:
    with torch.device("meta"):
        return set(InfiniteTalkDiT(cfg).state_dict())


@pytest.mark.parametrize(("field", "keys"), [
    ("norm_output_audio", {"audio_proj.norm.weight", "audio_proj.norm.bias"}),
    ("norm_input_visual", {"blocks.0.norm_x.weight", "blocks.0.norm_x.bias"}),
    ("cross_attn_norm", {"blocks.0.norm3.weight", "blocks.0.norm3.bias"}),
    ("qk_norm", {f"blocks.0.{a}.{n}.weight" for a, n in [("self_attn", "norm_q"), ("self_attn", "norm_k"),
                 ("cross_attn", "norm_q"), ("cross_attn", "norm_k"), ("cross_attn", "norm_k_img")]}),
])
def test_a_dit_norm_switched_off_becomes_an_identity_without_weights(field, keys):
    on, off = DiTConfig(**TINY_DIT), DiTConfig(**TINY_DIT, **{field: False})
    assert keys <= keys_of(on)
    assert keys_of(on) - keys_of(off) == keys


def test_the_audio_projection_without_its_output_norm_returns_the_raw_projection():
    cfg = DiTConfig(**TINY_DIT, norm_output_audio=False)
    torch.manual_seed(0)
    proj = AudioProjModel(cfg)
    assert isinstance(proj.norm, nn.Identity)
    first = torch.randn(1, 1, cfg.audio_window, cfg.audio_blocks, cfg.audio_channels)
    later = torch.randn(1, 2, cfg.audio_window + cfg.vae_scale - 1, cfg.audio_blocks, cfg.audio_channels)
    with torch.no_grad():
        out = proj(first, later)
        a = torch.relu(proj.proj1(first.flatten(2)))
        b = torch.relu(proj.proj1_vf(later.flatten(2)))
        raw = proj.proj3(torch.relu(proj.proj2(torch.cat([a, b], dim=1))))
    assert torch.equal(out, raw.view(1, 3, cfg.audio_context_tokens, cfg.audio_output_dim))


@pytest.mark.parametrize(("values", "message"), [
    ({"model_type": "t2v"}, r"DiTConfig\.model_type = 't2v' is not supported \(.*i2v\)"),
    ({"window_size": [4, 4]}, r"DiTConfig\.window_size = \(4, 4\) is not supported \(only full attention"),
    ({"num_heads": 3}, r"DiTConfig\.num_heads = 3 is not supported"),
])
def test_a_dit_structure_the_runtime_cannot_build_is_refused_by_name_at_load(tmp_path, values, message):
    path = tmp_path / "itk_model_config.json"
    path.write_text(json.dumps({"dit": {**TINY_DIT, **values}}))
    with pytest.raises(ValueError, match=message):
        load_model_config(file=path)


def test_an_unknown_constructor_field_is_refused_by_name(tmp_path):
    path = tmp_path / "itk_model_config.json"
    path.write_text(json.dumps({"vae": {"dropout": 0.1}}))
    with pytest.raises(ValueError, match="unknown VAEConfig field.*dropout"):
        load_model_config(file=path)


def test_vae_attention_scales_put_attention_blocks_where_the_official_model_has_them(tmp_path):
    path = tmp_path / "itk_model_config.json"
    path.write_text(json.dumps({"vae": {**TINY_VAE, "attn_scales": [1.0, 0.25]}}))
    cfg = load_model_config(file=path).vae
    assert cfg.attn_scales == (1.0, 0.25)
    vae = WanVAE(cfg)
    kinds = lambda stages: [type(m).__name__[0] for m in stages]  # noqa: E731 - R(esidual), A(ttention), R(esample)
    # Encoder stages at scales 1, 1/2, 1/4, 1/8: attention after each residual block of stages 1 and 1/4.
    assert "".join(kinds(vae.encoder.downsamples)) == "RARARRRRRARARRR"
    # Decoder stages at scales 1/4, 1/2, 1, 2 (the last has no resampler after it).
    assert "".join(kinds(vae.decoder.upsamples)) == "RARARARRRRRRARARARRRR"
    assert sum(isinstance(m, AttentionBlock) for m in vae.modules()) == 4 + 6 + 2  # + one per middle
    with torch.no_grad():
        latent = vae.encode(torch.zeros(3, 5, 16, 16))
        assert latent.shape == (16, 2, 2, 2)
        assert vae.decode(latent).shape == (3, 5, 16, 16)


def test_a_vae_without_attention_scales_has_attention_only_in_the_middles():
    vae = WanVAE(VAEConfig(**TINY_VAE))
    assert sum(isinstance(m, AttentionBlock) for m in vae.modules()) == 2


def test_temporal_downsampling_needs_one_entry_per_resampler():
    with pytest.raises(ValueError, match=r"VAEConfig\.temporal_downsample = \(True,\) is not supported"):
        VAEConfig(temporal_downsample=(True,))


def test_a_latent_width_without_release_statistics_is_refused_by_name():
    with pytest.raises(ValueError, match=r"VAEConfig\.z_dim = 4 is not supported \(16: the latent mean"):
        VAEConfig(z_dim=4)


def test_the_checkpoints_own_config_json_is_honoured_as_the_official_loader_reads_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v", "dim": 5120,
        "eps": 1e-05, "num_layers": 30}))
    cfg = load_model_config(folder=tmp_path).dit
    assert cfg.eps == 1e-05 and cfg.num_layers == 30 and cfg.dim == 5120


def test_a_config_json_argument_the_runtime_cannot_build_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t2v"}))
    with pytest.raises(ValueError, match="model_type"):
        load_model_config(folder=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "i2v", "added_kv_proj_dim": 64}))
    with pytest.raises(ValueError, match="added_kv_proj_dim is not a WanModel argument"):
        load_model_config(folder=tmp_path)


def test_the_tiny_config_beside_the_weights_overrides_the_official_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "i2v", "dim": 5120, "num_layers": 40}))
    (tmp_path / "itk_model_config.json").write_text(json.dumps({"dit": {"dim": 64, "num_heads": 2}}))
    cfg = load_model_config(folder=tmp_path).dit
    assert (cfg.dim, cfg.num_heads, cfg.num_layers) == (64, 2, 40)
