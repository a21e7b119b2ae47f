"""Finished clips written beside the next clip's sampling.

The GPU loop hands each finished clip to `ClipWriter.put` and goes on with the next one. One writer thread
takes the clips in order and does everything the next clip does not need: the uint8 conversion, the dubbing
composite, the clip's resume segment and carry (the commit point of `ResumeState.save`), and the hand-off to
the mp4 encoder (its own thread, runtime/video.py). The bytes on disk are the ones the same steps write in
line: the same functions on the same frames in the same order.

At most two clips wait on the host (the one being written and one queued), so a long video still holds one
clip at a time on the GPU and two on the host. A clip handed over is saved even when the run stops (Ctrl-C,
SIGTERM, a cancelled job, an error in the loop): the writer saves whatever it already holds before the mp4 is
abandoned, so a resume redoes no clip that had finished. An error on the writer (a full disk) comes back
from the next `put` or from `finish`, with its own type.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itk.runtime.video import to_uint8_frames, write_mp4_stream

if TYPE_CHECKING:
    from itk.runtime.dub import Dubber
    from itk.runtime.pipeline import ClipOutput
    from itk.runtime.resume import ResumeState

POLL_S = 0.2  # how often a blocked put looks whether the writer is still alive


class _End:
    """The queue's marker for 'no more clips': `finished` says whether the video is complete."""

    def __init__(self, finished: bool) -> None:
        self.finished = finished


class Abandoned(Exception):
    """Raised inside the writer's frame stream when the run stopped: the partial mp4 is removed."""


class ClipWriter:
    """The writer thread of one video (see the module docstring). Use as a context manager: leaving the block
    without `finish` (an exception, Ctrl-C) saves the clips already handed over and abandons the mp4."""

    def __init__(self, *, output: Path, count: int, audio: np.ndarray | None, sample_rate: int,
                 state: ResumeState, dubber: Dubber | None = None) -> None:
        self.output, self.count, self.audio, self.sample_rate = output, count, audio, sample_rate
        self.state, self.dubber = state, dubber
        self._clips: queue.Queue[ClipOutput | _End] = queue.Queue(maxsize=1)
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="itk-clip-writer", daemon=True)
        self._thread.start()

    # -- the loop's side -------------------------------------------------------------------------------------
    def put(self, clip: ClipOutput) -> None:
        """Hand over a finished clip (its frames on the host); blocks while one clip already waits."""
        if clip.carry is not None:  # the carry goes to disk from the writer: bring it to the host here, in order
            carry = clip.carry
            clip = dataclasses.replace(clip, carry=dataclasses.replace(
                carry, motion=carry.motion.detach().cpu(), color_ref=carry.color_ref.detach().cpu(),
                noise=carry.noise.detach().cpu()))
        self._offer(clip)

    def finish(self) -> Path:
        """Wait until every clip is written and the mp4 is complete; returns its path."""
        self._offer(_End(finished=True))
        self._thread.join()
        self._raise()
        assert self._result is not None
        return self._result

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread.is_alive():
            self._put_end_now()
            self._thread.join()

    def _offer(self, item: ClipOutput | _End) -> None:
        while True:
            self._raise()
            if not self._thread.is_alive():
                raise RuntimeError("the clip writer stopped without an error")
            try:
                self._clips.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _put_end_now(self) -> None:
        """The stop marker behind any clip still queued (that clip is saved first); never blocks for long."""
        while self._thread.is_alive():
            try:
                self._clips.put(_End(finished=False), timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writer thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._result = write_mp4_stream(self.output, self._frames(), count=self.count, audio=self.audio,
                                            sample_rate=self.sample_rate)
        except Abandoned:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the loop's thread, raised there by put or finish
            self._error = exc

    def _frames(self) -> Iterator[np.ndarray]:
        """The saved clips first (a resumed run), then each handed-over clip: uint8, composited when dubbing,
        saved to the resume state before the encoder gets it."""
        written = 0
        for frames in self.state.replay():
            written += len(frames)
            yield frames
        while True:
            item = self._clips.get()
            if isinstance(item, _End):
                if not item.finished:
                    raise Abandoned
                return
            frames = self._write(item, written)
            written += len(frames)
            yield frames

    def _write(self, clip: ClipOutput, start: int) -> np.ndarray:
        frames = to_uint8_frames(clip.frames)
        if self.dubber is not None:
            frames = self.dubber.apply(frames, start=start)
        if clip.carry is not None:
            self.state.save(clip.index, frames, clip.carry)
        return frames
