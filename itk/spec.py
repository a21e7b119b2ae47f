"""One video to make, as a person asked for it: `RunSpec`, the one object every front door builds.

The command line (`itk run`), the web page and the job queue (`itk batch`, `itk serve`) all describe a video
the same way: a job (what to animate and the speech), the output, a preset, settings on top of it, LoRAs, GPUs
and the weights folder. `RunSpec` holds them typed and checked for shape (which options go together, what a
value must look like), so `itk.run.plan_run(spec)` can check the files, the weights and the machine. Nothing
here opens an input or loads a model; `--gpus auto` asks the GPU driver how many GPUs there are.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from itk.runtime.protocol import EXIT_BAD_INPUT, Job, UserError, parse_setting, read_job

if TYPE_CHECKING:
    from itk.speech import SpeechText

DEFAULT_PROMPT = "A person is talking."
DEFAULT_AUDIO_MODE = "add"  # two recordings given one after the other read as turns; "para" plays them together


def bad_input(message: str, fix: str) -> UserError:
    return UserError(message, fix, EXIT_BAD_INPUT)


def parse_sets(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> typed values. Names, types, ranges and refusals (a flag the generator does
    not support yet is refused here, with its reason) come from the protocol's flag table."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise bad_input(f"--set {item!r}: expected KEY=VALUE", "e.g. --set sample_steps=20")
        out[key.strip().lstrip("-").replace("-", "_")] = parse_setting(key, raw)
    return out


def parse_box(text: str, option: str) -> list[float]:
    """`--bbox1 y0,x0,y1,x1` -> four numbers: rows first, as the official job file's bbox is read."""
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise bad_input(f"{option} {text}: expected four numbers row_min,col_min,row_max,col_max (pixels)",
                        f"e.g. {option} 40,20,300,200 (rows first, as the official bbox)")
    return numbers


def parse_gpus(value: str | int) -> int:
    """`--gpus` as given: a count, or "auto" (every usable GPU, at least 1)."""
    if str(value).strip().lower() == "auto":
        from itk.launch import usable_gpus

        return max(1, usable_gpus())
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise bad_input(f"--gpus {value}: expected a count of 1 or more, or auto", "e.g. --gpus 2")
    return count


def output_path(output: str | Path | None) -> Path:
    """The video to write, absolute. The default name is unique (time + a random suffix): two runs started in
    the same second must not share a run folder."""
    if output is None:
        return Path("outputs").absolute() / f"itk-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.mp4"
    path = Path(output).expanduser()
    if path.suffix.lower() != ".mp4":
        raise bad_input(f"--output {output}: the video is written as mp4", f"--output {path.with_suffix('.mp4')}")
    return path.absolute()


def job_from_options(*, image: str | None, video: str | None, audio: str | None, prompt: str | None) -> Job:
    """The job of `--image`/`--video` and `--audio` (exactly one picture source and the speech)."""
    if bool(image) == bool(video):
        raise bad_input("give exactly one of --image or --video (or a job file with --input-json)",
                        "itk run --image face.png --audio speech.wav")
    if not audio:
        raise bad_input("--audio is missing", "itk run --image face.png --audio speech.wav")
    return Job(prompt=prompt or DEFAULT_PROMPT, cond_video=Path(image or video).expanduser().absolute(),
               cond_audio={"person1": Path(audio).expanduser().absolute()})


