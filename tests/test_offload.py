"""Low-VRAM streaming: with any persistence budget the DiT computes exactly what the resident model does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_dit import golden_config

from itk.runtime.models.dit import load_dit
from itk.runtime.offload import enable_streaming, params_of, resident_plan

from golden import load_golden, weights_of


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    meta, tensors = load_golden("dit_A")
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    save_file(weights_of(meta, tensors), str(path))
    return meta, tensors, path


def forward(model, t):
    with torch.no_grad():
        return model(t["input.x"], t["input.t"], t["input.context"], t["input.clip_fea"], t["input.y"],
                     t["input.audio"])


def test_the_budget_fills_in_module_order(golden):
    meta, _, path = golden
    model = load_dit([path], golden_config(meta), dtype=torch.float32)
    outside = sum(params_of(m) for name, m in model.named_children() if name != "blocks")
    block = params_of(model.blocks[0])
    assert resident_plan(model, 0)[0] == [False, False]
    assert resident_plan(model, outside + block)[0] == [True, False]
    assert resident_plan(model, 10**12)[0] == [True, True]


@pytest.mark.parametrize("budget", ["none", "one_block", "all"])
def test_streamed_output_is_bit_identical_to_the_resident_model(golden, budget):
    meta, t, path = golden
    cfg = golden_config(meta)
    reference = forward(load_dit([path], cfg, dtype=torch.float32), t)
    model = load_dit([path], cfg, dtype=torch.float32)
    outside = sum(params_of(m) for name, m in model.named_children() if name != "blocks")
    n = {"none": 0, "one_block": outside + params_of(model.blocks[0]), "all": 10**12}[budget]
    streamer = enable_streaming(model, n, "cpu")
    assert streamer.mode == ("resident" if budget == "all" else "mmap")
    assert torch.equal(forward(model, t), reference)
    assert torch.equal(forward(model, t), reference)  # the reused block buffers hold no stale state


def test_streaming_works_on_fp8_blocks(golden, tmp_path):
    from itk.runtime.models.dit import InfiniteTalkDiT
    from itk.runtime.quant import linear_names, load_dit_fp8, write_quantized

    meta, t, _ = golden
    cfg = golden_config(meta)
    with torch.device("meta"):
        names = linear_names(InfiniteTalkDiT(cfg))
    path = tmp_path / "fp8.safetensors"
    write_quantized(weights_of(meta, t), names, path, tmp_path / "fp8.json")
    reference = forward(load_dit_fp8(path, None, cfg, dtype=torch.float32), t)
    model = load_dit_fp8(path, None, cfg, dtype=torch.float32)
    streamer = enable_streaming(model, 0, "cpu")
    assert torch.equal(forward(model, t), reference)
    # The streamed FP8 weights were read from the file with pread (not through the mapping).
    assert streamer.mapped.offset_of(model.blocks[1].ffn[0].weight) is not None
    # The reusable block buffers are their own small tensors, not copies of the memory-mapped file.
    slot_weight = streamer.slots[0].ffn[0].weight
    assert slot_weight.untyped_storage().nbytes() == slot_weight.numel() * slot_weight.element_size()
    assert model.blocks[0].ffn[0].weight.untyped_storage().nbytes() == path.stat().st_size


def test_a_blocks_host_copy_is_one_allocation_with_aligned_views():
    from itk.runtime.offload import ALIGN, flat_views

    like = [torch.randn(3, 5), torch.zeros(7, dtype=torch.bfloat16), torch.ones((), dtype=torch.float64),
            torch.randn(4, 4).to(torch.float8_e4m3fn)]
    views = flat_views(like, pin=False)
    storages = {v.untyped_storage().data_ptr() for v in views}
    assert len(storages) == 1
    assert [(v.shape, v.dtype) for v in views] == [(t.shape, t.dtype) for t in like]
    assert all(v.data_ptr() % ALIGN == 0 for v in views)
    for v, t in zip(views, like, strict=True):
        v.copy_(t)
    assert all(torch.equal(v.float(), t.float()) for v, t in zip(views, like, strict=True))  # no overlap
