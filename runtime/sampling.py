"""How a video is sampled, as one frozen object from the flags to the sampler, and the facts derived from it.

`Sampling.from_flags` is the one place the sampling flags get their defaults (40 steps, the shift of the size
bucket, the guidance scales of the flag table); `passes_per_step` is the one rule for which DiT passes a step
runs. The toolkit builds the same object from a preset's settings to count steps and passes for its plans and
estimates, and the generator hands it to the pipeline and the sampler. Torch-free: `itk run --dry-run` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from itk.runtime.protocol import DEFAULT_SHIFT, DEFAULT_STEPS, FLAG

PASSES_THREE = ("cond", "drop_text", "uncond")
PASSES_TWO = ("cond", "drop_audio")
PASSES_ONE = ("cond",)


def drops_text_pass(text_scale: float) -> bool:
    """The official switch: a text scale of exactly 1 (math.isclose) drops the text guidance pass."""
    return math.isclose(text_scale, 1.0)


def passes_per_step(text_scale: float, audio_scale: float) -> tuple[str, ...]:
    """The DiT calls of one denoising step, by name. Three (cond, drop_text, uncond) by default; two (cond,
    drop_audio) when the text scale is 1, as officially; one (cond) when the audio scale is 1 too, since the
    guided velocity is then `cond` itself (the official code still runs drop_audio and throws it away)."""
    if not drops_text_pass(text_scale):
        return PASSES_THREE
    return PASSES_ONE if math.isclose(audio_scale, 1.0) else PASSES_TWO


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How each clip is sampled and joined: the official flags' values with their defaults filled in (the
    defaults are the flag table's, so `Sampling()` equals `Sampling.from_flags({})`).

    seed: a negative seed asks the generator to draw one (`Request` does, once per run)."""

    frame_num: int = FLAG["frame_num"].default
    motion_frame: int = FLAG["motion_frame"].default
    max_frame_num: int = FLAG["max_frame_num"].default
    streaming: bool = FLAG["mode"].default == "streaming"
    steps: int = DEFAULT_STEPS
    shift: float = DEFAULT_SHIFT[FLAG["size"].default]
    text_scale: float = FLAG["sample_text_guide_scale"].default
    audio_scale: float = FLAG["sample_audio_guide_scale"].default
    use_apg: bool = FLAG["use_apg"].default
    apg_momentum: float = FLAG["apg_momentum"].default
    apg_norm_threshold: float = FLAG["apg_norm_threshold"].default
    color_correction_strength: float = FLAG["color_correction_strength"].default
    seed: int = FLAG["base_seed"].default
    use_teacache: bool = FLAG["use_teacache"].default
    teacache_thresh: float = FLAG["teacache_thresh"].default

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> Sampling:
        """The sampling of these flag values (by the official names; a missing one takes the flag table's
        default): the generator's parsed flags, or a preset's settings with `itk run --set` on top."""

        def get(name: str) -> Any:
            value = values.get(name)
            return FLAG[name].default if value is None else value

        streaming = get("mode") == "streaming"
        return cls(
            frame_num=get("frame_num"), motion_frame=get("motion_frame"),
            # the official script's rule: clip mode makes one clip, so its video is frame_num frames at most
            max_frame_num=get("max_frame_num") if streaming else get("frame_num"), streaming=streaming,
            steps=get("sample_steps") or DEFAULT_STEPS, shift=get("sample_shift") or DEFAULT_SHIFT[get("size")],
            text_scale=float(get("sample_text_guide_scale")), audio_scale=float(get("sample_audio_guide_scale")),
            use_apg=bool(get("use_apg")), apg_momentum=get("apg_momentum"),
            apg_norm_threshold=get("apg_norm_threshold"), color_correction_strength=get("color_correction_strength"),
            seed=get("base_seed"), use_teacache=bool(get("use_teacache")), teacache_thresh=get("teacache_thresh"),
        )

    @property
    def passes(self) -> tuple[str, ...]:
        """The DiT calls of every step (`passes_per_step` of the guidance scales)."""
        return passes_per_step(self.text_scale, self.audio_scale)

    @property
    def drops_text_pass(self) -> bool:
        """A text scale of 1: the step runs no text guidance pass (`drops_text_pass`)."""
        return drops_text_pass(self.text_scale)


@dataclass(frozen=True)
class ClipPlan:
    """Where each clip starts in the audio, how long clips are, and the final length of the video."""

    frames: int
    starts: tuple[int, ...]
    pad: int  # mirrored frames appended to the audio embedding before the last clip (0: none)
    length: int  # frames of the finished video

    @property
    def clips(self) -> int:
        return len(self.starts)


def plan_clips(audio_frames: int, s: Sampling) -> ClipPlan:
    """The official clip schedule: clips of `frame_num` frames, each later one starting `frame_num -
    motion_frame` frames after the one before, until the audio (or `max_frame_num`) is covered; the last
    clip's audio is mirror-padded past the audio's end. Outside streaming mode one clip.

    The official code refuses audio of <= frame_num frames. Here such a talk becomes ONE shorter clip of
    the smallest 4n+1 frames covering the audio (the DiT needs 4n+1), its embedding mirror-padded by the
    official rule, and the video is cut to the audio's length: no wasted frames, no frozen tail.
    """
    if audio_frames < 1:
        raise ValueError("the audio is shorter than one video frame (40 ms)")
    frames = s.frame_num
    if audio_frames <= s.frame_num:
        frames = 4 * math.ceil((audio_frames - 1) / 4) + 1
        return ClipPlan(frames, (0,), frames - audio_frames + 3 if frames >= audio_frames else 0, audio_frames)
    if not s.streaming or s.max_frame_num <= s.frame_num:
        return ClipPlan(frames, (0,), 0, min(s.frame_num, s.max_frame_num))
    starts, start, pad = [0], 0, 0
    limit = min(s.max_frame_num, audio_frames)
    while True:
        start += frames - s.motion_frame
        starts.append(start)
        end = start + frames
        if end >= limit:
            pad = end - audio_frames + 3 if end >= audio_frames else 0
            break
    total = frames + (len(starts) - 1) * (frames - s.motion_frame)
    length = min(total, s.max_frame_num)
    if pad:
        length = min(length, audio_frames)
    return ClipPlan(frames, tuple(starts), pad, length)
