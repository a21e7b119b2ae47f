"""The contract between the toolkit (`itk run`) and the generator (`python -m itk.runtime.generate`).

One module, imported by both sides, so neither keeps a copy that can drift: the job file (read and write,
one rule for relative paths), the progress events (emit and parse), the exit codes, shared constants, and
ONE table of the generator's flags. The generator's argument parser, `itk run`'s `--set` names, the range
checks and the refusal of official flags we do not implement are all built from that table.

No torch here (nor anything heavy): `itk --help` and `itk run --dry-run` import this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TextIO

# --- exit codes (both sides) ---------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1  # a check or a job failed; for the generator: a crash the advice rules classify
EXIT_BAD_INPUT = 2  # flags, job file, image or audio unusable: one line says which and why
EXIT_MISSING_WEIGHTS = 3
EXIT_INTERRUPTED = 130

# --- shared constants ------------------------------------------------------------------------------------
FPS = 25  # video frames per second: the audio embedding is resampled to it
SAMPLE_RATE = 16000  # wav2vec2's input rate
SIZES = ("infinitetalk-480", "infinitetalk-720")
DEFAULT_SHIFT = MappingProxyType({"infinitetalk-480": 7.0, "infinitetalk-720": 11.0})
DEFAULT_STEPS = 40
# The official reader tells a video from an image by extension; both sides do the same.
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".flv", ".wmv", ".webm", ".mpeg", ".mpg"})
SPEAKERS = ("person1", "person2")
AUDIO_TYPES = ("add", "para")
SILENT_SPEAKER = "None"  # the official job format's placeholder for a speaker without a track
# Dubbing a source video: where the generated frames replace the source's (runtime/dub.py)
DUB_REGIONS = ("full", "face", "bbox")


RESUME_STATE = "state.json"  # in the resume folder: {"clips_done": int, "clips": int, "video_s": float, ...}


def resume_folder(output: Path) -> Path:
    """Where an unfinished run keeps its resume state: `talk.mp4` -> `talk.mp4.itk-resume/` (both sides)."""
    return output.with_name(output.name + ".itk-resume")


class UserError(Exception):
    """A failure the user can fix: shown as one line of what went wrong and one of how to fix it, and ending
    the command with `exit_code`."""

    def __init__(self, message: str, fix: str = "", exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.message, self.fix, self.exit_code = message, fix, exit_code


class BadInput(UserError):
    """Exit 2: a flag, the job file or an input file cannot be used. `fix` says what to do instead."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message, fix, EXIT_BAD_INPUT)


# --- the job file ----------------------------------------------------------------------------------------
JOB_HELP = (
    'The job file is the official --input_json format: {"prompt": ..., "cond_video": IMAGE_OR_VIDEO, '
    '"cond_audio": {"person1": WAV}} (two speakers: "person2" too, and "audio_type": "add" or "para"; '
    'optional "bbox": {"person1": [row_min, col_min, row_max, col_max], "person2": [...]} in pixels, rows '
    "first as the official code reads it). Relative paths are looked up in the current folder first, as the "
    "official scripts and their example jobs expect, then in the job file's folder."
)


def is_video(path: str | Path) -> bool:
    """The official rule: a `cond_video` is a video by its extension (`VIDEO_EXTENSIONS`, in any case),
    anything else is an image."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Job:
    """One generation job. Paths are resolved (see `resolve_job_path`); a silent speaker is None."""

    prompt: str
    cond_video: Path
    cond_audio: dict[str, Path | None]
    audio_type: str | None = None
    bbox: dict[str, list[float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the file, passed through unchanged

    @property
    def speakers(self) -> int:
        return len(self.cond_audio)

    @property
    def is_video(self) -> bool:
        return is_video(self.cond_video)

    def audio_files(self) -> dict[str, Path]:
        """The speakers that have a track (the official 'None' placeholder left out)."""
        return {k: p for k, p in self.cond_audio.items() if p is not None}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "cond_video": str(self.cond_video),
            "cond_audio": {k: SILENT_SPEAKER if p is None else str(p) for k, p in self.cond_audio.items()},
        }
        if self.audio_type:
            data["audio_type"] = self.audio_type
        if self.bbox is not None:
            data["bbox"] = self.bbox
        data.update(self.extra)
        return data


def resolve_job_path(value: str, job_dir: Path | None, cwd: Path | None = None) -> Path:
    """The one rule for a path in a job: absolute as given; else the current folder if the file is there,
    else the job file's folder if it is there, else the current folder's (so the error names that)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    here = (cwd or Path.cwd()) / path
    if here.exists() or job_dir is None:
        return here.absolute()
    beside = job_dir / path
    return beside.absolute() if beside.exists() else here.absolute()


