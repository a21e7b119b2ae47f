"""`itk run`: preset + inputs -> generator command line -> supervised child -> the video, or the reason why not.

Everything that can be known before the model loads is checked first (inputs decode, audio long enough,
weights present and whole), because the generator spends minutes loading before it touches any of them.
Nothing here prints: `plan_run` returns a Plan, `run_job` a RunResult, and progress streams through the
`on_event` callback; itk.console renders them for the CLI, and a web page can call the same two functions.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itk.inputs import MediaFacts
from itk.runtime.layout import Layout
from itk.runtime.paths import check_output
from itk.runtime.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING_WEIGHTS,
    EXIT_OK,
    RESUME_STATE,
    Job,
    UserError,
    resume_folder,
    to_argv,
)
from itk.runtime.request import check_output_name
from itk.runtime.sampling import Sampling
from itk.spec import RunSpec

if TYPE_CHECKING:
    from itk.advice import Verdict
    from itk.measured import Measurement
    from itk.runtime.verify import FileStatus
    from itk.supervisor import Supervisor

GENERATOR = [sys.executable, "-m", "itk.runtime.generate"]
# A flag-compatible generator to drive instead (the official generate_infinitetalk.py, or a test double).
GENERATOR_ENV = "ITK_GENERATOR"
ALLOC_CONF = "expandable_segments:True"  # VAE-decode OOMs on 24 GB cards are allocator fragmentation


def generator_command() -> list[str]:
    override = os.environ.get(GENERATOR_ENV)
    return shlex.split(override) if override else list(GENERATOR)


def generator_argv(generator: list[str], *, path_flags: dict[str, Path], settings: dict[str, Any], job_path: Path,
                   stem: Path, resume: bool = False, loras: list[tuple[Path, float]] | None = None,
                   layout: Layout | None = None) -> list[str]:
    """The exact command line, spelled by the protocol's flag table: path flags (then --lora_dir), then the
    settings in the preset's order (as the guide writes them; then --lora_scale, one per file: the generator
    pairs them with zip, as the official one does), then the job and the output stem, then itk's own flags:
    --gpu_layout (several GPUs: the split chosen here, so no rank chooses again) and --resume."""
    files = [("lora_dir", [path for path, _ in loras])] if loras else []
    scales = [("lora_scale", [scale for _, scale in loras])] if loras else []
    values = [*path_flags.items(), *files, *settings.items(), *scales, ("input_json", job_path), ("save_file", stem)]
    if layout is not None and layout.world > 1:
        values.append(("gpu_layout", layout.flag))
    if resume:
        values.append(("resume", True))
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


def lora_pairs(preset_loras: list[tuple[Path, float]], user_loras: list[tuple[Path, float]],
               set_scales: list[float] | None) -> list[tuple[Path, float]]:
    """The run's LoRA files and scales, in zip order: the preset's, then the user's `--lora`s. `--set lora_scale`
    replaces the scales, one per file (the official zip would silently drop files beyond the scales)."""
    pairs = [*preset_loras, *user_loras]
    if set_scales is None:
        return pairs
    if len(set_scales) != len(pairs):
        names = ", ".join(path.name for path, _ in pairs) or "none"
        raise UserError(f"--set lora_scale gives {len(set_scales)} scale(s) for {len(pairs)} LoRA file(s) ({names})",
                        "give one scale per file, the preset's first, or set each with --lora FILE:SCALE",
                        EXIT_BAD_INPUT)
    return [(path, scale) for (path, _), scale in zip(pairs, set_scales, strict=True)]


def prepare_output(out: Path, inputs: list[Path]) -> None:
    """UserError (exit 2) when the video could not be written, found here and not after the whole generation
    (`itk.runtime.paths.check_output`, the generator's own rule); then the output's folder is made (the run folder
    goes there anyway), and a file in the way of the run folder is refused."""
    check_output_name(out, "--output")  # the generator's rule: the name and its temporary names fit (255 bytes)
    check_output(out, "--output", Path.home() / "itk-outputs" / out.name, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder {out.parent} for --output ({exc.strerror or type(exc).__name__})",
                        "choose another --output", EXIT_BAD_INPUT) from None
    run_dir = run_folder(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file: itk keeps the run's log in a folder of that name",
                        "move that file away or choose another --output", EXIT_BAD_INPUT)


def run_folder(out: Path) -> Path:
    """Where the job file, the generator's log, the verdict and the output's lock live."""
    return out.parent / f"{out.stem}.run"


def resume_line(out: Path) -> str | None:
    """One line for a run that continues an interrupted one, or None when there is nothing to resume. The
    counts come from the state the generator keeps (the generator itself checks it and refuses a changed job)."""
    folder = resume_folder(out)
    if not folder.is_dir():
        return None
    try:
        state = json.loads((folder / RESUME_STATE).read_text(encoding="utf-8"))
        return f"resuming {out}: {int(state['clips_done'])} of {int(state['clips'])} clips already done"
    except (OSError, ValueError, KeyError, TypeError):
        return f"resuming {out} from {folder}"


# --- two speakers ---------------------------------------------------------------------------------------------
MODE_WORDS = {"add": "taking turns (speaker 2 after speaker 1)", "para": "together (both tracks at once)"}
LENGTH_RULE = {"add": "both tracks one after the other (add)",
               "para": "the longer track (para; the official code stops at speaker 1's end)"}


def check_speaker_boxes(job: Job, media: MediaFacts) -> None:
    """A box outside the picture is refused here (exit 2); overlapping boxes are allowed with a warning."""
    if job.speakers < 2 or not job.bbox:
        return
    from itk.runtime.speakers import check_boxes

    boxes = [job.bbox.get("person1", []), job.bbox.get("person2", [])]
    try:
        media.warnings += check_boxes(boxes, (media.height, media.width))
    except ValueError as exc:
        what, _, fix = str(exc).partition(": give ")
        raise UserError(f"bbox: {what}", f"give {fix}" if fix else "draw the box inside the picture",
                        EXIT_BAD_INPUT) from None


@dataclass(kw_only=True)
class Plan:
    """Everything decided before launch: the job, what its inputs make, the settings and the command line."""

    preset_name: str
    preset_reason: str
    job: Job
    media: MediaFacts
    settings: dict[str, Any]
    sampling: Sampling  # the settings as the generator will sample with them (steps, passes, clips)
    output: Path
    run_dir: Path
    argv: list[str]  # the whole command: the generator (under torchrun for several GPUs), then `flags`
    flags: list[str]  # the generator's flags alone (what a warm worker takes for one job)
    unusable: list[FileStatus]  # weight files the run cannot start with (itk.runtime.verify's UNUSABLE states)
    fetch_command: str
    doctor_command: str
    step_time: Measurement | None = None  # OUR runtime's measured step on this GPU class (itk.measured)
    gpu_name: str | None = None
    resume: str | None = None  # the line saying this run continues an interrupted one (None: a fresh run)
    loras: list[tuple[Path, float]] = field(default_factory=list)  # --lora_dir/--lora_scale, in zip order
    variant: str = "single"  # the InfiniteTalk DiT the job's speakers need (itk.variants)
    variant_missing: list[str] = field(default_factory=list)  # multi files absent where the single ones are usable
    layout: Layout = Layout(1, 1)  # how the GPUs split the work; one generator process per GPU (itk/launch.py)
    no_gpu_here: bool = False  # this machine has no NVIDIA GPU (the run can only be one on tiny weights)

    @property
    def gpus(self) -> int:
        return self.layout.world

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)

    @property
    def expected_step_s(self) -> float | None:
        """Seconds per step measured for this preset on this GPU class; None when nobody has measured it."""
        return self.step_time.seconds if self.step_time else None

    @property
    def estimate_s(self) -> float | None:
        return self.media.clips * self.steps * self.step_time.seconds if self.step_time else None

    @property
    def passes(self) -> int:
        """DiT calls per step under these guidance settings (3, 2 with text guidance 1, 1 with both at 1)."""
        return len(self.sampling.passes)

    @property
    def recipe(self) -> str:
        return recipe(self.sampling, self.loras)

    @property
    def estimate(self) -> str:
        """The run's time estimate in words, or why there is none (never a number nobody measured)."""
        if self.step_time is None:
            gpu = f"an {self.gpu_name}" if self.gpu_name else "this machine (no NVIDIA GPU found)"
            if self.gpu_name and self.gpus > 1:
                gpu = f"{self.gpus} x {self.gpu_name}"
            return f"no time estimate: preset {self.preset_name}'s step time has not been measured on {gpu}"
        return (f"about {duration(self.estimate_s or 0)} for {self.media.clips * self.steps} steps at "
                f"{self.step_time.label}")

    @property
    def resume_folder(self) -> Path:
        return resume_folder(self.output)

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "output.lock"

    @property
    def job_path(self) -> Path:
        return self.run_dir / "job.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "generate.log"

    @property
    def steps(self) -> int:
        return self.sampling.steps

    def write_job(self) -> Path:
        """The job file the command line names (a dry run writes it too, so the command runs as printed)."""
        from itk.runtime.protocol import write_job

        return write_job(self.job, self.job_path)

    @property
    def speaker_layout(self) -> list[str]:
        """Two speakers in words: who, the mode, the boxes or the official split, the length and its rule."""
        job = self.job
        if job.speakers < 2 or job.audio_type is None:
            return []
        who = " + ".join(f"{key} {p.name} ({self.media.audio_s[key]:.1f} s)" if p is not None else f"{key} silent"
                         for key, p in job.cond_audio.items())
        masks = (f"boxes person1 {job.bbox['person1']}, person2 {job.bbox['person2']} (row_min, col_min, row_max, "
                 "col_max)" if job.bbox else "official split (speaker 1 left half, speaker 2 right half)")
        return [f"speakers: {who}, {job.audio_type}: {MODE_WORDS[job.audio_type]}",
                f"where: {masks}; video {self.media.video_s:.1f} s = {LENGTH_RULE[job.audio_type]}"]

    @property
    def missing(self) -> list[str]:
        """Each unusable weight file as "label (state: detail)"."""
        return [f"{st.label} ({st.state.replace('_', ' ')}{': ' + st.detail if st.detail else ''})"
                for st in self.unusable]

    @property
    def weights_problem(self) -> str | None:
        """One line naming each weight file this run cannot start with, and its state."""
        if not self.missing:
            return None
        n = len(self.missing)
        shown = ", ".join(self.missing[:3]) + (f" and {n - 3} more" if n > 3 else "")
        return f"preset {self.preset_name}: {n} weight file(s) not usable: {shown}"

    @property
    def weights_fix(self) -> str:
        """The fix for every unusable file: a link leading out of its folder has its own; fetch re-downloads
        what is missing or damaged and re-hashes a changed file (downloading only if it differs); the doctor
        re-hashes a changed file without downloading anything."""
        states = {st.state for st in self.unusable}
        fixes = list(dict.fromkeys(st.fix for st in self.unusable if st.state == "unsafe"))
        if states - {"unsafe", "changed"}:
            fixes.append(self.fetch_command)
        if "changed" in states:
            fetch = "" if states - {"unsafe", "changed"} else f"`{self.fetch_command}` or "
            fixes.append(f"re-hash the changed file(s): {fetch}`{self.doctor_command}`")
        return "; ".join(fixes) or self.fetch_command

    def require_gpus(self) -> None:
        """UserError (exit 2) when the plan splits one video over more GPUs than this machine has: several
        generator processes would share a GPU, or run on the CPU. A dry run may plan for another machine."""
        if self.gpus < 2:
            return
        from itk.launch import usable_gpus

        present = usable_gpus()
        if present < self.gpus:
            here = f"this machine has {present} usable NVIDIA GPU{'s' if present != 1 else ''}"
            raise UserError(f"--gpus {self.gpus}: {here}", f"--gpus {present}" if present > 1 else
                            "leave out --gpus (one GPU), or run on a machine with that many GPUs", EXIT_BAD_INPUT)

    def require_weights(self) -> None:
        """UserError naming each unusable weight file with its state, and the fix: exit 2 for two speakers on
        a folder that has only the single-speaker DiT (the job asks for what these weights cannot do), else 3."""
        if self.variant_missing:
            raise UserError(f"two speakers need the multi-speaker InfiniteTalk DiT: {', '.join(self.variant_missing)}"
                            " is missing (only the single-speaker one is here)", self.fetch_command, EXIT_BAD_INPUT)
        if problem := self.weights_problem:
            if self.no_gpu_here:  # first what matters more: even with the weights, no real video runs here
                raise UserError(f"this machine has no NVIDIA GPU, so it cannot make real videos; and {problem}",
                                f"`itk selftest` checks the install here on tiny weights (or `itk ui` with "
                                f"--weights-dir on them); on a machine with an NVIDIA GPU: {self.weights_fix}",
                                EXIT_MISSING_WEIGHTS)
            raise UserError(problem, self.weights_fix, EXIT_MISSING_WEIGHTS)

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset_name, "argv": self.argv, "command": self.command_line,
                "job": self.job.to_json(), "clips": self.media.clips, "video_s": self.media.video_s,
                "output": str(self.output), "missing_weights": self.missing,
                "unusable_weights": [{"file": st.label, "state": st.state, "detail": st.detail, "fix": st.fix}
                                     for st in self.unusable],
                "estimate_s": self.estimate_s, "estimate": self.estimate, "resume": self.resume,
                "steps": self.steps, "passes": self.passes, "gpus": self.gpus,
                "loras": [{"file": str(path), "scale": scale} for path, scale in self.loras],
                "warnings": self.media.warnings, "variant": self.variant,
                "speakers": self.speaker_layout}


