"""The mp4 writer and the 25 fps reader, checked by reading the files back with PyAV."""

from __future__ import annotations

import threading
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from itk.runtime.video import (
    VideoError,
    VideoFrames,
    frames_at_25fps,
    to_uint8_frames,
    write_mp4,
    write_mp4_stream,
)

SR = 16000


def _frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames whose brightness encodes their index, so a reader's choice of frame is visible."""
    values = (np.arange(count) * 8 % 256).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (count, height, width, 3)).copy()


def _write_source(path, fps: int, count: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        for frame in _frames(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_the_mp4_has_h264_at_25_fps_every_frame_and_aac_cut_to_the_video_length(tmp_path):
    audio = np.sin(np.arange(3 * SR) / SR * 2 * np.pi * 220).astype(np.float32) * 0.3
    out = write_mp4(_frames(30), audio, SR, tmp_path / "talk.mp4")
    assert out == tmp_path / "talk.mp4" and sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4"]
    with av.open(str(out)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert len(container.streams) == 2
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert video.average_rate == Fraction(25)
        assert sum(1 for _ in container.decode(video)) == 30
    with av.open(str(out)) as container:
        sound = container.streams.audio[0]
        assert sound.codec_context.name == "aac" and sound.rate == SR
        samples = sum(f.samples for f in container.decode(sound))
    assert abs(samples / SR - 30 / 25) <= 1024 / SR


def test_frames_survive_the_round_trip_within_codec_error(tmp_path):
    video = torch.linspace(-1, 1, 3 * 5 * 32 * 48).reshape(3, 5, 32, 48)
    out = write_mp4(to_uint8_frames(video), None, SR, tmp_path / "a.mp4", crf=0)
    back = np.stack(list(frames_at_25fps(out)))
    assert back.shape == (5, 32, 48, 3)
    assert np.abs(back.astype(int) - to_uint8_frames(video).astype(int)).mean() < 3


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    with pytest.raises(VideoError, match="even"):
        write_mp4(_frames(3, 47, 64), None, SR, tmp_path / "odd.mp4")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_by_a_complete_one(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"old")
    with pytest.raises(VideoError):
        write_mp4(_frames(0), None, SR, target)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def _encoder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("itk-mp4")]


def test_clips_are_encoded_on_a_worker_thread_that_is_gone_when_the_file_is_written(tmp_path):
    seen = []

    def clips():
        for start in range(0, 12, 4):
            seen.append(_encoder_threads())
            yield _frames(12)[start:start + 4]

    threads = threading.active_count()
    out = write_mp4_stream(tmp_path / "talk.mp4", clips(), count=12, audio=None, sample_rate=SR)
    assert all(seen[1:]) and _encoder_threads() == [] and threading.active_count() == threads
    assert len(list(frames_at_25fps(out))) == 12


class ProducerFailed(Exception):
    pass


@pytest.mark.parametrize("error", [ProducerFailed, KeyboardInterrupt])
def test_an_error_while_making_a_clip_stops_the_encoder_leaving_no_file_and_no_thread(tmp_path, error):
    def clips():
        yield _frames(4)
        raise error("the sampler stopped")

    threads = threading.active_count()
    with pytest.raises(error, match="the sampler stopped"):
        write_mp4_stream(tmp_path / "talk.mp4", clips(), count=8, audio=np.zeros(SR, np.float32), sample_rate=SR)
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == threads


def test_an_error_in_the_encoder_reaches_the_caller_with_its_own_type_leaving_no_file_and_no_thread(tmp_path):
    made = []

    def clips():
        yield _frames(4)
        yield _frames(4).astype(np.float32)  # not rgb24: PyAV refuses it on the encoder's thread
        made.append("after the bad clip")
        yield _frames(4)

    threads = threading.active_count()
    with pytest.raises(ValueError):
        write_mp4_stream(tmp_path / "talk.mp4", clips(), count=12, audio=None, sample_rate=SR)
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == threads
    assert made == ["after the bad clip"]  # found when the next clip is handed on


def test_a_25_fps_source_is_read_frame_for_frame(tmp_path):
    _write_source(tmp_path / "src.mp4", 25, 20)
    frames = list(frames_at_25fps(tmp_path / "src.mp4"))
    assert len(frames) == 20
    assert [int(f[0, 0, 0]) for f in frames] == pytest.approx([int(v) for v in _frames(20)[:, 0, 0, 0]], abs=2)


def test_a_30_fps_source_is_resampled_to_25_fps_by_display_time(tmp_path):
    _write_source(tmp_path / "src30.mp4", 30, 30)  # one second
    frames = list(frames_at_25fps(tmp_path / "src30.mp4"))
    assert len(frames) == 25
    expected = [(i * 30 // 25) * 8 % 256 for i in range(25)]
    assert [int(f[0, 0, 0]) for f in frames] == pytest.approx(expected, abs=2)


def test_indexing_past_the_end_repeats_the_last_frame_and_going_back_rewinds(tmp_path):
    _write_source(tmp_path / "src.mp4", 25, 6)
    frames = VideoFrames(tmp_path / "src.mp4")
    assert int(frames[100][0, 0, 0]) == pytest.approx(5 * 8, abs=2)
    assert int(frames[1][0, 0, 0]) == pytest.approx(8, abs=2)
