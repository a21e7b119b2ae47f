"""FP8 weights: the official quantised files, read without optimum-quanto.

Format (optimum-quanto 0.2.6, runtime-spec §6): for every Linear `P` named in the companion JSON map,
`P.weight._data` (float8_e4m3fn [out, in]), `P.weight._scale` ([out, 1], per output row), `P.bias`, and the
scalars `P.input_scale` / `P.output_scale` (1.0 with `"activations": "none"`). Every other tensor is stored
plain under its usual name. quanto loads these with strict=False and silently leaves a missing weight
uninitialised; we check coverage key by key and name what is missing.

`FP8Linear` keeps the weight in FP8 (half the memory of bf16, which is what lets a 24 GB card and a 32 GB
host hold the 14B model) and follows gpt-fast's shape: two buffers and a short forward. On GPUs with FP8
tensor cores (compute capability 8.9+: RTX 40xx, H100) bf16 activations are quantised per token and
multiplied on the FP8 tensor cores (torch._scaled_mm, row-wise scales); we chose plain torch ops for the
activation quantisation because torch.compile of the block fuses them into one kernel (no Triton code of
our own, no torchao dependency). Elsewhere (CPU, older GPUs, float32 inputs) the weight is dequantised to
the activation dtype right before the matmul: quanto's weight-only arithmetic.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from itk.runtime.loading import WeightsError, read_state_dict

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
WEIGHTS_QTYPE = "qfloat8_e4m3fn"
# The quanto names of one quantised Linear `P`, and where each goes in FP8Linear.
QUANTO_KEYS = {"weight._data": "weight", "weight._scale": "scale"}
QUANTO_SCALARS = ("input_scale", "output_scale")


class FP8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with one scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("scale", torch.empty(out_features, 1, dtype=scale_dtype))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and fp8_matmul_available(x.device) and self.in_features % 16 == 0 \
                and self.out_features % 16 == 0:
            return self._scaled_mm(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 tensor-core matmul: activations quantised per token on the fly (fused by torch.compile when
        the block is compiled), weights per output row, accumulation in fp32, bf16 out."""
        rows = x.reshape(-1, self.in_features)
        scale_a = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
        quantized = (rows.float() / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale_a, scale_b=self.scale.float().t().contiguous(),
                               bias=bias, out_dtype=torch.bfloat16)
        return out.reshape(*x.shape[:-1], self.out_features)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_matmul_available(device: torch.device) -> bool:
    """FP8 tensor cores (compute capability 8.9+) and not switched off with ITK_FP8_MATMUL=off."""
    if device.type != "cuda" or os.environ.get("ITK_FP8_MATMUL", "auto") == "off":
        return False
    return _capability(device.index or 0) >= (8, 9)


def quantize_rowwise(
    weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """quanto's absmax scheme: scale_r = max|W_r| / 448, data = W / scale_r rounded to float8_e4m3fn."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12).to(scale_dtype)
    data = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return data, scale


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def write_quantized(
    state: dict[str, torch.Tensor], quantize: Iterable[str], path: str | Path, map_path: str | Path,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write `state` in the official quanto layout (file + JSON map), quantising the Linears named.

    The tests, the selftest and the benchmarks use this to make files of the real format.
    """
    out: dict[str, torch.Tensor] = dict(state)
    qmap = {}
    for name in quantize:
        data, scale = quantize_rowwise(out.pop(f"{name}.weight"), scale_dtype)
        out[f"{name}.weight._data"], out[f"{name}.weight._scale"] = data, scale
        for scalar in QUANTO_SCALARS:
            out[f"{name}.{scalar}"] = torch.ones((), dtype=scale_dtype)
        qmap[name] = {"weights": WEIGHTS_QTYPE, "activations": "none"}
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, tmp))
    _atomic(map_path, lambda tmp: Path(tmp).write_text(json.dumps(qmap, indent=1)))