def recipe(sampling: Sampling, loras: list[tuple[Path, float]]) -> str:
    """What one clip costs and what is merged into the DiT: "4 steps x 2 passes, LoRA a.safetensors x1"."""
    merged = " + ".join(f"{path.name} x{scale:g}" for path, scale in loras)
    return f"{sampling.steps} steps x {len(sampling.passes)} passes" + (f", LoRA {merged}" if merged else "")


def duration(seconds: float) -> str:
    """1 h 05 min / 12 min 30 s / 40 s (the same form as the console's elapsed times)."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def plan_run(spec: RunSpec) -> Plan:
    """Check the spec's inputs, output, settings and weights against this machine and build the command line;
    launches nothing, prints nothing. The run takes the preset's weights in the variant its speakers need
    (itk.variants); a GPU count the model's heads cannot split is refused here."""
    from itk import machine
    from itk.inputs import COLOUR_DRIFT_S, check_lora, check_picture, validate
    from itk.launch import launch_argv, layout_for, model_heads
    from itk.measured import expected_step_s
    from itk.presets import load_presets, resolve_preset
    from itk.runtime.manifest import load_manifest
    from itk.runtime.paths import weights_dir as resolve_weights_dir
    from itk.runtime.verify import UNUSABLE, check_files
    from itk.variants import swap_components, swap_paths, variant_for

    preset, reason = resolve_preset(spec.preset)
    settings = {**preset.generator, **spec.settings}
    set_scales = settings.pop("lora_scale", None)
    sampling = Sampling.from_flags(settings)
    user_loras = [(f.path, f.scale) for f in (check_lora(path, scale) for path, scale in spec.loras)]
    job, out = spec.job, spec.output
    prepare_output(out, [job.cond_video, *job.audio_files().values()])
    wdir = resolve_weights_dir(spec.weights_dir).absolute()
    picture = None
    if spec.speech is not None:  # spoken only once the output, the clip settings and the picture are good
        from itk.speech import job_with_speech

        picture = check_picture(job, sampling)
        job = job_with_speech(job, spec.speech, video=out, weights_dir=wdir)
    media = validate(job, sampling, picture=picture)
    check_speaker_boxes(job, media)
    if preset.long_video_warning and media.video_s > COLOUR_DRIFT_S:
        media.warnings.append(preset.long_video_warning)
    facts = machine.gather()
    if spec.preset:  # an automatic choice already fits this GPU
        media.warnings += setting_warnings(settings, facts.vram_gb)
    gpu = spec.gpu_name or facts.gpu_name
    # The doctor's weights check without hashing: presence, recorded size and mtime, header (a truncated
    # download fails here in milliseconds instead of after minutes of loading; a changed file is not trusted).
    variant = variant_for(job.speakers)
    components = swap_components(preset.components, variant)
    statuses = check_files(wdir, load_manifest().files_for(components), deep=False)
    unusable = [st for st in statuses if st.state in UNUSABLE]
    variant_missing = missing_variant(statuses, preset.components, components, wdir, variant)
    where = f" --weights-dir {shlex.quote(str(spec.weights_dir))}" if spec.weights_dir else ""
    fetch = f"itk fetch --preset {preset.name}{' --variant multi' if variant == 'multi' else ''}{where}"
    doctor = f"itk doctor --deep --only weights --preset {preset.name}{where}"
    run_dir = run_folder(out)
    path_flags = swap_paths(preset.path_flags(wdir), preset.components, wdir, variant)
    if settings.get("quant") and "quant_dir" not in path_flags:
        quantised = [p.name for p in load_presets().values() if "quant_dir" in p.paths and p.auto]
        raise UserError(f"preset {preset.name} has no quantised weights for --set quant={settings['quant']}",
                        f"use a preset with them: --preset {' or --preset '.join(quantised)}", EXIT_BAD_INPUT)
    resume = None if spec.restart else resume_line(out)  # --restart: no --resume, so the generator deletes the state
    pairs = lora_pairs(preset.lora_files(wdir), user_loras, set_scales)
    count = spec.gpus or preset.gpus
    # a preset's measured step holds for its own GPU count only: another count gets no invented number
    step_time = expected_step_s(preset.name, gpu) if count == preset.gpus else None
    # the model's heads limit how several GPUs split a step (one GPU needs no split, nor the model's config)
    heads = model_heads(path_flags.get("ckpt_dir"), path_flags.get("model_config")) if count > 1 else 1
    layout = layout_for(count, len(sampling.passes), heads)
    generator = list(spec.generator) if spec.generator else generator_command()
    flags = generator_argv([], path_flags=path_flags, settings=settings, job_path=run_dir / "job.json",
                           stem=out.with_suffix(""), resume=resume is not None, loras=pairs, layout=layout)
    # the preset line of a dry run says what a clip costs, which LoRAs are merged and how the GPUs split
    spread = f"; {layout.describe(len(sampling.passes))}" if count > 1 else ""
    return Plan(preset_name=preset.name, preset_reason=f"{reason}; {recipe(sampling, pairs)}{spread}", job=job,
                media=media, settings=settings, sampling=sampling, output=out, run_dir=run_dir,
                argv=[*launch_argv(generator, count), *flags], flags=flags,
                unusable=unusable, fetch_command=fetch, doctor_command=doctor, step_time=step_time, gpu_name=gpu,
                resume=resume, loras=pairs, variant=variant, variant_missing=variant_missing, layout=layout,
                no_gpu_here=facts.vram_gb is None)


