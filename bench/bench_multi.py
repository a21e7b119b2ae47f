"""Two speakers against one at 480p: DiT step time and peak GPU memory, FP8 streamed with budget 0 (issue 13).

The same full-size random-weight FP8 DiT as bench_dit_step.py (its builders), 480p bucket 640x640, 81 frames:
L = 21 x 40 x 40 = 33,600 tokens, blocks streamed from host memory with `--num_persistent_param_in_dit 0`
(DiTRunner budget 0). A step is the pipeline's three guidance passes:
  one speaker:  cond (1 speaker), drop_text (1 speaker), uncond (one zero speaker);
  two speakers: cond (2 speakers + masks), drop_text (2 speakers + masks), uncond (one zero speaker, which
                takes the one-speaker path as officially).
The two-speaker passes add the reference-target map (per block, chunked queries) and the L-RoPE rotation.
Measured eagerly (the map must not need torch.compile) and, unless --no-compile, with every computing block
torch.compile'd as the engine runs them. Also the two-pass step (text scale 1: cond + drop_audio) derived from
the per-pass times. Targets: two speakers within 1.10x of one, <= 8 GB DiT peak (max_memory_allocated over
the denoising passes).

Run on the device (about 5 minutes on an H200: the eager passes take 4.5 s each):
  python -m pip install -e . --no-deps --no-build-isolation -q && python bench/bench_multi.py --out $OUT/multi-h200.json
Options: [--layers 40] [--repeats 2] [--no-compile]. Each measurement is written as soon as it is taken, so a
failure later loses nothing. Results: bench/results/multi-h200.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
from bench_dit_step import FULL_LAYERS, GRID, inputs, random_dit, timed

from itk.runtime.attention import Attention
from itk.runtime.configs import DiTConfig
from itk.runtime.offload import DiTRunner
from itk.runtime.quant import FP8Kernel
from itk.runtime.speakers import speaker_masks

IMAGE = (640, 640)  # source image = its 480p bucket (square): the official left/right split, no boxes
TARGETS = {"two_over_one_step": "<= 1.10", "dit_gpu_peak_gb": "<= 8"}


def passes(args: tuple, speakers: int, masks: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """audio and speaker masks of each guidance pass for `speakers` speakers."""
    one = args[5]
    audio = one if speakers == 1 else torch.cat([one, torch.roll(one, 7, dims=1)])
    given = masks if speakers == 2 else None
    return {"cond": (audio, given), "drop_text": (audio, given), "uncond": (torch.zeros_like(one), None)}


def measure(runner: DiTRunner, args: tuple, speakers: int, masks: torch.Tensor, repeats: int) -> dict:
    """Per-pass forward times, the 3-pass and 2-pass steps, and the GPU peak, for one speaker count."""
    base = args[:5]
    calls = passes(args, speakers, masks)

    def forward(name: str) -> None:
        audio, given = calls[name]
        runner.dit(*base, audio, speaker_masks=given, run_blocks=runner.streamer)

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        step = timed(lambda: [forward(name) for name in ("cond", "drop_text", "uncond")], repeats)
        cond = timed(lambda: forward("cond"), repeats, warm_up=False)  # the step above warmed both up
        zero = timed(lambda: forward("uncond"), repeats, warm_up=False)
    return {
        "speakers": speakers, "step_3pass_s": round(step, 3), "forward_cond_s": round(cond, 4),
        "forward_zero_speaker_s": round(zero, 4), "step_2pass_s_derived": round(cond + zero, 3),
        "dit_gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="DiT blocks (fewer: a quick look)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager only (skip the compiled run)")
    parser.add_argument("--out", default="bench/results/multi-h200.json")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": GRID[0] * GRID[1] * GRID[2],
        "layers_measured": opts.layers, "blocks_full_model": FULL_LAYERS, "budget": 0, "weights": "fp8",
        "note": ("step = cond + drop_text + uncond; two speakers: cond and drop_text carry both speakers and the"
                 " masks, uncond one zero speaker; step_2pass_s_derived = cond + uncond (text scale 1)"),
        "targets": TARGETS, "runs": [],
    }

    def save() -> None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(json.dumps(result["runs"][-1] if result["runs"] else result), flush=True)

    cfg = DiTConfig(num_layers=opts.layers)
    args = inputs(cfg, "cuda")
    masks = speaker_masks(IMAGE, IMAGE).cuda()
    result["speaker_tokens"] = [int(n) for n in masks.sum(1).tolist()]
    kernel = FP8Kernel(matmul=True)
    model = random_dit(cfg, kernel, "cuda", attention=Attention.resolve("auto", "cuda"))  # ITK_ATTENTION unset
    model.cpu()
    torch.cuda.empty_cache()
    for compile in (False,) if opts.no_compile else (False, True):
        runner = None
        try:
            runner = DiTRunner(model, device=torch.device("cuda"), budget=0, compile=compile)
            for speakers in (1, 2):
                run = {"compiled": compile, "host_memory": runner.mode,
                       **measure(runner, args, speakers, masks, opts.repeats)}
                result["runs"].append(run)
                save()
        except Exception as exc:  # noqa: BLE001 - keep the other measurements
            result["runs"].append({"compiled": compile, "error": f"{type(exc).__name__}: {exc}"})
            save()
        finally:
            runner = None
            gc.collect()
            torch.cuda.empty_cache()
    for compile in (False, True):
        pair = {r["speakers"]: r for r in result["runs"] if r.get("compiled") == compile and "error" not in r}
        if {1, 2} <= set(pair):
            key = "compiled" if compile else "eager"
            result[f"two_over_one_step_{key}"] = round(pair[2]["step_3pass_s"] / pair[1]["step_3pass_s"], 3)
            result[f"two_over_one_step_2pass_{key}"] = round(
                pair[2]["step_2pass_s_derived"] / pair[1]["step_2pass_s_derived"], 3)
            result[f"dit_gpu_peak_gb_two_speakers_{key}"] = pair[2]["dit_gpu_peak_gb"]
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
