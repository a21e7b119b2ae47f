"""The job file of `itk batch`: one job per line (JSON Lines), checked whole before anything runs.

A line is the official job format (`prompt`, `cond_video`, `cond_audio`, and for two speakers `audio_type`
and `bbox`) plus, optionally, `output` (the video's file name in the output folder), `preset`, `settings`
(generator settings as `--set` takes them) and `seed`. Empty lines and lines starting with `#` are skipped.
Every line that is not a valid job is reported with its number, all at once, and nothing runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from itk.runtime.protocol import EXIT_BAD_INPUT, BadInput, Job, UserError, job_from_dict, parse_setting
from itk.speech import SpeechText

OFFICIAL_KEYS = ("prompt", "cond_video", "cond_audio", "audio_type", "bbox")
BATCH_KEYS = ("output", "preset", "settings", "seed")
SPEECH_KEYS = ("text", "voice", "voice2", "speed")  # speech from text instead of cond_audio (itk.speech)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
EXAMPLE = ('{"prompt": "A woman is talking.", "cond_video": "faces/anna.png", "cond_audio": {"person1": '
           '"speech/anna-01.wav"}, "output": "anna-01.mp4", "preset": "rtx4090-24g-fast", "seed": 7, '
           '"settings": {"sample_steps": 6}}')
FORMAT_HELP = (
    "One job per line (JSON Lines): the official job format (prompt, cond_video, cond_audio, and for two speakers "
    "audio_type and bbox) plus optional output (file name of its video in the output folder; default: the "
    "image's and speech's names), preset, seed and settings (generator settings as --set takes them); text (with "
    "optional voice, voice2, speed) instead of cond_audio makes the speech from text. Relative "
    f"paths: the current folder, then the job file's folder. Lines starting with # are skipped. Example: {EXAMPLE}"
)


@dataclass(frozen=True)
class BatchJob:
    """One line of a job file: its job, its own preset and settings, and the name its video gets."""

    line: int
    name: str
    job: Job
    preset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # the line as written
    speech: SpeechText | None = None  # the speech is made from this text when the job runs (no cond_audio)

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides the video: the job with resolved paths, preset and settings."""
        data = {"job": self.job.to_json(), "preset": self.preset, "settings": self.settings,
                "speech": asdict(self.speech) if self.speech else None}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """The job as one line of a job file, its paths absolute and its output named: what the store keeps, so
        every front door's jobs read the same and `from_json` makes the same job again."""
        line: dict[str, Any] = {**self.job.to_json(), "output": f"{self.name}.mp4"}
        if self.speech is not None:
            del line["cond_audio"]
            line.update({k: v for k, v in asdict(self.speech).items() if v is not None})
        if self.preset is not None:
            line["preset"] = self.preset
        if self.settings:
            line["settings"] = dict(self.settings)
        return line

    @classmethod
    def from_json(cls, data: Any) -> BatchJob:
        """The job a store row's spec (`to_json`) describes, checked again as a job file's line is (BadInput)."""
        return parse_line(data, 0, Path.cwd())


def setting_text(value: Any) -> str:
    """A JSON value as `--set` text: true/false, lists joined by commas."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def default_name(job: Job) -> str:
    """The video's name when a line gives none: the image's and the first speech track's names."""
    speech = next(iter(job.audio_files().values()), None)
    stem = f"{job.cond_video.stem}-{speech.stem}" if speech is not None else job.cond_video.stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:90] or "job"