def missing_variant(statuses: list[FileStatus], preset_components: tuple[str, ...], components: tuple[str, ...],
                    weights_dir: Path, variant: str) -> list[str]:
    """The `variant` DiT files (labels) that are unusable while the preset's own (single-speaker) ones are
    fine: the case where the fix is `--variant multi`, not a fresh download of everything."""
    from itk.runtime.verify import UNUSABLE, check_files
    from itk.variants import variant_files

    if variant == "single":
        return []
    wanted = {f.label for f in variant_files(components, variant)}
    absent = [st.label for st in statuses if st.label in wanted and st.state in UNUSABLE]
    own = variant_files(preset_components, "single")
    if absent and own and all(st.state not in UNUSABLE for st in check_files(weights_dir, own, deep=False)):
        return absent
    return []


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
    resumable: bool = False  # the generator kept its resume state: the same command continues the run

    @property
    def ok(self) -> bool:
        return self.output is not None

    def to_json(self) -> dict[str, Any]:
        if self.interrupted:
            return {"ok": False, "interrupted": True, "resumable": self.resumable, "log": str(self.log)}
        if self.ok:
            return {"ok": True, "output": str(self.output), "video_s": self.video_s,
                    "elapsed_s": round(self.elapsed_s, 1), "gpu_peak_gb": self.gpu_peak_gb, "log": str(self.log)}
        return {"ok": False, "verdict": self.verdict.to_json() if self.verdict else None,
                "resumable": self.resumable, "log": str(self.log)}


