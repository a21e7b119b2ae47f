"""DiT step time and GPU memory at 480p on a real GPU: resident bf16, resident FP8, FP8 streamed (budget 0).

Full-size random weights (dim 5120, 40 heads, FFN 13824) for a DiT of LAYERS blocks (default all 40: the
bf16 model is 38 GB and fits an 80 GB card) plus every module outside the blocks. A denoising step is 3
guidance passes of one forward; with fewer than 40 blocks (a mode that ran out of memory is retried with 8)
it is extrapolated: step = 3 * (forward - blocks + blocks * 40 / LAYERS), and the JSON says which.
480p bucket 640x640, 81 frames: L = 21 x 40 x 40 = 33,600 tokens, 512 text + 257 image context tokens.
Modes: bf16 resident, FP8 resident (tensor-core FP8 matmul), FP8 streamed with budget 0 from pinned memory,
FP8 resident weight-only (dequantised), FP8 streamed from pageable memory through the pinned staging ring.
Also the FP8 vs bf16 output cosine of a one-block full-size DiT (both FP8 paths).

Run on the device:  python bench/bench_dit_step.py [--layers 40] [--only MODES] [--out bench/results/dit-step-h100.json]
Each measurement is written as soon as it is taken, so a failure later loses nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_request import refuse_fallback, require_attention
from torch import nn

from itk.runtime.atomic import atomic_write_text
from itk.runtime.attention import SDPA, Attention
from itk.runtime.configs import DiTConfig
from itk.runtime.models.dit import InfiniteTalkDiT, rope_angles, rope_table
from itk.runtime.offload import DiTRunner
from itk.runtime.quant import FP8Kernel, FP8Linear, has_fp8_matmul, linear_names, quantize_rowwise, swap_linears

FULL_LAYERS = 40
PASSES = 3
SIZES = {"480p": (21, 40, 40), "720p": (21, 60, 60)}  # latent frames, token rows, token columns (640², 960²)
GRID = SIZES["480p"]


def random_dit(cfg: DiTConfig, kernel: FP8Kernel | None, device: str, seed: int = 0, *,
               attention: Attention = SDPA, parallel=None) -> InfiniteTalkDiT:
    """A full-width DiT with random weights, generated layer by layer on `device` (no fp32 copy); its
    Linears are FP8 computed by `kernel` when one is given, else bf16; its attentions run `attention`, on this
    rank's share of `parallel` (runtime/parallel.py) when given."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg, attention=attention, parallel=parallel)
    if kernel is not None:
        swap_linears(model, linear_names(model), kernel)
    for module in model.modules():
        if isinstance(module, FP8Linear):
            w = torch.randn(module.out_features, module.in_features, device=device, dtype=torch.bfloat16,
                            generator=g) * module.in_features**-0.5
            data, scale = quantize_rowwise(w)
            module.weight, module.scale = data, scale.float()
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=device, dtype=torch.bfloat16),
                                           requires_grad=False)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            fan_in = p.shape[1] if p.dim() > 1 else 1
            value = torch.randn(p.shape, device=device, dtype=torch.bfloat16, generator=g) * fan_in**-0.5
            if name == "weight" and p.dim() == 1:
                value = torch.ones_like(value)
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    model.rope = rope_table(cfg.head_dim)
    return model.eval()


def inputs(cfg: DiTConfig, device: str, grid: tuple[int, int, int] = GRID) -> tuple:
    t, h, w = grid
    frames = 1 + 4 * (t - 1)
    g = torch.Generator(device=device).manual_seed(1)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    return (r(16, t, 2 * h, 2 * w), torch.tensor([900.0], device=device), r(300, cfg.text_dim),
            r(1, cfg.image_tokens, cfg.clip_dim), r(1, 20, t, 2 * h, 2 * w),
            r(1, frames, cfg.audio_window, cfg.audio_blocks, cfg.audio_channels))


