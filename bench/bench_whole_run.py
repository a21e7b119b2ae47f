"""The whole 4090-preset run, measured end to end: per-phase wall time, whole-run peak GPU memory, peak host RSS.

Writes synthetic full-size files of every component in the official layout (bench_load.py's writers: the FP8
DiT ~19 GB + map, the FP8 T5 ~6.7 GB + map, the CLIP .pth 4.77 GB, the fp32 VAE, chinese-wav2vec2-base; the
umT5 tokenizer and the other small files come from itk.runtime.tiny, since a tokenizer only has to tokenize),
a 640x640 portrait and a speech-like wav long enough for 2 clips of 81 frames. Then it runs the REAL
generator (`python -m itk.runtime.generate`) as `itk run` would with the rtx4090-24g preset (FP8,
--num_persistent_param_in_dit 0, 480p, motion_frame 9, streaming), but with --sample_steps 2: a 40-step
clip is extrapolated from the measured step time, and the JSON says so.

Phases come from the generator's ITK-EVENT lines (each stamped with elapsed_s and gpu_peak_gb = torch's
max_memory_allocated so far): startup -> read_inputs -> audio embedding (wav2vec2) -> T5 -> CLIP -> loading
the VAE and the DiT -> per clip: VAE encode + noise before the first step, each step, then VAE decode +
colour correction + mp4 encode of its frames (no event separates those: see `phases_note`). A thread polls
the process tree's RSS (psutil) and the GPU's used memory (NVML, per process where the driver shows it).

Run on the device:  python bench/bench_whole_run.py [--dir /tmp/itk-whole] [--out bench/results/whole-run-h200.json]
CPU check (tiny weights, a minute):  python bench/bench_whole_run.py --tiny --out /tmp/whole-tiny.json
The result is written after each stage of the bench, so a failure later loses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

PRESET = "rtx4090-24g"
STEPS, FULL_STEPS = 2, 40  # steps run for a preset of many; the 40-step fallback when a preset names none
SPEECH_S = 4.0  # 100 video frames: clips start at 0 and 72 (81 frames, motion 9), so exactly 2 clips
TARGETS = {"gpu_peak_gb": 12.0, "peak_rss_gb": 24.0, "overhead_share_of_40_step_clip": 0.15}


# --- the inputs ----------------------------------------------------------------------------------------------

def write_weights(root: Path, tiny: bool) -> dict[str, Any]:
    """The preset's weight folders under `root`. Tiny: itk.runtime.tiny's whole layout. Full: that layout's
    small files (tokenizers, wav2vec2 preprocessor), then every component replaced by a full-size one."""
    from itk.runtime.configs import MODEL_CONFIG_FILE
    from itk.runtime.manifest import load_manifest
    from itk.runtime.tiny import write_tiny_weights

    layout = write_tiny_weights(root)
    if tiny:
        return {"weights": "itk.runtime.tiny (tiny dims, official layout)"}
    import bench_load  # noqa: PLC0415 - beside this file; torch-heavy writers

    manifest = load_manifest()
    ckpt, quant = layout.ckpt_dir, layout.fp8_dit.parent
    (ckpt / MODEL_CONFIG_FILE).unlink()  # the official sizes from here on
    (ckpt / manifest.select("config")[0].path).write_text(json.dumps(official_config(), indent=2))
    shutil.rmtree(layout.wav2vec_dir)
    files: dict[str, Any] = {}
    for name, write in (("dit_fp8", lambda: bench_load.write_dit(quant, 40)),
                        ("t5_fp8", lambda: bench_load.write_t5(quant)),
                        ("clip", lambda: bench_load.write_clip(ckpt / manifest.select("clip")[0].path)),
                        ("vae", lambda: bench_load.write_vae(ckpt / manifest.select("vae")[0].path)),
                        ("wav2vec2", lambda: bench_load.write_wav2vec2(layout.wav2vec_dir))):
        start = time.monotonic()
        files[name] = {"bytes": write(), "write_s": round(time.monotonic() - start, 1)}
        print(name, files[name], flush=True)
    return {"weights": "synthetic full-size files (bench_load.py writers); tokenizers from itk.runtime.tiny",
            "files": files}


def official_config() -> dict[str, Any]:
    """The Wan folder's config.json with the official 14B sizes (our DiTConfig defaults)."""
    from itk.runtime.configs import WAN_CONFIG_FIELDS, DiTConfig

    fields = {k: v for k, v in asdict(DiTConfig()).items() if k in WAN_CONFIG_FIELDS}
    return {"_class_name": "WanModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def write_inputs(folder: Path, seconds: float = SPEECH_S) -> Path:
    """A 640x640 portrait (itk's selftest drawing, scaled onto a square canvas), a speech-like wav of `seconds`
    and the job file naming them; returns the job file."""
    from PIL import Image

    from itk.selftest import write_portrait, write_speech

    folder.mkdir(parents=True, exist_ok=True)
    drawing = Image.open(write_portrait(folder / "portrait.png")).convert("RGB")
    square = Image.new("RGB", (640, 640), drawing.getpixel((0, 0)))
    square.paste(drawing.resize((480, 640), Image.BICUBIC), (80, 0))
    square.save(folder / "face.png")
    write_speech(folder / "speech.wav", seconds)
    job = folder / "job.json"
    job.write_text(json.dumps({"prompt": "a person talking to the camera", "cond_video": str(folder / "face.png"),
                               "cond_audio": {"person1": str(folder / "speech.wav")}}))
    return job


def preset_command(weights: Path, job: Path, stem: Path, preset_name: str, steps: int) -> list[str]:
    """Exactly what `itk run --preset NAME` starts (the preset's path flags, LoRA files and settings, in its
    order), with sample_steps set to `steps`."""
    from itk.presets import get_preset
    from itk.run import generator_argv, generator_command

    preset = get_preset(preset_name)
    settings = {**preset.generator, "sample_steps": steps}
    return generator_argv(generator_command(), path_flags=preset.path_flags(weights), settings=settings,
                          job_path=job, stem=stem, loras=preset.lora_files(weights))


def write_loras(weights: Path, preset_name: str) -> dict[str, Any]:
    """Random full-size LoRA files (lightx2v layout: every block's 12 Linears, rank from the file name, else
    64) where the preset expects its LoRAs."""
    import re

    import torch
    from bench_lora import lora_file  # noqa: PLC0415 - beside this file

    from itk.presets import get_preset
    from itk.runtime.configs import DiTConfig
    from itk.runtime.models.dit import InfiniteTalkDiT

    written = {}
    for path, _ in get_preset(preset_name).lora_files(weights):
        if path.is_file():
            continue
        rank = int(m.group(1)) if (m := re.search(r"rank(\d+)", path.name)) else 64
        with torch.device("meta"):
            model = InfiniteTalkDiT(DiTConfig())
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(lora_file(model, rank, path.parent, 40), path)
        written[path.name] = {"rank": rank, "bytes": path.stat().st_size}
    return written


# --- watching the run ----------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Peak RSS of the process tree (psutil) and GPU used memory (NVML), every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stopped = pid, threading.Event()
        self.peak = {"rss": 0, "anon_rss": 0, "gpu_process_used": 0, "gpu_device_used_increase": 0}
        self.nvml_note = ""
        self.started = time.monotonic()
        self.timeline: list[tuple[float, int, int]] = []  # (t on the bench's clock, rss, anon rss)

    def run(self) -> None:
        import psutil

        gpu = self._nvml()
        baseline = gpu[0].nvmlDeviceGetMemoryInfo(gpu[1]).used if gpu else 0
        while not self.stopped.wait(0.05):
            try:
                procs = [psutil.Process(self.pid)]
                procs += procs[0].children(recursive=True)
                infos = [p.memory_info() for p in procs]
            except psutil.Error:
                continue
            rss, anon = sum(i.rss for i in infos), sum(i.rss - i.shared for i in infos)
            self._max("rss", rss)
            self._max("anon_rss", anon)
            self.timeline.append((time.monotonic() - self.started, rss, anon))
            if gpu:
                nvml, handle = gpu
                self._max("gpu_device_used_increase", nvml.nvmlDeviceGetMemoryInfo(handle).used - baseline)
                pids = {p.pid for p in procs}
                used = [p.usedGpuMemory or 0 for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                        if p.pid in pids]
                self._max("gpu_process_used", sum(used))

    def _max(self, key: str, value: int) -> None:
        self.peak[key] = max(self.peak[key], value)

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # noqa: BLE001 - no NVIDIA driver (the --tiny CPU check): RSS only
            self.nvml_note = f"no GPU polling ({type(exc).__name__})"
            return None


def run_generator(argv: list[str], log: Path,
                  on_event: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Start the generator, record each event with the bench's own clock, poll memory; the full log is kept.
    `on_event` sees the events so far after each one (a bench that may be cut off writes as it goes)."""
    from itk.run import child_env
    from itk.runtime.protocol import parse_event

    started = time.monotonic()
    # Started in the log's folder: `python -m` puts the current folder first on sys.path, and the repository
    # root's itk/ folder would hide the installed package's itk.runtime.
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=child_env(),
                            cwd=log.parent)
    sampler = Sampler(proc.pid)
    sampler.started = started
    sampler.start()
    events = []
    assert proc.stderr is not None
    with log.open("w") as out:
        for line in proc.stderr:
            out.write(line)
            event = parse_event(line)
            if event:
                events.append({**event, "t": round(time.monotonic() - started, 3)})
                if on_event:
                    on_event(events)
    code = proc.wait()
    sampler.stopped.set()
    sampler.join()
    return {"exit_code": code, "wall_s": round(time.monotonic() - started, 2), "events": events,
            "peak": sampler.peak, "nvml_note": sampler.nvml_note, "timeline": sampler.timeline}


def add_rss(spans: list[dict[str, Any]], timeline: list[tuple[float, int, int]]) -> None:
    """Each phase's peak RSS and peak anonymous RSS (GB) from the samples taken inside it."""
    for span in spans:
        inside = [(r, a) for t, r, a in timeline if span["start_s"] <= t <= span["start_s"] + span["s"]]
        if inside:
            span["rss_peak_gb"] = round(max(r for r, _ in inside) / 1e9, 2)
            span["anon_rss_peak_gb"] = round(max(a for _, a in inside) / 1e9, 2)


# --- the phases ----------------------------------------------------------------------------------------------

STAGE_PHASES = {"read_inputs": "read_inputs", "audio_embedding": "audio_wav2vec2", "text_encoding": "t5",
                "image_encoding": "clip_image_encoder", "load_models": "load_vae_and_dit",
                "generate": "vae_encode_reference"}


def phases(events: list[dict[str, Any]], wall_s: float) -> list[dict[str, Any]]:
    """Consecutive intervals between events on the bench's clock, each named for what runs in it."""
    out, previous, name = [], 0.0, "startup_python_and_imports"
    clips = max((e["clips"] for e in events if e["event"] == "clip"), default=0)
    for event in events:
        out.append({"phase": name, "start_s": previous, "s": round(event["t"] - previous, 3),
                    "gpu_peak_gb_at_end": event.get("gpu_peak_gb")})
        previous, kind = event["t"], event["event"]
        if kind == "stage":
            name = STAGE_PHASES.get(event["stage"], event["stage"])
            if event["stage"] == "write_video":
                name = "mp4_encode_last_clip_and_finish"
        elif kind == "clip":
            name = f"clip{event['clip']}_noise_vae_encode_and_step1"
        elif kind == "step":
            last = event["step"] == event["steps"]
            after = "vae_decode_colour" if event["clip"] == clips else "vae_decode_colour_mp4_encode"
            name = f"clip{event['clip']}_{after}" if last else f"clip{event['clip']}_step{event['step'] + 1}"
        else:
            name = f"exit_after_{kind}"
    out.append({"phase": name, "start_s": previous, "s": round(wall_s - previous, 3), "gpu_peak_gb_at_end": None})
    return out


def summarize(run: dict[str, Any], steps_run: int, full_steps: int) -> dict[str, Any]:
    """Step time, the extrapolated full clip, the overhead outside the steps, each clip's sampling and
    whole-clip time, and where the GPU and RSS peaks are."""
    events, wall = run["events"], run["wall_s"]
    spans = phases(events, wall)
    add_rss(spans, run["timeline"])
    steps = [e for e in events if e["event"] == "step"]
    # A step's time is the gap between two step events of one clip; the first step of each clip also holds
    # the clip's set-up (noise, VAE encode) and, in the first clip, torch.compile: counted as overhead.
    gaps = [b["t"] - a["t"] for a, b in zip(steps, steps[1:], strict=False) if a["clip"] == b["clip"]]
    step_s = statistics.median(gaps) if gaps else None
    result: dict[str, Any] = {"phases": spans, "steps_run": len(steps), "step_s_measured": step_s and round(step_s, 3)}
    if step_s:
        dit_s = step_s * len(steps)
        clip_full = step_s * full_steps
        result.update({
            "dit_steps_s": round(dit_s, 2), "overhead_outside_dit_steps_s": round(wall - dit_s, 2),
            f"clip_{full_steps}_steps_dit_s_extrapolated": round(clip_full, 2),
            f"overhead_share_of_{full_steps}_step_clip": round((wall - dit_s) / clip_full, 4),
            f"whole_run_{full_steps}_steps_s_extrapolated": round(wall + step_s * (full_steps - steps_run) * len(
                {e["clip"] for e in steps}), 1),
        })
    # Per clip: sampling = from its clip event (noise, VAE encode, then the steps) to its last step event;
    # whole clip = to the next clip event (decode, colour, encode) or, for the last clip, to the done event.
    marks = [e for e in events if e["event"] in ("clip", "step", "done")]
    clips = []
    for i, e in enumerate(marks):
        if e["event"] != "clip":
            continue
        own = [m for m in marks[i + 1:] if m["event"] == "step" and m["clip"] == e["clip"]]
        after = next((m for m in marks[i + 1:] if m["event"] in ("clip", "done")), None)
        clips.append({"clip": e["clip"], "sampling_s": round(own[-1]["t"] - e["t"], 2) if own else None,
                      "whole_clip_s": round(after["t"] - e["t"], 2) if after else None})
    result["clips"] = clips
    rss = [s for s in spans if "rss_peak_gb" in s]
    if rss:
        top = max(rss, key=lambda s: s["rss_peak_gb"])
        result.update({"rss_peak_phase": top["phase"], "rss_peak_phase_anon_gb": top["anon_rss_peak_gb"]})
    peaks = [e.get("gpu_peak_gb") for e in events if e.get("gpu_peak_gb") is not None]
    if peaks:
        final = peaks[-1]
        holder = next(s for s in spans if s["gpu_peak_gb_at_end"] is not None and s["gpu_peak_gb_at_end"] >= final)
        result.update({"gpu_peak_gb": final, "gpu_peak_phase": holder["phase"]})
    return result


def verdicts(summary: dict[str, Any], peak_rss_gb: float) -> dict[str, Any]:
    measured = {"gpu_peak_gb": summary.get("gpu_peak_gb"), "peak_rss_gb": peak_rss_gb,
                "overhead_share_of_40_step_clip": summary.get("overhead_share_of_40_step_clip")}
    measured = {k: v for k, v in measured.items() if v is not None}
    return {k: {"target": f"<= {TARGETS[k]}", "measured": v, "met": None if v is None else v <= TARGETS[k]}
            for k, v in measured.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/itk-whole", help="scratch folder for the weights (~31 GB)")
    parser.add_argument("--out", default="bench/results/whole-run-h200.json")
    parser.add_argument("--preset", default=PRESET, help="the itk preset whose command is run (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps run (default: {STEPS} for presets of more than 8 steps, extrapolated "
                             "to the preset's steps; else the preset's own)")
    parser.add_argument("--pin", choices=("auto", "0", "1"), default="auto",
                        help="ITK_PIN for the generator: pin the streamed DiT blocks (1), read them from the page "
                             "cache (0), or decide from free RAM (auto)")
    parser.add_argument("--tiny", action="store_true", help="tiny weights instead of full-size files (CPU check)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (a later run reuses it)")
    opts = parser.parse_args(argv)
    from itk.presets import get_preset

    preset = get_preset(opts.preset)
    full_steps = int(preset.generator.get("sample_steps", FULL_STEPS))
    steps = opts.steps or (STEPS if full_steps > 8 else full_steps)
    folder, out = Path(opts.dir), Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ready = folder / "weights" / ".bench-weights-complete"
    if not ready.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    flags = " ".join(f"--{k} {v}" for k, v in preset.generator.items())
    result: dict[str, Any] = {
        "preset": f"{preset.name}: {flags}; frame_num 81, 640x640 bucket",
        "pin": {"auto": "ITK_PIN unset: pinned when free RAM holds the streamed blocks",
                "1": "ITK_PIN=1: streamed blocks pinned in host memory",
                "0": "ITK_PIN=0: streamed blocks read from the page cache (pread) through a 2-block pinned ring"
                }[opts.pin],
        "sampling": (f"--sample_steps {steps} measured; a {full_steps}-step clip extrapolated from the median step "
                     "time (gaps between step events of one clip)") if steps != full_steps
        else f"--sample_steps {steps}: the preset's whole clip, nothing extrapolated",
        "inputs": f"640x640 generated portrait, {SPEECH_S} s speech-like wav (2 clips, 100 frames)",
        "targets": {k: f"<= {v}" for k, v in TARGETS.items()},
        "phases_note": "intervals between the generator's events on the bench's clock. No event separates the "
                       "VAE encode before a clip's first step from that step (clipN_noise_vae_encode_and_step1 "
                       "minus step_s_measured), nor a clip's VAE decode from its colour correction, resume-state "
                       "save and mp4 encode (clipN_vae_decode_colour_mp4_encode; for the last clip the decode "
                       "ends at the write_video stage and the mp4 encode follows). Step 1 of clip 1 also holds "
                       "torch.compile. rss_peak_gb / anon_rss_peak_gb per phase: the process tree's RSS "
                       "(psutil, every 50 ms; pinned host memory counts as shared, not anonymous).",
    }

    def save() -> None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    import torch

    result.update({"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
                   "torch": torch.__version__, "disk_free_gb_before": round(shutil.disk_usage(folder).free / 1e9, 1)})
    if ready.is_file():
        result["weights"] = json.loads(ready.read_text())
    else:
        result.update(write_weights(folder / "weights", opts.tiny))
        ready.write_text(json.dumps({k: result[k] for k in ("weights", "files") if k in result}))
    if preset.loras and not opts.tiny:
        result["loras_written"] = write_loras(folder / "weights", preset.name)
    save()
    job = write_inputs(folder / "inputs")
    argv_run = preset_command(folder / "weights", job, folder / "out" / "talk", preset.name, steps)
    result["command"] = " ".join(map(str, argv_run))
    if opts.pin != "auto":
        os.environ["ITK_PIN"] = opts.pin
    run = run_generator(argv_run, out.with_suffix(".log"))
    peak_rss_gb = round(run["peak"]["rss"] / 1e9, 2)
    result.update({"exit_code": run["exit_code"], "wall_s": run["wall_s"], "log": str(out.with_suffix(".log")),
                   "peak_rss_gb": peak_rss_gb, "peak_anon_rss_gb": round(run["peak"]["anon_rss"] / 1e9, 2),
                   "nvml_peak_process_used_gb": round(run["peak"]["gpu_process_used"] / 1e9, 2),
                   "nvml_peak_device_used_increase_gb": round(run["peak"]["gpu_device_used_increase"] / 1e9, 2),
                   "gpu_peak_gb_note": "gpu_peak_gb is torch.cuda.max_memory_allocated at the last event (GiB); "
                                       "nvml_* add the CUDA context and the allocator's cache (GB)",
                   **({"nvml_note": run["nvml_note"]} if run["nvml_note"] else {})})
    summary = summarize(run, steps, full_steps)
    result.update(summary)
    result["verdicts"] = verdicts(summary, peak_rss_gb)
    result["events"] = run["events"]
    save()
    if not opts.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("events", "phases")}, indent=2))
    return 0 if run["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
