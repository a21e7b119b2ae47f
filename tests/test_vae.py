"""Our VAE against the official WanVAE on tiny random weights (golden vae_A: base width 6)."""

from __future__ import annotations

import pytest
import torch

from itk.runtime.configs import VAEConfig
from itk.runtime.loading import WeightsError
from itk.runtime.models.vae import LATENT_MEAN, LATENT_STD, load_vae

from golden import GOLDENS, load_golden, rel_err, weights_of

TOL = 1e-4


@pytest.fixture(scope="module")
def vae_a(tmp_path_factory):
    meta, tensors = load_golden("vae_A")
    mc = meta["model_config"]
    cfg = VAEConfig(dim=mc["dim"], z_dim=mc["z_dim"], dim_mult=tuple(mc["dim_mult"]),
                    num_res_blocks=mc["num_res_blocks"], temporal_downsample=tuple(mc["temperal_downsample"]))
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(weights_of(meta, tensors), path)
    return meta, tensors, cfg, path, load_vae(path, cfg)


def test_encoding_a_5_frame_clip_matches_the_official_latent(vae_a):
    _, t, _, _, vae = vae_a
    assert rel_err(vae.encode(t["input.video"]), t["output.latent"]) < TOL
    assert rel_err(vae.encode(t["input.video"], normalise=False), t["intermediate.latent_unnormalised"]) < TOL


def test_decoding_matches_before_and_after_the_clamp(vae_a):
    _, t, _, _, vae = vae_a
    assert rel_err(vae.decode(t["input.latent"], clamp=False), t["intermediate.video_unclamped"]) < TOL
    video = vae.decode(t["input.latent"])
    assert rel_err(video, t["output.video"]) < TOL
    assert video.min() >= -1 and video.max() <= 1


def test_the_round_trip_matches_the_official_reconstruction(vae_a):
    _, t, _, _, vae = vae_a
    assert rel_err(vae.decode(vae.encode(t["input.video"])), t["output.reconstruction"]) < TOL


def test_the_latent_statistics_are_the_official_constants(vae_a):
    _, t, _, _, _ = vae_a
    assert torch.equal(torch.tensor(LATENT_MEAN), t["param.latent_mean"])
    assert torch.equal(torch.tensor(LATENT_STD), t["param.latent_std"])


def test_a_missing_key_fails_naming_the_key_and_the_file(vae_a, tmp_path):
    meta, t, cfg, _, _ = vae_a
    state = weights_of(meta, t)
    del state["decoder.head.2.bias"]
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"Wan2\.1_VAE\.pth: missing key decoder\.head\.2\.bias"):
        load_vae(path, cfg)


def test_a_bf16_load_keeps_bf16_weights(vae_a):
    _, _, cfg, path, _ = vae_a
    vae = load_vae(path, cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


def test_every_vae_call_of_pipeline_a_matches_including_three_chunk_caches():
    """pipeline_A's own VAE (width 4) on 32x48 clips of 1, 5 and 9 frames, decoding 3 latent frames."""
    meta, tensors = load_golden("pipeline_A")
    vae = load_vae(GOLDENS / meta["weight_files"]["vae"], VAEConfig(dim=meta["vae_config"]["dim"]))
    calls = sorted({name.rsplit(".", 1)[0] for name in tensors if name.startswith("intermediate.vae_call.")})
    assert len(calls) == meta["counts"]["vae_calls"]
    for call in calls:
        run = vae.encode if call.endswith("encode") else vae.decode
        assert rel_err(run(tensors[f"{call}.in"][0]), tensors[f"{call}.out"][0]) < TOL, call


def test_frames_past_the_last_whole_chunk_are_dropped_as_officially(vae_a):
    *_, vae = vae_a
    video = torch.rand(3, 8, 16, 24) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (16, 2, 2, 3)
    assert torch.equal(latent, vae.encode(video[:, :5]))


def test_a_bf16_vae_stays_within_its_measured_error_but_outside_the_goldens_tolerance(vae_a):
    """bf16 (the engine's `dtype` choice) measured on vae_A: encode ~1.2e-2, decode ~3.4e-2 of the output scale,
    far past the 1e-4 the goldens allow, so float32 stays the default."""
    _, t, cfg, path, _ = vae_a
    vae = load_vae(path, cfg, dtype=torch.bfloat16)
    latent, video = vae.encode(t["input.video"]), vae.decode(t["input.latent"])
    assert latent.dtype == video.dtype == torch.float32
    assert TOL < rel_err(latent, t["output.latent"]) < 3e-2
    assert TOL < rel_err(video, t["output.video"]) < 6e-2
