"""Where the DiT runs: `DiTRunner` places it, streams its blocks and compiles them, from outside the model.

Low-VRAM DiT: `--num_persistent_param_in_dit N` keeps N parameters resident on the GPU and streams the
rest block by block, with the next block's copy overlapping the current block's compute.

Same meaning as the official flag: a budget of parameter elements, filled in module order (the embeddings
and head first, then blocks 0, 1, ...). Unlike the official wrapper (a synchronous copy from pageable memory
per layer and per call), the streamed blocks' weights sit in pinned host memory and are
copied into one of two reusable GPU block buffers on a side CUDA stream while the other buffer computes.
When host RAM cannot pin them all (psutil's available RAM minus a headroom, against their bytes), they stay
where the loader put them (for `load_dit_fp8`: views of the memory-mapped file, so the page cache, not the
process, holds them) and pass through a ring of two block-sized pinned staging buffers: the host copies
block i+1 into its staging buffer while the GPU computes block i (kernels are queued asynchronously), then
the DMA runs on the side stream. Which of the two was chosen is logged and kept in `DiTRunner.mode`.
The modules outside the blocks (embeddings, head: ~1.6% of the parameters, used once per forward) are
always resident.

Which block goes to which buffer, and when each copy is issued and waited for, is one pure function
(`copy_schedule`); the streamer only executes it. On a CPU the same schedule runs with plain copies, so
tests check it bit for bit against the resident model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from itk.runtime.loading import MappedFile
from itk.runtime.models.dit import InfiniteTalkDiT

log = logging.getLogger(__name__)
FILL_THREADS = 8  # parallel preads into the pinned buffers: one thread reads ~3-5 GB/s from the page cache
PIN_HEADROOM = 8 * 2**30  # RAM left free after pinning, for activations, the VAE and the OS
ALIGN = 64  # byte alignment of each tensor inside a block's flat host buffer


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for b in module.buffers() if b.dtype == torch.float8_e4m3fn
    )


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, in a fixed order shared by blocks of the same structure."""
    return sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items())


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in named_tensors(module)]


def flat_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors)