def job_from_dict(data: Any, source: str, job_dir: Path | None = None) -> Job:
    """Validate the job's structure (not the media) and resolve its paths. Raises BadInput."""
    fix = 'a job is {"prompt": "...", "cond_video": "face.png", "cond_audio": {"person1": "speech.wav"}}'
    if not isinstance(data, dict):
        raise BadInput(f"{source}: must hold a JSON object", fix)
    missing = [k for k in ("prompt", "cond_video", "cond_audio") if k not in data]
    if missing:
        raise BadInput(f"{source}: lacks {', '.join(missing)}", fix)
    if not isinstance(data["prompt"], str):
        raise BadInput(f"{source}: prompt must be a string", fix)
    if not isinstance(data["cond_video"], str) or not data["cond_video"]:
        raise BadInput(f"{source}: cond_video must be an image or video path", fix)
    audio = data["cond_audio"]
    if not isinstance(audio, dict) or "person1" not in audio:
        raise BadInput(f'{source}: "cond_audio" must be an object with "person1"', fix)
    unknown = sorted(set(audio) - set(SPEAKERS))
    if unknown:
        raise BadInput(f"{source}: cond_audio.{unknown[0]} is not a speaker (person1, person2)", fix)
    tracks: dict[str, Path | None] = {}
    for key in SPEAKERS:
        if key not in audio:
            continue
        value = audio[key]
        if not isinstance(value, str) or not value:
            raise BadInput(f"{source}: cond_audio.{key} must be a file path (or \"None\" for a silent speaker)", fix)
        tracks[key] = None if value == SILENT_SPEAKER else resolve_job_path(value, job_dir)
    if tracks["person1"] is None and len(tracks) == 1:
        raise BadInput(f"{source}: cond_audio.person1 is \"None\": the job has no speech", fix)
    audio_type = data.get("audio_type")
    if len(tracks) > 1 and audio_type not in AUDIO_TYPES:
        raise BadInput(f'{source}: two speakers need "audio_type": "add" (taking turns) or "para" (together)',
                       'add "audio_type": "add" to the job file')
    if audio_type is not None and audio_type not in AUDIO_TYPES:
        raise BadInput(f'{source}: audio_type {audio_type!r} is not "add" or "para"', 'use "audio_type": "add"')
    bbox = data.get("bbox")
    if bbox is not None:
        if not isinstance(bbox, dict) or any(
            k not in SPEAKERS or not isinstance(v, list) or len(v) != 4
            or not all(isinstance(n, (int, float)) for n in v) for k, v in bbox.items()
        ):
            raise BadInput(f"{source}: bbox must map person1/person2 to four numbers each",
                           '"bbox": {"person1": [row_min, col_min, row_max, col_max], "person2": [...]} in pixels '
                           "(rows first, as the official code reads it)")
    extra = {k: v for k, v in data.items() if k not in ("prompt", "cond_video", "cond_audio", "audio_type", "bbox")}
    return Job(
        prompt=data["prompt"],
        cond_video=resolve_job_path(data["cond_video"], job_dir),
        cond_audio=tracks,
        audio_type=audio_type,
        bbox=bbox,
        extra=extra,
    )


