"""Reading source videos at 25 fps and writing the finished mp4 (H.264 + AAC) with PyAV.

PyAV was chosen over imageio-ffmpeg because it bundles the ffmpeg libraries inside the wheel and gives
direct access to streams, timestamps and encoders: no external ffmpeg binary, no temp wav, no shelling out.
The official script writes the video, then crops the audio and muxes with two ffmpeg calls; here one
encoder pass writes both streams into a temporary file beside the target, which is renamed only when
complete, so an interrupted run never leaves a partial mp4 under the final name. Frames arrive in chunks
(one clip's new frames at a time) and go to the encoder at once: memory stays flat in the length.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np

from itk.runtime.atomic import atomic_write
from itk.runtime.protocol import FPS

PARTIAL_SUFFIX = ".partial.mp4"  # the temporary name's end: the muxer picks the format from it


class VideoError(Exception):
    """A video that cannot be read or written; the message names the file."""


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


class _Encoder:
    """The mp4 being written, on a worker thread of its own: encoding a clip overlaps making the next.

    PyAV releases the GIL while libx264 encodes. Every PyAV call runs on the one worker, in order (open,
    audio, clips, flush, close), so the container is never touched by two threads. `send` first waits for
    the previous clip, so at most two clips' frames are alive: the one encoding and the one just made. An
    error on the worker comes back, with its own type, from the next `send` or `finish`; leaving the
    `with` block (normally, on any error, on Ctrl-C) closes the container and joins the worker.
    """

    def __init__(self, tmp: Path, width: int, height: int, crf: int, audio: np.ndarray | None,
                 sample_rate: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="itk-mp4")
        self._container = self._stream = None
        self._last: Future[None] = self._pool.submit(self._open, tmp, width, height, crf, audio, sample_rate)

    def _open(self, tmp: Path, width: int, height: int, crf: int, audio: np.ndarray | None,
              sample_rate: int) -> None:
        import av

        self._container = av.open(str(tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=FPS)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf)}
        if audio is not None:
            _encode_audio(self._container, audio, sample_rate)

    def _encode(self, frames: np.ndarray | None) -> None:
        import av

        images = [None] if frames is None else (av.VideoFrame.from_ndarray(f, format="rgb24") for f in frames)
        for image in images:
            for packet in self._stream.encode(image):
                self._container.mux(packet)

    def _close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.close()

    def send(self, frames: np.ndarray | None) -> None:
        """Queue a clip (None: flush) once the previous one is encoded."""
        self._last.result()
        self._last = self._pool.submit(self._encode, frames)

    def finish(self) -> None:
        """Flush the encoder and close the file: complete once this returns."""
        self.send(None)
        self._last.result()
        self._pool.submit(self._close).result()

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.submit(self._abort)  # after whatever the worker still has to do; a no-op once finished
        self._pool.shutdown(wait=True)

    def _abort(self) -> None:
        with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
            self._close()


def write_mp4_stream(
    path: str | Path, chunks: Iterable[np.ndarray], *, count: int, audio: np.ndarray | None, sample_rate: int,
    crf: int = 23,
) -> Path:
    """Write `count` frames arriving as [N, H, W, 3] uint8 chunks at 25 fps (libx264, yuv420p) plus mono
    audio as AAC, atomically: the file appears under `path` only when the last chunk is encoded.

    Each chunk is encoded as it arrives, on a worker thread while the caller makes the next one (see
    `_Encoder`), so the caller never holds the whole video. The first chunk gives the frame size; the audio,
    cut to the video's duration (count/25 s), is muxed right after it, exactly as the whole-video writer
    did, so a streamed file holds the same streams as one written at the end.
    """
    path = Path(path)

    def encode(tmp: Path) -> None:
        pending = iter(chunks)
        first = next(pending, None)
        height, width = (0, 0) if first is None else first.shape[1:3]
        if count < 1 or first is None or height % 2 or width % 2:
            raise VideoError(f"{path}: cannot encode {count} frames of {width}x{height} (yuv420p needs even sides)")
        cut = None if audio is None else audio[: round(count / FPS * sample_rate)]
        written = 0
        with _Encoder(tmp, width, height, crf, cut, sample_rate) as encoder:
            clips, first = itertools.chain([first], pending), None  # keep no reference to the first clip
            for chunk in clips:
                written += len(chunk)
                if written > count:
                    raise VideoError(f"{path}: more than the {count} frames announced")
                encoder.send(chunk)
            if written != count:
                raise VideoError(f"{path}: {written} frames written, {count} announced")
            encoder.finish()

    return atomic_write(path, encode, suffix=PARTIAL_SUFFIX)


def write_mp4(
    frames: np.ndarray, audio: np.ndarray | None, sample_rate: int, path: str | Path, crf: int = 23
) -> Path:
    """Write [T, H, W, 3] uint8 frames at 25 fps plus mono audio as AAC, atomically (see write_mp4_stream)."""
    return write_mp4_stream(path, [frames], count=len(frames), audio=audio, sample_rate=sample_rate, crf=crf)


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
    indexes the source as if it were 25 fps, which puts a 30 fps source's lips out of step with its audio;
    resampling keeps them in step.
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
