"""`itk run`: preset + inputs -> generator command line -> supervised child -> the video, or the reason why not.

Everything that can be known before the model loads is checked first (inputs decode, audio long enough,
weights present and whole), because the generator spends minutes loading before it touches any of them.
Nothing here prints: `plan_run` returns a Plan, `run_job` a RunResult, and progress streams through the
`on_event` callback; itk.console renders them for the CLI, and a web page can call the same two functions.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itk.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_MISSING_WEIGHTS, EXIT_OK, EXIT_USAGE, UserError
from itk.inputs import MediaFacts
from itk.runtime.protocol import DEFAULT_STEPS, Job, parse_setting, to_argv

if TYPE_CHECKING:
    from itk.advice import Verdict

GENERATOR = [sys.executable, "-m", "itk.runtime.generate"]
# A flag-compatible generator to drive instead (the official generate_infinitetalk.py, or a test double).
GENERATOR_ENV = "ITK_GENERATOR"
ALLOC_CONF = "expandable_segments:True"  # VAE-decode OOMs on 24 GB cards are allocator fragmentation


def parse_sets(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> typed values. Names, types, ranges and refusals (a flag the generator does
    not support yet is refused here, with its reason) come from the protocol's flag table."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE", "e.g. --set sample_steps=20", EXIT_USAGE)
        out[key.strip().lstrip("-").replace("-", "_")] = parse_setting(key, raw)
    return out


def generator_command() -> list[str]:
    override = os.environ.get(GENERATOR_ENV)
    return shlex.split(override) if override else list(GENERATOR)


def generator_argv(generator: list[str], path_flags: dict[str, Path], settings: dict[str, Any], job_path: Path,
                   stem: Path) -> list[str]:
    """The exact command line, spelled by the protocol's flag table: path flags, then the settings in the
    preset's order (as the guide writes them), then the job and the output stem."""
    values = [*path_flags.items(), *settings.items(), ("input_json", job_path), ("save_file", stem)]
    return [*generator, *(arg for name, value in values for arg in to_argv({name: value}))]


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


def output_path(output: str | Path | None) -> Path:
    if output is None:
        return Path("outputs") / f"itk-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    path = Path(output).expanduser()
    if path.suffix.lower() != ".mp4":
        raise UserError(f"--output {output}: the video is written as mp4", f"--output {path.with_suffix('.mp4')}",
                        EXIT_USAGE)
    return path


@dataclass
class Plan:
    """Everything decided before launch: the job, what its inputs make, the settings and the command line."""

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

    @property
    def job_path(self) -> Path:
        return self.run_dir / "job.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "generate.log"

    @property
    def steps(self) -> int:
        return int(self.settings.get("sample_steps") or DEFAULT_STEPS)

    def write_job(self) -> Path:
        """The job file the command line names (a dry run writes it too, so the command runs as printed)."""
        from itk.runtime.protocol import write_job

        return write_job(self.job, self.job_path)

    def require_weights(self) -> None:
        """UserError (exit 3) with the fetch command when a weight file is missing or not whole."""
        if self.missing:
            n = len(self.missing)
            shown = ", ".join(self.missing[:3]) + (f" and {n - 3} more" if n > 3 else "")
            raise UserError(f"preset {self.preset_name} lacks {n} weight file(s): {shown}",
                            self.fetch_command, EXIT_MISSING_WEIGHTS)

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset_name, "argv": self.argv, "command": self.command_line,
                "job": self.job.to_json(), "clips": self.media.clips, "video_s": self.media.video_s,
                "missing_weights": self.missing, "warnings": self.media.warnings}