def read_job(path: str | Path) -> Job:
    """Read a job file (the official --input_json format). Raises BadInput naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"job file {path} does not exist", "check the path given to --input_json") from None
    except IsADirectoryError:
        raise BadInput(f"job file {path} is a folder", "give the path of a .json file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"job file {path} is not valid JSON ({exc})", JOB_HELP) from None
    except RecursionError:  # json's parser recurses once per [ or {: a file nested 200k deep ends it
        raise BadInput(f"job file {path}: its JSON is nested too deeply to read", JOB_HELP) from None
    except OSError as exc:  # a name over 255 bytes, a device, a permission
        raise BadInput(f"job file {path} cannot be read ({exc.strerror or type(exc).__name__})",
                       "check the path given to --input_json") from None
    return job_from_dict(data, f"job file {path}", path.parent.absolute())


def write_job(job: Job, path: str | Path) -> Path:
    """Atomically: a half-written job file must never be what the generator reads."""
    from itk.runtime.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(job.to_json(), indent=2, ensure_ascii=False) + "\n")


# --- progress events -------------------------------------------------------------------------------------
EVENT_PREFIX = "ITK-EVENT "
# job and ready: the warm worker's (`python -m itk.runtime.worker`): a job starts; the worker waits for the next
EVENT_KINDS = ("stage", "clip", "step", "done", "error", "job", "ready")
DONE_VIDEO = "path"  # the done event's field naming the video written: the generator writes it, the toolkit reads it
# The generator's stages in the words a person reads (the progress bar, the batch board, the page, the selftest's
# lines); a stage the generator announces must be one of these.
STAGES = MappingProxyType({
    "read_inputs": "reading the inputs", "resume": "resuming the interrupted run",
    "audio_embedding": "reading the speech", "text_encoding": "reading the prompt",
    "image_encoding": "reading the portrait", "speakers": "placing the two speakers",
    "dub_region": "finding the speaker in the source video", "load_models": "loading the models",
    "generate": "generating", "write_video": "writing the video",
})


def stage_words(name: str) -> str:
    """A generator stage as a person reads it: "audio_embedding" -> "reading the speech"; a name not in STAGES
    (a toolkit's own stage, already words) with its underscores as spaces."""
    return STAGES.get(name, name.replace("_", " "))


def format_event(event: str, **fields: Any) -> str:
    """One protocol line (without the newline). Fields: stage, clip/clips, step/steps, elapsed_s,
    gpu_peak_gb, path (done), message/exit_code (error), and what a stage adds. A clip event also carries
    clips_done and video_s (seconds of video written so far); the "resume" stage carries from_clip; the "generate"
    stage clips, frames and the attention kernel the DiT runs."""
    if event not in EVENT_KINDS:
        raise ValueError(f"unknown event {event!r}")
    return EVENT_PREFIX + json.dumps({"event": event, **fields}, ensure_ascii=False)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event of one output line, or None: an event is a line that STARTS with the prefix and holds a
    JSON object with a known `event`; anything else (a malformed one included) is ordinary log text."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        record = json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("event") in EVENT_KINDS else None


class Events:
    """The generator's side: writes events to a stream (stderr by default), stamped with the seconds since
    the start (of the job, in a warm worker) and, when a GPU is in use, its peak memory so far. `job`: the warm
    worker's job id, carried by every event of that job."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, job: str | None = None) -> None:
        self.stream = stream
        self.enabled = enabled  # False on every rank but 0 of a multi-GPU run
        self.job = job
        self.start = time.monotonic()

    def for_job(self, job: str) -> Events:
        """The events of one job of a warm worker: the same stream, the clock started now, tagged `job`."""
        return Events(self.stream, self.enabled, job)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {**({"job": self.job} if self.job is not None else {}), **fields,
                  "elapsed_s": round(time.monotonic() - self.start, 3)}
        peak = _gpu_peak_gb()
        if peak is not None:
            record["gpu_peak_gb"] = peak
        if self.enabled:
            stream = self.stream or sys.stderr
            stream.write(format_event(event, **record) + "\n")
            stream.flush()
        return {"event": event, **record}

    def stage(self, name: str, **fields: Any) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: add its words to STAGES")
        self.emit("stage", stage=name, **fields)


def _gpu_peak_gb() -> float | None:
    torch = sys.modules.get("torch")  # only when the generator already imported it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


# --- the warm worker's job requests ---------------------------------------------------------------------------
# `python -m itk.runtime.worker` reads one request per line on stdin and runs them one after another with its
# models kept loaded: {"job": ID, "argv": [generator flags, as `python -m itk.runtime.generate` takes them]}.
# Every event of a job carries "job": ID, from a "job" event to its "done" or "error" (with exit_code); a "ready"
# event says the worker waits for the next line. SIGUSR1 stops the job in progress (exit code 130 for that job;
# the worker stays); SIGINT/SIGTERM stop the job and the worker; end of input ends the worker.
CANCEL_JOB_SIGNAL = signal.SIGUSR1


def job_request(job: str, argv: list[str]) -> str:
    """One request line (without the newline)."""
    return json.dumps({"job": job, "argv": list(argv)}, ensure_ascii=False)


def parse_job_request(line: str) -> tuple[str, list[str]]:
    """(job id, generator flags) of a request line; BadInput for anything else."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInput(f"worker request is not JSON ({exc})", "send one {\"job\": ID, \"argv\": [...]} per line") \
            from None
    if not (isinstance(data, dict) and isinstance(data.get("job"), str) and isinstance(data.get("argv"), list)
            and all(isinstance(a, str) for a in data["argv"])):
        raise BadInput("worker request needs a string job and a list of string argv",
                       "send one {\"job\": ID, \"argv\": [...]} per line")
    return data["job"], data["argv"]


# --- a failed rank of a multi-GPU run ------------------------------------------------------------------------
# torchrun's error summary, and the generator's own line per failed rank (`rank_failure_line`).
TORCHRUN_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+) \(local_rank: \d+\)"
                                 r"\s*exitcode\s*:\s*(-?\d+)", re.S)