def _atomic(path: str | Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def read_quant_map(path: str | Path) -> dict[str, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: quantisation map not found (it sits beside the .safetensors file)")
    try:
        qmap = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not a readable JSON map ({exc})") from exc
    for name, spec in qmap.items():
        if spec.get("weights") != WEIGHTS_QTYPE:
            raise WeightsError(f"{path}: {name} is {spec.get('weights')}, only {WEIGHTS_QTYPE} is supported")
        if spec.get("activations", "none") != "none":
            raise WeightsError(f"{path}: {name} quantises activations ({spec['activations']}), not supported")
    return qmap


def map_path_for(path: str | Path) -> Path:
    """The official convention: the map's path is the weights path with 'safetensors' replaced by 'json'."""
    return Path(str(path).replace("safetensors", "json"))


def swap_linears(model: nn.Module, names: Iterable[str], source: str) -> None:
    """Replace each named nn.Linear by an FP8Linear of the same shape (on the same device, usually meta)."""
    modules = dict(model.named_modules())
    for name in names:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise WeightsError(f"{source}: the map names {name}, which is not a Linear layer of this model")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        with torch.device(linear.weight.device):
            setattr(parent, child, FP8Linear(linear.in_features, linear.out_features, linear.bias is not None))


def quantized_state(
    raw: dict[str, torch.Tensor], qmap: dict[str, dict[str, str]], source: str
) -> dict[str, torch.Tensor]:
    """The file's tensors under FP8Linear's names; checks the quanto key set and dtypes of every layer."""
    state = dict(raw)
    for name in qmap:
        for quanto, ours in QUANTO_KEYS.items():
            key = f"{name}.{quanto}"
            if key not in state:
                raise WeightsError(f"{source}: missing key {key}")
            state[f"{name}.{ours}"] = state.pop(key)
        stored = state[f"{name}.weight"].dtype
        if stored != FP8:
            raise WeightsError(f"{source}: {name}.weight._data is {stored}, expected float8_e4m3fn")
        for scalar in QUANTO_SCALARS:
            value = state.pop(f"{name}.{scalar}", None)
            if value is not None and value.float().item() != 1.0:
                raise WeightsError(f"{source}: {name}.{scalar} is {value.item()}; activation scales are not supported")
    return state


def assign_quantized(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Strict assign: FP8 data stays FP8, everything else becomes `dtype`, all on `device`."""
    from itk.runtime.loading import check_keys

    check_keys(model, state, source)
    cast = {
        k: v.to(device=device, dtype=v.dtype if v.dtype == FP8 or not v.is_floating_point() else dtype)
        for k, v in state.items()
    }
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            cast[f"{name}.scale"] = cast[f"{name}.scale"].float()  # the scale multiplies in any dtype
    model.load_state_dict(cast, strict=True, assign=True)


def load_dit_fp8(path: str | Path, cfg, dtype: torch.dtype = torch.bfloat16, device="cpu", map_path=None):
    """The complete InfiniteTalk DiT from `quant_models/infinitetalk_single_fp8.safetensors` + its map."""
    from itk.runtime.models.dit import InfiniteTalkDiT, rope_table

    path = Path(path)
    qmap = read_quant_map(map_path or map_path_for(path))
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg)
    swap_linears(model, qmap, str(path))
    assign_quantized(model, quantized_state(read_state_dict(path), qmap, str(path)), str(path), dtype, device)
    model.rope = rope_table(cfg.head_dim)
    return model.eval().requires_grad_(False)


def dequantized_state(path: str | Path, map_path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Official-key state dict with every quantised weight dequantised to `dtype`, one layer at a time.

    For the T5, which runs once per job: it then loads through the ordinary (key-mapped) T5 loader.
    """
    path = Path(path)
    qmap = read_quant_map(map_path)
    state = quantized_state(read_state_dict(path), qmap, str(path))
    for name in qmap:
        data, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.scale")
        state[f"{name}.weight"] = data.to(dtype) * scale.to(dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
