"""Colour correction against the official `color_correction` golden (strengths 1, 0.5, 0 and a flat channel)."""

from __future__ import annotations

import pytest
import torch

from itk.runtime.color import lab_to_rgb, match_colors, match_colors_torch, rgb_to_lab

from golden import load_golden

META, T = load_golden("color_correction")


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lab_transfer_toward_the_reference_matches_the_official_output(strength):
    ours = match_colors(T["input.source"], T["input.reference"], strength)
    assert ours.dtype == torch.float32 and ours.shape == T["input.source"].shape
    assert (ours - T[f"output.strength_{strength}"]).abs().max().item() == 0.0


def test_strength_zero_returns_the_clip_unchanged():
    ours = match_colors(T["input.source"], T["input.reference"], 0.0)
    assert torch.equal(ours, T["output.strength_0.0"])


def test_a_flat_channel_takes_the_reference_mean():
    ours = match_colors(T["input.source_flat_channel"], T["input.reference"], 1.0)
    assert (ours - T["output.flat_channel_strength_1.0"]).abs().max().item() == 0.0


def test_a_strength_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="strength"):
        match_colors(T["input.source"], T["input.reference"], 1.5)


class _CastVAE:
    """decode() gives a fixed video with a strong colour cast; encode() gives zero latents of the right shape."""

    def __init__(self, video: torch.Tensor) -> None:
        self.video = video  # [3, F, H, W] in [-1, 1]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return torch.zeros(16, (video.shape[1] - 1) // 4 + 1, video.shape[2] // 8, video.shape[3] // 8)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.video


def _sampling_from_the_command_line(tmp_path, strength: str):
    """The Sampling of a run given `--color_correction_strength strength` (flags -> Request), as the generator
    hands it to the pipeline."""
    import json

    from itk.runtime.protocol import build_parser, check_values
    from itk.runtime.request import Request

    (tmp_path / "face.png").write_bytes(b"")
    (tmp_path / "speech.wav").write_bytes(b"")
    (tmp_path / "job.json").write_text(json.dumps({"prompt": "p", "cond_video": str(tmp_path / "face.png"),
                                                   "cond_audio": {"person1": str(tmp_path / "speech.wav")}}))
    flags = vars(build_parser().parse_args([
        "--ckpt_dir", "w", "--wav2vec_dir", "w", "--infinitetalk_dir", "w/it.safetensors",
        "--input_json", str(tmp_path / "job.json"), "--save_file", str(tmp_path / "talk"),
        "--frame_num", "9", "--motion_frame", "5", "--sample_steps", "1",
        "--color_correction_strength", strength]))
    check_values(flags)
    return Request.from_flags(flags).sampling


def test_an_intermediate_strength_reaches_the_colour_step_of_a_generated_clip(tmp_path):
    from itk.runtime.pipeline import SeededNoise, StreamingPipeline
    from itk.runtime.sampling import plan_clips

    sampling = _sampling_from_the_command_line(tmp_path, "0.3")
    assert sampling.color_correction_strength == 0.3
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(3, 9, 16, 16, generator=g) * torch.tensor([0.4, 1.0, 0.2])[:, None, None, None]) * 2 - 1
    reference = torch.rand(1, 3, 1, 16, 16, generator=g) * 2 - 1
    plan = plan_clips(9, sampling)
    pipeline = StreamingPipeline(dit=lambda x, t, context, clip_fea, y, audio: torch.zeros_like(x),
                                 vae=_CastVAE(video), sampling=sampling, noise=SeededNoise(0))
    (clip,) = pipeline.clips(references=[reference], clip_features=[torch.zeros(1, 257, 8)],
                             context=torch.zeros(1, 4, 8), context_null=torch.zeros(1, 4, 8),
                             audio=torch.zeros(9, 2, 4), plan=plan)
    ours = clip.frames.float()
    expected = {s: match_colors(video[None], reference, s)[0] for s in (0.3, 1.0)}
    assert torch.equal(ours, expected[0.3])
    assert (ours - expected[1.0]).abs().max().item() > 1e-2  # the strength makes a visible difference here


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_gpu_path_math_matches_the_official_output_within_float32_rounding(strength):
    ours = match_colors_torch(T["input.source"], T["input.reference"], strength)
    assert ours.dtype == torch.float32 and ours.shape == T["input.source"].shape
    assert (ours - T[f"output.strength_{strength}"]).abs().max().item() < 1e-5


def test_the_gpu_path_math_gives_a_flat_channel_the_reference_mean():
    ours = match_colors_torch(T["input.source_flat_channel"], T["input.reference"], 1.0)
    assert (ours - T["output.flat_channel_strength_1.0"]).abs().max().item() < 1e-5


def test_the_torch_lab_conversions_equal_scikit_image_including_out_of_gamut_colours():
    import warnings

    import numpy as np
    from skimage import color

    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(64, 3, generator=g, dtype=torch.float64)
    assert np.allclose(rgb_to_lab(rgb).numpy(), color.rgb2lab(rgb.numpy()), atol=1e-10)
    lab = torch.stack([torch.rand(64, generator=g) * 100, torch.randn(64, generator=g) * 80,
                       torch.randn(64, generator=g) * 80], dim=-1).double()  # many outside the sRGB gamut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = np.clip(color.lab2rgb(lab.numpy()), 0, 1)
    assert np.allclose(lab_to_rgb(lab).numpy(), expected, atol=1e-10)