RANK_FAILURE = re.compile(r"^error: rank (\d+) of (\d+) failed: (.+)$", re.M)


def rank_failure_line(rank: int, world_size: int, exc: BaseException) -> str:
    """The line every rank of a multi-GPU run prints for its own crash, so a crash names where it happened."""
    return f"error: rank {rank} of {world_size} failed: {type(exc).__name__}: {exc}"


def failed_rank(log_text: str) -> str | None:
    """"rank K failed first: WHY" for a multi-GPU run that failed (None for a single process): the root cause
    torchrun names, with that rank's own `rank_failure_line`, or its exit status when it left none (killed)."""
    errors: dict[int, str] = {}
    for m in RANK_FAILURE.finditer(log_text):
        # The ranks share one stderr: another rank's event line can land inside this line; cut it off there.
        errors.setdefault(int(m[1]), m[3].split(EVENT_PREFIX)[0].strip())
    root = TORCHRUN_ROOT_CAUSE.search(log_text)
    if root is None and not errors:
        return None
    rank = int(root[1]) if root else next(iter(errors))
    why = errors.get(rank)
    if why is None and root is not None:
        code = int(root[2])
        why = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit status {code}"
    return f"rank {rank} failed first: {why}"


# --- the flag table --------------------------------------------------------------------------------------
Value = Any


@dataclass(frozen=True)
class Flag:
    """One generator flag, as the official generate_infinitetalk.py spells it.

    settable: `itk run --set NAME=VALUE` and presets may set it (path flags come from presets and
    --weights-dir only). refused: why a non-default value is refused ("" = supported). minimum/maximum
    bound numbers (inclusive; `above` = strictly greater than).
    """

    name: str
    type: type
    default: Value = None
    help: str = ""
    settable: bool = True
    refused: str = ""
    choices: tuple[Any, ...] | None = None
    nargs: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    required: bool = False
    path: bool = False

    @property
    def is_switch(self) -> bool:
        return self.type is bool

    def check(self, value: Value) -> str | None:
        """Why `value` is out of range for this flag, or None."""
        if value is None or self.is_switch:
            return None
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                return f"--{self.name} {v}: must be a finite number"
            if self.minimum is not None and v < self.minimum:
                return f"--{self.name} {v}: must be at least {self.minimum:g}"
            if self.maximum is not None and v > self.maximum:
                return f"--{self.name} {v}: must be at most {self.maximum}"
            if self.above is not None and v <= self.above:
                return f"--{self.name} {v}: must be greater than {self.above:g}"
        return None


