"""The clip writer (itk.runtime.clip_writer): finished clips are converted, saved to the resume state and encoded
on a thread of their own while the loop samples the next clip, with the bytes the in-line steps wrote."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from run_media import decoded

from itk.runtime.clip_writer import ClipWriter
from itk.runtime.pipeline import Carry, ClipOutput
from itk.runtime.resume import ResumeState, read_segment
from itk.runtime.video import to_uint8_frames, write_mp4_stream

CLIPS, FRAMES = 3, 6  # three clips of six new frames, 32x32


def clip_outputs() -> list[ClipOutput]:
    """What the pipeline yields: new frames in [-1, 1] on the host and, but for the last clip, a carry."""
    generator = torch.Generator().manual_seed(0)
    outs = []
    for k in range(CLIPS):
        frames = torch.rand(3, FRAMES, 32, 32, generator=generator) * 2 - 1
        carry = None if k == CLIPS - 1 else Carry(
            clip=k + 1, frames=(k + 1) * FRAMES, motion=torch.rand(16, 1, 4, 4, generator=generator),
            color_ref=torch.rand(1, 3, 1, 32, 32, generator=generator), noise=torch.zeros(8, dtype=torch.uint8))
        outs.append(ClipOutput(k, frames, carry))
    return outs


def fresh_state(output: Path) -> ResumeState:
    state = ResumeState.prepare(output, {"job": "test"}, resume=False)
    state.check_plan(CLIPS)
    return state


class HeldState(ResumeState):
    """A resume state whose saves wait for the test's word and say on which thread they ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()
        self.threads: list[str] = []

    def save(self, clip, frames, carry) -> None:
        assert self.go.wait(30)
        self.threads.append(threading.current_thread().name)
        super().save(clip, frames, carry)


def held_state(output: Path) -> HeldState:
    state = HeldState(fresh_state(output).folder, {"job": "test"})
    state.check_plan(CLIPS)
    return state


def test_the_written_video_and_resume_segments_hold_the_frames_the_in_line_steps_wrote(tmp_path):
    outs = clip_outputs()
    expected = [to_uint8_frames(out.frames) for out in outs]
    write_mp4_stream(tmp_path / "in-line.mp4", expected, count=CLIPS * FRAMES, audio=None, sample_rate=16000)
    state = fresh_state(tmp_path / "talk.mp4")
    with ClipWriter(output=tmp_path / "talk.mp4", count=CLIPS * FRAMES, audio=None, sample_rate=16000,
                    state=state) as writer:
        for out in outs:
            writer.put(out)
        assert writer.finish() == tmp_path / "talk.mp4"
    assert np.array_equal(decoded(tmp_path / "talk.mp4"), decoded(tmp_path / "in-line.mp4"))
    for k in range(CLIPS - 1):  # the last clip has no carry: nothing is resumed after it
        assert np.array_equal(read_segment(state.folder / f"clip-{k:05d}.mkv"), expected[k])
    assert state.done == CLIPS - 1 and state.frames == (CLIPS - 1) * FRAMES
    assert torch.equal(ResumeState.load(state.folder).carry().motion, outs[-2].carry.motion)


def test_the_loop_goes_on_while_a_finished_clip_is_still_being_saved(tmp_path):
    state = held_state(tmp_path / "talk.mp4")
    outs = clip_outputs()
    with ClipWriter(output=tmp_path / "talk.mp4", count=CLIPS * FRAMES, audio=None, sample_rate=16000,
                    state=state) as writer:
        writer.put(outs[0])  # returns although clip 0's save is held
        writer.put(outs[1])  # queued behind it
        assert state.done == 0 and not (tmp_path / "talk.mp4").exists()
        state.go.set()
        writer.put(outs[2])
        writer.finish()
    assert state.threads == ["itk-clip-writer"] * 2 and (tmp_path / "talk.mp4").is_file()


def test_a_stopped_run_keeps_every_clip_it_handed_over_and_leaves_no_partial_video(tmp_path):
    state = held_state(tmp_path / "talk.mp4")
    outs = clip_outputs()
    with pytest.raises(KeyboardInterrupt), ClipWriter(output=tmp_path / "talk.mp4", count=CLIPS * FRAMES,
                                                      audio=None, sample_rate=16000, state=state) as writer:
        writer.put(outs[0])
        writer.put(outs[1])
        state.go.set()
        raise KeyboardInterrupt  # Ctrl-C while clip 2 samples
    saved = ResumeState.load(state.folder)
    assert saved.done == 2 and saved.frames == 2 * FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.folder.name]  # no mp4, no temporary file


def test_a_failure_on_the_writer_comes_back_from_the_next_put_with_its_own_type(tmp_path):
    state = fresh_state(tmp_path / "talk.mp4")
    state.folder = tmp_path / "a-file" / "state"  # the state cannot be saved: its parent is a file
    (tmp_path / "a-file").write_text("in the way")
    outs = clip_outputs()
    with pytest.raises(OSError), ClipWriter(output=tmp_path / "talk.mp4", count=CLIPS * FRAMES, audio=None,
                                            sample_rate=16000, state=state) as writer:
        for out in outs:
            writer.put(out)
        writer.finish()
    assert not (tmp_path / "talk.mp4").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]



def test_a_carry_left_by_a_kill_between_the_commit_and_its_removal_goes_at_the_next_save(tmp_path):
    outs = clip_outputs()
    state = fresh_state(tmp_path / "talk.mp4")
    state.save(0, to_uint8_frames(outs[0].frames), outs[0].carry)
    stale = state.folder / "carry-00000.safetensors"  # as a kill after state.json named carry-00001 leaves it
    stale.write_bytes((state.folder / state.carry_file).read_bytes())
    resumed = ResumeState.prepare(tmp_path / "talk.mp4", {"job": "test"}, resume=True)
    resumed.check_plan(CLIPS)
    resumed.save(1, to_uint8_frames(outs[1].frames), outs[1].carry)
    assert sorted(p.name for p in state.folder.glob("carry-*")) == ["carry-00002.safetensors"]
    assert ResumeState.load(state.folder).done == 2
