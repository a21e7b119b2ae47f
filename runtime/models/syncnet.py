"""SyncNet (Chung & Zisserman, "Out of time", 2016), the `syncnet_v2.model` of joonson/syncnet_python, and the
lip-sync scores the talking-head papers report: Sync-C (confidence) and Sync-D (distance).

The network: an audio tower over 13 MFCC x 20 steps (0.2 s) and a lip tower over 5 RGB frames of a 224x224
face crop (0.2 s at 25 fps), each ending in a 1024-d embedding; in sync, the two embeddings are close. Our
attribute names and layer indices ARE the official checkpoint's keys (netcnnaud.*, netfcaud.*, netcnnlip.*,
netfclip.*); the official file, saved by an old PyTorch, has no BatchNorm `num_batches_tracked` counters (unused
in evaluation), so those alone may be absent.

The inputs as the reference pipeline makes them (run_pipeline.py + SyncNetInstance.py): frames in BGR order
with raw 0-255 values; the face crop centred on the smoothed face box, half-size s = half its larger side,
rows centre-s .. centre+1.8s and columns centre-1.4s .. centre+1.4s, out-of-frame pixels 110, resized to
224x224; audio as 16 kHz mono int16 values, MFCC by python_speech_features' defaults (`mfcc` below, ours:
that package is unmaintained since 2017, and the definition is twenty lines of NumPy), 4 MFCC steps per frame.

Scores (SyncNetInstance.evaluate): window i pairs frames i..i+4 with MFCC steps 4i..4i+19, for
min(frames, samples // 640) - 5 windows. For every offset d in -15..15, the mean over windows of the L2
distance (PyTorch's pairwise_distance, eps 1e-6) between lip embedding i and audio embedding i+d, audio
embeddings zero-padded at both ends: Sync-D is the smallest of the 31 means, Sync-C their median minus Sync-D,
and the offset 15 - argmin (positive: the sound comes before the mouth).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from itk.runtime.protocol import EXIT_MISSING_WEIGHTS, SAMPLE_RATE, UserError

EMBEDDING = 1024
LIP_FRAMES = 5  # video frames per window
MFCC_STEPS = 20  # MFCC steps per window (0.2 s)
MFCC_PER_FRAME = 4  # 100 MFCC steps per second / 25 frames per second
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
VSHIFT = 15  # offsets searched, in frames, each way
CROP_SIZE = 224
CROP_SCALE = 0.4  # run_pipeline.py --crop_scale
CROP_PAD_VALUE = 110
PAIRWISE_EPS = 1e-6
FETCH_HINT = "itk fetch --component syncnet"


def _conv_block(conv: nn.Module, channels: int, norm: type[nn.Module]) -> list[nn.Module]:
    return [conv, norm(channels), nn.ReLU(inplace=True)]


def _head() -> nn.Sequential:
    """512 -> 512 (BatchNorm, ReLU) -> EMBEDDING."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBEDDING))


