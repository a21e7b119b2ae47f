"""Speech -> per-video-frame wav2vec2 features, computed the way InfiniteTalk computes them.

The steps: librosa loads the track at 16 kHz mono; pyloudnorm brings it to -23 LUFS; the folder's
Wav2Vec2FeatureExtractor prepares the waveform; chinese-wav2vec2-base (transformers' Wav2Vec2Model) turns it
into one `[layers, hidden]` row per 25 fps video frame; `audio_windows` then gives each video frame its
5-frame neighbourhood, which is what the DiT's audio adapter consumes.

Two speakers (`combine_speakers`, as the official `audio_prepare_multi`): each track is loudness-normalised
on its own, then `add` puts the turns one after the other (each track padded with the other's silence) and
`para` plays them together; each speaker's padded track is embedded on its own (`embed_speakers`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from itk.runtime.configs import AudioConfig
from itk.runtime.protocol import AUDIO_TYPES, SAMPLE_RATE

if TYPE_CHECKING:
    import numpy as np
    import torch

# |loudness| above this is silence (-inf LUFS) or meaningless: the official rule leaves the track as it is.
UNMEASURABLE_LUFS = 100.0
# BS.1770 measures in 400 ms gating blocks; pyloudnorm refuses anything shorter.
LOUDNESS_BLOCK_S = 0.4

OFFICIAL = AudioConfig()

# The key map from chinese-wav2vec2-base's checkpoint (a Wav2Vec2ForPreTraining state dict, saved before
# torch's weight-norm parametrisations existed) to transformers' Wav2Vec2Model. Every other name is the same.
CHECKPOINT_PREFIX = "wav2vec2."
CHECKPOINT_RENAMES = MappingProxyType({
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
})
# Pre-training heads of Wav2Vec2ForPreTraining (contrastive quantizer and projections): unused for features.
PRETRAINING_HEADS = ("quantizer.", "project_q.", "project_hid.")
# The CNN feature encoder runs on at most this many of its 50 Hz output frames per call (5 s of speech; the
# widest layer then takes ~0.25 s on two CPU cores): a Ctrl-C is seen between calls, and a 60 s track's one
# call (3 s for its widest layer) no longer holds it up. The result equals the whole-track computation.
CNN_CHUNK_FRAMES = 250


class AudioError(Exception):
    """A speech track that cannot be used; the message names the file and what to give instead."""


def load_speech(path: str | Path, cfg: AudioConfig = OFFICIAL) -> np.ndarray:
    """Mono float32 samples at 16 kHz, sample for sample what the official `librosa.load(sr=16000)` gives.

    librosa reads with soundfile and resamples with soxr; importing librosa also imports numba and
    scipy.signal (most of a run's input reading). `_soundfile_load` makes the same calls without them, and
    librosa itself reads only what it alone can (a file libsndfile cannot open, e.g. m4a, via audioread).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        samples = _soundfile_load(path, cfg.sample_rate)
        if samples is None:
            samples = _librosa_load(path, cfg.sample_rate)
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if samples.size == 0:
        raise AudioError(f"{path}: the audio file holds no samples; give a speech recording")
    return samples.astype(np.float32, copy=False)


def _unreadable(path: Path, exc: Exception) -> AudioError:
    detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AudioError(f"{path}: not a readable audio file ({detail}); give a speech recording (.wav, .flac, .mp3)")


def _soundfile_load(path: Path, sr: int) -> np.ndarray | None:
    """librosa 0.11's load(sr=sr, mono=True) for what soundfile reads: the same read, downmix, soxr call and
    length fix (librosa.core.audio: __soundfile_load, to_mono, resample with res_type="soxr_hq"); None
    where librosa would go on to audioread (soundfile cannot read it) or stop (samples not finite)."""
    import numpy as np
    import soundfile
    import soxr

    try:
        with soundfile.SoundFile(path) as file:
            native = file.samplerate
            y = file.read(frames=-1, dtype=np.float32, always_2d=False).T
    except soundfile.SoundFileRuntimeError:
        return None
    if not np.isfinite(y).all():
        return None  # librosa refuses it (ParameterError): let it say so itself
    if y.ndim > 1:
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    if native == sr:
        return y
    size = int(np.ceil(y.shape[-1] * float(sr) / native))
    # librosa maps soxr over the last axis with np.apply_along_axis; for one channel that is one call.
    y_hat = soxr.resample(y, in_rate=native, out_rate=sr, quality="soxr_hq")
    y_hat = y_hat[:size] if len(y_hat) >= size else np.pad(y_hat, (0, size - len(y_hat)))
    return np.asarray(y_hat, dtype=y.dtype)


def _librosa_load(path: Path, sr: int) -> np.ndarray:
    """librosa.load itself, for files only its audioread fallback decodes."""
    import audioread
    import librosa

    try:
        with warnings.catch_warnings():
            # librosa warns before falling back from soundfile to audioread; our error says it all.
            warnings.simplefilter("ignore")
            return librosa.load(str(path), sr=sr, mono=True)[0]
    except audioread.exceptions.DecodeError as exc:
        raise _unreadable(path, exc) from exc


def loudness_normalize(samples: np.ndarray, sr: int = SAMPLE_RATE,
                       target: float = OFFICIAL.target_lufs) -> np.ndarray:
    """The track scaled to `target` LUFS (BS.1770 integrated loudness), as the official preparation does.

    Silence measures -inf LUFS, and the official rule leaves any track with |loudness| > 100 unchanged. A
    track shorter than one 400 ms gating block cannot be measured at all (pyloudnorm raises, the official
    script would crash); we leave it unchanged too, the same answer as for any other unmeasurable track.
    """
    import numpy as np
    import pyloudnorm

    if len(samples) < LOUDNESS_BLOCK_S * sr:
        return samples
    loudness = pyloudnorm.Meter(sr).integrated_loudness(samples)
    if not abs(loudness) <= UNMEASURABLE_LUFS:  # also true for NaN
        return samples
    with warnings.catch_warnings():
        # pyloudnorm warns of "possible clipped samples"; the official run keeps them as they are too.
        warnings.simplefilter("ignore")
        normalized = pyloudnorm.normalize.loudness(samples, loudness, target)
    return normalized.astype(np.float32, copy=False)


def frame_count(num_samples: int, cfg: AudioConfig = OFFICIAL) -> int:
    """S, the video frames (25 fps) a track of `num_samples` covers, floored like the official code."""
    return int(num_samples / cfg.sample_rate * cfg.fps)


@dataclass(frozen=True)
class SpeakerTracks:
    """Two speakers' speech laid out for the video: `first` and `second` (equal lengths) are what wav2vec2
    embeds per speaker, `mix` is the video's sound track (their sum, the official sum.wav); `notes` say what
    was done beyond the official preparation (for the run's log and dry run)."""

    first: np.ndarray
    second: np.ndarray
    mix: np.ndarray
    notes: tuple[str, ...] = ()


def combine_speakers(first: np.ndarray | None, second: np.ndarray | None, mode: str,
                     sample_rate: int = SAMPLE_RATE) -> SpeakerTracks:
    """Two loudness-normalised tracks (None: a silent speaker, the official "None") laid out as officially.

    add: [track 1 | silence as long as track 2] and [silence as long as track 1 | track 2], both len1 + len2,
    in float64 as the official np.zeros padding makes them. para: both as given (float32), played together.
    A silent speaker is zeros as long as the other track (float64, no loudness step). Where the official
    code stops with an error (`para` with tracks of different lengths: its sum fails), the shorter track
    is padded with silence at its end and a note says so.
    """
    import numpy as np

    if mode not in AUDIO_TYPES:
        raise ValueError(f"audio mode {mode!r}: expected one of {', '.join(AUDIO_TYPES)}")
    if first is None and second is None:
        raise ValueError("both speakers are silent: give at least one speech track")
    if first is None:
        first = np.zeros(second.shape[0])
    if second is None:
        second = np.zeros(first.shape[0])
    notes: list[str] = []
    if mode == "add":
        first, second = (np.concatenate([first, np.zeros(second.shape[0])]),
                         np.concatenate([np.zeros(first.shape[0]), second]))
    elif len(first) != len(second):
        short, long = (1, 2) if len(first) < len(second) else (2, 1)
        length = max(len(first), len(second))
        seconds = {1: len(first) / sample_rate, 2: len(second) / sample_rate}
        notes.append(
            f"speaker {short}'s track ({seconds[short]:.2f} s) is shorter than speaker {long}'s"
            f" ({seconds[long]:.2f} s): padded with {seconds[long] - seconds[short]:.2f} s of silence"
            " (the official code stops with an error here)")
        first, second = (np.pad(track, (0, length - len(track))) for track in (first, second))
    return SpeakerTracks(first, second, first + second, tuple(notes))


def two_speaker_frames(first_samples: int, second_samples: int, mode: str, cfg: AudioConfig = OFFICIAL) -> int:
    """The video length (25 fps frames) of a two-speaker run: until both speakers are done.

    add: len1 + len2 (the turns follow each other); para: the longer track. The official stop rule looks
    only at speaker 1's embedding; that agrees wherever the official code runs (add: speaker 1's padded
    track is len1 + len2; para: the tracks must be equal) and differs only for `para` tracks of different
    lengths, which the official code refuses and we pad.
    """
    if mode not in AUDIO_TYPES:
        raise ValueError(f"audio mode {mode!r}: expected one of {', '.join(AUDIO_TYPES)}")
    total = first_samples + second_samples if mode == "add" else max(first_samples, second_samples)
    return frame_count(total, cfg)


def checkpoint_to_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """chinese-wav2vec2-base's checkpoint keys -> transformers' Wav2Vec2Model keys.

    Drops the `wav2vec2.` prefix and the pre-training heads, and renames the positional conv's old-style
    weight norm (`weight_g`/`weight_v`) to torch's parametrisation names. Keys already in Wav2Vec2Model's
    spelling pass through, so a checkpoint saved by a newer transformers loads too. Anything else is left
    for the strict load to report.
    """
    mapped = {}
    for key, value in state.items():
        if key.startswith(PRETRAINING_HEADS):
            continue
        name = key.removeprefix(CHECKPOINT_PREFIX)
        mapped[CHECKPOINT_RENAMES.get(name, name)] = value
    return mapped


def audio_windows(embedding: torch.Tensor, start: int, frames: int, window: int = 5) -> torch.Tensor:
    """[frames, window, layers, hidden]: for video frame i in [start, start+frames), rows i-2..i+2 of the
    embedding (for window 5), clamped to [0, S-1] so the first and last frames repeat at the track's edges."""
    import torch

    offsets = torch.arange(window) - window // 2
    rows = torch.arange(start, start + frames)[:, None] + offsets[None, :]
    return embedding[rows.clamp(0, embedding.shape[0] - 1)]


class AudioEncoder:
    """chinese-wav2vec2-base with InfiniteTalk's 25 fps feature path.

    We do not call Wav2Vec2Model.forward. InfiniteTalk resamples the 50 Hz CNN features to the 25 fps video
    rate with a linear interpolation (align_corners=True) *between* the CNN and the feature projection, so the
    transformer itself runs at 25 Hz; transformers' forward has no hook for that point. So `hidden_states`
    composes the model's own submodules (feature_extractor, feature_projection, encoder) with the
    interpolation in between, and reads each transformer layer's output with forward hooks, which works the
    same on transformers 4.x and 5.x (their ways of reporting hidden states differ).
    """

    def __init__(self, model, extractor, cfg: AudioConfig = OFFICIAL, cnn_chunk_frames: int = CNN_CHUNK_FRAMES):
        self.model = model
        self.extractor = extractor
        self.cfg = cfg
        self.cnn_chunk_frames = cnn_chunk_frames

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str | torch.device = "cpu", cfg: AudioConfig = OFFICIAL
    ) -> AudioEncoder:
        """The encoder from a chinese-wav2vec2-base folder: its config, preprocessor config and the weights
        the manifest names (only on the hub's refs/pr/1; main has just a pickle, see runtime/manifest.toml).

        The architecture and the feature extractor come from transformers (local files only). The weights go
        through our explicit key map and a strict load instead of `from_pretrained`, which would quietly
        randomise a missing weight (a warning only) and renames keys differently across transformers versions.
        """
        import torch
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        from itk.runtime.loading import WeightsError, load_strict, read_state_dict
        from itk.runtime.manifest import load_manifest
        from itk.runtime.weights import wav2vec_weights

        folder = Path(folder)
        manifest = load_manifest()
        weights_file = wav2vec_weights(manifest)
        for entry in (*manifest.select("wav2vec-config"), weights_file):
            if not (folder / entry.path).is_file():
                where = f" (itk fetch takes it from the hub's {entry.revision})" if entry.why else ""
                raise WeightsError(f"{folder / entry.path}: missing; run `itk fetch` to download it{where}")
        config = Wav2Vec2Config.from_pretrained(folder, local_files_only=True)
        if config.do_stable_layer_norm:
            raise WeightsError(
                f"{folder}: its config is a pre-LN (do_stable_layer_norm) wav2vec2, not"
                " chinese-wav2vec2-base; point --wav2vec_dir at TencentGameMate/chinese-wav2vec2-base"
            )
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = Wav2Vec2Model(config)
        weights = folder / weights_file.path
        state = checkpoint_to_model_keys(read_state_dict(weights))
        load_strict(model, state, str(weights), dtype=torch.float32, device=device)
        return cls(model.eval(), extractor, cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_values(self, samples: np.ndarray) -> torch.Tensor:
        """[N] float32: the feature extractor's waveform (zero mean, unit variance when the folder's
        preprocessor_config.json sets do_normalize; otherwise the samples as they are)."""
        import numpy as np
        import torch

        values = self.extractor(samples, sampling_rate=self.cfg.sample_rate).input_values
        return torch.from_numpy(np.asarray(values[0], dtype=np.float32))

    def conv_features(self, values: torch.Tensor) -> torch.Tensor:
        """[T_50Hz, conv_dim]: the CNN feature encoder's output for the whole track, computed at most
        `cnn_chunk_frames` output frames per call (`cnn_chunks`)."""
        import torch

        values = values.to(self.device)
        layers = list(self.model.feature_extractor.conv_layers)
        geometry = [(layer.conv.kernel_size[0], layer.conv.stride[0]) for layer in layers]
        frames = len(values)
        for kernel, stride in geometry:
            frames = (frames - kernel) // stride + 1
        if frames <= self.cnn_chunk_frames:
            return self.model.feature_extractor(values[None])[0].transpose(0, 1)
        return torch.cat([chunk[0].transpose(0, 1) for chunk in self.cnn_chunks(values, layers, geometry, frames)])

    def cnn_chunks(self, values: torch.Tensor, layers: list, geometry: list[tuple[int, int]],
                   frames: int) -> Iterator[torch.Tensor]:
        """The CNN's output frames [a, b) one chunk after another, each from only the samples it depends on.

        Frames [a, b) of a layer of (kernel, stride) read its input's [a*stride, (b-1)*stride + kernel); walked
        back through the layers that gives the chunk's slice of the track, and its outputs line up with the
        whole track's. The one exception is chinese-wav2vec2-base's first layer: a GroupNorm (one group per
        channel) normalises over the WHOLE track, so its statistics come from a first pass over the track in
        chunks (`_group_stats`), and each chunk is normalised with them."""
        import torch

        first = layers[0]
        norm = getattr(first, "layer_norm", None)
        stats = self._group_stats(values, first, geometry) if isinstance(norm, torch.nn.GroupNorm) else None
        for a in range(0, frames, self.cnn_chunk_frames):
            start, end = a, min(a + self.cnn_chunk_frames, frames)
            for kernel, stride in reversed(geometry):
                start, end = start * stride, (end - 1) * stride + kernel
            h = values[start:end][None, None]
            for index, layer in enumerate(layers):
                if index == 0 and stats is not None:
                    mean, std = stats
                    h = layer.activation((layer.conv(h) - mean) / std * norm.weight[:, None] + norm.bias[:, None])
                else:
                    h = layer(h)
            yield h

    def _group_stats(self, values: torch.Tensor, layer, geometry: list[tuple[int, int]]):
        """(mean, std) per channel, [C, 1], of the first layer's GroupNorm over the whole track's conv output:
        each chunk's own mean and variance, combined in float64 (Chan et al.'s pairwise update)."""
        import torch

        norm, (kernel, stride) = layer.layer_norm, geometry[0]
        outputs = (len(values) - kernel) // stride + 1
        step = self.cnn_chunk_frames * math.prod(s for _, s in geometry[1:])  # one chunk's first-layer frames
        groups = norm.num_groups
        count, mean, m2 = 0, None, None
        for a in range(0, outputs, step):
            b = min(a + step, outputs)
            y = layer.conv(values[a * stride:(b - 1) * stride + kernel][None, None])[0]
            var_b, mean_b = torch.var_mean(y.reshape(groups, -1), dim=1, correction=0)
            n_b, mean_b, m2_b = y.numel() // groups, mean_b.double(), var_b.double() * (y.numel() // groups)
            if mean is None:
                count, mean, m2 = n_b, mean_b, m2_b
                continue
            delta, total = mean_b - mean, count + n_b
            mean, m2, count = mean + delta * n_b / total, m2 + m2_b + delta * delta * count * n_b / total, total
        per_channel = norm.num_channels // groups
        std = (m2 / count + norm.eps).sqrt()
        return (mean.repeat_interleave(per_channel)[:, None].to(values.dtype),
                std.repeat_interleave(per_channel)[:, None].to(values.dtype))

    @staticmethod
    def to_video_rate(features: torch.Tensor, frames: int) -> torch.Tensor:
        """[T, C] -> [frames, C] by linear interpolation with align_corners=True (ends pinned to ends)."""
        import torch.nn.functional as F

        resampled = F.interpolate(features.T[None], size=frames, mode="linear", align_corners=True)
        return resampled[0].T

    def hidden_states(self, values: torch.Tensor, frames: int) -> list[torch.Tensor]:
        """[encoder input, layer 1 output, ..., layer L output], each [frames, hidden], for input values."""
        import torch

        with torch.no_grad():
            features = self.to_video_rate(self.conv_features(values), frames)
            projected = self.model.feature_projection(features[None])[0]
            states: list[torch.Tensor] = []

            def keep_input(module, args, kwargs):
                states.append(args[0] if args else kwargs["hidden_states"])

            def keep_output(module, args, output):
                states.append(output[0] if isinstance(output, tuple) else output)

            layers = self.model.encoder.layers
            hooks = [layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
            hooks += [layer.register_forward_hook(keep_output) for layer in layers]
            try:
                self.model.encoder(projected)
            finally:
                for hook in hooks:
                    hook.remove()
        return [state[0].float() for state in states]

    def embed(self, samples: np.ndarray) -> torch.Tensor:
        """[S, layers, hidden] float32, S = frame_count(len(samples)): the outputs of transformer layers 1..L
        (not the encoder input) for each video frame."""
        import torch

        frames = frame_count(len(samples), self.cfg)
        if frames < 1:
            raise AudioError(f"speech of {len(samples)} samples is shorter than one video frame (40 ms)")
        states = self.hidden_states(self.input_values(samples), frames)
        return torch.stack(states[1:], dim=1)

    def embed_speakers(self, tracks: Sequence[np.ndarray]) -> torch.Tensor:
        """[S, frames, layers, hidden]: each speaker's track embedded on its own (the feature extractor's
        normalisation runs over the whole padded track, as officially); the tracks have equal lengths
        (`combine_speakers` makes them so)."""
        import torch

        lengths = {len(track) for track in tracks}
        if len(lengths) != 1:
            raise AudioError(f"speaker tracks of different lengths ({sorted(lengths)} samples): combine them first")
        return torch.stack([self.embed(track) for track in tracks])
