"""Loading a checkpoint copies a large tensor a slice at a time: a Ctrl-C during model loading is seen after
one slice instead of after the whole tensor (umT5's 2 GB embedding read from a cold disk takes seconds), and
the loaded values are exactly those of one whole copy (issue 31, item 15)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from itk.runtime.loading import COPY_SLICE_BYTES, dequantized_state, load_strict, map_file, read_state_dict
from itk.runtime.quant import FP8


class LargestCopy(TorchDispatchMode):
    """Watches every tensor operation and keeps the size in bytes of the largest result of a copy or cast."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten.mul):
            self.largest = max(self.largest, out.numel() * out.element_size())
        return out


def test_a_tensor_larger_than_a_slice_loads_one_slice_per_copy_with_the_values_of_one_cast(tmp_path):
    rows = 2 * COPY_SLICE_BYTES // (4 * 1024) + 3  # float32 from a bf16 file: two slices and a bit
    weight = torch.randn(rows, 1024).to(torch.bfloat16)
    save_file({"weight": weight, "bias": torch.randn(rows).to(torch.bfloat16)}, str(tmp_path / "big.safetensors"))
    with torch.device("meta"):
        module = nn.Linear(1024, rows)
    state = read_state_dict(tmp_path / "big.safetensors")
    with LargestCopy() as watch:
        load_strict(module, state, "big.safetensors", dtype=torch.float32, device="cpu")
    assert 0 < watch.largest <= COPY_SLICE_BYTES
    assert torch.equal(module.weight, weight.float()) and module.weight.dtype == torch.float32


def test_a_tensor_already_in_place_is_not_copied(tmp_path):
    weight = torch.randn(64, 32)
    save_file({"weight": weight, "bias": torch.zeros(64)}, str(tmp_path / "small.safetensors"))
    state = read_state_dict(tmp_path / "small.safetensors")
    with torch.device("meta"):
        module = nn.Linear(32, 64)
    load_strict(module, state, "small", dtype=torch.float32, device="cpu")
    assert module.weight.data_ptr() == state["weight"].data_ptr()  # same dtype and device: no copy at all


def test_an_fp8_layer_larger_than_a_slice_dequantises_a_slice_at_a_time(tmp_path):
    rows = 2 * COPY_SLICE_BYTES // (4 * 2048) + 5
    data = (torch.randn(rows, 2048) * 50).to(FP8)
    scale = torch.rand(rows, 1).to(torch.bfloat16) / 100
    save_file({"layer.weight._data": data, "layer.weight._scale": scale}, str(tmp_path / "q.safetensors"))
    (tmp_path / "q.json").write_text('{"layer": {"weights": "qfloat8_e4m3fn", "activations": "none"}}')
    with LargestCopy() as watch:
        state = dequantized_state(tmp_path / "q.safetensors", tmp_path / "q.json", dtype=torch.float32)
    assert 0 < watch.largest <= COPY_SLICE_BYTES
    assert torch.equal(state["layer.weight"], data.to(torch.float32) * scale.to(torch.float32))
    assert map_file(tmp_path / "q.safetensors")[0]["layer.weight._data"].dtype == FP8