class SyncNet(nn.Module):
    """syncnet_v2: `embed_audio` [N, 1, 13, 20] -> [N, 1024]; `embed_lips` [N, 3, 5, 224, 224] -> [N, 1024]."""

    def __init__(self) -> None:
        super().__init__()
        conv2, bn2 = nn.Conv2d, nn.BatchNorm2d
        self.netcnnaud = nn.Sequential(  # 13x20 -> 13x20 -> 11x9 -> 5x4 -> 1x1
            *_conv_block(conv2(1, 64, 3, padding=1), 64, bn2),
            nn.MaxPool2d(1, 1),
            *_conv_block(conv2(64, 192, 3, padding=1), 192, bn2),
            nn.MaxPool2d(3, (1, 2)),
            *_conv_block(conv2(192, 384, 3, padding=1), 384, bn2),
            *_conv_block(conv2(384, 256, 3, padding=1), 256, bn2),
            *_conv_block(conv2(256, 256, 3, padding=1), 256, bn2),
            nn.MaxPool2d(3, 2),
            *_conv_block(conv2(256, 512, (5, 4)), 512, bn2),
        )
        self.netfcaud = _head()
        self.netfclip = _head()
        conv3, bn3 = nn.Conv3d, nn.BatchNorm3d
        self.netcnnlip = nn.Sequential(  # 5x224x224 -> 1x109x109 -> 54 -> 26 -> 13 -> 6 -> 1
            *_conv_block(conv3(3, 96, (5, 7, 7), stride=(1, 2, 2)), 96, bn3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_block(conv3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), 256, bn3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            *_conv_block(conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, bn3),
            *_conv_block(conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, bn3),
            *_conv_block(conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, bn3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_block(conv3(256, 512, (1, 6, 6)), 512, bn3),
        )

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_lips(self, frames: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(path: str | Path, device: str | torch.device = "cpu") -> SyncNet:
    """The official syncnet_v2.model (a state dict) in a SyncNet, in eval mode, on `device`.

    Strict: every parameter and running statistic must be there under its official name with its shape, and
    nothing else; only the BatchNorm counters may be absent. A file that fails says so in one line (exit 3)."""
    model = SyncNet()
    fix = f"download it again: {FETCH_HINT}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        raise UserError(f"{path}: not a readable SyncNet checkpoint ({type(exc).__name__})", fix,
                        EXIT_MISSING_WEIGHTS) from exc
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a SyncNet state dict", fix, EXIT_MISSING_WEIGHTS)
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor)
                                                    or tuple(state[k].shape) != tuple(expected[k].shape))]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise UserError(f"{path}: not the syncnet_v2 layout ({detail})", fix, EXIT_MISSING_WEIGHTS)
    model.load_state_dict({**{k: v for k, v in expected.items() if k not in state}, **state}, strict=True)
    return model.eval().to(device)


