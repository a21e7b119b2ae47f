"""bench/bench_cond_encode.py's receptive field and exact reuse, measured on a tiny random VAE (width 4) on
16x16 frames: the computed receptive field is where the latents stop depending on the first frame, and the
reuse of reference-independent segment outputs gives the official latent bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from itk.runtime.configs import VAEConfig

SCRIPT = Path(__file__).parents[1] / "bench" / "bench_cond_encode.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_cond_encode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_vae(study):
    return study.random_vae(VAEConfig(dim=4), seed=0)


def test_the_receptive_field_is_where_the_latents_stop_depending_on_the_first_frame(study, tiny_vae):
    reach = study.receptive_field(tiny_vae.encoder)
    last = reach // study.TEMPORAL_STRIDE  # the last latent frame that sees frame 0
    frames = 1 + study.TEMPORAL_STRIDE * (last + 3)  # three latent frames past it
    result = study.reference_dependence(tiny_vae, size=16, seed=1, frames=frames)
    diff = result["per_latent_max_abs"]
    assert diff[0] > 0 and diff[last] > 0
    assert result["identical_latents"] == [last + 1, last + 2, last + 3]
    assert study.last_dependent_frames(study.encoder_segments(tiny_vae.encoder))[-1] == last


def test_the_official_clip_has_no_latent_frame_independent_of_the_reference(study, tiny_vae):
    result = study.reference_dependence(tiny_vae, size=16, seed=2)
    assert result["latent_shape"][1] == 21
    assert all(d > 0 for d in result["per_latent_max_abs"])
    assert result["prefix_encode_equals_full_encode"]["bit_equal"]
    assert result["exact_reuse"]["bit_equal_to_official"]


def test_reusing_one_chunk_earlier_than_computed_changes_the_latent(study, tiny_vae, monkeypatch):
    g = torch.Generator().manual_seed(3)
    a, b = (study.conditioning_video(torch.rand(3, 16, 16, generator=g) * 2 - 1, study.FRAMES) for _ in range(2))
    first = study.first_reusable_chunks(study.encoder_segments(tiny_vae.encoder))
    _, kept = study.encode_reusing(tiny_vae, b, keep=True)
    assert min(kept) == first[0] < study.FRAMES // study.TEMPORAL_STRIDE
    assert torch.equal(study.encode_reusing(tiny_vae, a, kept)[0], tiny_vae.encode(a))

    monkeypatch.setattr(study, "first_reusable_chunks", lambda segments: [f - 1 for f in first])
    _, kept = study.encode_reusing(tiny_vae, b, keep=True)
    assert not torch.equal(study.encode_reusing(tiny_vae, a, kept)[0], tiny_vae.encode(a))