def output_lock(plan: Plan) -> AbstractContextManager[None]:
    """One run per output: a lock in the run folder naming its holder's pid (itk.locking)."""
    from itk.locking import held

    return held(plan.lock_path, lambda holder: UserError(
        f"{plan.output} is being written by another itk run ({holder})",
        "wait for that run to finish (or stop it), or give this one another --output", EXIT_BAD_INPUT))


def supervisor_for(plan: Plan, on_event: Callable[[dict[str, Any]], None] | None = None) -> Supervisor:
    """The Supervisor that runs this plan's command line, its log in the run folder and its progress going to
    `on_event`. A caller that may cancel the run (the web page) keeps it and calls its `cancel()`."""
    from itk.supervisor import Supervisor

    return Supervisor(plan.argv, plan.log_path, env=child_env(), on_event=on_event)


def run_job(plan: Plan, on_event: Callable[[dict[str, Any]], None] | None = None, *,
            supervisor: Supervisor | None = None) -> RunResult:
    """Launch the plan under its Supervisor (`supervisor_for(plan, on_event)` unless one is given; its events
    then go to its own callback), keep the log in the run folder, and on failure diagnose it with the advice rules
    (verdict.json beside the log). Prints nothing. The output is locked for the whole run: a second run on it is
    refused, naming this one's pid. A run that continues an interrupted one first sends the callback a `stage`
    event "resume" with the line to show."""
    supervisor = supervisor or supervisor_for(plan, on_event)
    plan.require_weights()
    with output_lock(plan):
        if plan.resume:
            supervisor.on_event({"event": "stage", "stage": "resume", "message": plan.resume, "origin": "itk"})
        return _run_locked(plan, supervisor)


