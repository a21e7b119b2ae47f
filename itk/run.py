"""`itk run`: preset + inputs -> generator command line -> supervised child -> the video, or the reason why not.

Everything that can be known before the model loads is checked first (inputs decode, audio long enough,
weights present and whole), because the generator spends minutes loading before it touches any of them.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itk.console import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_MISSING_WEIGHTS, EXIT_OK, EXIT_USAGE, UserError
from itk.inputs import Job, MediaFacts

GENERATOR = [sys.executable, "-m", "itk.runtime.generate"]
# A flag-compatible generator to drive instead (the official generate_infinitetalk.py, or a test double).
GENERATOR_ENV = "ITK_GENERATOR"
# Flags of the official generate_infinitetalk.py that `--set` may change, with their types. bool = a flag
# without a value (store_true). Path flags come from the preset and --weights-dir, never from --set.
SETTABLE: dict[str, type] = {
    "size": str, "frame_num": int, "max_frame_num": int, "mode": str, "motion_frame": int,
    "sample_steps": int, "sample_shift": float, "sample_text_guide_scale": float,
    "sample_audio_guide_scale": float, "num_persistent_param_in_dit": int, "base_seed": int, "quant": str,
    "offload_model": str, "t5_cpu": bool, "color_correction_strength": float, "use_teacache": bool,
    "teacache_thresh": float, "use_apg": bool, "apg_momentum": float, "apg_norm_threshold": float,
    "audio_save_dir": str,
}
TRUE = {"1", "true", "yes", "on"}
ALLOC_CONF = "expandable_segments:True"  # VAE-decode OOMs on 24 GB cards are allocator fragmentation


def parse_sets(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or key not in SETTABLE:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of the generator's settings",
                            f"known keys: {', '.join(sorted(SETTABLE))}", EXIT_USAGE)
        kind = SETTABLE[key]
        try:
            out[key] = raw.strip().lower() in TRUE if kind is bool else kind(raw.strip())
        except ValueError:
            raise UserError(f"--set {key}={raw!r}: not a valid {kind.__name__}",
                            f"e.g. --set {key}={kind(1) if kind is not str else 'value'}", EXIT_USAGE) from None
    return out


def generator_command() -> list[str]:
    override = os.environ.get(GENERATOR_ENV)
    return shlex.split(override) if override else list(GENERATOR)


def generator_argv(path_flags: dict[str, Path], settings: dict[str, Any], job_path: Path, stem: Path) -> list[str]:
    """The exact command line, flags as the official script spells them."""
    argv = generator_command()
    for flag, path in path_flags.items():
        argv += [f"--{flag}", str(path)]
    for key, value in settings.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        else:
            argv += [f"--{key}", str(value)]
    return argv + ["--input_json", str(job_path), "--save_file", str(stem)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # events must arrive as they happen, not when a buffer fills
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # torch renamed it; a user's value wins
        env.setdefault(name, ALLOC_CONF)
    return env


def setting_warnings(settings: dict[str, Any], vram_gb: float | None) -> list[str]:
    """Settings known to fail on this GPU: without weight streaming the 14B DiT (about 19.5 GB even in FP8)
    goes to the GPU whole and leaves no room for activations on a card under 40 GB."""
    if vram_gb is not None and vram_gb < 40 and settings.get("num_persistent_param_in_dit") != 0:
        return [f"this GPU has {vram_gb:.0f} GB: without num_persistent_param_in_dit=0 the whole DiT is put on it "
                "and the run ends in CUDA out of memory; add --set num_persistent_param_in_dit=0"]
    return []


def output_path(output: str | None) -> Path:
    if output is None:
        return Path("outputs") / f"itk-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    path = Path(output).expanduser()
    if path.suffix.lower() != ".mp4":
        raise UserError(f"--output {output}: the video is written as mp4", f"--output {path.with_suffix('.mp4')}",
                        EXIT_USAGE)
    return path


@dataclass
class Plan:
    preset_name: str
    preset_reason: str
    job: Job
    media: MediaFacts
    settings: dict[str, Any]
    output: Path
    run_dir: Path
    argv: list[str]
    missing: list[str]
    fetch_command: str
    expected_step_s: float | None = None

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


def plan_run(image: str | None, video: str | None, audio: str | None, prompt: str | None, output: str | None,
             preset_name: str | None, input_json: str | None, sets: tuple[str, ...], weights_dir: str | None) -> Plan:
    from itk.doctor import resolve_preset
    from itk.inputs import job_from_json, job_from_options, validate
    from itk.manifest import load_manifest
    from itk.paths import weights_dir as resolve_weights_dir
    from itk.presets import load_presets
    from itk.verify import UNUSABLE, check_files

    preset, reason = resolve_preset(preset_name)
    settings = {**preset.generator, **parse_sets(sets)}
    if input_json:
        if image or video or audio:
            raise UserError("--input-json already names the image/video and audio",
                            "give either --input-json FILE or --image/--video with --audio", EXIT_USAGE)
        job = job_from_json(Path(input_json))
        if prompt:
            job.prompt = prompt
    else:
        job = job_from_options(image, video, audio, prompt)
    media = validate(job, settings)
    if preset_name:  # an automatic choice already fits this GPU
        from itk.doctor import machine_facts

        media.warnings += setting_warnings(settings, machine_facts().vram_gb)
    wdir = resolve_weights_dir(weights_dir).absolute()
    # The doctor's weights check without hashing: presence, recorded size, header (a truncated download
    # fails here in milliseconds instead of after minutes of loading).
    statuses = check_files(wdir, load_manifest().files_for(preset.components), deep=False)
    missing = [f"{st.label} ({st.state.replace('_', ' ')}{': ' + st.detail if st.detail else ''})"
               for st in statuses if st.state in UNUSABLE]
    fetch = f"itk fetch --preset {preset.name}" + (f" --weights-dir {shlex.quote(weights_dir)}" if weights_dir else "")
    out = output_path(output).absolute()
    run_dir = out.parent / f"{out.stem}.run"
    path_flags = preset.path_flags(wdir)
    if settings.get("quant") and "quant_dir" not in path_flags:
        quantised = [p.name for p in load_presets().values() if "quant_dir" in p.paths]
        raise UserError(f"preset {preset.name} has no quantised weights for --set quant={settings['quant']}",
                        f"use a preset with them: --preset {' or --preset '.join(quantised)}", EXIT_USAGE)
    argv = generator_argv(path_flags, settings, run_dir / "job.json", out.with_suffix(""))
    return Plan(preset.name, reason, job, media, settings, out, run_dir, argv, missing, fetch,
                preset.expected_step_s)


def describe(plan: Plan) -> list[str]:
    m = plan.media
    audio = ", ".join(f"{k} {v:.1f} s" for k, v in m.audio_s.items())
    steps = int(plan.settings.get("sample_steps", 40))
    estimate = (f" (about {took(m.clips * steps * plan.expected_step_s)} at the {plan.expected_step_s:.0f} s per step "
                "measured for this preset)") if plan.expected_step_s else ""
    return [
        f"preset {plan.preset_reason}",
        f"input: {m.kind} {m.width}x{m.height}, audio {audio} -> {m.video_s:.1f} s of video, "
        f"{m.clips} clip(s) x {steps} steps{estimate}",
        *(f"[yellow]warning:[/] {w}" for w in m.warnings),
    ]


def video_seconds(path: Path) -> float | None:
    import av

    try:
        with av.open(str(path)) as container:
            return container.duration / 1e6 if container.duration else None
    except av.FFmpegError:
        return None


def took(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def run_job(plan: Plan, as_json: bool) -> int:
    from itk.advice import diagnose, machine_facts
    from itk.checks.ram import read_cgroup
    from itk.console import console, err_console, print_json
    from itk.diagnose import render, write_verdict
    from itk.progress import ProgressView
    from itk.supervisor import Supervisor

    plan.job.write(plan.run_dir / "job.json")
    log_path = plan.run_dir / "generate.log"
    log_path.write_text(f"# itk run: {plan.command_line}\n", encoding="utf-8")
    show = err_console if as_json else console
    for line in describe(plan):
        show.print(line, highlight=False, soft_wrap=True)
    show.print(f"log: {log_path}", highlight=False, soft_wrap=True)
    kills_before = read_cgroup()[3]
    steps = int(plan.settings.get("sample_steps", 40))
    with ProgressView(show, plan.media.clips, steps, plan.expected_step_s) as view:
        outcome = Supervisor(plan.argv, log_path, env=child_env(), on_event=view.handle).run()
    if outcome.interrupted:
        if as_json:
            print_json({"ok": False, "interrupted": True, "log": str(log_path)})
        show.print(f"[yellow]interrupted:[/] the generator and all its processes were stopped; log: {log_path}",
                   highlight=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    video = Path(outcome.output or plan.output)
    if outcome.returncode == 0 and video.is_file():
        seconds = video_seconds(video)
        result = {"ok": True, "output": str(video), "video_s": seconds, "elapsed_s": round(outcome.elapsed_s, 1),
                  "gpu_peak_gb": (outcome.done or {}).get("gpu_peak_gb"), "log": str(log_path)}
        if as_json:
            print_json(result)
        else:
            length = f"{seconds:.1f} s" if seconds else "unknown length"
            peak = f", GPU peak {result['gpu_peak_gb']:.1f} GB" if result["gpu_peak_gb"] else ""
            console.print(f"[green]done:[/] {video} ({length} of video) in {took(outcome.elapsed_s)}{peak}",
                          highlight=False, soft_wrap=True)
        return EXIT_OK
    kills_after = read_cgroup()[3]
    facts = {**machine_facts(), "preset": plan.preset_name, "phase": outcome.phase}
    errors = [e for e in outcome.events if e.get("event") == "error" and e.get("message")]
    if errors:
        facts["error_message"] = errors[-1]["message"]
    if kills_before is not None and kills_after is not None:
        facts["oom_kills_during_run"] = kills_after - kills_before
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if outcome.returncode == 0:
        text += f"\nitk: the generator exited 0 but wrote no video at {video}\n"
    verdict = diagnose(text, outcome.returncode if outcome.returncode else None, facts, str(log_path))
    write_verdict(verdict, plan.run_dir / "verdict.json")
    if as_json:
        print_json({"ok": False, "verdict": verdict.to_json(), "log": str(log_path)})
    else:
        render(verdict)
    return outcome.returncode if outcome.returncode in (EXIT_USAGE, EXIT_MISSING_WEIGHTS) else EXIT_FAILED


def run_command(image: str | None, video: str | None, audio: str | None, prompt: str | None, output: str | None,
                preset: str | None, input_json: str | None, sets: tuple[str, ...], weights_dir: str | None,
                dry_run: bool, as_json: bool) -> int:
    from itk.console import console, err_console, print_json

    plan = plan_run(image, video, audio, prompt, output, preset, input_json, sets, weights_dir)
    if dry_run:
        plan.job.write(plan.run_dir / "job.json")  # so the printed command runs as printed
        if as_json:
            print_json({"preset": plan.preset_name, "argv": plan.argv, "command": plan.command_line,
                        "job": plan.job.to_json(), "clips": plan.media.clips, "video_s": plan.media.video_s,
                        "missing_weights": plan.missing, "warnings": plan.media.warnings})
            return EXIT_OK
        for line in describe(plan):
            err_console.print(line, highlight=False, soft_wrap=True)
        if plan.missing:
            err_console.print(f"[yellow]note:[/] {len(plan.missing)} weight file(s) missing; {plan.fetch_command}",
                              highlight=False, soft_wrap=True)
        console.print(plan.command_line, highlight=False, soft_wrap=True)
        return EXIT_OK
    if plan.missing:
        shown = ", ".join(plan.missing[:3]) + (f" and {len(plan.missing) - 3} more" if len(plan.missing) > 3 else "")
        raise UserError(f"preset {plan.preset_name} lacks {len(plan.missing)} weight file(s): {shown}",
                        plan.fetch_command, EXIT_MISSING_WEIGHTS)
    return run_job(plan, as_json)