def flat_views(like: Sequence[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """Empty host tensors shaped like `like`, all views of ONE allocation (pinned when asked)."""
    return views_of(torch.empty(flat_bytes(like), dtype=torch.uint8, pin_memory=pin), like)


def views_of(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors shaped like `like`, laid out one after another (ALIGN-aligned) in the uint8 tensor `flat`."""
    views, offset = [], 0
    for t in like:
        size = t.numel() * t.element_size()
        views.append(flat[offset:offset + size].view(t.dtype).view(t.shape))
        offset += -(-size // ALIGN) * ALIGN
    return views


def pow2_groups(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive block indices grouped into allocations that waste little of a power of two.

    Why: torch's pinned allocator rounds every allocation up to a power of two. One allocation per block
    (0.47 GB at 480p FP8) takes 512 MiB each, 2.6 GB more than the 40 blocks' 18.9 GB; one for all of them
    would take 32 GiB. Each group here fills the largest power of two that what is left can fill (a block
    larger than that gets its own), so the waste is at most one block per group, and the groups are few
    (16 GiB + 1 GiB + 512 MiB + 512 MiB for the 480p model: 0.45 GB over).
    """
    groups, i = [], 0
    while i < len(sizes):
        left = sum(sizes[i:])
        cap = max(1 << (left.bit_length() - 1), 1 << max(sizes[i] - 1, 0).bit_length())
        group, total = [], 0
        while i < len(sizes) and total + sizes[i] <= cap:
            group.append(i)
            total += sizes[i]
            i += 1
        groups.append(group)
    return groups


def empty_copy(block: nn.Module, device: torch.device) -> nn.Module:
    """A module like `block` with fresh, uninitialised tensors on `device`.

    Not `deepcopy(block).to(device)`: deepcopy of a view copies its whole storage, which for a block loaded
    from the memory-mapped file is the entire 19 GB file (and for a pinned block its whole host buffer).
    """
    memo: dict[int, torch.Tensor] = {}
    for t in tensors_of(block):
        empty = torch.empty_like(t, device=device)
        memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(block, memo)


def can_pin(nbytes: int) -> bool:
    import psutil

    return psutil.virtual_memory().available - nbytes > PIN_HEADROOM


class RegisteredHost:
    """Host memory for blocks of `sizes` bytes, one after another, page-locked in place with cudaHostRegister,
    one registration per block, from several threads.

    Why not torch's pinned allocator: it rounds every allocation up to a power of two (the 480p model's
    18.9 GB of streamed blocks would take 32 GiB in one allocation, 21.5 GB in one per block), and it
    page-locks serially. This takes exactly the bytes asked for. One registration per block, not fixed-size
    chunks: an asynchronous copy fails ("invalid argument") when its host range crosses from one
    registration into the next, and no tensor crosses a block. `pinned` is False (nothing left locked) when
    the driver refuses, e.g. under a locked-memory limit; the caller then falls back to the allocator.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.flat = torch.empty(sum(sizes), dtype=torch.uint8)
        self._cudart = torch.cuda.cudart()
        base, ok = self.flat.data_ptr(), self._cudart.cudaError.success
        starts = [base + sum(sizes[:i]) for i in range(len(sizes))]

        def lock(piece: tuple[int, int]) -> bool:
            return self._cudart.cudaHostRegister(piece[0], piece[1], 0) == ok

        with ThreadPoolExecutor(max_workers=FILL_THREADS) as pool:
            locked = list(pool.map(lock, zip(starts, sizes, strict=True)))
        self.locked = [ptr for ptr, done in zip(starts, locked, strict=True) if done]
        self.pinned = all(locked)
        if not self.pinned:
            log.warning("page-locking %.1f GB in place was refused; using torch's pinned allocator",
                        sum(sizes) / 1e9)
            self.close()

    def close(self) -> None:
        for ptr in self.locked:
            self._cudart.cudaHostUnregister(ptr)
        self.locked = []


def pins(sizes: Sequence[int], cuda: bool, pin: bool | None) -> bool:
    """Whether streamed blocks of these flat sizes go to pinned host memory: on CUDA, when asked (`pin`)
    or, unset, when free RAM holds them and the headroom."""
    return cuda and bool(sizes) and (can_pin(sum(sizes)) if pin is None else pin)


def host_mode(dit: nn.Module, device: torch.device | str, budget: int | None, pin: bool | None) -> str:
    """The `DiTRunner.mode` a runner of these arguments will have, known before it is built (the engine
    chooses how to apply a LoRA from it): "resident" | "pinned" | "mmap"."""
    plan = [True] * len(dit.blocks) if budget is None else resident_plan(dit, budget)[0]
    sizes = [flat_bytes(tensors_of(b)) for b, keep in zip(dit.blocks, plan, strict=True) if not keep]
    if not sizes:
        return "resident"
    return "pinned" if pins(sizes, torch.device(device).type == "cuda", pin) else "mmap"


def _replace(block: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = block.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


@dataclass(frozen=True)
class Step:
    """One step of a forward through the blocks.

    copy: issue the copy of `block`'s weights into device buffer `slot` (on CUDA it waits on the side
    stream until the slot's previous block finished computing; the host does not wait). wait: the compute
    stream waits until that copy landed. run: compute `block`, in place when `slot` is None (resident),
    else from `slot`. free: mark `slot` reusable once the queued compute so far is done.
    """

    kind: Literal["copy", "wait", "run", "free"]
    block: int
    slot: int | None = None


def copy_schedule(resident: Sequence[bool], primed: bool = False) -> list[Step]:
    """Every step of one forward: streamed blocks alternate between two slots, and each one's successor
    among the streamed blocks is copied while it computes. The last streamed block's turn also copies the
    first one for the next forward (every denoising pass starts with it), so that copy overlaps the end of
    this forward, the head and the next embedding instead of stalling the next pass. `primed`: that copy
    was issued by the previous forward, so this one does not start with it."""
    streamed = [i for i, keep in enumerate(resident) if not keep]
    slot_of = {block: n % 2 for n, block in enumerate(streamed)}
    upcoming = dict(zip(streamed, [*streamed[1:], *streamed[:1]], strict=True))  # last -> next forward's first
    steps = [Step("copy", streamed[0], 0)] if streamed and not primed else []
    for i, keep in enumerate(resident):
        if keep:
            steps.append(Step("run", i))
            continue
        slot = slot_of[i]
        after = upcoming[i]
        steps += [Step("wait", i, slot), Step("run", i, slot), Step("free", i, slot),
                  Step("copy", after, slot_of[after])]
    return steps


Compiler = Callable[[nn.Module], Callable[..., torch.Tensor]]


def eager(module: nn.Module) -> Callable[..., torch.Tensor]:
    """The `Compiler` that compiles nothing: the module itself runs."""
    return module


class BlockStreamer:
    """Runs a list of identically shaped blocks on `device`, resident ones in place, the rest streamed.

    `wrap` turns each module that computes (a resident block, a device slot) into what is called: the
    module itself, or its torch.compile'd version.
    """

    def __init__(self, blocks: Sequence[nn.Module], resident: Sequence[bool], *, device: torch.device,
                 pin: bool | None = None, mapped: MappedFile | None = None, wrap: Compiler = eager):
        self.mapped = mapped  # the memory-mapped FP8 file the blocks came from: its bytes are read with pread
        self.blocks = list(blocks)
        self.resident = list(resident)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # The first forward copies the first streamed block itself; every later one finds it copied (primed).
        self.schedules = {primed: copy_schedule(self.resident, primed) for primed in (False, True)}
        self.primed = False
        streamed = [b for b, r in zip(self.blocks, self.resident, strict=True) if not r]
        for block, keep in zip(self.blocks, self.resident, strict=True):
            if keep:
                block.to(self.device)
        sizes = [flat_bytes(tensors_of(b)) for b in streamed]
        nbytes = sum(sizes)
        self.pinned = pins(sizes, self.cuda, pin)
        self.mode = "resident" if not streamed else ("pinned" if self.pinned else "mmap")
        if streamed:
            source = ("pinned host memory" if self.pinned else
                      "host memory as loaded (the memory-mapped file for FP8) through a 2-block pinned ring")
            log.info("DiT streaming: %d of %d blocks (%.1f GB) streamed from %s",
                     len(streamed), len(self.blocks), nbytes / 1e9, source)
        self.arenas: list[RegisteredHost] = []  # exact-size pinned memory, unregistered by close()
        self.host = self._to_host(self.blocks, self.resident)
        # Two reusable device buffers shaped like a block; they alternate between consecutive streamed blocks.
        self.slots = [empty_copy(streamed[0], self.device) for _ in range(min(2, len(streamed)))]
        self.staging = (
            [flat_views(tensors_of(streamed[0]), pin=True) for _ in self.slots]
            if streamed and self.cuda and not self.pinned else None
        )
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in self.slots]
            self.freed = [torch.cuda.Event() for _ in self.slots]
        self.block_calls = [wrap(b) if r else None for b, r in zip(self.blocks, self.resident, strict=True)]
        self.slot_calls = [wrap(slot) for slot in self.slots]

    def _to_host(self, blocks: Sequence[nn.Module], resident: Sequence[bool]) -> list[list[torch.Tensor] | None]:
        """The streamed blocks' tensors on the host: copied into pinned memory (one exact-size allocation
        page-locked in place, see `RegisteredHost`; blocks filled in parallel threads, since pread and tensor
        copies release the GIL) when
        pinning was chosen, else left where they are (views of the mapped file for FP8). Each module tensor
        is replaced by its host copy block by block, so host memory never holds the DiT twice."""
        streamed = [b for b, r in zip(blocks, resident, strict=True) if not r]
        if self.pinned:
            named = [named_tensors(b) for b in streamed]
            sizes = [flat_bytes([t for _, t in n]) for n in named]
            views: list[list[torch.Tensor]] = [[] for _ in streamed]
            arena = RegisteredHost(sizes) if self.cuda else None
            if arena is not None and arena.pinned:
                self.arenas.append(arena)
                groups, flats = [list(range(len(streamed)))], [arena.flat]
            else:  # page-locking in place refused (e.g. a locked-memory limit): torch's pinned allocator
                groups = pow2_groups(sizes)
                flats = [torch.empty(sum(sizes[i] for i in g), dtype=torch.uint8, pin_memory=True) for g in groups]
            for group, flat in zip(groups, flats, strict=True):
                offset = 0
                for i in group:
                    views[i] = views_of(flat[offset:offset + sizes[i]], [t for _, t in named[i]])
                    offset += sizes[i]

            def fill(i: int) -> None:
                for (_, t), view in zip(named[i], views[i], strict=True):
                    self._fill(view, t.detach())
                for (name, _), view in zip(named[i], views[i], strict=True):
                    _replace(streamed[i], name, view)

            with ThreadPoolExecutor(max_workers=FILL_THREADS) as pool:
                list(pool.map(fill, range(len(streamed))))
        else:
            for block in streamed:
                for name, t in named_tensors(block):
                    if t.device.type != "cpu":
                        _replace(block, name, t.detach().cpu())
        return [None if r else tensors_of(b) for b, r in zip(blocks, resident, strict=True)]

    def _fill(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """dst <- src on the host; bytes of the memory-mapped file are read with pread, not through the mapping."""
        offset = self.mapped.offset_of(src) if self.mapped is not None else None
        if offset is None or dst.device.type != "cpu" or not dst.is_contiguous():
            return dst.copy_(src)
        self.mapped.read_into(dst, offset)
        return dst

    def _copy(self, index: int, slot: int) -> None:
        """Copy block `index` into device slot `slot` (on CUDA: queued on the copy stream, not waited for)."""
        targets = tensors_of(self.slots[slot])
        sources = self.host[index]
        if not self.cuda:
            for dst, src in zip(targets, sources, strict=True):
                self._fill(dst, src)
            return
        if self.staging is not None:
            self.copied[slot].synchronize()  # this staging area may still feed the slot's previous copy
            for stage, src in zip(self.staging[slot], sources, strict=True):
                self._fill(stage, src)
            sources = self.staging[slot]
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])  # the slot's previous block has finished computing
            for dst, src in zip(targets, sources, strict=True):
                dst.copy_(src, non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def close(self) -> None:
        """Unlock the pinned host memory (the tensors stay usable, as pageable memory)."""
        for arena in getattr(self, "arenas", ()):  # also when __init__ failed before it existed
            arena.close()
        self.arenas = []

    def __del__(self) -> None:
        self.close()

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        """The blocks on x. The streamed blocks' host weights must not change after the first call: the
        first streamed block's slot is refilled at the end of each call, ahead of the next."""
        steps = self.schedules[self.primed]
        self.primed = False  # a call that fails part-way leaves the slots unknown: the next one copies afresh
        for step in steps:
            if step.kind == "run":
                call = self.block_calls[step.block] if step.slot is None else self.slot_calls[step.slot]
                x = call(x, *args)  # on CUDA queued: the GPU computes while the host goes on
            elif step.kind == "copy":
                self._copy(step.block, step.slot)
            elif self.cuda and step.kind == "wait":
                torch.cuda.current_stream(self.device).wait_event(self.copied[step.slot])
            elif self.cuda and step.kind == "free":
                self.freed[step.slot].record(torch.cuda.current_stream(self.device))
        self.primed = bool(self.slots)
        return x


def resident_plan(model: nn.Module, budget: int) -> tuple[list[bool], int]:
    """Which blocks fit the budget after the always-resident modules, in module order."""
    used = sum(params_of(m) for name, m in model.named_children() if name != "blocks")
    plan = []
    for block in model.blocks:
        size = params_of(block)
        fits = used + size <= budget
        used += size if fits else 0
        plan.append(fits)
    return plan, used


COMPILE_OPTIONS = MappingProxyType({"max_autotune_pointwise": True})  # inductor switches for the blocks (below)


@dataclass(frozen=True)
class BlockCompiler:
    """torch.compile for the DiT's blocks, its configuration scoped to them: the process-wide compiler
    configuration is never changed. Inductor's settings go through torch.compile's `options` (applied while it
    compiles); dynamo's recompile limit is patched around each call of a compiled block (`scope`), where dynamo
    checks it before compiling again.

    Compiling fuses a block's float32 norm/modulation/RoPE arithmetic (and the FP8 activation quantiser): those
    element-wise steps are memory-bound and cost as much as the matmuls when run one by one (1.3-1.6x per step
    on the H100, bench/results/dit-step-h100*.json). Inductor benchmarks its launch configurations for the
    element-wise and reduction kernels (max_autotune_pointwise: ~10 s more on a first compile, then cached on
    disk with the compiled graph; those kernels took 5% less GPU time on the H200, bench/results/fusion-h200.json).
    threads: inductor's compile worker processes (RuntimeOptions.compile_threads)."""

    blocks: int
    threads: int = 1

    @property
    def options(self) -> dict[str, Any]:
        return {**COMPILE_OPTIONS, "compile_threads": self.threads}

    @property
    def recompile_limit(self) -> int:
        """One compiled graph per block instance and slot, and per speaker layout (one speaker, or two with
        their masks), all of one code object (Block.forward): room for all, so none falls back to eager."""
        return 2 * (self.blocks + 2) + 8

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Dynamo's configuration while a compiled block runs (and compiles): the recompile limit raised."""
        config = torch._dynamo.config
        return config.patch(cache_size_limit=max(config.cache_size_limit, self.recompile_limit))

    def __call__(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        """`module`'s forward compiled (on its first call), run inside `scope`; the module itself is unchanged."""
        forward = torch.compile(module.forward, dynamic=False, options=self.options)

        def call(*args: Any) -> torch.Tensor:
            with self.scope():
                return forward(*args)

        return call


class DiTRunner:
    """The DiT placed on `device`, its blocks streamed and compiled from outside; called like the DiT.

    budget None: everything resident on `device`. An int (`--num_persistent_param_in_dit`): the modules
    outside the blocks and the blocks that fit the budget in module order are resident, the rest stream
    from host memory (`mapped`: the memory-mapped FP8 file they are views of; `pin`: force or forbid
    pinning, None = decided from free RAM). compile: torch.compile every block that computes (on a CUDA
    device; ignored elsewhere) with a `BlockCompiler` of `compile_threads` worker processes.
    `mode`: "resident" | "pinned" | "mmap".
    """

    def __init__(self, dit: InfiniteTalkDiT, *, device: torch.device | str, budget: int | None = None,
                 compile: bool = False, mapped: MappedFile | None = None, pin: bool | None = None,
                 compile_threads: int = 1):
        self.dit = dit
        self.device = torch.device(device)
        for name, child in dit.named_children():
            if name != "blocks" or budget is None:
                child.to(self.device)
        plan = [True] * len(dit.blocks) if budget is None else resident_plan(dit, budget)[0]
        wrap: Compiler = eager
        if compile and self.device.type == "cuda":
            wrap = BlockCompiler(blocks=len(dit.blocks), threads=compile_threads)
        self.streamer = BlockStreamer(dit.blocks, plan, device=self.device, pin=pin, mapped=mapped, wrap=wrap)
        self.mode = self.streamer.mode

    def __call__(self, x, t, context, clip_fea, y, audio, *, speaker_masks=None) -> torch.Tensor:
        return self.dit(x, t, context, clip_fea, y, audio, speaker_masks=speaker_masks, run_blocks=self.streamer)
