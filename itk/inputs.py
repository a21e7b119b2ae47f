"""The job (the official `--input_json` format) and its validation before anything heavy starts.

A bad input found after three minutes of model loading is the worst kind of failure, so every file is opened
and decoded here first: the image with Pillow, a video and every audio track with PyAV (which bundles
FFmpeg, so mp3/m4a/mp4 audio needs no system ffmpeg). Audio length is checked against the clip length the
runtime needs: audio of `frame_num` frames or fewer is refused by the official pipeline (with an assertion
that misleadingly says the audio file does not exist), while itk's runtime makes one shorter clip of it:
the run says so before it starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.atomic import atomic_write_text
from itk.console import EXIT_USAGE, UserError

FPS = 25  # the runtime's frame rate: audio embeddings are resampled to 25 per second
# The official reader tells a video from an image by extension; so do we, so both runtimes agree.
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".flv", ".wmv", ".webm", ".mpeg", ".mpg"}
COLOUR_DRIFT_S = 60  # colour drifts visibly beyond about a minute (InfiniteTalk README)


@dataclass
class Job:
    """One generation job, as the official JSON describes it; paths are absolute once loaded."""

    prompt: str
    cond_video: Path
    cond_audio: dict[str, Path]
    audio_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # bbox and anything else, passed through

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "cond_video": str(self.cond_video),
            "cond_audio": {k: str(v) for k, v in self.cond_audio.items()},
        }
        if self.audio_type:
            data["audio_type"] = self.audio_type
        data.update(self.extra)
        return data

    def write(self, path: Path) -> Path:
        """Atomically: a half-written job file must never be what the generator reads."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")


def bad_input(message: str, fix: str) -> UserError:
    return UserError(message, fix, EXIT_USAGE)


def _resolve(value: Any, base: Path, what: str, source: str) -> Path:
    if not isinstance(value, str) or not value:
        raise bad_input(f"{source}: {what} must be a file path, got {value!r}",
                        'write it as "cond_video": "path/to/image.png"')
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def job_from_json(path: Path) -> Job:
    """Read an official job file. Relative paths are taken from the current folder, as the official script
    does (it opens them as given)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad_input(f"job file {path} does not exist", "check the path given to --input-json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_input(f"{path} is not valid JSON: {exc}", "fix the file; `itk run --help` shows the format") from None
    if not isinstance(data, dict):
        raise bad_input(f"{path} must hold a JSON object", "see the official examples/single_example_image.json")
    missing = [k for k in ("prompt", "cond_video", "cond_audio") if k not in data]
    if missing:
        raise bad_input(f"{path} lacks {', '.join(missing)}",
                        'a job needs "prompt", "cond_video" and "cond_audio": {"person1": "speech.wav"}')
    audio = data["cond_audio"]
    if not isinstance(audio, dict) or "person1" not in audio:
        raise bad_input(f'{path}: "cond_audio" must be an object with "person1"',
                        '"cond_audio": {"person1": "speech.wav"}')
    base = Path.cwd()
    extra = {k: v for k, v in data.items() if k not in ("prompt", "cond_video", "cond_audio", "audio_type")}
    return Job(
        prompt=str(data["prompt"]),
        cond_video=_resolve(data["cond_video"], base, "cond_video", str(path)),
        cond_audio={k: _resolve(v, base, f"cond_audio.{k}", str(path)) for k, v in audio.items()},
        audio_type=data.get("audio_type"),
        extra=extra,
    )


def job_from_options(image: str | None, video: str | None, audio: str | None, prompt: str | None) -> Job:
    if bool(image) == bool(video):
        raise bad_input("give exactly one of --image or --video (or a job file with --input-json)",
                        "itk run --image face.png --audio speech.wav")
    if not audio:
        raise bad_input("--audio is missing", "itk run --image face.png --audio speech.wav")
    return Job(
        prompt=prompt or "A person is talking.",
        cond_video=Path(image or video).expanduser().absolute(),  # type: ignore[arg-type]
        cond_audio={"person1": Path(audio).expanduser().absolute()},
    )


@dataclass
class MediaFacts:
    """What validation learnt; the run prints it and the planner uses it."""

    kind: str  # "image" or "video"
    width: int
    height: int
    audio_s: dict[str, float]
    frames: int  # output frames the audio asks for at 25 fps
    clips: int
    warnings: list[str] = field(default_factory=list)

    @property
    def video_s(self) -> float:
        return self.frames / FPS


def probe_image(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode every pixel: a truncated file fails here, not in the runtime
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise bad_input(f"{path} is not a readable image ({exc})", "use a PNG or JPEG portrait") from None


def probe_video(path: Path) -> tuple[int, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise bad_input(f"{path} has no video stream", "give a video with a picture, or use --image")
            frame = next(container.decode(video=0), None)
    except av.FFmpegError as exc:
        raise bad_input(f"{path} is not a readable video ({exc})", "use an mp4 (H.264) file") from None
    if frame is None:
        raise bad_input(f"{path} has no decodable frame", "re-encode it: ffmpeg -i in.mp4 -c:v libx264 out.mp4")
    return frame.width, frame.height


def probe_audio(path: Path) -> float:
    """Seconds of audio, by decoding the whole track (headers of broken files lie about their length)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise bad_input(f"{path} has no audio track", "give a wav/mp3/m4a file with the speech")
            samples, rate = 0, container.streams.audio[0].rate or 0
            for frame in container.decode(audio=0):
                samples += frame.samples
                rate = frame.sample_rate or rate
    except av.FFmpegError as exc:
        raise bad_input(f"{path} is not a readable audio file ({exc})",
                        "convert it: ffmpeg -i in -ar 16000 out.wav") from None
    if not rate or not samples:
        raise bad_input(f"{path} holds no audio samples", "give a wav/mp3/m4a file with the speech")
    return samples / rate