def parse_line(data: Any, line: int, job_dir: Path) -> BatchJob:
    """One line's job. BadInput naming the problem (the caller adds the line number)."""
    if not isinstance(data, dict):
        raise BadInput("not a JSON object", FORMAT_HELP)
    unknown = sorted(set(data) - set(OFFICIAL_KEYS) - set(BATCH_KEYS) - set(SPEECH_KEYS))
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r}",
                       f"known keys: {', '.join(OFFICIAL_KEYS + BATCH_KEYS + SPEECH_KEYS)}")
    speech = speech_of_line(data)
    official = {k: v for k, v in data.items() if k in OFFICIAL_KEYS}
    if speech is None:
        job = job_from_dict(official, "the job", job_dir)
    else:  # the structure checked with a stand-in track; the speech is made when the job runs
        stand_in = job_from_dict({**official, "cond_audio": {"person1": "speech-from-text.wav"}}, "the job", job_dir)
        job = replace(stand_in, cond_audio={})
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise BadInput("settings must be an object of generator settings", '"settings": {"sample_steps": 8}')
    try:
        typed = {str(k): parse_setting(str(k), setting_text(v)) for k, v in settings.items()}
        if "seed" in data:
            typed["base_seed"] = parse_setting("base_seed", setting_text(data["seed"]))
    except BadInput as exc:  # the flag table's words, said as a job file says it
        raise BadInput(exc.message.replace("--set ", "settings: "), exc.fix.replace("--set ", "settings: ")) from None
    preset = data.get("preset")
    if preset is not None:
        from itk.presets import load_presets

        if not isinstance(preset, str) or preset not in load_presets():
            raise BadInput(f"preset {preset!r} does not exist", f"one of: {', '.join(sorted(load_presets()))}")
    output = data.get("output")
    if output is None:
        name = default_name(job) if speech is None else f"{default_name(job)}-{speech.key[:6]}"
    else:
        if not isinstance(output, str) or not output.endswith(".mp4") or not SAFE_NAME.fullmatch(output[:-4]):
            raise BadInput(f"output {output!r} must be a plain file name ending in .mp4 (letters, digits, . _ -)",
                           '"output": "talk-01.mp4" (it is written in the output folder)')
        name = output[:-4]
    return BatchJob(line=line, name=name, job=job, preset=preset, settings=typed, source=data, speech=speech)


def speech_of_line(data: dict[str, Any]) -> SpeechText | None:
    """A line's speech from text (checked: the script's tags, the speed), or None when it gives cond_audio."""
    from itk.speech import check_text

    if "text" not in data:
        stray = [k for k in SPEECH_KEYS if k in data]
        if stray:
            raise BadInput(f"{stray[0]} is for speech from text, and the line has no text", '"text": "Hello!"')
        return None
    if "cond_audio" in data:
        raise BadInput("give cond_audio or text, not both", "the speech comes from a recording or from text")
    text, speed = data["text"], data.get("speed", 1.0)
    voices = [data.get("voice"), data.get("voice2")]
    if not isinstance(text, str) or not all(v is None or isinstance(v, str) for v in voices) \
            or isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise BadInput("text and voices must be strings and speed a number", '"text": "Hello!", "speed": 1.0')
    speech = SpeechText(text=text, voice=voices[0], voice2=voices[1], speed=float(speed))
    check_text(speech)
    return speech


def read_job_file(path: Path) -> list[BatchJob]:
    """Every job of the file, in order, with unique names (a name given twice is an error; a default name
    repeated gets -2, -3 ...). UserError (exit 2) listing every bad line with its number, or the file's own
    problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"job file {path} does not exist", "check the path", EXIT_BAD_INPUT) from None
    except IsADirectoryError:
        raise UserError(f"job file {path} is a folder", "give a .jsonl file, one job per line", EXIT_BAD_INPUT) \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"job file {path} cannot be read ({exc})", "give a UTF-8 text file, one job per line",
                        EXIT_BAD_INPUT) from None
    jobs, problems = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(raw)
            jobs.append(parse_line(data, number, path.parent.absolute()))
        except (json.JSONDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else f"{exc.msg} at column {exc.colno}"
            problems.append((number, f"not valid JSON ({why})", FORMAT_HELP))
        except BadInput as exc:
            problems.append((number, exc.message.replace("the job: ", ""), exc.fix))
    if not jobs and not problems:
        raise UserError(f"job file {path} holds no job", f"one job per line, e.g. {EXAMPLE}", EXIT_BAD_INPUT)
    given = Counter(j.name for j in jobs if j.source.get("output"))
    for name, n in given.items():
        if n > 1:
            lines = [j.line for j in jobs if j.name == name]
            problems.append((lines[1], f"output {name}.mp4 is also given on line {lines[0]}",
                             "give every job its own output name"))
    if problems:
        problems.sort()
        shown = "; ".join(f"line {n}: {message}" for n, message, _ in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"job file {path}: {len(problems)} bad line(s): {shown}{more}", problems[0][2], EXIT_BAD_INPUT)
    return unique_names(jobs)


def unique_names(jobs: list[BatchJob]) -> list[BatchJob]:
    """Default names made unique in file order: the second `anna-speech` becomes `anna-speech-2`."""
    taken = {j.name for j in jobs if j.source.get("output")}
    seen: Counter[str] = Counter()
    out = []
    for job in jobs:
        if job.source.get("output"):
            out.append(job)
            continue
        seen[job.name] += 1
        name = job.name if seen[job.name] == 1 else f"{job.name}-{seen[job.name]}"
        while name in taken:
            seen[job.name] += 1
            name = f"{job.name}-{seen[job.name]}"
        taken.add(name)
        out.append(replace(job, name=name))
    return out
