"""One video on 1 and on several GPUs (issue 15): 480p DiT step time, FP8 resident and FP8 streamed with
`--num_persistent_param_in_dit 0`, and the whole-clip wall time of the real generator, in one run.

Step: the full-size random-weight FP8 DiT of bench_dit_step.py (40 blocks, dim 5120, 40 heads), 480p bucket
640x640, 81 frames (L = 21 x 40 x 40 = 33,600 tokens), each rank holding the whole DiT (resident, or streamed
from its own pinned host copy). One step = the pipeline's passes (Sampler.passes) plus the guidance gather
(Sampler.velocity), exactly as runtime/pipeline.py runs them, under torchrun with 1 and N processes. Measured
for 3 passes (the default guidance: sequence parallel over N) and 2 passes (text scale 1: one guidance group
per pass), so the JSON says which split pays on this machine.
Whole clip: bench_whole_run.py's synthetic full-size weights and inputs (2 clips of 81 frames), the real
generator as `itk run --preset gpu80g-fp8-480p --gpus N` starts it, with --sample_steps STEPS; a 40-step
run is extrapolated from the median step gap (the JSON says so).

Run on the device (kind nvidia-h200-x2; ~15 minutes, ~31 GB of scratch files for the whole-clip part):
  python -m pip install -e . --no-deps --no-build-isolation -q && python bench/bench_gpus.py --gpus 1,2 \
      --out $OUT/gpus-h200x2.json
Options: [--repeats 3] [--passes 3,2] [--no-compile] [--skip-whole] [--dir /tmp/itk-gpus] (weights that
bench_whole_run.py --keep left in --dir are reused). Each result is written as soon as
it is taken. Targets: >= 1.8x per step on 2 GPUs, whole run (incl. VAE) >= 1.6x.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
TARGETS = {"step_speedup_2_gpus": ">= 1.8", "whole_run_speedup_2_gpus": ">= 1.6"}
MODES = (("fp8_resident", None), ("fp8_streamed_budget0", 0))  # name, --num_persistent_param_in_dit
SCALES = (("3_passes", 5.0), ("2_passes", 1.0))  # text guidance scale (audio 4): 3 or 2 passes per step
WHOLE_PRESET = "gpu80g-fp8-480p"
STEPS, FULL_STEPS = 3, 40


def step(runner, sampler, args: tuple) -> None:
    """One denoising step's DiT work: this rank's passes, then every pass gathered into the velocity."""
    import torch

    with torch.no_grad():
        sampler.velocity({name: runner(*args).float() for name in sampler.passes()})


def worker(opts: argparse.Namespace) -> None:
    """One rank under torchrun: every (passes, mode) step time; rank 0 writes them to opts.out."""
    import torch
    from bench_dit_step import inputs, random_dit, timed

    from itk.runtime import parallel
    from itk.runtime.attention import Attention
    from itk.runtime.configs import DiTConfig
    from itk.runtime.layout import choose_layout
    from itk.runtime.offload import DiTRunner
    from itk.runtime.options import Launch
    from itk.runtime.quant import FP8Kernel
    from itk.runtime.sampler import Sampler
    from itk.runtime.sampling import Sampling

    launch, cfg, runs = Launch.from_env(), DiTConfig(), []
    group = None
    for label, text in [(label, text) for label, text in SCALES if label.split("_")[0] in opts.passes.split(",")]:
        sampling = Sampling(text_scale=text, audio_scale=4.0)
        passes = len(sampling.passes)
        layout = choose_layout(launch.world_size, passes, cfg.num_heads)
        group = parallel.start(launch, layout) if group is None else parallel.arrange(launch, layout)
        attention = Attention.resolve("auto", "cuda")  # the generator's default (ITK_ATTENTION unset)
        args = inputs(cfg, "cuda")
        for mode, budget in MODES:
            model = random_dit(cfg, FP8Kernel(matmul=True), "cuda", attention=attention, parallel=group)
            if budget is not None:
                model.cpu()
                torch.cuda.empty_cache()
            runner = DiTRunner(model, device=torch.device("cuda"), budget=budget, compile=opts.compile, pin=True)
            sampler = Sampler(sampling, group)
            torch.cuda.reset_peak_memory_stats()
            seconds = timed(functools.partial(step, runner, sampler, args), opts.repeats)
            layout = group.layout if group is not None else None
            runs.append({"passes": label, "mode": mode, "gpus": launch.world_size, "step_s": round(seconds, 3),
                         "layout": layout.describe(passes) if layout else "1 GPU",
                         "gpu_peak_gb_rank0": round(torch.cuda.max_memory_allocated() / 1e9, 2)})
            if parallel.writes(group):
                Path(opts.out).write_text(json.dumps(runs, indent=2))
                print(json.dumps(runs[-1]), flush=True)
            del runner, model, sampler
            gc.collect()
            torch.cuda.empty_cache()
    parallel.stop(group, wait=True)


def torchrun(gpus: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", str(HERE),
            *extra]


def whole_runs(folder: Path, counts: list[int], result: dict[str, Any], save) -> None:
    """The real generator on full-size synthetic weights, on each GPU count; wall time and a 40-step estimate."""
    import bench_whole_run as whole

    from itk.launch import launch_argv
    from itk.presets import get_preset
    from itk.run import generator_argv, generator_command
    from itk.runtime.configs import DiTConfig
    from itk.runtime.layout import choose_layout

    ready = folder / "weights" / ".bench-weights-complete"  # bench_whole_run.py's, reused when present
    if ready.is_file():
        result["whole_weights"] = json.loads(ready.read_text())
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        result["whole_weights"] = whole.write_weights(folder / "weights", tiny=False)
        ready.write_text(json.dumps(result["whole_weights"]))
    job = whole.write_inputs(folder / "inputs")
    preset = get_preset(WHOLE_PRESET)
    settings = {**preset.generator, "sample_steps": STEPS}
    result["whole"] = []
    for n in counts:
        argv = generator_argv(launch_argv(generator_command(), n), path_flags=preset.path_flags(folder / "weights"),
                              settings=settings, job_path=job, stem=folder / "out" / f"talk-{n}",
                              layout=choose_layout(n, preset.passes, DiTConfig().num_heads))
        run = whole.run_generator(argv, folder / f"whole-{n}.log")
        summary = whole.summarize(run, STEPS, FULL_STEPS)  # the step time and extrapolation bench_whole_run uses
        result["whole"].append({"gpus": n, "exit_code": run["exit_code"], "wall_s_measured": run["wall_s"],
                                "sample_steps": STEPS, "clips": len(summary["clips"]),
                                "step_s_median": summary["step_s_measured"],
                                "wall_s_40_steps_extrapolated":
                                    summary.get(f"whole_run_{FULL_STEPS}_steps_s_extrapolated"),
                                "command": " ".join(map(str, argv))})
        save()


def speedups(result: dict[str, Any]) -> None:
    base = {(r["passes"], r["mode"]): r["step_s"] for r in result["steps"] if r["gpus"] == 1}
    result["step_speedup"] = {f"{r['passes']} {r['mode']} on {r['gpus']} GPUs": round(base[r["passes"], r["mode"]] /
                                                                                       r["step_s"], 3)
                              for r in result["steps"] if r["gpus"] > 1 and (r["passes"], r["mode"]) in base}
    whole = {w["gpus"]: w["wall_s_40_steps_extrapolated"] for w in result.get("whole", []) if w["exit_code"] == 0}
    if 1 in whole and whole[1]:
        result["whole_run_speedup"] = {f"{n} GPUs": round(whole[1] / s, 3) for n, s in whole.items() if n > 1 and s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts (default 1,2)")
    parser.add_argument("--out", default="bench/results/gpus-h200x2.json")
    parser.add_argument("--dir", default="/tmp/itk-gpus", help="scratch folder for the whole-clip weights (~31 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run the blocks eagerly")
    parser.add_argument("--skip-whole", action="store_true", help="only the step times")
    parser.add_argument("--passes", default="3,2", help="guidance passes per step to time: 3, 2 or both (default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts)
    import torch

    counts = [int(n) for n in opts.gpus.split(",")]
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "gpu_count_visible": torch.cuda.device_count(), "gpu_counts_measured": counts, "torch": torch.__version__,
        "compiled": opts.compile, "targets": TARGETS, "steps": [],
        "note": "step_s: median of the pipeline's passes + guidance gather on rank 0, after one warm-up step",
    }

    def save() -> None:
        speedups(result)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    for n in counts:
        part = out.with_name(f".{out.stem}-{n}.json")
        extra = ["--worker", "--out", str(part), "--repeats", str(opts.repeats), "--passes", opts.passes] + (
            [] if opts.compile else ["--no-compile"])
        code = subprocess.run(torchrun(n, extra), env={**os.environ, "PYTHONPATH": str(HERE.parent)}).returncode
        runs = json.loads(part.read_text()) if part.is_file() else []
        result["steps"] += runs
        if code:
            result.setdefault("failed", []).append(f"step bench on {n} GPUs exited {code}")
        save()
    if not opts.skip_whole:
        folder = Path(opts.dir)
        whole_runs(folder, counts, result, save)
    save()
    print(json.dumps({k: result.get(k) for k in ("step_speedup", "whole_run_speedup")}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
