"""A minute of video, measured whole: `itk run`'s generator on a 60 s speech track from process start to the mp4.

Writes the full-size synthetic weights of bench_whole_run.py (the official layout and sizes, random values;
reused from `--dir` when a previous run left them), the preset's LoRA files, a 640x640 portrait and a speech-like
wav of `--speech-s` seconds, then starts the REAL generator exactly as `itk run --preset P` does, with the
preset's own steps (nothing extrapolated) and ITK_ATTENTION set to `--attention`. A kernel asked for must be the
one that runs: the bench refuses before starting when it is not installed, and fails after the run when the
generator's `generate` stage names another (the runtime would fall back to SDPA).

Reported (bench clock, from the generator's events): `wall_s` (process start to its exit, the mp4 complete),
`done_s` (to the done event), `startup_s` (to the first clip event: imports, encoders, loading, compile),
`per_clip_s` (each clip from its clip event to the next clip event, the last one to the done event: its
sampling, the decode and the motion frames' encode), `median_clip_s` over clips 2..N, `between_clips_s` (the
last step event of a clip to the first step event of the next, less one median step: what the GPU waits for
between two clips), the step time, the GPU peak and the targets with whether each was met. `--compare-to
VIDEO`: the max abs difference and PSNR of this run's decoded frames against another run's mp4 (a code change's
effect on the frames). `--generator-path DIR` runs another build of the package (an A/B against old code).

Run on the device:  python bench/bench_minute.py --attention fa4 --out $OUT/minute-video-h100.json
CPU check (tiny weights, no LoRA files):
  python bench/bench_minute.py --tiny --preset rtx4090-24g --attention sdpa --speech-s 4 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import bench_whole_run as whole  # noqa: E402 - beside this file
from kernel_request import require_attention

from itk.runtime.atomic import atomic_write_text
from itk.runtime.protocol import FPS

PRESET, SPEECH_S = "rtx4090-24g-fast", 60.0
TARGETS = {"median_clip_s": 17.0, "wall_s": 390.0}  # per clip (clips 2..N) and the whole minute, 6.5 min


def clip_times(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-clip wall times and the gaps between clips from the generator's events (each stamped `t`, s)."""
    clips = [e for e in events if e["event"] == "clip"]
    steps = [e for e in events if e["event"] == "step"]
    done = next((e for e in events if e["event"] == "done"), None)
    ends = [*(c["t"] for c in clips[1:]), done["t"] if done else None][: len(clips)]
    per_clip = [round(end - c["t"], 2) if end is not None else None for c, end in zip(clips, ends, strict=True)]
    gaps = [b["t"] - a["t"] for a, b in zip(steps, steps[1:], strict=False) if a["clip"] == b["clip"]]
    step_s = statistics.median(gaps) if gaps else None
    between = []
    for k in range(1, len(clips)):
        last = [s for s in steps if s["clip"] == k]
        first = next((s for s in steps if s["clip"] == k + 1), None)
        if last and first and step_s:
            between.append(round(first["t"] - last[-1]["t"] - step_s, 2))
    later = [s for s in per_clip[1:] if s is not None]
    return {"clips": len(clips), "per_clip_s": per_clip, "median_clip_s": round(statistics.median(later), 2)
            if later else None, "step_s": step_s and round(step_s, 3), "between_clips_s": between,
            "median_between_clips_s": round(statistics.median(between), 2) if between else None,
            "startup_s": clips[0]["t"] if clips else None, "done_s": done["t"] if done else None}


def frame_difference(video: Path, other: Path) -> dict[str, Any]:
    """Max abs difference (grey levels) and PSNR of two mp4s' decoded frames; inf PSNR when equal."""
    import numpy as np

    from itk.runtime.video import frames_at_25fps  # both are 25 fps: every frame as it is

    a, b = (np.stack(list(frames_at_25fps(path))).astype(np.int16) for path in (video, other))
    if a.shape != b.shape:
        return {"compared_to": str(other), "shapes": [list(a.shape), list(b.shape)]}
    mse = float(np.mean((a - b).astype(np.float64) ** 2))
    return {"compared_to": str(other), "max_abs": int(np.abs(a - b).max()),
            "psnr_db": "inf" if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)}


