"""Reading official checkpoint files into modules without ever holding two copies of the weights.

Modules are built on the meta device; tensors come from the file by mmap (safetensors, or `.pth` zip
archives with `mmap=True`) and are cast once, straight to their final dtype and device, then assigned.
Key coverage is strict: a missing or unexpected key is an error naming the key and the file, because a
silently uninitialised weight produces plausible-looking garbage video hours later.

The FP8 (optimum-quanto) files are read here too (`map_file`, `read_quant_map`, `quantized_state`,
`dequantized_state`; models/dit.py's `load_dit_fp8` assembles the DiT from them); their arithmetic is in
runtime/quant.py. An FP8 file is memory-mapped, not read: FP8
data and bf16 tensors are used in place (zero copy), so loading costs no host RAM beyond the page cache
and a streamed model can page its weights straight from the file (`MappedFile`, runtime/offload.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from itk.runtime.quant import FP8, QUANTO_KEYS, QUANTO_SCALARS, WEIGHTS_QTYPE, FP8Linear

# A tensor is cast or moved in slices of at most this many bytes (of the result): each slice is one short
# operation, so a Ctrl-C during loading is seen after one slice. One copy of umT5's 2 GB embedding read from a
# cold page cache otherwise holds the interrupt (and any signal handler) for seconds.
COPY_SLICE_BYTES = 64 << 20
SAFETENSORS_DTYPES = MappingProxyType({
    "F8_E4M3": FP8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
})


class WeightsError(Exception):
    """A checkpoint that cannot be used as it is: missing, unreadable, or with the wrong keys or shapes."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or `.pth` file, memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read ({exc})") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def read_state_dicts(paths: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """Several files merged into one dict; a later file's key replaces an earlier one's (official order)."""
    merged: dict[str, torch.Tensor] = {}
    for path in paths:
        merged.update(read_state_dict(path))
    return merged


def check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming the first missing/unexpected keys and mismatched shapes."""
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(
            f"unexpected key {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key])}")
            break
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems))


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Assign `state` into `module` (usually built on meta) after one cast to `dtype`/`device`.

    Floating tensors take `dtype` when given; integer tensors keep theirs.
    """
    check_keys(module, state, source)
    cast = {}
    for key, value in state.items():
        target_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
        cast[key] = cast_sliced(value, dtype=target_dtype, device=device or value.device)
    module.load_state_dict(cast, strict=True, assign=True)
    return module


def cast_sliced(value: torch.Tensor, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`value.to(device=device, dtype=dtype)`, the same values, in copies of at most COPY_SLICE_BYTES (a
    tensor already in place is returned as it is, as `.to` does: a memory-mapped one stays mapped)."""
    device = torch.device(device)
    same_device = device.type == value.device.type and device.index in (None, value.device.index)
    if same_device and dtype == value.dtype:
        return value
    itemsize = max(dtype.itemsize, value.element_size())
    if value.numel() * itemsize <= COPY_SLICE_BYTES or not value.is_contiguous():
        return value.to(device=device, dtype=dtype)
    out = torch.empty(value.shape, dtype=dtype, device=device)
    source, target, step = value.reshape(-1), out.view(-1), COPY_SLICE_BYTES // itemsize
    for start in range(0, source.numel(), step):
        target[start:start + step].copy_(source[start:start + step])
    return out


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


def map_file(path: str | Path) -> tuple[dict[str, torch.Tensor], MappedFile]:
    """Every tensor of a safetensors file as a zero-copy view of one memory map of the file.

    Why not safetensors' load_file: it copies each tensor into process memory, so a 19.5 GB file costs
    19.5 GB of RSS before anything else happens. Views of a private mapping cost nothing until touched, are
    backed by the page cache (the kernel can drop them under pressure) and go to the GPU without a copy.
    """
    from itk.runtime.safetensors_header import HeaderError, read_header

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        header = read_header(path)
    except (OSError, HeaderError) as exc:
        raise WeightsError(f"{path}: not a safetensors file ({exc})") from exc
    size = path.stat().st_size
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for key, info in header.tensors.items():
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise WeightsError(f"{path}: {key} has dtype {info.dtype}, which this runtime cannot read")
        raw = data[info.start:info.end]
        # A tensor whose offset is not a multiple of its element size cannot be viewed in place.
        if info.start % dtype.itemsize:
            raw = raw.clone()
        tensors[key] = raw.view(dtype).view(info.shape)
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
    model: nn.Module, state: dict[str, torch.Tensor], source: str, *, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Strict assign: FP8 data stays FP8, everything else becomes `dtype`, all on `device`."""
    check_keys(model, state, source)
    cast = {
        k: cast_sliced(v, device=device, dtype=v.dtype if v.dtype == FP8 or not v.is_floating_point() else dtype)
        for k, v in state.items()
    }
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            cast[f"{name}.scale"] = cast[f"{name}.scale"].float()  # the scale multiplies in any dtype
    model.load_state_dict(cast, strict=True, assign=True)


def dequantized_state(
    path: Path, map_path: Path, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Official-key state dict with every quantised weight dequantised to `dtype` on `device`, layer by layer.

    For the T5, which runs once per job: it then loads through the ordinary (key-mapped) T5 loader. Each
    FP8 tensor goes to `device` first and is dequantised there (on a GPU that is ~20 s faster for the
    5.7 B-parameter umT5 than on the CPU, and the host never holds the bf16 copy).
    """
    path = Path(path)
    qmap = read_quant_map(map_path)
    state = quantized_state(map_file(path)[0], qmap, str(path))
    for name in qmap:
        state[f"{name}.weight"] = dequantize_sliced(state.pop(f"{name}.weight"), state.pop(f"{name}.scale"),
                                                    dtype=dtype, device=device)
    return {k: cast_sliced(v, device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in state.items()}


def dequantize_sliced(data: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """data * scale (one scale per row) in `dtype` on `device`, computed in blocks of rows of at most
    COPY_SLICE_BYTES of the result (see `cast_sliced`)."""
    out = torch.empty(data.shape, dtype=dtype, device=device)
    row_bytes = max(1, math.prod(data.shape[1:])) * out.element_size()
    step = max(1, COPY_SLICE_BYTES // row_bytes)
    for start in range(0, data.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = data[rows].to(device).to(dtype) * scale[rows].to(device).to(dtype)
    return out
