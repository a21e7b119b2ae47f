"""The VAE's encode and decode, the official layout against the fast one (issue 17, item 3: the clip outside the DiT).

Full-size Wan2.1 VAE (runtime/configs.py's VAEConfig) with random weights, saved once and loaded through
`load_vae` like the generator loads it: encode 81 frames and decode 21 latent frames at 640x640, for
- official: `load_vae(..., fast=False)`, NCDHW and the official op sequence (the baseline),
- fast: `load_vae(..., fast=True)`, channels-last with the Triton norm+SiLU and residual sum, the biases
  added by the passes after the convs and the upsample conv on the low-resolution frame (runtime/models/vae.py),
each in float32 and bfloat16, plus the fast float32 path with cudnn.benchmark on (would autotuning the
convolutions pay?). Per run: seconds (CUDA events, one warm-up, median of 3), peak GPU GB (torch's
max_memory_allocated during the op: weights and input included), and for all but the baseline the max-abs
error, the relative error (max |d| / max |ref|) and the cosine against the official float32 output. Then a
torch.profiler breakdown of one float32 decode per layout by kernel kind: conv, conv_layout (cuDNN's own
NCDHW <-> NDHWC transposes), norm_silu, copy (cat, pad, copies), add (conv biases, residual sums), upsample,
attention, other.

Device:  python bench/bench_vae.py --out $OUT/vae-h200.json   (about 2 minutes on an H200)
CPU smoke (tests/test_vae.py runs it):  python bench/bench_vae.py --tiny --out /tmp/vae-tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, load_vae's fast, dtype, cudnn.benchmark): the first is the reference of every error.
RUNS = (("official_float32", False, torch.float32, False), ("fast_float32", True, torch.float32, False),
        ("official_bfloat16", False, torch.bfloat16, False), ("fast_bfloat16", True, torch.bfloat16, False),
        ("fast_float32_cudnn_benchmark", True, torch.float32, True))
PROFILED = ("official_float32", "fast_float32")
# Kernel (CUDA) or op (CPU smoke) name fragments, first match wins: cuDNN's layout transposes before its
# convolutions, whose names hold "nhwc" too; then the convolutions before the element-wise kernels, since
# CUTLASS names can hold "div" (FastDivmod).
KERNEL_KINDS = (("conv_layout", ("nchwtonhwc", "nhwctonchw")),
                ("conv", ("conv", "cudnn", "xmma", "gemm", "cutlass", "implicit", "winograd", "fprop", "nvjet")),
                ("norm_silu", ("norm", "silu", "sigmoid", "div", "mul")),
                ("copy", ("copy", "cat", "pad", "fill", "zero", "memset", "memcpy")),
                ("add", ("add", "residual_sum")),
                ("upsample", ("upsample",)),
                ("attention", ("attention", "fmha", "flash", "softmax")))
# The rest of the work outside the DiT per clip, from bench/results/speed-h200.json: colour correction on
# the GPU (0.034 s) and CLIP on one reference frame (0.02 s); the target for all of it is 3 s per clip.
OTHER_OUTSIDE_DIT_S = 0.034 + 0.02
TARGET_OUTSIDE_DIT_S = 3.0


@dataclasses.dataclass(frozen=True)
class Shape:
    size: int  # video height = width
    frames: int  # encoded video frames
    latent_frames: int  # decoded latent frames
    repeats: int


FULL = Shape(640, 81, 21, 3)
TINY = Shape(16, 5, 2, 1)


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """(fn's output, median seconds of `repeats` calls after one warm-up, peak GPU GB over them)."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = None
    for _ in range(repeats):
        out = None  # the previous output freed first: the peak is one call's
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
    return out, statistics.median(times), peak


def errors(value: torch.Tensor, ref: torch.Tensor) -> dict:
    ref = ref.to(value.device)
    diff = (value - ref).abs().max().item()
    cos = F.cosine_similarity(value.flatten().double(), ref.flatten().double(), dim=0).item()
    return {"max_abs_vs_official_float32": diff, "rel_err_vs_official_float32": diff / ref.abs().max().item(),
            "cosine_vs_official_float32": round(cos, 8)}


def kernel_profile(fn: Callable[[], torch.Tensor], device: torch.device) -> dict:
    """Time per kind of kernel in one call of fn (already warm): GPU kernels on CUDA, ops' self time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    kinds: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if cuda:
            us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
        else:
            us = event.self_cpu_time_total
        if us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        name = event.key.lower()
        kinds[next((k for k, frags in KERNEL_KINDS if any(f in name for f in frags)), "other")] += us / 1000
        kernels[event.key[:120]] += us / 1000
    total = sum(kinds.values())
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
    return {"clock": "GPU kernels" if cuda else "CPU ops (self time)", "total_ms": round(total, 2),
            "ms": {k: round(v, 2) for k, v in ranked}, "share": {k: round(v / total, 3) for k, v in ranked},
            "top_kernels_ms": {k: round(v, 2) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]}}


def random_vae_file(cfg, folder: Path, device: torch.device) -> Path:
    """Full-size random weights in the official file layout. Convolution weights ~ N(0, fan_in / 8): the
    default init explodes through 30 residual blocks, this keeps the activations O(1) (as bench_speed.py)."""
    from itk.runtime.models.vae import WanVAE

    torch.manual_seed(0)
    with torch.device(device):
        model = WanVAE(cfg)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d | torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=(2.0 / module.weight[0].numel()) ** 0.5 * 0.5)
    path = folder / "Wan2.1_VAE.pth"
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return path


def run_all(result: dict, shape: Shape, cfg, device: torch.device, only: set[str], save) -> None:
    from itk.runtime.models.vae import fused_kernels_ready, load_vae

    g = torch.Generator(device=device).manual_seed(3)
    video = torch.rand(3, shape.frames, shape.size, shape.size, device=device, generator=g) * 2 - 1
    latent_hw = shape.size // 2 ** (len(cfg.dim_mult) - 1)
    latent = torch.randn(cfg.z_dim, shape.latent_frames, latent_hw, latent_hw, device=device, generator=g)
    refs: dict[str, torch.Tensor] = {}
    runs, profiles = result.setdefault("runs", {}), result.setdefault("profile_decode_float32", {})
    with tempfile.TemporaryDirectory() as folder:
        path = random_vae_file(cfg, Path(folder), device)
        for name, fast, dtype, benchmark in RUNS:
            if only and name not in only and name != RUNS[0][0]:
                continue
            t0 = time.perf_counter()
            torch.backends.cudnn.benchmark = benchmark
            vae = load_vae(path, cfg, dtype=dtype, device=device, fast=fast)
            entry = runs.setdefault(name, {})
            for op, fn in (("encode", lambda vae=vae: vae.encode(video)),
                           ("decode", lambda vae=vae: vae.decode(latent))):
                out, seconds, peak = timed(fn, shape.repeats, device)
                entry[op] = {"s": round(seconds, 4), "gpu_peak_gb": round(peak, 2)}
                if name == RUNS[0][0]:
                    refs[op] = out.cpu()
                else:
                    entry[op].update(errors(out, refs[op]))
                del out
            if name in PROFILED:
                profiles[name] = kernel_profile(lambda vae=vae: vae.decode(latent), device)
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            del vae
            torch.backends.cudnn.benchmark = False
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    result["triton_kernels"] = "triton" if fused_kernels_ready(device) else "eager"
    base = runs[RUNS[0][0]]
    for name, entry in runs.items():
        if name != RUNS[0][0]:
            entry["speedup_vs_official_float32"] = {op: round(base[op]["s"] / entry[op]["s"], 2)
                                                    for op in ("encode", "decode")}
    if "fast_float32" in runs:
        fast = runs["fast_float32"]
        total = fast["encode"]["s"] + fast["decode"]["s"] + OTHER_OUTSIDE_DIT_S
        result["outside_dit_per_clip_s"] = {"fast_float32": round(total, 3), "target": TARGET_OUTSIDE_DIT_S,
                                            "met": total <= TARGET_OUTSIDE_DIT_S,
                                            "counts": "VAE encode 81 + decode 21 latent frames, colour, CLIP"}
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/vae-h200.json")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: a tiny VAE (dim 4) on 16x16, 5 frames, 2 latent frames, no repeats")
    parser.add_argument("--only", default="", help="comma-separated runs besides the baseline: "
                        + ",".join(name for name, *_ in RUNS[1:]))
    opts = parser.parse_args()
    only = set(filter(None, opts.only.split(",")))
    if only - {name for name, *_ in RUNS}:
        parser.error(f"--only {opts.only}: unknown run(s) {', '.join(sorted(only - {n for n, *_ in RUNS}))}")
    from itk.runtime.configs import VAEConfig

    device = torch.device("cpu" if opts.tiny or not torch.cuda.is_available() else "cuda")
    shape, cfg = (TINY, VAEConfig(dim=4)) if opts.tiny else (FULL, VAEConfig())
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                    "tf32_convolutions": torch.backends.cudnn.allow_tf32,
                    "shape": dataclasses.asdict(shape), "vae_config": dataclasses.asdict(cfg)}

    def save() -> None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    t0 = time.perf_counter()
    run_all(result, shape, cfg, device, only, save)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps({name: {op: run[op]["s"] for op in ("encode", "decode")}
                      for name, run in result["runs"].items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
