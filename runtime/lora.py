"""LoRA files applied to the DiT: the official merge (`wan/wan_lora.py`: weight += scale * up @ down) and more.

Accepted key conventions (one file may mix them), each optionally prefixed `diffusion_model.` or
`transformer.`:
- `<module>.lora_down.weight` + `.lora_up.weight` (official, lightx2v, Kijai), or diffusers/PEFT
  `.lora_A.weight` + `.lora_B.weight`: delta = up @ down, times the file's scale (and alpha / rank with
  `--lora_alpha scale` when the file has `<module>.alpha`);
- `<module>.diff`: a full weight delta; `<module>.diff_b`: a bias delta.
Module names are ours (= the official checkpoint's) or diffusers' `transformer_wan` names (attn1.to_q,
attn2.add_k_proj, ffn.net.0.proj, ...), mapped to ours. A key with any other suffix (`diff_m`, say) is
reported, never dropped silently; a file that matches nothing is an error; a delta whose shape does not fit
its layer refuses the file by name.

Where the delta goes:
- plain weights (the bf16 model, and every non-FP8 tensor of the FP8 model): added in float32, once, on
  `device` (the GPU when there is one: a 14B bf16 model merged on two CPU cores takes minutes);
- FP8 layers, `method="merge"` (the default): dequantise, add every file's delta, re-quantise per row, once
  at load, on `device`, written over the layer's weight in place. No per-step cost (the H200 measured
  0.996x the no-LoRA step, against 1.045x/1.047x for the side path at rank 32/64:
  bench/results/lora-h200.json); on the GPU the 40 blocks merge in seconds (59-68 s on the CPU). The engine
  merges after the DiT is placed, into the streamer's pinned blocks or the GPU-resident ones, so a merge
  takes no memory beyond what the model already holds.
- FP8 layers, `method="side"`: the low-rank factors stay beside the FP8 weight and the layer adds
  `x @ down^T @ up^T` in the activation dtype. The FP8 weight and its memory-mapped file stay untouched, so
  the engine picks it when the streamed blocks are read from the page cache rather than pinned (a merge
  would move 17 GB of mapped file into process memory on exactly the machines that lack it); each streamed
  block carries its factors (~2 MB per block at rank 32) through the same copies.
Output agreement with a bf16 merge: cosine 0.99973 for both methods on the H200 (the FP8 rounding of the
base weight dominates; bench/results/lora-h200.json).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from itk.runtime.protocol import BadInput
from itk.runtime.quant import FP8Linear, quantize_rowwise

log = logging.getLogger(__name__)

ALPHA_MODES = ("ignore", "scale")
FP8_METHODS = ("side", "merge")
FP8_DEFAULT = "merge"  # see the module docstring; bench/bench_lora.py measures both
PREFIXES = ("diffusion_model.", "transformer.")
LOW_RANK = MappingProxyType({"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down",
                             "lora_B.weight": "up"})
FULL = MappingProxyType({"diff": "weight", "diff_b": "bias"})
SHOWN = 3  # unmatched keys named in a warning
# diffusers' transformer_wan module names -> ours, longest first (block-relative and top-level).
DIFFUSERS = (
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"),
    ("attn1.norm_q", "self_attn.norm_q"), ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.norm_q", "cross_attn.norm_q"), ("attn2.norm_k", "cross_attn.norm_k"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("norm2", "norm3"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("proj_out", "head.head"),
)
BLOCK = re.compile(r"^blocks\.\d+\.")


@dataclass
class Delta:
    """One file's update of one model tensor: low-rank (up @ down * factor) or full (`full` * factor)."""

    target: str  # model tensor name, e.g. blocks.0.self_attn.q.weight
    factor: float
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        """The delta as a float32 tensor shaped like the target, on its device."""
        if self.full is not None:
            return self.full.to(like.device, torch.float32).reshape(like.shape) * self.factor
        down = self.down.to(like.device, torch.float32).flatten(1)
        up = self.up.to(like.device, torch.float32).flatten(1)
        return (up @ down).reshape(like.shape) * self.factor


@dataclass
class Parsed:
    deltas: list[Delta] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # module names not in the model
    unknown: list[str] = field(default_factory=list)  # keys with a suffix we do not apply
    alphas: set[float] = field(default_factory=set)
    modules: int = 0