def plan_run(image: str | None = None, video: str | None = None, audio: str | None = None, prompt: str | None = None,
             output: str | Path | None = None, preset_name: str | None = None, input_json: str | None = None,
             sets: tuple[str, ...] | list[str] = (), weights_dir: str | Path | None = None,
             generator: list[str] | None = None) -> Plan:
    """Check inputs, settings and weights and build the command line; launches nothing, prints nothing.
    `generator`: the command to run (default: ours, or $ITK_GENERATOR)."""
    from itk import machine
    from itk.inputs import job_from_options, validate
    from itk.manifest import load_manifest
    from itk.paths import weights_dir as resolve_weights_dir
    from itk.presets import load_presets, resolve_preset
    from itk.runtime.protocol import read_job
    from itk.verify import UNUSABLE, check_files

    preset, reason = resolve_preset(preset_name)
    settings = {**preset.generator, **parse_sets(sets)}
    if input_json:
        if image or video or audio:
            raise UserError("--input-json already names the image/video and audio",
                            "give either --input-json FILE or --image/--video with --audio", EXIT_USAGE)
        job = read_job(input_json)
        if prompt:
            job.prompt = prompt
    else:
        job = job_from_options(image, video, audio, prompt)
    media = validate(job, settings)
    if preset_name:  # an automatic choice already fits this GPU
        media.warnings += setting_warnings(settings, machine.gather().vram_gb)
    wdir = resolve_weights_dir(weights_dir).absolute()
    # The doctor's weights check without hashing: presence, recorded size, header (a truncated download
    # fails here in milliseconds instead of after minutes of loading).
    statuses = check_files(wdir, load_manifest().files_for(preset.components), deep=False)
    missing = [f"{st.label} ({st.state.replace('_', ' ')}{': ' + st.detail if st.detail else ''})"
               for st in statuses if st.state in UNUSABLE]
    fetch = f"itk fetch --preset {preset.name}" + (f" --weights-dir {shlex.quote(str(weights_dir))}"
                                                    if weights_dir else "")
    out = output_path(output).absolute()
    run_dir = out.parent / f"{out.stem}.run"
    path_flags = preset.path_flags(wdir)
    if settings.get("quant") and "quant_dir" not in path_flags:
        quantised = [p.name for p in load_presets().values() if "quant_dir" in p.paths]
        raise UserError(f"preset {preset.name} has no quantised weights for --set quant={settings['quant']}",
                        f"use a preset with them: --preset {' or --preset '.join(quantised)}", EXIT_USAGE)
    argv = generator_argv(generator or generator_command(), path_flags, settings, run_dir / "job.json",
                          out.with_suffix(""))
    return Plan(preset.name, reason, job, media, settings, out, run_dir, argv, missing, fetch,
                preset.expected_step_s)


def video_seconds(path: Path) -> float | None:
    import av

    try:
        with av.open(str(path)) as container:
            return container.duration / 1e6 if container.duration else None
    except av.FFmpegError:
        return None


@dataclass
class RunResult:
    """How a run ended: the video (ok), an interruption, or a failure with the advice rules' verdict."""

    log: Path
    elapsed_s: float
    exit_code: int = EXIT_OK
    output: Path | None = None
    video_s: float | None = None
    gpu_peak_gb: float | None = None
    interrupted: bool = False
    verdict: Verdict | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.output is not None

    def to_json(self) -> dict[str, Any]:
        if self.interrupted:
            return {"ok": False, "interrupted": True, "log": str(self.log)}
        if self.ok:
            return {"ok": True, "output": str(self.output), "video_s": self.video_s,
                    "elapsed_s": round(self.elapsed_s, 1), "gpu_peak_gb": self.gpu_peak_gb, "log": str(self.log)}
        return {"ok": False, "verdict": self.verdict.to_json() if self.verdict else None, "log": str(self.log)}


def run_job(plan: Plan, on_event: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Launch the plan under the Supervisor (progress goes to `on_event`), keep the log in the run folder,
    and on failure diagnose it with the advice rules (verdict.json beside the log). Prints nothing."""
    from itk import machine
    from itk.advice import diagnose
    from itk.checks.ram import read_cgroup
    from itk.diagnose import write_verdict
    from itk.supervisor import Supervisor

    plan.require_weights()
    plan.write_job()
    log_path = plan.log_path
    log_path.write_text(f"# itk run: {plan.command_line}\n", encoding="utf-8")
    kills_before = read_cgroup()[3]
    outcome = Supervisor(plan.argv, log_path, env=child_env(), on_event=on_event).run()
    if outcome.interrupted:
        return RunResult(log_path, outcome.elapsed_s, EXIT_INTERRUPTED, interrupted=True, events=outcome.events)
    video = Path(outcome.output or plan.output)
    if outcome.returncode == 0 and video.is_file():
        return RunResult(log_path, outcome.elapsed_s, EXIT_OK, video, video_seconds(video),
                         (outcome.done or {}).get("gpu_peak_gb"), events=outcome.events)
    kills_after = read_cgroup()[3]
    facts = {**machine.gather().to_json(), "preset": plan.preset_name, "phase": outcome.phase}
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
    code = outcome.returncode if outcome.returncode in (EXIT_USAGE, EXIT_MISSING_WEIGHTS) else EXIT_FAILED
    return RunResult(log_path, outcome.elapsed_s, code, verdict=verdict, events=outcome.events)