NOT_YET = "not supported yet by itk's generator; leave it out"
MAX_TORCH_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest seed; above it torch fails mid-run
FLAGS: tuple[Flag, ...] = (
    Flag("task", str, "infinitetalk-14B", "model task (only infinitetalk-14B)", settable=False,
         choices=("infinitetalk-14B",)),
    Flag("size", str, "infinitetalk-480", "size bucket table: 480p or 720p", choices=SIZES),
    Flag("frame_num", int, 81, "frames per clip (4n+1)", minimum=5),
    Flag("max_frame_num", int, 1000, "most frames of the video in streaming mode", minimum=1),
    Flag("ckpt_dir", str, None, "the Wan2.1-I2V-14B-480P folder", settable=False, required=True, path=True),
    Flag("infinitetalk_dir", str, None,
         "the InfiniteTalk adapter file, component infinitetalk-single (without --quant)",
         settable=False, path=True),
    Flag("quant_dir", str, None, "the quantised DiT file (component infinitetalk-single-fp8); its map and the "
         "quantised T5 are found beside it",
         settable=False, path=True),
    Flag("wav2vec_dir", str, None, "the chinese-wav2vec2-base folder", settable=False, required=True, path=True),
    Flag("model_config", str, None, "itk_model_config.json (default: the one in --ckpt_dir, if any)",
         settable=False, path=True),
    Flag("input_json", str, "examples.json", "the job file. " + JOB_HELP, settable=False, path=True),
    Flag("save_file", str, None, "output stem; .mp4 is appended", settable=False, path=True),
    Flag("base_seed", int, 42, "random seed; negative: a random one", minimum=-1, maximum=MAX_TORCH_SEED),
    Flag("motion_frame", int, 9, "frames of the previous clip that anchor the next (streaming)", minimum=1),
    Flag("mode", str, "clip", "clip: one clip; streaming: as long as the audio", choices=("clip", "streaming")),
    Flag("sample_steps", int, None, f"denoising steps (default {DEFAULT_STEPS})", minimum=1),
    Flag("sample_shift", float, None, "timestep shift (default 7 at 480p, 11 at 720p)", above=0),
    Flag("sample_text_guide_scale", float, 5.0, "text guidance; exactly 1 drops the text pass", minimum=0),
    Flag("sample_audio_guide_scale", float, 4.0, "audio guidance (3-5 is best; 2 with a distill LoRA)",
         minimum=0),
    Flag("color_correction_strength", float, 1.0, "colour transfer toward the first frame, 0 to 1",
         minimum=0, maximum=1),
    Flag("num_persistent_param_in_dit", int, None,
         "low VRAM: DiT parameters kept on the GPU, the rest streamed per block (0: all streamed)", minimum=0),
    Flag("use_apg", bool, False, "adaptive projected guidance"),
    Flag("apg_momentum", float, -0.75, "APG momentum"),
    Flag("apg_norm_threshold", float, 55.0, "APG norm clip", minimum=0),
    Flag("offload_model", str, None, "accepted; the encoders are always freed after use"),
    Flag("t5_cpu", bool, False, "run the text encoder on the CPU"),
    Flag("audio_save_dir", str, None, "accepted; no scratch files are written", path=True),
    Flag("audio_mode", str, "localfile", "where the speech comes from", choices=("localfile", "tts"),
         refused="--audio_mode tts is not supported yet; give a speech file in cond_audio"),
    Flag("quant", str, None, "fp8: the quantised DiT and T5 from --quant_dir's folder", choices=("fp8", "int8")),
    Flag("dit_path", str, None, "an alternative full DiT checkpoint", settable=False, refused=NOT_YET, path=True),
    Flag("lora_dir", str, None, "LoRA files applied to the DiT (bf16 and FP8 alike; the official script ignores "
         "them with --quant)", settable=False, nargs="+", path=True),
    Flag("lora_scale", float, None, "one multiplier per LoRA file, paired with --lora_dir as the official zip "
         "(files beyond the scales are dropped, with a warning); default 1.2 as officially (the README uses 1 "
         "with a distill LoRA)", nargs="+"),
    Flag("lora_alpha", str, "ignore", "itk only: a LoRA file's alpha keys. ignore (default): as the official "
         "merge, so --lora_scale means what it means there and in the README's recipes; scale: multiply each "
         "delta by alpha/rank (LightX2V, diffusers)", choices=("ignore", "scale")),
    Flag("use_teacache", bool, False, "TeaCache step skipping, as officially (coefficients per --size; never "
         "skips in the first 5 steps). With text guidance 1 each pass keeps its own cache slot, fixing the "
         "official code's slot drift (its decisions differ there)"),
    Flag("teacache_thresh", float, 0.2, "TeaCache threshold", above=0),
    Flag("ulysses_size", int, 1, "sequence-parallel degree", refused=NOT_YET, minimum=1),
    Flag("ring_size", int, 1, "ring-attention degree", refused=NOT_YET, minimum=1),
    Flag("dit_fsdp", bool, False, "shard the DiT with FSDP", refused=NOT_YET),
    Flag("t5_fsdp", bool, False, "shard the T5 with FSDP", refused=NOT_YET),
    Flag("scene_seg", bool, False, "split a source video into shots", refused=NOT_YET),
    Flag("dub_region", str, "full", "itk only, for a source video: where the generated frames replace it. full: "
         "the whole frame, as officially; face: the speaker's face and mouth, found and tracked in the source, "
         "every other pixel the source's own (a soft edge between); bbox: the job's bbox (itk run --bbox1), fixed",
         choices=DUB_REGIONS),
    Flag("gpu_layout", str, None, "itk only: how the GPUs of a torchrun launch split the work, GROUPSxSP (guidance "
         "groups x sequence-parallel degree), as `itk run --gpus` chose it (default: chosen from the world size)",
         settable=False),
    Flag("resume", bool, False, "itk only (not an official flag): continue an interrupted run from the state "
         "folder beside the output (<save_file>.mp4.itk-resume); refused when the job, settings or weights "
         "changed", settable=False),
)
FLAG = MappingProxyType({f.name: f for f in FLAGS})
# Refused values of otherwise supported flags: (flag, value) -> why.
REFUSED_VALUES: Mapping[tuple[str, Any], str] = MappingProxyType({
    ("quant", "int8"): "--quant int8 is not supported yet (its T5 file does not exist upstream); use --quant fp8",
})
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{self.prog}: {message}", f"`{self.prog} --help` lists the flags")


