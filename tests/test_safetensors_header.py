"""itk.runtime.safetensors_header: the one torch-free header parser, on a file the safetensors library wrote and on the
ways a file is really damaged."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from itk.runtime.safetensors_header import MAX_HEADER, HeaderError, read_header


def raw_file(path, header: dict | bytes, data: bytes = b"") -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_a_file_written_by_the_safetensors_library_parses_with_absolute_offsets(tmp_path):
    path = tmp_path / "good.safetensors"
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64)
    save_file({"a": a, "b": b}, str(path), metadata={"format": "pt"})
    header = read_header(path)
    blob = path.read_bytes()
    assert header.metadata == {"format": "pt"} and set(header.tensors) == {"a", "b"}
    ta, tb = header.tensors["a"], header.tensors["b"]
    assert (ta.dtype, ta.shape, tb.dtype, tb.shape) == ("F32", (2, 3), "I64", (4,))
    assert blob[ta.start:ta.end] == a.tobytes() and blob[tb.start:tb.end] == b.tobytes()
    assert header.data_start == 8 + struct.unpack("<Q", blob[:8])[0] and header.data_end == len(blob)


def test_a_truncated_file_says_truncated(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": np.zeros(64, dtype=np.float32)}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    with pytest.raises(HeaderError, match=rf"truncated: {len(whole) - 10} bytes, its header describes {len(whole)}"):
        read_header(path)
    path.write_bytes(whole[:5])
    with pytest.raises(HeaderError, match="truncated"):
        read_header(path)


def test_a_header_that_is_not_json_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    raw_file(path, b"\xff\xfe{not json" + b" " * 6)
    with pytest.raises(HeaderError, match="unreadable header"):
        read_header(path)
    raw_file(path, b"[1, 2]  ")
    with pytest.raises(HeaderError, match="not a JSON object"):
        read_header(path)


def test_offsets_past_the_end_of_the_file_are_refused(tmp_path):
    path = tmp_path / "past.safetensors"
    raw_file(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(HeaderError, match="truncated"):
        read_header(path)


def test_inconsistent_entries_are_refused_by_name(tmp_path):
    path = tmp_path / "odd.safetensors"
    for entry, said in (({"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}, "bad data_offsets"),
                        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}, "bad shape"),
                        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}, "16 bytes for shape"),
                        ({"shape": [4], "data_offsets": [0, 16]}, "no dtype")):
        raw_file(path, {"w": entry}, b"\0" * 16)
        with pytest.raises(HeaderError, match=f"tensor 'w': {said}"):
            read_header(path)


def test_an_absurd_header_length_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(HeaderError, match="header longer than the file"):
        read_header(path)
    with open(path, "wb") as f:  # a sparse file longer than the limit: the length alone is refused
        f.write(struct.pack("<Q", MAX_HEADER + 1) + b"{")
        f.truncate(MAX_HEADER + 64)
    with pytest.raises(HeaderError, match="beyond the format's limit"):
        read_header(path)
