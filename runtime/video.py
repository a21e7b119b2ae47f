"""Reading source videos at 25 fps and writing the finished mp4 (H.264 + AAC) with PyAV.

PyAV was chosen over imageio-ffmpeg because it bundles the ffmpeg libraries inside the wheel and gives
direct access to streams, timestamps and encoders: no external ffmpeg binary, no temp wav, no shelling out.
The official script writes the video, then crops the audio and muxes with two ffmpeg calls (runtime-spec
§5.8); here one encoder pass writes both streams into a temporary file beside the target, which is renamed
only when complete, so an interrupted run never leaves a partial mp4 under the final name. Frames arrive
in chunks (one clip's new frames at a time) and go to the encoder at once: memory stays flat in the length.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from itk.atomic import atomic_write
from itk.runtime.protocol import FPS, VIDEO_EXTENSIONS

PARTIAL_SUFFIX = ".partial.mp4"  # the temporary name's end: the muxer picks the format from it


class VideoError(Exception):
    """A video that cannot be read or written; the message names the file."""


def is_video(path: str | Path) -> bool:
    """The official rule: a `cond_video` is a video by its extension, anything else is an image."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def to_uint8_frames(video) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8, truncating like the official writer."""
    frames = ((video.float().cpu() + 1) / 2).permute(1, 2, 3, 0).numpy()
    return np.clip(frames * 255, 0, 255).astype(np.uint8)


def _encode_audio(container, samples: np.ndarray, sample_rate: int) -> None:
    import av

    stream = container.add_stream("aac", rate=sample_rate)
    stream.layout = "mono"
    ctx = stream.codec_context
    size = ctx.frame_size or 1024
    pts = 0
    for start in range(0, len(samples), size):
        chunk = np.ascontiguousarray(samples[start:start + size], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = pts
        frame.time_base = Fraction(1, sample_rate)
        pts += len(chunk)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_mp4_stream(
    path: str | Path, chunks: Iterable[np.ndarray], count: int, audio: np.ndarray | None, sample_rate: int,
    crf: int = 23,
) -> Path:
    """Write `count` frames arriving as [N, H, W, 3] uint8 chunks at 25 fps (libx264, yuv420p) plus mono
    audio as AAC, atomically: the file appears under `path` only when the last chunk is encoded.

    Each chunk is encoded as it arrives, so the caller never holds the whole video. The first chunk gives
    the frame size; the audio, cut to the video's duration (count/25 s), is muxed right after it, exactly
    as the whole-video writer did, so a streamed file holds the same streams as one written at the end.
    """
    import av

    path = Path(path)

    def encode(tmp: Path) -> None:
        pending = iter(chunks)
        first = next(pending, None)
        height, width = (0, 0) if first is None else first.shape[1:3]
        if count < 1 or first is None or height % 2 or width % 2:
            raise VideoError(f"{path}: cannot encode {count} frames of {width}x{height} (yuv420p needs even sides)")
        written = 0
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            if audio is not None:
                _encode_audio(container, audio[: round(count / FPS * sample_rate)], sample_rate)
            for chunk in itertools.chain([first], pending):
                written += len(chunk)
                if written > count:
                    raise VideoError(f"{path}: more than the {count} frames announced")
                for frame in chunk:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
            if written != count:
                raise VideoError(f"{path}: {written} frames written, {count} announced")
            for packet in stream.encode(None):
                container.mux(packet)

    return atomic_write(path, encode, suffix=PARTIAL_SUFFIX)


def write_mp4(
    frames: np.ndarray, audio: np.ndarray | None, sample_rate: int, path: str | Path, crf: int = 23
) -> Path:
    """Write [T, H, W, 3] uint8 frames at 25 fps plus mono audio as AAC, atomically (see write_mp4_stream)."""
    return write_mp4_stream(path, [frames], len(frames), audio, sample_rate, crf)


def stale_partials(path: str | Path) -> list[Path]:
    """Temporary files an earlier, killed writer of `path` left beside it (SIGKILL skips the clean-up)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"))


def _decoded(path: Path) -> Iterator[tuple[float, np.ndarray]]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                yield float(frame.time or 0.0), frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: cannot decode video ({exc})") from exc


def frames_at_25fps(path: str | Path) -> Iterator[np.ndarray]:
    """Frames [H, W, 3] uint8 sampled at 25 fps: frame i is the source frame on screen at time i/25.

    A 25 fps source yields every frame as it is; 30 fps drops some, 15 fps repeats some. The official code
    indexes the source as if it were 25 fps (runtime-spec §9 #10); resampling keeps lips and audio in step.
    """
    previous: tuple[float, np.ndarray] | None = None
    index, start, step = 0, None, 1.0 / FPS
    for time, frame in _decoded(Path(path)):
        start = time if start is None else start
        time -= start
        if previous is not None:
            step = time - previous[0] or step
        while previous is not None and index / FPS < time - 1e-6:
            yield previous[1]
            index += 1
        previous = (time, frame)
    if previous is None:
        raise VideoError(f"{path}: has no frames")
    # The last frame stays on screen for one source frame interval.
    end = previous[0] + step
    while index == 0 or index / FPS < end - 1e-6:
        yield previous[1]
        index += 1


class VideoFrames:
    """Random access by 25 fps index, decoding forward only as far as needed; past the end the last frame."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self._iter = frames_at_25fps(self.path)
        self._index = -1
        self._frame: np.ndarray | None = None

    def __getitem__(self, index: int) -> np.ndarray:
        if index < self._index:
            self._reset()
        while self._index < index:
            frame = next(self._iter, None)
            if frame is None:
                break
            self._frame, self._index = frame, self._index + 1
        assert self._frame is not None
        return self._frame