def timed(fn, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of `repeats` calls, after one warm-up call (compilation, kernel selection) if asked."""
    if warm_up:
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def measure(name: str, runner: DiTRunner, args: tuple, layers: int, repeats: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    model = runner.dit
    with torch.no_grad():
        forward = timed(lambda: runner(*args), repeats)
        tokens, grid, e, e0, ctx, audio = model.embed(*args)
        rope = rope_angles(grid, model.rope, tokens.device)
        blocks = timed(lambda: runner.streamer(tokens, e0, ctx, audio, grid, rope), repeats)
        embed = timed(lambda: model.embed(*args), repeats)
        head = timed(lambda: model.unpatchify(model.head(tokens, e).float(), grid), repeats)
    step = PASSES * (forward - blocks + blocks * FULL_LAYERS / layers)
    return {
        "mode": name, "layers_measured": layers, "forward_s": round(forward, 4), "blocks_s": round(blocks, 4),
        "per_block_ms": round(1000 * blocks / layers, 2), "step_s_extrapolated": round(step, 3),
        "embed_ms": round(1000 * embed, 2), "head_ms": round(1000 * head, 2),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
    }


def pass_timeline(fn) -> dict:
    """Where one call's wall time goes on the GPU (torch.profiler's trace, after a warm-up): per stream the
    kernel-busy ms, and on the busiest (compute) stream the idle ms between its first and last kernel, the
    gaps over 50 us counted: the part of a pass that no kernel shortens."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    streams: dict[int, list[tuple[float, float]]] = {}
    for ev in events:
        if ev.get("cat") in ("kernel", "gpu_memcpy") and "dur" in ev:
            streams.setdefault(ev["args"].get("stream", -1), []).append((ev["ts"], ev["ts"] + ev["dur"]))
    busy = {s: sum(b - a for a, b in spans) / 1000 for s, spans in streams.items()}
    main = max(busy, key=busy.get)
    spans = sorted(streams[main])
    # (idle us, where it began in us from the first kernel) between consecutive kernels that do not overlap
    idle = sorted(((b[0] - a[1], a[1] - spans[0][0]) for a, b in zip(spans, spans[1:], strict=False)
                   if b[0] > a[1]), reverse=True)
    gaps = [g for g, _ in idle]
    long_gaps = [g for g in gaps if g > 50]
    return {"wall_ms_profiled": round(wall * 1000, 1),
            "busy_ms_per_stream": {str(k): round(v, 1) for k, v in busy.items()},
            "compute_stream_span_ms": round((spans[-1][1] - spans[0][0]) / 1000, 1),
            "compute_stream_idle_ms": round(sum(gaps) / 1000, 1),
            "gaps_over_50us": {"count": len(long_gaps), "ms": round(sum(long_gaps) / 1000, 1)},
            "largest_gaps_ms_at_ms": [[round(g / 1000, 2), round(t / 1000, 1)] for g, t in idle[:8]]}


def to_fp8(model: nn.Module, kernel: FP8Kernel) -> nn.Module:
    """Replace every nn.Linear by an FP8Linear holding its row-wise quantised weight."""
    for name in linear_names(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, leaf)
        fp8 = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        fp8 = fp8.to(linear.weight.device)
        fp8.weight, scale = quantize_rowwise(linear.weight)
        fp8.scale = scale.float()
        fp8.bias = linear.bias
        setattr(parent, leaf, fp8)
    return model