def explain_failure(plan: Plan, *, log_text: str, returncode: int, events: list[dict[str, Any]],
                    oom_kills_before: int | None) -> Verdict:
    """The advice rules' verdict on a failed generator (its log, exit status, last events and this machine's
    facts), written as verdict.json in the run folder. `oom_kills_before`: the cgroup's OOM kills when it started."""
    from itk import machine
    from itk.advice import diagnose
    from itk.checks.ram import read_cgroup
    from itk.diagnose import write_verdict
    from itk.runtime.protocol import failed_rank
    from itk.supervisor import Outcome

    phase = Outcome(returncode, False, 0.0, plan.log_path, events).phase
    facts = {**machine.gather().to_json(), "preset": plan.preset_name, "phase": phase}
    errors = [e for e in events if e.get("event") == "error" and e.get("message")]
    if errors:
        facts["error_message"] = errors[-1]["message"]
    kills_after = read_cgroup().oom_kills
    if oom_kills_before is not None and kills_after is not None:
        facts["oom_kills_during_run"] = kills_after - oom_kills_before
    verdict = diagnose(log_text, returncode if returncode else None, facts, str(plan.log_path))
    if (rank := failed_rank(log_text)) is not None:  # several GPUs: say which one failed first
        verdict = replace(verdict, diagnosis=f"{rank}. {verdict.diagnosis}")
    write_verdict(verdict, plan.run_dir / "verdict.json")
    return verdict


