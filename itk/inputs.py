"""A job's inputs validated before anything heavy starts (the job itself is itk.runtime.protocol's Job).

A bad input found after three minutes of model loading is the worst kind of failure, so every file is opened
and decoded here first: the image with Pillow, a video and every audio track with PyAV (which bundles
FFmpeg, so mp3/m4a/mp4 audio needs no system ffmpeg). Audio length is checked against the clip length the
runtime needs: audio of `frame_num` frames or fewer is refused by the official pipeline (with an assertion
that misleadingly says the audio file does not exist), while itk's runtime makes one shorter clip of it:
the run says so before it starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from itk.runtime.protocol import EXIT_BAD_INPUT, FPS, Job, UserError
from itk.runtime.request import MISSING, check_clip_settings, file_problem, image_size
from itk.runtime.sampling import Sampling, plan_clips

COLOUR_DRIFT_S = 60  # colour drifts visibly beyond about a minute (InfiniteTalk README)


def bad_input(message: str, fix: str) -> UserError:
    return UserError(message, fix, EXIT_BAD_INPUT)


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
    """(width, height), once the header passed the generator's pixel limit (`image_size`) and every pixel
    decoded."""
    from PIL import Image, UnidentifiedImageError

    image_size(path)  # before decoding: a decompression bomb is refused from its header
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


def check_file(what: str, path: Path) -> None:
    """UserError (exit 2) naming `what` when `path` is missing or not a readable file."""
    problem = file_problem(path)
    if problem:
        raise bad_input(f"{what} {path} {problem}",
                        "check the path (relative paths: the current folder, then the job file's folder)"
                        if problem == MISSING else "give the image or speech file itself")


def check_picture(job: Job, sampling: Sampling) -> tuple[int, int]:
    """The clip settings (the generator's rule: clip lengths that can make a video) and the job's image or source
    video, opened and decoded: its (width, height). UserError (exit 2) otherwise."""
    check_clip_settings(sampling)
    check_file("the source video" if job.is_video else "the image", job.cond_video)
    return (probe_video if job.is_video else probe_image)(job.cond_video)


def validate(job: Job, sampling: Sampling, *, picture: tuple[int, int] | None = None) -> MediaFacts:
    """Open and decode every input and work out the video it makes; what the runtime will do differently from
    what people expect (short audio, the frame cap) comes back as warnings. Raises UserError (exit 2).
    `picture`: what `check_picture` returned when the caller checked the settings and the picture already."""
    tracks = job.audio_files()  # the official format's silent speaker ("None") has no file
    width, height = picture or check_picture(job, sampling)
    speech = {"person1": "the speech", "person2": "the second speaker's speech"}
    for key, path in tracks.items():
        check_file(speech[key], path)
    audio_s = {k: probe_audio(p) for k, p in tracks.items()}
    if not audio_s:
        raise bad_input("the job has no speech track", '"cond_audio": {"person1": "speech.wav"}')
    for key, seconds in audio_s.items():
        if seconds * FPS < 1:
            raise bad_input(f"audio {tracks[key]} is {seconds * 1000:.0f} ms, shorter than one video frame "
                            f"({1000 // FPS} ms)", "give a recording of the speech to lip-sync")
    frame_num = sampling.frame_num
    # add: the turns follow each other, and a silent speaker ("None") takes a turn as long as the other's
    # track (the official layout), so one real track of two plays for twice its length.
    turns = list(audio_s.values()) * (job.speakers if len(audio_s) == 1 else 1)
    total_s = sum(turns) if job.audio_type == "add" else max(audio_s.values())
    warnings = []
    if total_s * FPS <= frame_num:
        name = next(iter(tracks.values())).name
        warnings.append(
            f"audio {name} is {total_s:.2f} s, shorter than one clip of {frame_num} frames ({frame_num / FPS:.2f} s): "
            "itk's runtime makes one shorter clip as long as the audio (the official script refuses such audio; "
            f"to run it there, pad with silence: ffmpeg -i {name} -af apad=whole_dur="
            f"{math.ceil((frame_num + 1) / FPS)} padded.wav)"
        )
    audio_frames = int(total_s * FPS)
    clips = plan_clips(audio_frames, sampling)  # the generator's own schedule
    cap = sampling.max_frame_num
    if sampling.streaming and audio_frames > cap:
        warnings.append(
            f"the audio is {total_s:.1f} s but the video stops at max_frame_num {cap} frames ({cap / FPS:.1f} s); "
            f"for all of it: --set max_frame_num={audio_frames}"
        )
    if clips.length / FPS > COLOUR_DRIFT_S:
        warnings.append(f"{clips.length / FPS:.0f} s of video: colours may drift after about {COLOUR_DRIFT_S} s")
    return MediaFacts("video" if job.is_video else "image", width, height, audio_s, clips.length, clips.clips,
                      warnings)


# --- a user's own LoRA (`itk run --lora FILE[:SCALE]`) --------------------------------------------------------
DEFAULT_LORA_SCALE = 1.0  # the README's distill-LoRA scale; the official script's default without --lora_scale is 1.2
# Key endings of every LoRA convention the generator merges (official/Kijai, diffusers/PEFT, full deltas);
# the generator maps the module names and checks the shapes against the model.
LORA_KEY_ENDINGS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".diff", ".diff_b")
LORA_FIX = ("a LoRA for Wan2.1 14B is a .safetensors file with keys like "
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight")


@dataclass(frozen=True)
class LoraFile:
    path: Path
    scale: float
    tensors: int  # LoRA-looking tensors in the file

    @property
    def label(self) -> str:
        return f"{self.path.name} x{self.scale:g}"


def parse_lora(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale). The scale is what follows the last colon, unless the whole text names
    an existing file (a file name may hold a colon)."""
    path, sep, tail = text.rpartition(":")
    if not sep or Path(text).expanduser().exists() or "/" in tail or "\\" in tail:
        return Path(text).expanduser().absolute(), DEFAULT_LORA_SCALE
    try:
        scale = float(tail)
    except ValueError:
        raise bad_input(f"--lora {text}: the scale {tail!r} is not a number",
                        f"--lora {path}:0.8 (FILE:SCALE; without :SCALE the scale is {DEFAULT_LORA_SCALE:g})") from None
    if not math.isfinite(scale):
        raise bad_input(f"--lora {text}: the scale must be a finite number", f"--lora {path}:1")
    return Path(path).expanduser().absolute(), scale


def check_lora(path: Path, scale: float) -> LoraFile:
    """A user's LoRA, checked before the model loads: the file exists and is a readable safetensors file with
    LoRA-looking keys. Reads only the header (no torch); the generator checks the shapes against the model."""
    from itk.runtime.safetensors_header import HeaderError, read_header

    if path.is_dir():
        raise bad_input(f"--lora {path} is a folder", "give the LoRA's .safetensors file inside it")
    if not path.is_file():
        raise bad_input(f"--lora {path}: no such file", "check the path (relative paths: the current folder)")
    try:
        header = read_header(path)
    except HeaderError as exc:
        raise bad_input(f"--lora {path} is not a safetensors file: {exc}",
                        "itk loads LoRAs only as .safetensors (a pickled .ckpt/.pt can run code: convert it)") from None
    except OSError as exc:
        raise bad_input(f"--lora {path} cannot be read ({exc.strerror or type(exc).__name__})",
                        "check the file's permissions") from None
    lora_keys = [k for k in header.tensors if k.endswith(LORA_KEY_ENDINGS)]
    if not lora_keys:
        first = ", ".join(list(header.tensors)[:2]) or "none"
        raise bad_input(f"--lora {path} has {len(header.tensors)} tensors but no LoRA keys (first: {first})",
                        LORA_FIX)
    return LoraFile(path, scale, len(lora_keys))