def cosine_fp8_vs_bf16(args: tuple, kernel: FP8Kernel, attention: Attention = SDPA) -> float:
    """A one-block full-size DiT in bf16 against the same weights quantised to FP8 (computed by `kernel`)."""
    bf16 = random_dit(DiTConfig(num_layers=1), None, device="cuda", seed=7, attention=attention)
    with torch.no_grad():
        a = bf16(*args).flatten().double()
        b = to_fp8(bf16, kernel)(*args).flatten().double()
    return F.cosine_similarity(a, b, dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--only", default="", help="comma-separated mode names (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (BlockStreamer slots too)")
    parser.add_argument("--attention", default="auto", help="the runtime's attention choice (ITK_ATTENTION's values)")
    parser.add_argument("--long-keys", type=int, default=None,
                        help="key count from which FA4 / Sage run instead of SDPA (runtime.attention.LONG_KEYS)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config switch for the compiled blocks (repeatable), e.g. "
                             "coordinate_descent_tuning=1")
    parser.add_argument("--exact-accum", action="store_true",
                        help="FP8 matmuls without use_fast_accum (as before the fourth round)")
    parser.add_argument("--timeline", action="store_true", help="also profile one pass: GPU busy and idle time")
    parser.add_argument("--size", choices=SIZES, default="480p", help="the bucket: 640x640 or 960x960, 81 frames")
    parser.add_argument("--out", default="bench/results/dit-step-h100.json")
    opts = parser.parse_args()
    require_attention(opts.attention)  # an explicit kernel that cannot run is refused, never measured as SDPA
    grid = SIZES[opts.size]
    attention = Attention.resolve(opts.attention, "cuda")
    refuse_fallback(opts.attention, attention.name)
    if opts.long_keys is not None:
        attention = dataclasses.replace(attention, long_keys=opts.long_keys)
    import torch._inductor.config as inductor_config

    for switch in opts.inductor:
        key, _, value = switch.partition("=")
        setattr(inductor_config, key, type(getattr(inductor_config, key))(int(value)))
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": grid[0] * grid[1] * grid[2],
        "size": opts.size, "context_tokens": 769, "passes_per_step": PASSES, "blocks_full_model": FULL_LAYERS,
        "note": ("step_s = 3 passes x one forward of a DiT of layers_measured full-size blocks plus every other "
                 "module; measured directly when layers_measured is 40, else extrapolated per block"),
        "targets": {"fp8_streamed_vs_fp8_resident": "<= 1.05x", "fp8_streamed_step_s": "<= 9.5",
                    "fp8_streamed_gpu_peak_gb": "<= 8", "fp8_vs_bf16_cosine": ">= 0.999"},
        "compiled": opts.compile, "fast_accum": not opts.exact_accum,
        "attention": attention.name, "long_keys": attention.long_keys, "inductor": opts.inductor,
        "runs": [],
    }

    def save() -> None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["runs"][-1] if result["runs"] else result), flush=True)

    result["fp8_tensor_core_path"] = has_fp8_matmul(torch.device("cuda"))
    args = inputs(DiTConfig(), "cuda", grid)
    # name, FP8 weights, streamed with budget 0, pinned host memory, FP8 tensor-core matmul
    modes = (("bf16_resident", False, False, None, True), ("fp8_resident", True, False, None, True),
             ("fp8_streamed_budget0", True, True, True, True),
             ("fp8_weightonly_resident", True, False, None, False),
             ("fp8_streamed_budget0_pageable_staged", True, True, False, True))
    for name, fp8, streamed, pin, matmul in modes:
        if opts.only and name not in opts.only.split(","):
            continue
        for layers in dict.fromkeys((opts.layers, 8)):  # full depth first; 8 blocks if that does not fit
            runner = None
            kernel = FP8Kernel(matmul=matmul, fast_accum=not opts.exact_accum) if fp8 else None
            try:
                model = random_dit(DiTConfig(num_layers=layers), kernel, "cuda", attention=attention)
                if streamed:
                    model.cpu()
                    torch.cuda.empty_cache()
                runner = DiTRunner(model, device=torch.device("cuda"), budget=0 if streamed else None,
                                   compile=opts.compile, pin=pin)
                model = None
                run = measure(name, runner, args, layers, opts.repeats)
                if opts.timeline:
                    with torch.no_grad():
                        run["timeline"] = pass_timeline(lambda runner=runner: runner(*args))
                if streamed:
                    run["host_memory"] = runner.mode
                if kernel is not None:
                    run["fp8_tensor_core_matmul"] = kernel.matmul_active and result["fp8_tensor_core_path"]
                    run["fp8_matmul_error"] = kernel.matmul_error or None
                    run["activation_quantisation_compiled"] = kernel.fused_quantize
                result["runs"].append(run)
                break
            except Exception as exc:  # noqa: BLE001 - keep the other measurements
                result["runs"].append({"mode": name, "layers": layers, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                save()
                model = runner = None
                gc.collect()
                torch.cuda.empty_cache()
    for key, matmul in (("fp8_vs_bf16_block_cosine", True), ("fp8_weightonly_vs_bf16_block_cosine", False)):
        try:
            kernel = FP8Kernel(matmul=matmul, fast_accum=not opts.exact_accum)
            result[key] = round(cosine_fp8_vs_bf16(args, kernel, attention), 6)
        except Exception as exc:  # noqa: BLE001
            result[key] = f"error: {type(exc).__name__}: {exc}"
        save()
    runs = {r["mode"]: r for r in result["runs"] if "error" not in r}
    if {"fp8_resident", "fp8_streamed_budget0"} <= set(runs):
        result["fp8_streamed_over_resident"] = round(
            runs["fp8_streamed_budget0"]["step_s_extrapolated"] / runs["fp8_resident"]["step_s_extrapolated"], 3)
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