def build_parser(prog: str = "python -m itk.runtime.generate", description: str = "") -> argparse.ArgumentParser:
    """The generator's argparse parser, from FLAGS (official spellings, types and defaults)."""
    parser = _OneLineParser(prog=prog, description=description)
    for f in FLAGS:
        kwargs: dict[str, Any] = {"default": f.default, "help": f.help + (" [not supported yet]" if f.refused else "")}
        if f.is_switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=f.type, choices=f.choices, nargs=f.nargs, required=f.required)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def check_values(values: Mapping[str, Value]) -> None:
    """Refusals and ranges for parsed flag values; raises BadInput for the first problem."""
    for name, value in values.items():
        flag = FLAG.get(name)
        if flag is None:
            continue
        if flag.refused and value != flag.default:
            raise BadInput(f"--{name}: {flag.refused}" if not flag.refused.startswith("--") else flag.refused,
                           f"leave out --{name}")
        why = None if isinstance(value, list) else REFUSED_VALUES.get((name, value))  # nargs values: no refusals
        if why:
            raise BadInput(why, f"leave out --{name}")
        problem = flag.check(value)
        if problem:
            raise BadInput(problem, f"`python -m itk.runtime.generate --help` gives the range of --{name}")


def settable() -> dict[str, Flag]:
    return {f.name: f for f in FLAGS if f.settable}


def parse_setting(name: str, raw: str) -> Value:
    """`--set NAME=RAW` (or a preset value given as text) -> a typed, range-checked value. Raises BadInput."""
    flags = settable()
    key = name.strip().lstrip("-").replace("-", "_")
    if key not in flags:
        raise BadInput(f"--set {name}: not a generator setting itk passes on",
                       f"known: {', '.join(sorted(flags))}")
    flag, text = flags[key], raw.strip()
    if flag.is_switch:
        if text.lower() not in TRUE_WORDS | FALSE_WORDS:
            raise BadInput(f"--set {key}={raw}: expected true or false", f"--set {key}=true")
        value: Value = text.lower() in TRUE_WORDS
    else:
        try:
            parts = [flag.type(p) for p in text.split(",")] if flag.nargs else flag.type(text)
        except ValueError:
            raise BadInput(f"--set {key}={raw}: not a valid {flag.type.__name__}",
                           f"e.g. --set {key}={flag.type(1) if flag.type is not str else 'value'}") from None
        value = parts
        if flag.choices and value not in flag.choices:
            raise BadInput(f"--set {key}={raw}: one of {', '.join(map(str, flag.choices))}",
                           f"--set {key}={flag.choices[0]}")
    check_values({key: value})
    return value


def to_argv(values: Mapping[str, Value]) -> list[str]:
    """Flag values -> the generator's command-line arguments, in table order (switches without a value)."""
    argv: list[str] = []
    for f in FLAGS:
        if f.name not in values or values[f.name] is None:
            continue
        value = values[f.name]
        if f.is_switch:
            argv += [f"--{f.name}"] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [f"--{f.name}", *map(str, value)]
        else:
            argv += [f"--{f.name}", str(value)]
    return argv


OFFICIAL_LORA_SCALE = 1.2  # --lora_scale's default in generate_infinitetalk.py


def pair_loras(files: Iterable[str | Path] | None, scales: Iterable[float] | None) -> list[tuple[Path, float]]:
    """--lora_dir and --lora_scale as the official script pairs them: zip, scales defaulting to [1.2]. Files
    beyond the scales are dropped as officially, but with a warning (silence would hide a LoRA asked for)."""
    files, scales = list(files or []), list(scales or [OFFICIAL_LORA_SCALE])
    if len(files) > len(scales):
        logging.getLogger(__name__).warning(
            "--lora_dir gives %d files but --lora_scale %d scale(s): as in the official script only the first %d "
            "applied; give one scale per file", len(files), len(scales), len(scales))
    return [(Path(f), float(s)) for f, s in zip(files, scales, strict=False)]