def _run_locked(plan: Plan, supervisor: Supervisor) -> RunResult:
    from itk.checks.ram import read_cgroup

    plan.write_job()
    log_path = plan.log_path
    log_path.write_text(f"# itk run: {plan.command_line}\n", encoding="utf-8")
    kills_before = read_cgroup().oom_kills
    outcome = supervisor.run()
    if outcome.interrupted:
        return RunResult(log_path, outcome.elapsed_s, EXIT_INTERRUPTED, interrupted=True, events=outcome.events,
                         resumable=plan.resume_folder.is_dir())
    video = Path(outcome.output or plan.output)
    if outcome.returncode == 0 and video.is_file():
        return RunResult(log_path, outcome.elapsed_s, EXIT_OK, video, video_seconds(video),
                         (outcome.done or {}).get("gpu_peak_gb"), events=outcome.events)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if outcome.returncode == 0:
        text += f"\nitk: the generator exited 0 but wrote no video at {video}\n"
    verdict = explain_failure(plan, log_text=text, returncode=outcome.returncode, events=outcome.events,
                              oom_kills_before=kills_before)
    code = outcome.returncode if outcome.returncode in (EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS) else EXIT_FAILED
    return RunResult(log_path, outcome.elapsed_s, code, verdict=verdict, events=outcome.events,
                     resumable=plan.resume_folder.is_dir())