def add_second_speaker(job: Job, *, audio2: str | None, mode: str | None,
                       boxes: tuple[str | None, str | None], dub_boxes: bool = False) -> Job:
    """The job with `--audio2` (and its mode and boxes) folded in, as a job file would hold them. One speaker's
    `--bbox1` is accepted as the region of `--dub-region bbox` (`dub_boxes`)."""
    if not audio2:
        if dub_boxes and boxes[0] and not boxes[1] and not mode:
            return replace(job, bbox={"person1": parse_box(boxes[0], "--bbox1")})
        stray = [name for name, value in (("--audio-mode", mode), ("--bbox1", boxes[0]), ("--bbox2", boxes[1]))
                 if value]
        if stray:
            raise bad_input(f"{stray[0]} is for two speakers, and there is no --audio2",
                            "add --audio2 SECOND.wav, or leave out " + " and ".join(stray))
        return job
    if bool(boxes[0]) != bool(boxes[1]):
        raise bad_input("give both --bbox1 and --bbox2, or neither (the official left/right split)",
                        "add the other speaker's box: --bbox2 row_min,col_min,row_max,col_max")
    bbox = ({"person1": parse_box(boxes[0], "--bbox1"), "person2": parse_box(boxes[1], "--bbox2")}
            if boxes[0] and boxes[1] else None)
    return replace(job, cond_audio={**job.cond_audio, "person2": Path(audio2).expanduser().absolute()},
                   audio_type=mode or DEFAULT_AUDIO_MODE, bbox=bbox)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One video to make, checked for shape.

    job: what to animate and the speech. output: the mp4, absolute (`output_path`). preset: a preset's name
    (None: the one itk picks for this machine). settings: generator settings on top of the preset's, typed by
    the flag table (`--set`). loras: the user's own LoRA files (path, scale), merged after the preset's.
    gpus: GPUs for this one video (None: the preset's). weights_dir: where the weights live (None: $ITK_WEIGHTS,
    else ./weights). generator: the command to run instead of ours (None: ours, or $ITK_GENERATOR). gpu_name:
    the GPU whose measured step time the estimate uses (None: this machine's). speech: the text the job's speech
    is made from (its cond_audio is empty until then): plan_run speaks it beside the video once the output and
    the picture are checked."""

    job: Job
    speech: SpeechText | None = None
    output: Path = field(default_factory=lambda: output_path(None))
    preset: str | None = None
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    loras: tuple[tuple[Path, float], ...] = ()
    gpus: int | None = None
    weights_dir: Path | None = None
    restart: bool = False  # --restart: an interrupted run's resume state is deleted and the video made afresh
    generator: tuple[str, ...] | None = None
    gpu_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @classmethod
    def from_options(cls, *, image: str | None = None, video: str | None = None, audio: str | None = None,
                     audio2: str | None = None, audio_mode: str | None = None, bbox1: str | None = None,
                     bbox2: str | None = None, prompt: str | None = None, input_json: str | None = None,
                     output: str | Path | None = None, preset: str | None = None,
                     sets: tuple[str, ...] | list[str] = (), loras: tuple[str, ...] | list[str] = (),
                     gpus: str | int | None = None, weights_dir: str | Path | None = None,
                     text: str | None = None, text_file: str | None = None, voice: str | None = None,
                     voice2: str | None = None, speed: float | None = None,
                     dub_region: str | None = None, restart: bool = False) -> RunSpec:
        """The spec of `itk run`'s options (the page passes the same names). UserError (exit 2) for options that
        do not go together or a value of the wrong shape; the files themselves are checked by plan_run. With
        `text` (or `text_file`) the speech is made from it first (itk.speech: Kokoro, offline), beside the video.
        `dub_region`: for a source video, where the generated frames replace it (itk.runtime.dub)."""
        from itk.inputs import parse_lora

        settings = parse_sets(sets)
        if dub_region is not None:
            settings["dub_region"] = parse_setting("dub_region", dub_region)
        out = output_path(output)
        wdir = Path(weights_dir).expanduser() if weights_dir else None
        speech = speech_of(text=text, text_file=text_file, voice=voice, voice2=voice2, speed=speed)
        if input_json:
            if image or video or audio or audio2 or speech:
                raise bad_input("--input-json already names the image/video and audio",
                                "give either --input-json FILE or --image/--video with --audio or --text")
            job = read_job(input_json)
            job = replace(job, prompt=prompt) if prompt else job
        elif speech is not None:
            job = spoken_job(speech, image=image, video=video, audio=audio or audio2, prompt=prompt,
                             boxes=(bbox1, bbox2), audio_mode=audio_mode)
        else:
            job = add_second_speaker(job_from_options(image=image, video=video, audio=audio, prompt=prompt),
                                     audio2=audio2, mode=audio_mode, boxes=(bbox1, bbox2),
                                     dub_boxes=settings.get("dub_region") == "bbox")
        return cls(job=job, speech=speech, output=out, preset=preset, settings=settings,
                   loras=tuple(parse_lora(item) for item in loras),
                   gpus=None if gpus is None else parse_gpus(gpus), weights_dir=wdir, restart=restart)


def speech_of(*, text: str | None, text_file: str | None, voice: str | None, voice2: str | None,
              speed: float | None) -> SpeechText | None:
    """The `--text`/`--text-file` request (None without one); the voice options only go with it."""
    from itk.speech import SpeechText, read_text_file

    if text is not None and text_file:
        raise bad_input("give --text or --text-file, not both", "itk run --text-file script.txt")
    if text is None and not text_file:
        stray = [name for name, value in (("--voice", voice), ("--voice2", voice2), ("--speed", speed)) if value]
        if stray:
            raise bad_input(f"{stray[0]} is for speech from text, and there is no --text",
                            "add --text \"...\" (or --text-file), or leave out " + " and ".join(stray))
        return None
    return SpeechText(text=text if text is not None else read_text_file(text_file), voice=voice, voice2=voice2,
                      speed=1.0 if speed is None else float(speed))


def spoken_job(speech: SpeechText, *, image: str | None, video: str | None, audio: str | None,
               prompt: str | None, boxes: tuple[str | None, str | None], audio_mode: str | None) -> Job:
    """The job whose speech will be made from text (plan_run speaks it), its script checked here: the picture,
    the prompt and the speakers' boxes, with no speech yet."""
    from itk.speech import check_text

    if audio:
        raise bad_input("give --audio or --text, not both", "the speech comes from a recording or from text")
    if audio_mode:
        raise bad_input("--audio-mode is for two recordings; a script's turns are already laid out",
                        "leave out --audio-mode")
    if bool(image) == bool(video):
        raise bad_input("give exactly one of --image or --video", 'itk run --image face.png --text "Hello!"')
    speakers = check_text(speech)
    if any(boxes) and speakers < 2:
        raise bad_input("--bbox1/--bbox2 are for two speakers, and the text has one",
                        "tag the turns (s1) ... (s2) ..., or leave out the boxes")
    base = Job(prompt=prompt or DEFAULT_PROMPT, cond_video=Path(image or video).expanduser().absolute(),
               cond_audio={})
    if boxes[0] or boxes[1]:
        if not (boxes[0] and boxes[1]):
            raise bad_input("give both --bbox1 and --bbox2, or neither (the official left/right split)",
                            "add the other speaker's box: --bbox2 row_min,col_min,row_max,col_max")
        return replace(base, bbox={"person1": parse_box(boxes[0], "--bbox1"),
                                   "person2": parse_box(boxes[1], "--bbox2")})
    return base
