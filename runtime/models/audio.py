"""Speech -> per-video-frame wav2vec2 features, as InfiniteTalk computes them.

The encoder is transformers' Wav2Vec2Model loaded from the local chinese-wav2vec2-base folder (it strips the
checkpoint's `wav2vec2.` prefix and maps the weight-norm tensors itself). We do not call its forward: the
official features interpolate the 50 Hz CNN features to the 25 fps video rate *before* the feature
projection and the transformer, a point that Wav2Vec2Model.forward does not expose. So we compose its three
submodules (feature_extractor, feature_projection, encoder) with the interpolation in between.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
FPS = 25
SILENCE_LUFS = 100.0  # |loudness| above this means silence (-inf) or garbage: leave the track alone
WEIGHTS = "model.safetensors"


class AudioError(Exception):
    """Speech that cannot be used, or an encoder folder that cannot be loaded; one line with the fix."""


def load_speech(path: str | Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz, resampled by librosa whatever the file's rate and channels."""
    import librosa

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    try:
        samples, _ = librosa.load(str(path), sr=SAMPLE_RATE, mono=True)
    except Exception as exc:  # noqa: BLE001 - soundfile/audioread raise many types for a non-audio file
        raise AudioError(f"{path}: not a readable audio file ({type(exc).__name__})") from exc
    return samples.astype(np.float32)


def loudness_normalize(samples: np.ndarray, sr: int = SAMPLE_RATE, target_lufs: float = -23.0) -> np.ndarray:
    """BS.1770 integrated loudness to `target_lufs`; silence (or anything unmeasurable) is left unchanged."""
    import pyloudnorm

    loudness = pyloudnorm.Meter(sr).integrated_loudness(samples)
    if not np.isfinite(loudness) or abs(loudness) > SILENCE_LUFS:
        return samples
    return pyloudnorm.normalize.loudness(samples, loudness, target_lufs)


def frame_count(samples: np.ndarray, sr: int = SAMPLE_RATE) -> int:
    """Video frames the track covers at 25 fps (floored, as the official code does)."""
    return int(len(samples) / sr * FPS)


class AudioEncoder:
    """chinese-wav2vec2-base with InfiniteTalk's 25 fps feature extraction."""

    def __init__(self, extractor, model, device: str | torch.device = "cpu"):
        self.extractor = extractor
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu") -> AudioEncoder:
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        folder = Path(folder)
        for name in ("config.json", "preprocessor_config.json", WEIGHTS):
            if not (folder / name).is_file():
                hint = " (it comes from the hub's refs/pr/1 revision)" if name == WEIGHTS else ""
                raise AudioError(f"{folder / name}: missing{hint}; run `itk fetch` to download it")
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        model = Wav2Vec2Model.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        return cls(extractor, model, device)

    def input_values(self, samples: np.ndarray) -> torch.Tensor:
        """The feature extractor's waveform (zero-mean/unit-variance when the folder says do_normalize)."""
        values = self.extractor(samples, sampling_rate=SAMPLE_RATE).input_values
        return torch.from_numpy(np.squeeze(np.asarray(values))).float()

    @torch.no_grad()
    def embed(self, samples: np.ndarray) -> torch.Tensor:
        """[frames, layers, hidden] float32: the outputs of every transformer layer, one row per video frame."""
        frames = frame_count(samples)
        x = self.input_values(samples).unsqueeze(0).to(self.device)
        cnn = self.model.feature_extractor(x)  # [1, C, T_50Hz]
        cnn = F.interpolate(cnn, size=frames, mode="linear", align_corners=True).transpose(1, 2)
        hidden = self.model.feature_projection(cnn)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        # Each layer's output, caught by hooks: transformers 4.x and 5.x report hidden states differently.
        layer_outputs: list[torch.Tensor] = []

        def keep(module, args, output) -> None:
            layer_outputs.append(output[0] if isinstance(output, tuple) else output)

        hooks = [layer.register_forward_hook(keep) for layer in self.model.encoder.layers]
        try:
            self.model.encoder(hidden)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([o[0] for o in layer_outputs], dim=1).float()  # [frames, layers, hidden]
