"""FP8 weights: the official quantised files, read without optimum-quanto.

Format (optimum-quanto 0.2.6, runtime-spec §6): for every Linear `P` named in the companion JSON map,
`P.weight._data` (float8_e4m3fn [out, in]), `P.weight._scale` ([out, 1], per output row), `P.bias`, and the
scalars `P.input_scale` / `P.output_scale` (1.0 with `"activations": "none"`). Every other tensor is stored
plain under its usual name. quanto loads these with strict=False and silently leaves a missing weight
uninitialised; we check coverage key by key and name what is missing.

The file is memory-mapped, not read: FP8 data and bf16 tensors are used in place (zero copy), so loading
costs no host RAM beyond the page cache and a streamed model can page its weights straight from the file.

`FP8Linear` keeps the weight in FP8 (half the memory of bf16, which is what lets a 24 GB card and a 32 GB
host hold the 14B model) and follows gpt-fast's shape: two buffers and a short forward. Two compute paths:
- GPUs with FP8 tensor cores (compute capability >= 8.9) and bf16 activations: a real FP8 matmul,
  `torch._scaled_mm` with the per-row weight scales and the activations quantised per token (row-wise
  absmax / 448). The activation quantisation is one `torch.compile`d function: Inductor fuses the row
  absmax, the division and the cast into a single Triton kernel (one read of x, one fp8 write). Eager it is
  four passes over x, which on the H100 made FP8 linears slower than bf16 (shared/specs/perf-limit.md:
  40.6 vs 32.9 ms per block). torch.compile rather than a hand-written Triton kernel: same fusion, no code
  of ours to keep correct per GPU, and Triton ships with torch. torchao's float8 inference would serve too
  but is one more dependency for ~20 lines.
- Elsewhere (CPU, pre-Ada GPUs, float32 activations, odd shapes): the weight is dequantised per layer to
  the activation dtype (data * scale) right before `F.linear`, quanto's weight-only arithmetic.
`ITK_FP8_MATMUL=0` forces the second path everywhere (for comparisons, or if a driver misbehaves).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from itk.atomic import atomic_write, atomic_write_text
from itk.runtime.loading import WeightsError, check_keys

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
WEIGHTS_QTYPE = "qfloat8_e4m3fn"
# The quanto names of one quantised Linear `P`, and where each goes in FP8Linear.
QUANTO_KEYS = {"weight._data": "weight", "weight._scale": "scale"}
QUANTO_SCALARS = ("input_scale", "output_scale")
SAFETENSORS_DTYPES = {
    "F8_E4M3": FP8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
FP8_MATMUL = os.environ.get("ITK_FP8_MATMUL", "1") != "0"
FP8_MATMUL_ERROR = ""  # why the FP8 matmul was turned off at run time, if it was
_BIAS_IN_MATMUL = True
FUSED_QUANTIZE = True  # False once torch.compile failed on this machine
log = logging.getLogger(__name__)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]): per-token absmax scaling."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def _fused_quantize() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """quantize_activations compiled once (dynamic in the token count, so no recompile per shape)."""
    return torch.compile(quantize_activations, dynamic=True, fullgraph=True)


def _quantize_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled quantiser; if compiling fails here (no working Triton, say), eager from then on, logged."""
    global FUSED_QUANTIZE
    if FUSED_QUANTIZE:
        try:
            return _fused_quantize()(x)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager version computes the same
            FUSED_QUANTIZE = False
            log.warning("compiling the FP8 activation quantiser failed (%s); quantising eagerly", exc)
    return quantize_activations(x)


@functools.cache
def has_fp8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fused: bool = True
) -> torch.Tensor:
    """x [..., K] bf16 @ (weight [N, K] fp8 * scale [N, 1])^T + bias, as one FP8 tensor-core matmul."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = (_quantize_fused if fused else quantize_activations)(x2)
    scale_b = scale.float().reshape(1, -1)
    bias = None if bias is None else bias.to(x.dtype)
    if bias is not None and not _BIAS_IN_MATMUL:
        out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_b, out_dtype=x.dtype) + bias
    else:
        out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_b, bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _fast_or_none(layer: FP8Linear, x: torch.Tensor) -> torch.Tensor | None:
    """The FP8 tensor-core result, or None once this torch/GPU has refused it (then logged, and never retried:
    a run that cannot use FP8 matmuls still runs, on the dequantised path)."""
    global FP8_MATMUL, FP8_MATMUL_ERROR, _BIAS_IN_MATMUL
    try:
        return fp8_matmul(x, layer.weight, layer.scale, layer.bias)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        if _BIAS_IN_MATMUL and layer.bias is not None:
            _BIAS_IN_MATMUL = False  # some torch versions take no bias with row-wise scales
            return _fast_or_none(layer, x)
        FP8_MATMUL, FP8_MATMUL_ERROR = False, f"{type(exc).__name__}: {exc}"
        log.warning("FP8 matmul unavailable here (%s); using dequantised weights", FP8_MATMUL_ERROR)
        return None


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
        if FP8_MATMUL and x.dtype == torch.bfloat16 and has_fp8_matmul(x.device) and self.in_features % 16 == 0 \
                and self.out_features % 16 == 0:
            if torch.compiler.is_compiling():  # inside a compiled block: no fallbacks, the block fuses the quantiser
                return fp8_matmul(x, self.weight, self.scale, self.bias, fused=False)
            out = _fast_or_none(self, x)
            if out is not None:
                return out
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)


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
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, str(tmp)))
    atomic_write_text(map_path, json.dumps(qmap, indent=1))


class MappedFile:
    """The file behind `map_file`'s tensors, so a reader can fetch a tensor's bytes with pread.

    Why: pages of a mapping that were touched count in the process's RSS until the whole mapping goes,
    so copying 19 GB of streamed blocks out of the mapping would show as 19 GB more RSS although it is
    only page cache. Reading the same bytes with pread leaves them in the page cache, outside the process.
    """

    def __init__(self, path: Path, base: int, size: int):
        self.path, self.base, self.size = path, base, size
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        os.close(self.fd)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """The file offset of `t`'s bytes if `t` is a contiguous view of this mapping, else None."""
        storage = t.untyped_storage()
        if t.device.type != "cpu" or storage.data_ptr() != self.base or storage.nbytes() != self.size:
            return None
        return t.data_ptr() - self.base if t.is_contiguous() else None

    def read_into(self, dst: torch.Tensor, offset: int) -> None:
        """Fill the contiguous CPU tensor `dst` with its byte count from `offset` of the file."""
        buf = dst.reshape(-1).view(torch.uint8).numpy()
        done = 0
        while done < buf.size:
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                raise WeightsError(f"{self.path}: file ended at byte {offset + done} while streaming weights")
            done += n


