"""The one safetensors header parser: torch-free, so the doctor and fetch can judge a file without loading it.

The format: 8 bytes little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}, ...,
"__metadata__": {...}}`, then the data; each tensor's offsets are relative to the end of the header.
Why not `safetensors.safe_open`: it maps the whole file and refuses a truncated one with a Rust error text;
the doctor needs to say *how* a file is damaged (cut short, not safetensors at all) in its own words, and the
generator's loader needs absolute offsets for its own memory map.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
ITEM_BITS = MappingProxyType({
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
})


class HeaderError(ValueError):
    """The file is not a whole safetensors file; the message says how, for a person."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte


@dataclass(frozen=True)
class Header:
    data_start: int  # absolute offset where the data section begins (8 + N)
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_end(self) -> int:
        """Where the data the header describes ends; a whole file ends exactly here."""
        return max((t.end for t in self.tensors.values()), default=self.data_start)


def read_header(path: str | Path) -> Header:
    """Parse and check the header of `path` against the file's length. Raises HeaderError."""
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"truncated ({size} bytes, shorter than a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise HeaderError("truncated or not a safetensors file (header longer than the file)")
        if n > MAX_HEADER:
            raise HeaderError(f"not a safetensors file (a header of {n:,} bytes is beyond the format's limit)")
        raw = f.read(n)
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HeaderError("not a safetensors file (unreadable header)") from None
    if not isinstance(parsed, dict):
        raise HeaderError("not a safetensors file (the header is not a JSON object)")
    data_start = 8 + n
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise HeaderError("not a safetensors file (__metadata__ is not an object)")
    tensors = {name: tensor_info(name, entry, data_start) for name, entry in parsed.items()}
    header = Header(data_start=data_start, tensors=tensors, metadata=metadata)
    if header.data_end > size:
        raise HeaderError(f"truncated: {size} bytes, its header describes {header.data_end}")
    return header


def tensor_info(name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, checked: known shape of non-negative ints, ordered offsets, byte count = shape x dtype."""
    bad = f"not a safetensors file (tensor {name!r}: "
    if not isinstance(entry, dict):
        raise HeaderError(bad + "not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise HeaderError(bad + "no dtype)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(bad + f"bad shape {shape!r})")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise HeaderError(bad + f"bad data_offsets {offsets!r})")
    bits = ITEM_BITS.get(dtype)
    if bits is not None and offsets[1] - offsets[0] != math.ceil(math.prod(shape) * bits / 8):
        raise HeaderError(bad + f"{offsets[1] - offsets[0]} bytes for shape {shape} of {dtype})")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=data_start + offsets[0], end=data_start + offsets[1])
