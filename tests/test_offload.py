"""Low-VRAM streaming: with any persistence budget the DiT computes exactly what the resident model does."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dit import golden_config

from itk.runtime.models.dit import load_dit
from itk.runtime.offload import DiTRunner, Step, copy_schedule, params_of, resident_plan

from golden import golden_weights_file, weights_of


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    meta, tensors = golden_weights_file("dit_A", path)
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
    runner = DiTRunner(model, device=torch.device("cpu"), budget=n)
    assert runner.mode == ("resident" if budget == "all" else "mmap")
    assert torch.equal(forward(runner, t), reference)
    assert torch.equal(forward(runner, t), reference)  # the reused block buffers hold no stale state


def test_streaming_works_on_fp8_blocks(golden, tmp_path):
    from itk.runtime.models.dit import InfiniteTalkDiT, load_dit_fp8
    from itk.runtime.quant import FP8Kernel, linear_names, write_quantized

    meta, t, _ = golden
    cfg = golden_config(meta)
    with torch.device("meta"):
        names = linear_names(InfiniteTalkDiT(cfg))
    path, map_path = tmp_path / "fp8.safetensors", tmp_path / "fp8.json"
    write_quantized(weights_of(meta, t), names, path, map_path)
    reference = forward(load_dit_fp8(path, map_path, cfg, dtype=torch.float32, device="cpu", kernel=FP8Kernel())[0], t)
    model, mapped = load_dit_fp8(path, map_path, cfg, dtype=torch.float32, device="cpu", kernel=FP8Kernel())
    runner = DiTRunner(model, device=torch.device("cpu"), budget=0, mapped=mapped)
    assert torch.equal(forward(runner, t), reference)
    streamer = runner.streamer
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


def test_streamed_blocks_alternate_slots_and_each_prefetches_the_next_one_the_last_the_next_forwards_first():
    assert copy_schedule([False, False, False]) == [
        Step("copy", 0, 0),
        Step("wait", 0, 0), Step("run", 0, 0), Step("free", 0, 0), Step("copy", 1, 1),
        Step("wait", 1, 1), Step("run", 1, 1), Step("free", 1, 1), Step("copy", 2, 0),
        Step("wait", 2, 0), Step("run", 2, 0), Step("free", 2, 0), Step("copy", 0, 0),
    ]


def test_a_primed_forward_finds_its_first_block_copied_by_the_previous_one():
    assert copy_schedule([False, False], primed=True) == [
        Step("wait", 0, 0), Step("run", 0, 0), Step("free", 0, 0), Step("copy", 1, 1),
        Step("wait", 1, 1), Step("run", 1, 1), Step("free", 1, 1), Step("copy", 0, 0),
    ]


def test_resident_blocks_run_in_place_and_are_skipped_by_the_copies():
    steps = copy_schedule([True, False, True, True, False])
    assert steps == [
        Step("copy", 1, 0),
        Step("run", 0),
        Step("wait", 1, 0), Step("run", 1, 0), Step("free", 1, 0), Step("copy", 4, 1),
        Step("run", 2), Step("run", 3),
        Step("wait", 4, 1), Step("run", 4, 1), Step("free", 4, 1), Step("copy", 1, 0),
    ]
    assert copy_schedule([True, True]) == copy_schedule([True, True], primed=True) == [Step("run", 0), Step("run", 1)]


@pytest.mark.parametrize("resident", [[False, True, False, False, True, False, False], [False, False], [True, False]])
def test_over_consecutive_forwards_each_streamed_block_is_copied_before_it_is_waited_for_and_never_into_a_busy_slot(
    resident,
):
    busy: dict[int, int] = {}  # slot -> block copied into it and not yet freed (carried from one forward to the next)
    for primed in (False, True, True):
        copied, ran = [], []
        for step in copy_schedule(resident, primed):
            if step.kind == "copy":
                assert step.slot not in busy  # the slot's previous block was freed first
                busy[step.slot] = step.block
                copied.append(step.block)
            elif step.kind == "wait":
                assert busy[step.slot] == step.block
            elif step.kind == "run":
                ran.append(step.block)
            else:
                assert busy.pop(step.slot) == step.block
        streamed = [i for i, keep in enumerate(resident) if not keep]
        assert ran == list(range(len(resident)))
        assert copied == (streamed[1:] if primed else streamed) + streamed[:1]


def test_a_forward_that_fails_part_way_leaves_the_next_one_to_copy_its_first_block_afresh(golden):
    meta, t, path = golden
    model = load_dit([path], golden_config(meta), dtype=torch.float32)
    third = copy.deepcopy(model.blocks[1])  # three streamed blocks: the first and the third share slot 0
    for p in third.parameters():
        p.data.mul_(0.5)
    model.blocks.append(third)
    reference = forward(model, t)
    runner = DiTRunner(model, device=torch.device("cpu"), budget=0)
    assert torch.equal(forward(runner, t), reference)
    streamer, first_slot, calls = runner.streamer, runner.streamer.slot_calls[0], []

    def fail_in_the_third_block(x, *args):
        calls.append(x)
        if len(calls) == 2:  # slot 0's second block of the forward, which now holds the third block's weights
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return first_slot(x, *args)

    streamer.slot_calls[0] = fail_in_the_third_block
    with pytest.raises(torch.cuda.OutOfMemoryError):
        forward(runner, t)
    streamer.slot_calls[0] = first_slot
    assert torch.equal(forward(runner, t), reference)  # the first block copied again, not the third's weights run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pin", [True, False])
def test_the_streamed_model_on_a_gpu_computes_what_the_resident_model_does(golden, pin):
    meta, t, path = golden
    cfg = golden_config(meta)
    cuda = torch.device("cuda")
    inputs = {k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    resident = DiTRunner(load_dit([path], cfg, dtype=torch.float32), device=cuda)
    assert resident.mode == "resident"
    reference = forward(resident, inputs)
    streamed = DiTRunner(load_dit([path], cfg, dtype=torch.float32), device=cuda, budget=0, pin=pin)
    assert streamed.mode == ("pinned" if pin else "mmap")
    for _ in range(2):  # the second forward reuses the slots and their events
        assert torch.equal(forward(streamed, inputs), reference)


def compiler_config() -> tuple[int, int | None]:
    import torch._inductor.config

    return torch._dynamo.config.cache_size_limit, torch._inductor.config.compile_threads


def test_the_runner_attaches_nothing_to_the_dit_and_ignores_compile_off_the_gpu(golden):
    meta, t, path = golden
    model = load_dit([path], golden_config(meta), dtype=torch.float32)
    reference = forward(model, t)
    attributes = {name: id(value) for name, value in vars(model).items()}
    before = compiler_config()
    runner = DiTRunner(model, device=torch.device("cpu"), compile=True, compile_threads=4)
    assert compiler_config() == before  # no process-wide compiler setting changed by building a runner
    assert runner.mode == "resident" and runner.streamer.block_calls == list(model.blocks)
    assert {name: id(value) for name, value in vars(model).items()} == attributes
    assert torch.equal(forward(runner, t), reference)


def test_the_block_compiler_scopes_its_settings_to_the_compile_and_the_calls_of_compiled_blocks(monkeypatch):
    """Inductor's settings travel in torch.compile's options; dynamo's recompile limit is raised only while a
    compiled block runs (where dynamo checks it), and the process-wide configuration is as it was after."""
    from itk.runtime.offload import COMPILE_OPTIONS, BlockCompiler

    before = compiler_config()
    compiled: dict[str, object] = {}
    during: list[tuple[int, int | None]] = []

    def fake_compile(fn, *, dynamic, options):
        compiled.update(dynamic=dynamic, options=options)

        def run(*args):
            during.append(compiler_config())
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiler = BlockCompiler(blocks=40, threads=3)
    block = torch.nn.Linear(2, 2)
    call = compiler(block)
    x = torch.ones(1, 2)
    assert torch.equal(call(x), block(x))
    assert compiled == {"dynamic": False, "options": {**COMPILE_OPTIONS, "compile_threads": 3}}
    assert during == [(max(before[0], 2 * (40 + 2) + 8), before[1])]
    assert compiler_config() == before


def test_fallback_pinned_groups_cover_every_block_in_order_and_waste_at_most_a_few_percent_of_the_480p_model():
    from itk.runtime.offload import pow2_groups

    block = 472_000_000  # one 480p FP8 block's flat bytes
    for sizes in ([block] * 40, [block] * 7, [3, 900, 5, 70, 70, 70], [block * 3] + [block] * 5):
        groups = pow2_groups(sizes)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
        assert all(g for g in groups)
    sizes = [block] * 40
    pow2 = lambda n: 1 << (n - 1).bit_length()  # noqa: E731 - what the pinned allocator takes for n bytes
    grouped = sum(pow2(sum(sizes[i] for i in g)) for g in pow2_groups(sizes))
    assert grouped <= 1.03 * sum(sizes) < 40 * pow2(block)
