"""Model configurations: the official InfiniteTalk / Wan2.1-I2V-14B sizes, and overrides for tiny test models.

Every size a module needs comes from here. The official code hard-codes a few of them (CLIP width 1280,
12 audio layers x 768 channels, 257 image tokens); we keep them as fields so tiny models can shrink them.

A folder may carry `itk_model_config.json` ({"dit": {...}, "vae": {...}, "t5": {...}, "clip": {...},
"audio": {...}, "buckets": {...}}) whose entries override the official values; without it the official
sizes apply.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.runtime.protocol import FPS, SAMPLE_RATE

MODEL_CONFIG_FILE = "itk_model_config.json"


def refuse(cfg: Any, name: str, supported: str) -> None:
    """A structural value the runtime cannot build: fail at load, naming the field, never build something else."""
    raise ValueError(f"{type(cfg).__name__}.{name} = {getattr(cfg, name)!r} is not supported ({supported})")


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 I2V DiT plus InfiniteTalk's audio adapter: the official `WanModel` of wan/modules/multitalk_model.py.

    Every argument of the official `WanModel` constructor that shapes the network is a field here and is
    either built (the norms switch between a LayerNorm/RMSNorm and Identity as officially) or refused by
    name (`model_type` other than i2v, windowed attention). `weight_init` has no counterpart: the weights
    always come from the checkpoint.
    """

    model_type: str = "i2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 36
    out_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True  # RMSNorm on q and k of self- and cross-attention; Identity when false
    cross_attn_norm: bool = True  # LayerNorm (`norm3`) before the cross-attention; Identity when false
    eps: float = 1e-6
    clip_dim: int = 1280
    image_tokens: int = 257
    audio_window: int = 5
    audio_blocks: int = 12
    audio_channels: int = 768
    audio_intermediate_dim: int = 512
    audio_output_dim: int = 768
    audio_context_tokens: int = 32
    vae_scale: int = 4
    norm_input_visual: bool = True  # LayerNorm (`norm_x`) before the audio cross-attention; Identity when false
    norm_output_audio: bool = True  # LayerNorm (`audio_proj.norm`) on the audio tokens; Identity when false

    def __post_init__(self) -> None:
        if self.model_type != "i2v":
            refuse(self, "model_type", "InfiniteTalk is an image-to-video model: i2v")
        if tuple(self.window_size) != (-1, -1):
            refuse(self, "window_size", "only full attention, (-1, -1)")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            refuse(self, "num_heads", f"dim {self.dim} must split into heads of an even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE, the arguments of the official `WanVAE_` constructor.

    `attn_scales`: the resolutions (1.0 = input, 0.5 = half, ...) after whose residual blocks an attention
    block is inserted, as officially (the release uses none). `dropout` has no counterpart: inference.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if self.z_dim != 16:
            refuse(self, "z_dim", "16: the latent mean and std are 16 fixed constants of the release")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            refuse(self, "temporal_downsample", f"one entry per resampler: {len(self.dim_mult) - 1} for dim_mult")


@dataclass(frozen=True)
class T5Config:
    """umT5-XXL encoder (the official `umt5_xxl` of wan/modules/t5.py)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    text_len: int = 512


@dataclass(frozen=True)
class CLIPConfig:
    """The visual tower of open-clip XLM-RoBERTa-large ViT-H/14."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    mlp_ratio: int = 4
    heads: int = 16
    layers: int = 32
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class AudioConfig:
    """Speech preparation for wav2vec2: the sample rate, the video rate the features are resampled to, and the
    loudness every track is normalised to (BS.1770 integrated, as the official preparation does)."""

    sample_rate: int = SAMPLE_RATE
    fps: int = FPS
    target_lufs: float = -23.0


@dataclass(frozen=True)
class ModelConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    # Extra size buckets, name -> {ratio: [h, w]}; tiny test models add a small one.
    buckets: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def _override(cfg: Any, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} field(s): {', '.join(unknown)}")
    typed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return dataclasses.replace(cfg, **typed)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Official sizes with the given per-component overrides applied."""
    base = ModelConfig()
    parts = {
        name: _override(getattr(base, name), data.get(name, {}))
        for name in ("dit", "vae", "t5", "clip", "audio")
    }
    return ModelConfig(**parts, buckets=data.get("buckets", {}))


# The official WanModel constructor arguments a checkpoint's config.json may set (diffusers' ConfigMixin reads
# it officially): each one is a DiTConfig field of the same name, so it is honoured or refused there.
WAN_CONFIG_FIELDS = frozenset({
    "model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
    "num_heads", "num_layers", "window_size", "qk_norm", "cross_attn_norm", "eps",
})


def official_dit_fields(path: Path) -> dict[str, Any]:
    """The WanModel arguments of the checkpoint's own config.json; an argument we do not know is refused by
    name (it might change the network), bookkeeping keys (`_class_name`, `_diffusers_version`) are skipped."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    unknown = sorted(k for k in data if not k.startswith("_") and k not in WAN_CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"{path}: {unknown[0]} is not a WanModel argument this runtime can build")
    return {k: v for k, v in data.items() if k in WAN_CONFIG_FIELDS}


def load_model_config(folder: str | Path | None = None, file: str | Path | None = None) -> ModelConfig:
    """The config for a weights folder: the official sizes, then the folder's own config.json (the manifest's
    "config" file, as the official loader reads it), then `file` or `folder/itk_model_config.json`."""
    from itk.runtime.manifest import load_manifest

    data: dict[str, Any] = {}
    if folder:
        official = Path(folder) / load_manifest().select("config")[0].path
        if official.is_file():
            data["dit"] = official_dit_fields(official)
    path = Path(file) if file else (Path(folder) / MODEL_CONFIG_FILE if folder else None)
    if path is not None and path.is_file():
        for name, values in json.loads(path.read_text()).items():
            data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return config_from_dict(data)
