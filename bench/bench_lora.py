"""LoRA on the FP8 DiT at 480p on one GPU: step time of the side path (rank 32 and 64) with the DiT streamed at
budget 0 against no LoRA, the cost of merging at load, and the output agreement of both FP8 methods with a
bf16 merge (the official arithmetic).

Full-size random weights, 40 blocks, random LoRA files of the lightx2v layout (12 Linears per block, official
`diffusion_model.*.lora_down/up` keys, ~10% relative delta) written to a temporary folder and applied through
runtime/lora.py. Step times: one forward at 640x640, 81 frames (33,600 tokens) x passes (2 with text
guidance 1, as the distill presets run; 3 otherwise), compiled as the engine runs it. A merged LoRA leaves
the FP8 tensors' shapes unchanged, so its step time is the no-LoRA one; its load cost is measured on 2 blocks
(CPU, where a streamed model is merged, and GPU) and scaled to 40. Agreement: a 4-block full-size DiT, cosine
of each FP8 method's output with the bf16 merge (and, for scale, of FP8 without the LoRA).

Run on the device:  python bench/bench_lora.py --out bench/results/lora-h200.json   (about 5 minutes)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_dit_step import inputs, random_dit, timed
from safetensors.torch import save_file
from torch import nn

from itk.runtime.attention import Attention
from itk.runtime.configs import DiTConfig
from itk.runtime.lora import apply_loras
from itk.runtime.offload import DiTRunner
from itk.runtime.quant import FP8Kernel, FP8Linear

LAYERS = 40
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def lora_file(model: nn.Module, rank: int, folder: Path, layers: int, seed: int = 3) -> Path:
    """A random LoRA of the lightx2v layout for `model`'s shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(layers):
        for name in TARGETS:
            m = model.get_submodule(f"blocks.{b}.{name}")
            k = f"diffusion_model.blocks.{b}.{name}"
            out[f"{k}.lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) * m.in_features**-0.5
                                            ).bfloat16()
            out[f"{k}.lora_up.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.1 * rank**-0.5
                                          * m.in_features**-0.5).bfloat16()
    path = folder / f"lora_rank{rank}_{layers}.safetensors"
    save_file(out, str(path))
    return path


def drop_side(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.lora_down = m.lora_up = None


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def step_times(name: str, model: nn.Module, budget: int | None, args: tuple, repeats: int, compile: bool) -> dict:
    runner = DiTRunner(model, device=torch.device("cuda"), budget=budget, compile=compile,
                       pin=True if budget is not None else None)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        forward = timed(lambda: runner(*args), repeats)
    run = {"mode": name, "forward_s": round(forward, 4), "step_s_2_passes": round(2 * forward, 3),
           "step_s_3_passes": round(3 * forward, 3), "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
           "host_memory": runner.mode}
    runner = None
    free()
    return run


def merge_cost(rank: int, folder: Path, device: str) -> float:
    """Seconds to merge a rank-`rank` LoRA into a 2-block FP8 DiT on `device`, scaled to 40 blocks."""
    model = random_dit(DiTConfig(num_layers=2), FP8Kernel(), "cuda").to(device)
    path = lora_file(model, rank, folder, 2)
    torch.cuda.synchronize()
    start = time.perf_counter()
    apply_loras(model, [(path, 1.0)], fp8_method="merge")
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) * LAYERS / 2, 2)