def read_mmap(path: str | Path) -> dict[str, torch.Tensor]:
    return map_file(path)[0]


def map_file(path: str | Path) -> tuple[dict[str, torch.Tensor], MappedFile]:
    """Every tensor of a safetensors file as a zero-copy view of one memory map of the file.

    Why not safetensors' load_file: it copies each tensor into process memory, so a 19.5 GB file costs
    19.5 GB of RSS before anything else happens. Views of a private mapping cost nothing until touched, are
    backed by the page cache (the kernel can drop them under pressure) and go to the GPU without a copy.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    base = 8 + header_len
    tensors = {}
    for key, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        start, end = (base + o for o in info["data_offsets"])
        if dtype is None or end > size:
            raise WeightsError(f"{path}: {key} has dtype {info['dtype']} or lies past the end of the file")
        raw = data[start:end]
        # A tensor whose offset is not a multiple of its element size cannot be viewed in place.
        if start % dtype.itemsize:
            raw = raw.clone()
        tensors[key] = raw.view(dtype).view(info["shape"])
    return tensors, MappedFile(path, data.data_ptr(), size)


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
        if not state[f"{name}.scale"].is_floating_point():
            raise WeightsError(f"{source}: {name}.weight._scale is {state[f'{name}.scale'].dtype}, expected a float")
        for scalar in QUANTO_SCALARS:
            value = state.pop(f"{name}.{scalar}", None)
            if value is not None and value.float().item() != 1.0:
                raise WeightsError(f"{source}: {name}.{scalar} is {value.item()}; activation scales are not supported")
    return state


def assign_quantized(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Strict assign: FP8 data stays FP8, everything else becomes `dtype`, all on `device`."""
    check_keys(model, state, source)
    cast = {
        k: v.to(device=device, dtype=v.dtype if v.dtype == FP8 or not v.is_floating_point() else dtype)
        for k, v in state.items()
    }
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            cast[f"{name}.scale"] = cast[f"{name}.scale"].float()  # the scale multiplies in any dtype
    model.load_state_dict(cast, strict=True, assign=True)


def load_dit_fp8(
    path: str | Path, map_path: str | Path | None, cfg, dtype: torch.dtype = torch.bfloat16, device="cpu"
):
    """The complete InfiniteTalk DiT from `quant_models/infinitetalk_single_fp8.safetensors` + its map.

    `map_path` None means the official convention (the same path with 'safetensors' replaced by 'json').
    On the CPU the FP8 weights stay views of the memory-mapped file until something reads them.
    """
    from itk.runtime.models.dit import InfiniteTalkDiT, rope_table

    path = Path(path)
    qmap = read_quant_map(map_path or map_path_for(path))
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg)
    swap_linears(model, qmap, str(path))
    raw, model.mapped_file = map_file(path)
    assign_quantized(model, quantized_state(raw, qmap, str(path)), str(path), dtype, device)
    model.rope = rope_table(cfg.head_dim)
    return model.eval().requires_grad_(False)


def dequantized_state(
    path: str | Path, map_path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Official-key state dict with every quantised weight dequantised to `dtype` on `device`, layer by layer.

    For the T5, which runs once per job: it then loads through the ordinary (key-mapped) T5 loader. Each
    FP8 tensor goes to `device` first and is dequantised there (on a GPU that is ~20 s faster for the
    5.7 B-parameter umT5 than on the CPU, and the host never holds the bf16 copy).
    """
    path = Path(path)
    qmap = read_quant_map(map_path)
    state = quantized_state(read_mmap(path), qmap, str(path))
    for name in qmap:
        data, scale = state.pop(f"{name}.weight").to(device), state.pop(f"{name}.scale").to(device)
        state[f"{name}.weight"] = data.to(dtype) * scale.to(dtype)
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
