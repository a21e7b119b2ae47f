"""Many jobs on one GPU: `itk batch`'s warm worker against one `itk run` per job, measured whole.

Writes synthetic full-size files of every component (bench_whole_run.py's writers, plus the preset's LoRA), a
640x640 portrait and a speech-like wav of --seconds, then
- warm: `itk batch` (itk.batch.run_batch, in this process) on --jobs jobs of that video, one worker on the GPU;
- cold: the same job as `itk run` starts it (its exact command line, from itk.run.plan_run), --cold-jobs times,
  each a fresh process.
Per job: the wall time and the time outside its denoising steps (the job's wall time minus its steps, each
step timed as the median interval between consecutive step events of a clip; the first job of the warm
worker also pays the imports, loading and compiling). jobs_per_hour_warm counts the whole batch (its first
job's start-up included), jobs_per_hour_cold the mean fresh run; overhead_per_job_s is the mean outside-the-
steps time of the warm jobs after the first. Targets: warm >= 1.3x cold in jobs per hour; overhead <= 5 s.

Run on the device (one call, about 8 minutes with 5-second jobs; see bench/README.md):
  python bench/bench_batch.py --preset gpu80g-fp8-480p-fast --jobs 4 --cold-jobs 2 --seconds 5 \
      --out $OUT/batch-h100.json
`--tiny` runs the same on itk.runtime.tiny weights on the CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

TARGETS = {"warm_over_cold": 1.3, "overhead_per_job_s": 5.0}


def step_time(events: list[dict[str, Any]]) -> float | None:
    """The median interval between consecutive step events of one clip (the generator's own clock)."""
    gaps, last = [], None
    for event in events:
        if event.get("event") != "step":
            continue
        if last is not None and event.get("clip") == last.get("clip"):
            gaps.append(float(event["elapsed_s"]) - float(last["elapsed_s"]))
        last = event
    return statistics.median(gaps) if gaps else None


def job_events(log: Path) -> list[dict[str, Any]]:
    from itk.runtime.protocol import parse_event

    return [e for e in map(parse_event, log.read_text(encoding="utf-8", errors="replace").splitlines()) if e]


def outside_steps(wall_s: float, events: list[dict[str, Any]]) -> dict[str, Any]:
    steps = sum(1 for e in events if e.get("event") == "step")
    per_step = step_time(events)
    inside = steps * per_step if per_step else 0.0
    return {"wall_s": round(wall_s, 2), "steps": steps, "step_s": round(per_step, 3) if per_step else None,
            "outside_steps_s": round(wall_s - inside, 2)}


def write_jobs(path: Path, face: Path, speech: Path, *, jobs: int, preset: str, steps: int | None) -> Path:
    settings = {"sample_steps": steps} if steps else {}
    lines = [{"prompt": "a person talking to the camera", "cond_video": str(face),
              "cond_audio": {"person1": str(speech)}, "preset": preset, "settings": settings, "seed": 42,
              "output": f"job{n:02d}.mp4"} for n in range(jobs)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def warm_run(jobs_file: Path, out: Path, weights: Path) -> dict[str, Any]:
    from itk.batch import run_batch

    started = time.monotonic()
    result = run_batch(jobs_file, out=out, gpus="1" if _has_gpu() else None, weights_dir=weights)
    wall = time.monotonic() - started
    jobs = []
    for job in result.jobs:
        events = job_events(out / f"{job.name}.run" / "generate.log")
        jobs.append({"name": job.name, "state": job.state, "setup_s": job.setup_s,
                     **outside_steps(job.busy_s, events)})
    return {"wall_s": round(wall, 2), "states": result.counts, "jobs": jobs}


def cold_run(face: Path, speech: Path, *, jobs: int, out: Path, weights: Path, preset: str,
             steps: int | None) -> dict[str, Any]:
    import bench_whole_run as whole

    from itk.run import plan_run
    from itk.spec import RunSpec

    runs = []
    for n in range(jobs):
        spec = RunSpec.from_options(image=str(face), audio=str(speech), output=out / f"cold{n:02d}.mp4",
                                    preset=preset, sets=["base_seed=42", *([f"sample_steps={steps}"] if steps else [])],
                                    weights_dir=weights)
        plan = plan_run(spec)
        plan.write_job()
        run = whole.run_generator(plan.argv, out / f"cold{n:02d}.log")
        runs.append({"exit_code": run["exit_code"], **outside_steps(run["wall_s"], run["events"])})
    return {"jobs": runs}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu80g-fp8-480p-fast")
    parser.add_argument("--jobs", type=int, default=10, help="jobs of the warm batch")
    parser.add_argument("--cold-jobs", type=int, default=3, help="fresh `itk run` processes timed")
    parser.add_argument("--seconds", type=float, default=10.0, help="speech (and video) length of each job")
    parser.add_argument("--steps", type=int, default=None, help="sample_steps (default: the preset's)")
    parser.add_argument("--dir", default="/tmp/itk-batch-bench")
    parser.add_argument("--out", default="bench/results/batch-h100.json")
    parser.add_argument("--tiny", action="store_true", help="tiny weights on the CPU: a check of this script")
    opts = parser.parse_args(argv)

    import bench_whole_run as whole
    import torch

    folder, out = Path(opts.dir), Path(opts.out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "preset": opts.preset, "video_s": opts.seconds, "sample_steps": opts.steps or "the preset's",
        "targets": {"jobs_per_hour_warm / jobs_per_hour_cold": f">= {TARGETS['warm_over_cold']}",
                    "overhead_per_job_s": f"<= {TARGETS['overhead_per_job_s']}"},
        "method": __doc__.split("\n\n")[1],
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        from itk.runtime.atomic import atomic_write_text as write

        write(out, json.dumps(result, indent=2) + "\n")

    weights = folder / "weights"
    result.update(whole.write_weights(weights, opts.tiny))
    if not opts.tiny:
        result["loras_written"] = whole.write_loras(weights, opts.preset)
    record_verdicts(weights, opts.preset)
    whole.SPEECH_S = opts.seconds
    inputs = folder / "inputs"
    whole.write_inputs(inputs)
    face, speech = inputs / "face.png", inputs / "speech.wav"
    save()
    jobs_file = write_jobs(folder / "jobs.jsonl", face, speech, jobs=opts.jobs, preset=opts.preset, steps=opts.steps)
    warm = warm_run(jobs_file, folder / "warm", weights)
    result["warm"] = warm
    save()
    cold = cold_run(face, speech, jobs=opts.cold_jobs, out=folder / "cold", weights=weights, preset=opts.preset,
                    steps=opts.steps)
    result["cold"] = cold
    done = [j for j in warm["jobs"] if j["state"] == "done"]
    cold_ok = [j for j in cold["jobs"] if j["exit_code"] == 0]
    if done and cold_ok:
        per_hour_warm = 3600 * len(done) / warm["wall_s"]
        per_hour_cold = 3600 / statistics.mean(j["wall_s"] for j in cold_ok)
        after_first = [j["outside_steps_s"] for j in done[1:]]
        result.update({
            "jobs": len(done),
            "jobs_per_hour_warm": round(per_hour_warm, 2),
            "jobs_per_hour_cold": round(per_hour_cold, 2),
            "warm_over_cold": round(per_hour_warm / per_hour_cold, 3),
            "jobs_per_hour_warm_after_first": round(3600 / statistics.mean(j["wall_s"] for j in done[1:]), 2)
            if done[1:] else None,
            "overhead_per_job_s": round(statistics.mean(after_first), 2) if after_first else None,
            "overhead_first_job_s": done[0]["outside_steps_s"],
            "overhead_cold_job_s": round(statistics.mean(j["outside_steps_s"] for j in cold_ok), 2),
        })
        result["verdicts"] = {
            "warm_over_cold": "met" if result["warm_over_cold"] >= TARGETS["warm_over_cold"] else "not met",
            "overhead_per_job_s": "met" if (result["overhead_per_job_s"] or 1e9) <= TARGETS["overhead_per_job_s"]
            else "not met",
        }
    save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("warm", "cold", "files")}, indent=2))
    return 0 if done and cold_ok else 1


def record_verdicts(weights: Path, preset: str) -> None:
    """The synthetic files recorded as verified (as `itk fetch` records downloads), so the plan's weights check,
    which trusts recorded verdicts, lets the jobs start."""
    from itk.presets import get_preset
    from itk.runtime.manifest import load_manifest
    from itk.runtime.verify import Record, VerdictStore

    store = VerdictStore(weights)
    for f in load_manifest().files_for(get_preset(preset).components):
        path = f.local_path(weights)
        if path.is_file():
            stat = path.stat()
            store.put(f.label, Record(size=stat.st_size, mtime_ns=stat.st_mtime_ns, algo="sha256", digest="synthetic",
                                      expected="synthetic", revision="bench_batch.py (synthetic, not hashed)",
                                      commit="", verdict="ok", verified_at=time.time()))


if __name__ == "__main__":
    raise SystemExit(main())
