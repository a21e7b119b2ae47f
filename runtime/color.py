"""Colour correction of streamed clips: Lab mean/std transfer toward the first reference frame.

Long streamed videos drift in colour because every clip is conditioned on the previous clip's output;
the official pipeline pulls each decoded clip back toward the run's first reference frame in CIE Lab
(scikit-image), blended by a strength (--color_correction_strength). Two paths, one result:
- CPU clips: scikit-image itself, in the official order on the same numpy dtypes (bit-equal to the
  `color_correction` golden).
- CUDA clips: the same formulas (skimage's rgb2lab/lab2rgb: sRGB gamma, the sRGB->XYZ matrix, D65 white,
  the CIE f(t) with its linear toe, z clipped at 0, the result clipped to [0, 1]) in float64 torch on the
  GPU, so an 81-frame 640x640 clip never leaves the device (scikit-image takes seconds of CPU for it).
  Agrees with the golden to ~1e-7, far inside its float32 tolerance (~1e-5 of the output scale).
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


# skimage.color's constants: sRGB (linear) -> XYZ, and the D65 2-degree reference white.
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """skimage.color.rgb2lab on [..., 3] values in [0, 1] (float64 recommended)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ torch.tensor(XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device).T
    xyz = xyz / torch.tensor(D65, dtype=rgb.dtype, device=rgb.device)
    f = torch.where(xyz > 0.008856, torch.pow(xyz.clamp_min(0), 1 / 3), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """skimage.color.lab2rgb on [..., 3] Lab values: z below 0 clipped (skimage warns), result in [0, 1]."""
    light, a, b = lab.unbind(-1)
    fy = (light + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * torch.tensor(D65, dtype=lab.dtype, device=lab.device)
    rgb_from_xyz = torch.linalg.inv(torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)).to(lab)
    linear = xyz @ rgb_from_xyz.T
    rgb = torch.where(linear > 0.0031308, 1.055 * torch.pow(linear.clamp_min(0), 1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0.0, 1.0)


def match_colors_torch(clip: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """The official transfer in float64 torch on the clip's device (one batched pass over all frames)."""
    frames = ((clip[0].double() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 3, 0)  # [T, H, W, 3]
    ref = ((reference[0, :, 0].to(clip.device).double() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 0)
    ref_lab = rgb_to_lab(ref).flatten(0, 1)
    ref_mean, ref_std = ref_lab.mean(0), ref_lab.std(0, correction=0)
    lab = rgb_to_lab(frames)
    mean = lab.mean(dim=(1, 2), keepdim=True)
    std = lab.std(dim=(1, 2), keepdim=True, correction=0)
    moved = (lab - mean) * (ref_std / std) + ref_mean
    moved = torch.where(std == 0, ref_mean.expand_as(lab), moved)  # a flat channel becomes the reference mean
    out = (1 - strength) * frames + strength * lab_to_rgb(moved)
    return (out * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0).to(clip.dtype).contiguous()


def match_colors(clip: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Colour-correct `clip` [1, 3, T, H, W] in [-1, 1] toward `reference` [1, 3, 1, H, W] (any device).

    strength 0 returns the clip itself; otherwise each frame is blended (1-s)*frame + s*corrected. A CUDA
    clip is corrected on its GPU (the result stays there), a CPU clip by scikit-image.
    """
    if strength == 0.0:
        return clip
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if clip.is_cuda:
        return match_colors_torch(clip, reference, strength)
    return _match_with_skimage(clip, reference, strength)


def _match_with_skimage(clip: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """The official code path, frame by frame in numpy (bit-equal to the golden)."""
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
