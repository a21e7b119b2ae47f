"""Colour correction of streamed clips: Lab mean/std transfer toward the first reference frame.

Long streamed videos drift in colour because every clip is conditioned on the previous clip's output;
the official pipeline pulls each decoded clip back toward the run's first reference frame in CIE Lab
(scikit-image), blended by a strength (runtime-spec §5.7). The arithmetic follows the official order on
the same numpy dtypes so the result matches the `color_correction` golden to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def _transfer(frame_lab: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray) -> np.ndarray:
    """Per Lab channel: (x - mean_src) * std_ref / std_src + mean_ref; a flat channel becomes mean_ref."""
    out = frame_lab.copy()
    for c in range(3):
        channel = frame_lab[:, :, c]
        mean, std = channel.mean(), channel.std()
        out[:, :, c] = ref_mean[c] if std == 0 else (channel - mean) * (ref_std[c] / std) + ref_mean[c]
    return out


def match_colors(clip: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Colour-correct `clip` [1, 3, T, H, W] in [-1, 1] toward `reference` [1, 3, 1, H, W].

    strength 0 returns the clip itself; otherwise each frame is blended (1-s)*frame + s*corrected.
    """
    if strength == 0.0:
        return clip
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    import warnings

    from skimage import color

    frames = np.clip((clip[0].permute(1, 2, 3, 0).cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
    ref = np.clip((reference[0, :, 0].permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
    ref_lab = color.rgb2lab(ref)
    ref_mean = [ref_lab[:, :, c].mean() for c in range(3)]
    ref_std = [ref_lab[:, :, c].std() for c in range(3)]
    out = []
    for frame in frames:
        with warnings.catch_warnings():  # out-of-gamut Lab values are clipped on purpose, as officially
            warnings.simplefilter("ignore", UserWarning)
            corrected = color.lab2rgb(_transfer(color.rgb2lab(frame), ref_mean, ref_std))
        out.append((1 - strength) * frame + strength * np.clip(corrected, 0.0, 1.0))
    result = torch.from_numpy(np.stack(out) * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)
    return result.contiguous().to(device=clip.device, dtype=clip.dtype)