def _split(key: str) -> tuple[str, str] | None:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix in (*LOW_RANK, *FULL, "alpha"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _resolve(module: str, leaf: str, shapes: dict[str, torch.Size]) -> str | None:
    """Our tensor name for `module`.`leaf` (ours or diffusers' spelling), or None."""
    if f"{module}.{leaf}" in shapes:
        return f"{module}.{leaf}"
    if module.endswith("scale_shift_table"):  # diffusers' modulation: the head's at the top level
        owner = module.removesuffix("scale_shift_table")
        name = f"{owner}modulation" if owner else "head.modulation"
        return name if name in shapes else None
    head = BLOCK.match(module)
    prefix, rest = (head.group(0), module[head.end():]) if head else ("", module)
    for theirs, ours in DIFFUSERS:
        if rest == theirs:
            name = f"{prefix}{ours}.{leaf}"
            return name if name in shapes else None
    return None


def parse(path: Path, scale: float, shapes: dict[str, torch.Size], alpha_mode: str) -> Parsed:
    """The deltas of one LoRA file for a model whose tensors have `shapes`. Raises BadInput for a file
    that is not a LoRA of this model (unreadable, half a low-rank pair, or a shape that does not fit)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise BadInput(f"--lora_dir {path}: not a readable safetensors LoRA file ({exc})",
                       "give a LoRA .safetensors file (e.g. one `itk fetch` downloaded)") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out = Parsed()
    for key, value in tensors.items():
        split = _split(key)
        if split is None:
            out.unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = value
    for module, parts in groups.items():
        low = {LOW_RANK[s]: t for s, t in parts.items() if s in LOW_RANK}
        if "alpha" in parts:
            out.alphas.add(float(parts["alpha"]))
        if not low and not any(s in FULL for s in parts):
            out.unknown += [f"{module}.{s}" for s in parts]  # an alpha alone
            continue
        out.modules += 1
        matched = False
        if low:
            if len(low) != 2:
                have = next(iter(low))
                raise BadInput(f"--lora_dir {path}: {module} has lora_{have} but no lora_"
                               f"{'up' if have == 'down' else 'down'} weight", "this file is not a complete LoRA")
            target = _resolve(module, "weight", shapes)
            if target is not None:
                out.deltas.append(_low_rank(path, module, target, down=low["down"], up=low["up"],
                                            alpha=parts.get("alpha"), scale=scale, shape=shapes[target],
                                            alpha_mode=alpha_mode))
                matched = True
        for suffix, leaf in FULL.items():
            if suffix in parts:
                target = _resolve(module, leaf, shapes)
                if target is not None:
                    if parts[suffix].numel() != math.prod(shapes[target]):
                        raise BadInput(f"--lora_dir {path}: {module}.{suffix} has shape {list(parts[suffix].shape)}"
                                       f", the model's {target} {list(shapes[target])}",
                                       "this LoRA is for another model; use one made for Wan2.1 I2V 14B")
                    out.deltas.append(Delta(target, scale, full=parts[suffix]))
                    matched = True
        if not matched:
            out.unmatched.append(module)
    return out


def _low_rank(path: Path, module: str, target: str, *, down: torch.Tensor, up: torch.Tensor,
              alpha: torch.Tensor | None, scale: float, shape: torch.Size, alpha_mode: str) -> Delta:
    rank = down.shape[0]
    fits = (len(shape) >= 2 and up.shape[0] == shape[0] and up.flatten(1).shape[1] == rank
            and down.flatten(1).shape[1] == math.prod(shape[1:]))
    if not fits:
        raise BadInput(f"--lora_dir {path}: {module} has down {list(down.shape)} and up {list(up.shape)}, which do "
                       f"not fit the model's {target} {list(shape)}",
                       "this LoRA is for another model; use one made for Wan2.1 I2V 14B")
    factor = scale
    if alpha is not None and alpha_mode == "scale":
        factor *= float(alpha) / rank
    return Delta(target, factor, down=down, up=up)


@dataclass
class Applied:
    """What was applied: per file the matched modules, and how the FP8 layers took their deltas."""

    files: list[tuple[Path, int]] = field(default_factory=list)
    side: int = 0  # FP8 layers computing a side path
    merged_fp8: int = 0  # FP8 layers merged (dequantised, added, re-quantised)


def _report(path: Path, parsed: Parsed, alpha_mode: str) -> None:
    if not parsed.deltas:
        shown = ", ".join((parsed.unmatched + parsed.unknown)[:SHOWN]) or "no keys"
        raise BadInput(f"--lora_dir {path}: no key matches this model (first keys: {shown})",
                       "give a LoRA made for Wan2.1 I2V 14B / InfiniteTalk")
    if parsed.unmatched:
        log.warning("LoRA %s: %d of %d modules match this model; not in it: %s", path.name,
                    parsed.modules - len(parsed.unmatched), parsed.modules, ", ".join(parsed.unmatched[:SHOWN]))
    if parsed.unknown:
        log.warning("LoRA %s: %d keys with a suffix itk does not apply (ignored): %s", path.name,
                    len(parsed.unknown), ", ".join(parsed.unknown[:SHOWN]))
    ranks = {d.down.shape[0] for d in parsed.deltas if d.down is not None}
    alphas = parsed.alphas
    if alphas and any(a != r for a in alphas for r in ranks):
        how = ("ignored, as the official merge does (--lora_alpha scale multiplies by alpha/rank)"
               if alpha_mode == "ignore" else "applied: deltas scaled by alpha/rank (--lora_alpha scale)")
        log.warning("LoRA %s: alpha %s differs from rank %s: alpha %s", path.name,
                 "/".join(f"{a:g}" for a in sorted(alphas)), "/".join(map(str, sorted(ranks))), how)


def apply_loras(model: nn.Module, files: Sequence[tuple[Path, float]], *, alpha_mode: str = "ignore",
                fp8_method: str = FP8_DEFAULT, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Applied:
    """Apply every (file, scale) to `model` in place, wherever its tensors are (see protocol.pair_loras for the
    official pairing of the flags): merged deltas are written into the tensors where they lie, side factors
    are attached beside each FP8 weight on its device. The engine merges once the DiT is placed (into its
    pinned or GPU-resident blocks) and attaches side factors before placing (each streamed block then carries
    its own). `dtype`: the side path's compute dtype (default: each FP8 layer's scale dtype). `device`: where
    merges are computed (None: where each tensor is); every tensor stays where it was."""
    if alpha_mode not in ALPHA_MODES or fp8_method not in FP8_METHODS:
        raise ValueError(f"alpha_mode {alpha_mode!r} / fp8_method {fp8_method!r}")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    fp8 = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    shapes = {n: t.shape for n, t in tensors.items() if n.rpartition(".")[0] not in fp8}
    shapes.update({f"{n}.weight": torch.Size((m.out_features, m.in_features)) for n, m in fp8.items()})
    shapes.update({f"{n}.bias": m.bias.shape for n, m in fp8.items() if m.bias is not None})
    applied = Applied()
    side: dict[str, list[Delta]] = {}
    merge: dict[str, list[Delta]] = {}
    plain: dict[str, list[Delta]] = {}
    for path, scale in files:
        path = Path(path)
        parsed = parse(path, scale, shapes, alpha_mode)
        _report(path, parsed, alpha_mode)
        applied.files.append((path, parsed.modules - len(parsed.unmatched)))
        for delta in parsed.deltas:
            module, _, leaf = delta.target.rpartition(".")
            if module in fp8 and leaf == "weight":
                to_side = fp8_method == "side" and delta.down is not None
                (side if to_side else merge).setdefault(module, []).append(delta)
            else:
                plain.setdefault(delta.target, []).append(delta)
    with torch.no_grad():
        for name, deltas in plain.items():
            add_deltas(tensors[name], deltas, device)
        for module, deltas in merge.items():
            merge_fp8(fp8[module], deltas, device)
    for module, deltas in side.items():
        attach_side(fp8[module], deltas, dtype)
    applied.side, applied.merged_fp8 = len(side), len(merge)
    pad_blocks(fp8)
    return applied


def add_deltas(target: torch.Tensor, deltas: Sequence[Delta], device: torch.device | str | None) -> None:
    """target += every delta, summed in float32 on `device` and rounded once to the target's dtype."""
    total = target.to(device or target.device, torch.float32)
    for delta in deltas:
        total += delta.dense(total)
    target.copy_(total.to(target.device, target.dtype))


