"""The CLIP image features the DiT needs: open-clip XLM-RoBERTa-large ViT-H/14's vision tower.

Why transformers' class: `CLIPVisionModel` computes what the official VisionTransformer computes
(wan/modules/clip.py), checked term by term and against the clip_A golden:
- patch conv without bias, class token first, learned absolute positions (official [1, 1, C] and
  [1, 257, C] parameters are the same numbers as transformers' [C] and [257, C]);
- a LayerNorm on the embeddings before the blocks (official `pre_norm` = `pre_layrnorm`);
- pre-norm blocks, LayerNorm eps 1e-5, exact (erf) GELU MLP ("gelu", not quick_gelu), attention scaled by
  1/sqrt(head_dim). The official fused `to_qkv` projection is q, k, v stacked along the output dim, so
  the key map splits it into `q_proj`, `k_proj`, `v_proj` (views, no copy).
`last_hidden_state` of transformers' model is the output of its last block WITHOUT the post-norm, so
building it with all blocks, loading strictly, then dropping the last block yields exactly the
official "first 31 of 32 blocks" features. Attention goes through torch SDPA (flash kernels on a GPU in
fp16/bf16), so unlike the official code this needs no flash-attn install.

The checkpoint holds the whole CLIP (visual.*, textual.*, log_scale); the text tower and log_scale are
ignored by name, every visual key is required, and the projection head is checked present but unused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from itk.runtime.configs import CLIPConfig
from itk.runtime.loading import load_strict, read_state_dict
from itk.runtime.models.keymap import Rule, remap

_BLOCK = r"visual\.transformer\.(\d+)\."
_LAYER = r"encoder.layers.\1."

# Official key -> CLIPVisionModel key (the same keys as `vision_model.*` of older transformers).
CLIP_KEY_MAP: tuple[Rule, ...] = (
    Rule(r"visual\.patch_embedding\.weight", ("embeddings.patch_embedding.weight",)),
    Rule(r"visual\.cls_embedding", ("embeddings.class_embedding",), squeeze=True),
    Rule(r"visual\.pos_embedding", ("embeddings.position_embedding.weight",), squeeze=True),
    Rule(r"visual\.pre_norm\.(weight|bias)", (r"pre_layrnorm.\1",)),
    Rule(_BLOCK + r"norm1\.(weight|bias)", (_LAYER + r"layer_norm1.\2",)),
    Rule(
        _BLOCK + r"attn\.to_qkv\.(weight|bias)",
        (_LAYER + r"self_attn.q_proj.\2", _LAYER + r"self_attn.k_proj.\2", _LAYER + r"self_attn.v_proj.\2"),
    ),
    Rule(_BLOCK + r"attn\.proj\.(weight|bias)", (_LAYER + r"self_attn.out_proj.\2",)),
    Rule(_BLOCK + r"norm2\.(weight|bias)", (_LAYER + r"layer_norm2.\2",)),
    Rule(_BLOCK + r"mlp\.0\.(weight|bias)", (_LAYER + r"mlp.fc1.\2",)),
    Rule(_BLOCK + r"mlp\.2\.(weight|bias)", (_LAYER + r"mlp.fc2.\2",)),
    Rule(r"visual\.post_norm\.(weight|bias)", (r"post_layernorm.\1",)),
    Rule(r"visual\.head", ()),  # image-text projection: present in the file, not part of the features
)

_UNUSED = re.compile(r"textual\..*|log_scale")
_BLOCK_KEYS = tuple(
    f"{part}.{kind}"
    for part in ("norm1", "attn.to_qkv", "attn.proj", "norm2", "mlp.0", "mlp.2")
    for kind in ("weight", "bias")
)
_HINT = (
    "expected Wan2.1's open-clip XLM-RoBERTa-large ViT-H/14 checkpoint (the full CLIP, runtime/manifest.toml role "
    "clip); "
    "fetch it again with `itk fetch`"
)


def official_clip_visual_keys(cfg: CLIPConfig) -> list[str]:
    """Every `visual.*` key of the official checkpoint for `cfg`."""
    blocks = [f"visual.transformer.{i}.{name}" for i in range(cfg.layers) for name in _BLOCK_KEYS]
    ends = ("visual.post_norm.weight", "visual.post_norm.bias", "visual.head")
    starts = ("visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding")
    norms = ("visual.pre_norm.weight", "visual.pre_norm.bias")
    return [*starts, *norms, *blocks, *ends]


def _vision_model(cfg: CLIPConfig) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.width * cfg.mlp_ratio,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=cfg.eps,
        attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    model = CLIPVisionModel(config)
    return getattr(model, "vision_model", model)  # transformers 4.x nests the tower one level down


class CLIPVision(nn.Module):
    """Vision tower whose `encode` turns a [-1, 1] frame into the DiT's [1, tokens, width] features."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _vision_model(cfg)

    def init_non_persistent(self, device: torch.device | str) -> None:
        """Recompute what the checkpoint does not hold: the position ids, and drop the unused last block."""
        embeddings = self.model.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
        self.model.encoder.layers = self.model.encoder.layers[: self.cfg.layers - 1]

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> [B*T, 3, size, size]: bicubic resize, aspect not kept, normalised."""
        size = (self.cfg.image_size, self.cfg.image_size)
        images = frames.float().transpose(1, 2).flatten(0, 1)
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        mean = torch.tensor(self.cfg.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std, device=images.device).view(1, 3, 1, 1)
        return (images * 0.5 + 0.5 - mean) / std

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Features after all blocks but the last, no post-norm, no head: [B*T, tokens, width]."""
        weight = self.model.embeddings.patch_embedding.weight
        pixels = self.preprocess(frames.to(weight.device)).to(weight.dtype)
        return self.model(pixel_values=pixels).last_hidden_state


def load_clip(
    path: str | Path, cfg: CLIPConfig, *, dtype: torch.dtype, device: torch.device | str
) -> CLIPVision:
    """The vision tower from the official full-CLIP file, built on meta and filled once in `dtype`."""
    with torch.device("meta"):
        clip = CLIPVision(cfg)
    state = read_state_dict(path)
    expected = official_clip_visual_keys(cfg)
    mapped = remap(state, CLIP_KEY_MAP, expected=expected, module=clip.model, source=str(path), hint=_HINT,
                   ignore=_UNUSED.fullmatch)
    load_strict(clip.model, mapped, str(path), dtype=dtype, device=device)
    clip.init_non_persistent(device)
    return clip.eval().requires_grad_(False)