def clip_count(frames: int, settings: dict[str, Any]) -> int:
    """Clips the streaming loop runs for `frames` output frames: the first clip gives frame_num frames,
    every later one frame_num - motion_frame new ones. Audio of one clip or less is one (shorter) clip;
    beyond that the loop always runs at least two in streaming mode, as the official one does."""
    frame_num = int(settings.get("frame_num", 81))
    if settings.get("mode", "clip") != "streaming" or frames <= frame_num:
        return 1
    limit = min(frames, int(settings.get("max_frame_num", 1000)))
    step = frame_num - int(settings.get("motion_frame", 9))
    return 1 + max(1, math.ceil((limit - frame_num) / step))


def validate(job: Job, settings: dict[str, Any]) -> MediaFacts:
    """Open and decode every input and work out the video it makes; what the runtime will do differently from
    what people expect (short audio, the frame cap) comes back as warnings. Raises UserError (exit 2)."""
    for what, path in [("cond_video", job.cond_video), *((f"audio {k}", p) for k, p in job.cond_audio.items())]:
        if str(path) == "None" and what.startswith("audio"):
            continue  # the official format's silent second speaker
        if not path.is_file():
            raise bad_input(f"{what} file {path} does not exist", "check the path (relative paths start here)")
    is_video = job.cond_video.suffix.lower() in VIDEO_EXTENSIONS
    width, height = (probe_video if is_video else probe_image)(job.cond_video)
    audio_s = {k: probe_audio(p) for k, p in job.cond_audio.items() if str(p) != "None"}
    if len(job.cond_audio) > 1 and job.audio_type not in ("para", "add"):
        raise bad_input('two speakers need "audio_type": "para" (together) or "add" (taking turns)',
                        'add "audio_type": "add" to the job file')
    if not audio_s:
        raise bad_input("the job has no speech track", '"cond_audio": {"person1": "speech.wav"}')
    for key, seconds in audio_s.items():
        if seconds * FPS < 1:
            raise bad_input(f"audio {job.cond_audio[key]} is {seconds * 1000:.0f} ms, shorter than one video frame "
                            f"({1000 // FPS} ms)", "give a recording of the speech to lip-sync")
    frame_num = int(settings.get("frame_num", 81))
    total_s = sum(audio_s.values()) if job.audio_type == "add" else max(audio_s.values())
    warnings = []
    if total_s * FPS <= frame_num:
        name = job.cond_audio["person1"].name
        warnings.append(
            f"audio {name} is {total_s:.2f} s, shorter than one clip of {frame_num} frames ({frame_num / FPS:.2f} s): "
            "itk's runtime makes one shorter clip as long as the audio (the official script refuses such audio; "
            f"to run it there, pad with silence: ffmpeg -i {name} -af apad=whole_dur="
            f"{math.ceil((frame_num + 1) / FPS)} padded.wav)"
        )
    frames = int(total_s * FPS)
    cap = int(settings.get("max_frame_num", 1000))
    if settings.get("mode") == "streaming" and frames > cap:
        warnings.append(
            f"the audio is {total_s:.1f} s but the video stops at max_frame_num {cap} frames ({cap / FPS:.0f} s); "
            f"for all of it: --set max_frame_num={frames}"
        )
        frames = cap
    elif settings.get("mode") != "streaming":
        frames = min(frames, frame_num)
    if frames / FPS > COLOUR_DRIFT_S:
        warnings.append(f"{frames / FPS:.0f} s of video: colours may drift after about {COLOUR_DRIFT_S} s")
    return MediaFacts("video" if is_video else "image", width, height, audio_s, frames,
                      clip_count(frames, settings), warnings)