def merge_fp8(layer: FP8Linear, deltas: Sequence[Delta], device: torch.device | str | None = None) -> None:
    """Dequantise the FP8 weight, add every delta, re-quantise per row (quanto's absmax scheme) once, on
    `device`; the result is written over the old weight and scale in place, so a layer already placed
    (pinned host memory, the GPU) stays there and takes no new memory."""
    work = device or layer.weight.device
    weight = layer.weight.to(work).float() * layer.scale.to(work).float()
    for delta in deltas:
        weight += delta.dense(weight)
    data, scale = quantize_rowwise(weight, layer.scale.dtype)
    layer.weight.copy_(data)
    layer.scale.copy_(scale)


def attach_side(layer: FP8Linear, deltas: Sequence[Delta], dtype: torch.dtype | None) -> None:
    """Give `layer` the low-rank side path of `deltas` (several files: their ranks stacked), the factor
    folded into `up`."""
    dtype = dtype or layer.scale.dtype
    device = layer.weight.device
    down = torch.cat([d.down.flatten(1).float() for d in deltas])
    up = torch.cat([d.up.flatten(1).float() * d.factor for d in deltas], dim=1)
    if layer.lora_down is not None:
        down, up = torch.cat([layer.lora_down.float(), down]), torch.cat([layer.lora_up.float(), up], dim=1)
    layer.lora_down, layer.lora_up = down.to(device, dtype), up.to(device, dtype)


def pad_blocks(fp8: dict[str, FP8Linear]) -> None:
    """Give the same layer of every block side factors of one rank (zeros where a block has fewer or none):
    the streamer copies every block into buffers shaped like one block, so all must have the same tensors."""
    groups: dict[str, list[FP8Linear]] = {}
    for name, layer in fp8.items():
        if BLOCK.match(name):
            groups.setdefault(BLOCK.sub("", name), []).append(layer)
    for layers in groups.values():
        rank = max((m.lora_down.shape[0] for m in layers if m.lora_down is not None), default=0)
        if not rank:
            continue
        dtype = next(m.lora_down.dtype for m in layers if m.lora_down is not None)
        for m in layers:
            have = 0 if m.lora_down is None else m.lora_down.shape[0]
            if have == rank:
                continue
            down = m.weight.new_zeros((rank, m.in_features), dtype=dtype)
            up = m.weight.new_zeros((m.out_features, rank), dtype=dtype)
            if have:
                down[:have], up[:, :have] = m.lora_down, m.lora_up
            m.lora_down, m.lora_up = down, up