def _mel_filterbank(filters: int = 26, nfft: int = 512, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[filters, nfft//2 + 1] triangles between FFT bins floor((nfft+1) * hz / rate) of mel-spaced points."""
    mel = np.linspace(0, 2595 * np.log10(1 + rate / 2 / 700.0), filters + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595.0) - 1)) / rate)
    index = np.arange(nfft // 2 + 1)[None, :]
    lo, mid, hi = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.where((index >= lo) & (index < mid), (index - lo) / (mid - lo), 0.0)
        fall = np.where((index >= mid) & (index < hi), (hi - index) / (hi - mid), 0.0)
    return rise + fall


def mfcc(samples: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[steps, 13] MFCC of mono samples (int16 values), as python_speech_features.mfcc with its defaults:
    pre-emphasis 0.97, 25 ms frames every 10 ms (the last zero-padded), |rFFT(512)|^2 / 512, 26 mel filters
    0..rate/2, log, orthonormal DCT-II, 13 coefficients liftered by 1 + 11 sin(pi n / 22), and the first
    replaced by the log frame energy (zeros replaced by the float epsilon before each log)."""
    from scipy.fft import dct

    x = np.asarray(samples, dtype=np.float64)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])
    length, step = int(0.025 * rate + 0.5), int(0.01 * rate + 0.5)
    count = 1 if len(x) <= length else 1 + math.ceil((len(x) - length) / step)
    padded = np.concatenate([x, np.zeros((count - 1) * step + length - len(x))])
    frames = padded[np.arange(length)[None, :] + step * np.arange(count)[:, None]]
    power = np.abs(np.fft.rfft(frames, 512)) ** 2 / 512
    eps = np.finfo(float).eps
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    bands = power @ _mel_filterbank(rate=rate).T
    bands = np.where(bands == 0, eps, bands)
    coeffs = dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :13]
    coeffs *= 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    coeffs[:, 0] = np.log(energy)
    return coeffs


def face_crop(frame: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """[224, 224, 3] uint8 BGR: the reference pipeline's crop of an RGB frame around a face box
    [row_min, col_min, row_max, col_max] (module doc)."""
    from PIL import Image

    r0, c0, r1, c1 = (float(v) for v in box)
    s = max(r1 - r0, c1 - c0) / 2
    pad = int(s * (1 + 2 * CROP_SCALE))
    canvas = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=CROP_PAD_VALUE)
    cy, cx = (r0 + r1) / 2 + pad, (c0 + c1) / 2 + pad
    rows = slice(int(cy - s), int(cy + s * (1 + 2 * CROP_SCALE)))
    cols = slice(int(cx - s * (1 + CROP_SCALE)), int(cx + s * (1 + CROP_SCALE)))
    face = Image.fromarray(np.ascontiguousarray(canvas[rows, cols]))
    resized = np.asarray(face.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR))
    return np.ascontiguousarray(resized[..., ::-1])


@dataclass(frozen=True)
class SyncScore:
    """Sync-C (confidence, higher is better), Sync-D (distance, lower is better), the best offset in frames."""

    confidence: float
    distance: float
    offset: int
    windows: int


def window_count(frames: int, samples: int) -> int:
    """Windows the reference scores for `frames` video frames and `samples` audio samples (may be <= 0)."""
    return min(frames, samples // SAMPLES_PER_FRAME) - LIP_FRAMES


def sync_score(lips: np.ndarray, audio: np.ndarray, vshift: int = VSHIFT) -> SyncScore:
    """Sync-C / Sync-D / offset from lip and audio embeddings [N, D] of the same N windows (module doc)."""
    n = len(lips)
    if n < 1 or len(audio) != n:
        raise ValueError(f"need embeddings of the same windows, got {len(lips)} lip and {len(audio)} audio")
    padded = np.concatenate([np.zeros((vshift, audio.shape[1])), audio, np.zeros((vshift, audio.shape[1]))])
    lips = lips.astype(np.float64)
    # mean[j]: over windows i, lip window i against audio window i + j - vshift
    mean = np.array([np.linalg.norm(lips - padded[j:j + n] + PAIRWISE_EPS, axis=1).mean()
                     for j in range(2 * vshift + 1)])
    best = int(np.argmin(mean))
    return SyncScore(float(np.median(mean) - mean[best]), float(mean[best]), vshift - best, n)


def embed(model: SyncNet, crops: Iterable[np.ndarray], coeffs: np.ndarray, windows: int, batch: int = 20
          ) -> tuple[np.ndarray, np.ndarray]:
    """Lip and audio embeddings [windows, 1024] float32 from BGR face crops [224, 224, 3] uint8 arriving one
    per frame (only batch + 4 are held) and MFCC [steps, 13]; window i: crops i..i+4, MFCC steps 4i..4i+19."""
    device = next(model.parameters()).device
    lips: list[np.ndarray] = []
    audio: list[np.ndarray] = []
    held: list[np.ndarray] = []  # crops from frame `first` on
    first = 0
    with torch.inference_mode():
        for crop in crops:
            held.append(crop)
            count = min(batch, windows - first)
            if count < 1:
                break
            if len(held) < count + LIP_FRAMES - 1:
                continue
            clip = np.stack([np.stack(held[i:i + LIP_FRAMES]) for i in range(count)])  # [B, 5, 224, 224, 3]
            lip_in = torch.from_numpy(clip).to(device=device, dtype=torch.float32).permute(0, 4, 1, 2, 3)
            lips.append(model.embed_lips(lip_in).float().cpu().numpy())
            steps = [coeffs[MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + MFCC_STEPS].T for i in range(first, first + count)]
            aud_in = torch.from_numpy(np.stack(steps)[:, None]).to(device=device, dtype=torch.float32)
            audio.append(model.embed_audio(aud_in).float().cpu().numpy())
            del held[:count]
            first += count
    if first < windows:
        raise ValueError(f"{first} of {windows} windows embedded: fewer crops than windows + 4")
    return np.concatenate(lips), np.concatenate(audio)