def agreement(rank: int, folder: Path, args: tuple) -> dict:
    """Output cosines against the bf16 merge on a 4-block full-size DiT."""
    layers = 4
    attention = Attention.resolve("auto", "cuda")  # the generator's default (ITK_ATTENTION unset)
    fp8 = random_dit(DiTConfig(num_layers=layers), FP8Kernel(), "cuda", seed=11, attention=attention)
    path = lora_file(fp8, rank, folder, layers)
    bf16 = random_dit(DiTConfig(num_layers=layers), None, "cuda", seed=11, attention=attention)
    with torch.no_grad():
        same = dict(bf16.named_parameters())
        for name, p in fp8.named_parameters():
            same[name].copy_(p)
        for name, m in fp8.named_modules():
            if isinstance(m, FP8Linear):
                same[f"{name}.weight"].copy_(m.dequantized(torch.bfloat16))
        plain = fp8(*args).flatten().double()
        apply_loras(bf16, [(path, 1.0)])
        ref = bf16(*args).flatten().double()
        apply_loras(fp8, [(path, 1.0)], fp8_method="side", dtype=torch.bfloat16)
        side = fp8(*args).flatten().double()
        drop_side(fp8)
        apply_loras(fp8, [(path, 1.0)], fp8_method="merge")
        merged = fp8(*args).flatten().double()
    cos = lambda a: round(F.cosine_similarity(a, ref, dim=0).item(), 6)  # noqa: E731
    return {"rank": rank, "blocks": layers, "side_vs_bf16_merge": cos(side), "merge_vs_bf16_merge": cos(merged),
            "fp8_without_lora_vs_bf16_merge": cos(plain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cpu-merge", action="store_true", help="also time the merge on the CPU (~1 min per rank)")
    parser.add_argument("--runs", default="", help="comma-separated run names to time (default: all), e.g. "
                        "no_lora,merge_rank64")
    parser.add_argument("--no-agreement", action="store_true", help="skip the merge-cost and cosine sections")
    parser.add_argument("--out", default="bench/results/lora-h200.json")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(), "gpus": 1, "torch": torch.__version__, "tokens": 33600,
                    "blocks": LAYERS, "compiled": not opts.no_compile,
                    "targets": {"side_step_vs_no_lora": "<= 1.03x", "fp8_vs_bf16_cosine": ">= 0.999"},
                    "runs": [], "merge_load_s": {}, "agreement": []}

    def save() -> None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(json.dumps(result, indent=1)[-600:], flush=True)

    args = inputs(DiTConfig(), "cuda")
    compile = not opts.no_compile
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rank in () if opts.no_agreement else (32, 64):
            for device in ("cpu", "cuda") if opts.cpu_merge else ("cuda",):
                result["merge_load_s"][f"rank{rank}_{device}"] = merge_cost(rank, folder, device)
                free()
            result["agreement"].append(agreement(rank, folder, args))
            free()
            save()
        model = random_dit(DiTConfig(num_layers=LAYERS), FP8Kernel(), "cuda",
                           attention=Attention.resolve("auto", "cuda"))
        files = {rank: lora_file(model, rank, folder, LAYERS) for rank in (32, 64)}
        model.cpu()
        free()
        for name, rank in (("fp8_streamed_budget0_no_lora", None), ("fp8_streamed_budget0_side_rank32", 32),
                           ("fp8_streamed_budget0_side_rank64", 64), ("fp8_streamed_budget0_merge_rank32", 32),
                           ("fp8_streamed_budget0_merge_rank64", 64)):
            if opts.runs and name.removeprefix("fp8_streamed_budget0_") not in opts.runs.split(","):
                continue
            drop_side(model)
            method = "merge" if "merge" in name else "side"
            if rank:
                # As the engine does it: the host-resident model merged layer by layer on the GPU.
                torch.cuda.synchronize()
                start = time.perf_counter()
                apply_loras(model, [(files[rank], 1.0)], fp8_method=method, dtype=torch.bfloat16, device="cuda")
                torch.cuda.synchronize()
                load = round(time.perf_counter() - start, 2)
            try:
                run = step_times(name, model, 0, args, opts.repeats, compile)
                if rank:
                    run[f"{method}_load_s"] = load
                result["runs"].append(run)
            except Exception as exc:  # noqa: BLE001 - keep the other measurements
                result["runs"].append({"mode": name, "error": f"{type(exc).__name__}: {exc}"})
            save()
    runs = {r["mode"]: r for r in result["runs"] if "error" not in r}
    base = runs.get("fp8_streamed_budget0_no_lora")
    for rank in (32, 64):
        side = runs.get(f"fp8_streamed_budget0_side_rank{rank}")
        if base and side:
            result[f"side_rank{rank}_over_no_lora"] = round(side["forward_s"] / base["forward_s"], 4)
        merged = runs.get(f"fp8_streamed_budget0_merge_rank{rank}")
        if base and merged:
            result[f"merge_rank{rank}_over_no_lora"] = round(merged["forward_s"] / base["forward_s"], 4)
    result["merge_note"] = ("the merge runs merge on top of the previous merge (the timing does not depend on the "
                            "weights' values); merge_load_s: the whole 40-block host-resident model on the GPU")
    save()


if __name__ == "__main__":
    main()