def verdicts(measured: dict[str, Any]) -> dict[str, Any]:
    """Each target against the run; the whole-video target only for a run that made at least a minute of video."""
    judged = {k: v for k, v in TARGETS.items() if k != "wall_s" or (measured.get("video_s") or 0) >= SPEECH_S}
    return {k: {"target": f"<= {v}", "measured": measured.get(k),
                "met": None if measured.get(k) is None else measured[k] <= v} for k, v in judged.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/itk-whole", help="scratch folder for the weights (~31 GB), reused")
    parser.add_argument("--out", default="bench/results/minute-video-h100.json")
    parser.add_argument("--preset", default=PRESET, help="the itk preset whose command is run (default %(default)s)")
    parser.add_argument("--attention", default="fa4", help="fa4 | flash | sage | sdpa | auto (ITK_ATTENTION)")
    parser.add_argument("--speech-s", type=float, default=SPEECH_S, help="seconds of speech (default %(default)s)")
    parser.add_argument("--generator-path", default=None, help="a folder put first on the generator's PYTHONPATH")
    parser.add_argument("--compare-to", default=None, help="another run's mp4: frame difference against it")
    parser.add_argument("--video", default=None, help="where to keep this run's mp4 (default: the scratch folder)")
    parser.add_argument("--note", default="", help="what this run is (kept in the JSON)")
    parser.add_argument("--tiny", action="store_true", help="tiny weights instead of full-size files (CPU check)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the weights and the preset's LoRA files into --dir, then stop (a device call "
                             "with time to spare prepares the next one's run)")
    opts = parser.parse_args(argv)
    require_attention(opts.attention)
    from itk.presets import get_preset

    preset = get_preset(opts.preset)
    steps = int(preset.generator.get("sample_steps", whole.FULL_STEPS))
    folder, out = Path(opts.dir), Path(opts.out)
    ready = folder / "weights" / ".bench-weights-complete"
    if not ready.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    import torch

    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)", "torch": torch.__version__,
        "preset": preset.name, "attention": opts.attention, "steps": steps, "speech_s": opts.speech_s,
        "note": opts.note, "targets": {k: f"<= {v}" for k, v in TARGETS.items()},
        "timing_note": "bench clock from the generator's process start; per_clip_s: clip event to the next clip "
                       "event (the last: to the done event); between_clips_s: last step of a clip to the first "
                       "step of the next, less one median step",
    }
    if ready.is_file():
        result["weights"] = json.loads(ready.read_text())["weights"]
    else:
        started = time.monotonic()
        result.update(whole.write_weights(folder / "weights", opts.tiny))
        ready.write_text(json.dumps({k: result[k] for k in ("weights", "files") if k in result}))
        result["weights_written_s"] = round(time.monotonic() - started, 1)
    if preset.loras and not opts.tiny:
        result["loras_written"] = whole.write_loras(folder / "weights", preset.name)
    if opts.prepare_only:
        print(json.dumps(result, indent=2))
        return 0
    job = whole.write_inputs(folder / "inputs", opts.speech_s)
    stem = folder / "out" / "talk"
    # The official default max_frame_num (1000 frames) would stop a minute of speech at 40 s (itk run warns
    # and names this flag): the bench asks for every frame of the speech, as that warning says to.
    max_frames = math.ceil(opts.speech_s * FPS)
    argv_run = [*whole.preset_command(folder / "weights", job, stem, preset.name, steps),
                "--max_frame_num", str(max_frames)]
    result["command"] = " ".join(map(str, argv_run))
    os.environ["ITK_ATTENTION"] = opts.attention
    if opts.generator_path:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (opts.generator_path, os.environ.get("PYTHONPATH")) if p)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for old in stem.parent.glob("talk*"):  # a previous run's video and resume state: this run starts afresh
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)

    def so_far(events: list[dict[str, Any]]) -> None:
        """After each clip, the clips so far (`partial`: a run cut off by a time limit still leaves its numbers)."""
        if events[-1]["event"] == "clip":
            atomic_write_text(out, json.dumps({**result, "partial": True, **clip_times(events)}, indent=2) + "\n")

    run = whole.run_generator(argv_run, out.with_suffix(".log"), on_event=so_far)
    events = run["events"]
    start = next((e for e in events if e.get("stage") == "generate"), {})
    peaks = [e["gpu_peak_gb"] for e in events if e.get("gpu_peak_gb") is not None]
    result.update({"exit_code": run["exit_code"], "wall_s": run["wall_s"], "attention_run": start.get("attention"),
                   "frames": start.get("frames"), "video_s": start.get("frames") and start["frames"] / 25,
                   "gpu_peak_gb": peaks[-1] if peaks else None, **clip_times(events)})
    result["verdicts"] = verdicts(result)
    video = stem.with_suffix(".mp4")
    if opts.video and video.is_file():
        shutil.copyfile(video, opts.video)
    if opts.compare_to and video.is_file():
        result["frames_against"] = frame_difference(video, Path(opts.compare_to))
    result["events"] = events
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=2))
    if opts.attention != "auto" and start.get("attention") not in (None, opts.attention):
        raise SystemExit(f"--attention {opts.attention}: the generator ran {start.get('attention')} instead "
                         "(the kernel did not import there); the result is not a measurement of it")
    if run["exit_code"] != 0:
        raise SystemExit(f"the generator exited with {run['exit_code']}; its log: {out.with_suffix('.log')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
