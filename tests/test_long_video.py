"""Long videos: frames streamed to the mp4 clip by clip (flat host memory), and an interrupted run resumed.

End-to-end runs are real `python -m itk.runtime.generate`-style subprocesses on tiny weights in the official
layout; each reports its own peak RSS, and a SIGKILL lands right after a clip's `clip` event (the event that
follows a committed resume state).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from itk.runtime.protocol import SAMPLE_RATE, parse_event
from itk.runtime.video import write_mp4_stream

FRAME_NUM, MOTION = 9, 5  # each clip after the first adds FRAME_NUM - MOTION = 4 new frames

# Runs the generator's main and reports the peak RSS of the clip loop in KiB: Linux's peak (VmHWM) is reset
# once the models are loaded, so loading's larger peak does not hide the loop's growth.
DRIVER = """
import sys
from pathlib import Path
from itk.runtime import engine
from itk.runtime.generate import main
loaded = engine.Engine.pipeline
def pipeline(*a, **kw):
    made = loaded(*a, **kw)
    Path("/proc/self/clear_refs").write_text("5")
    return made
engine.Engine.pipeline = pipeline
code = main(sys.argv[1:])
peak = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0]
print("ITK-TEST-MAXRSS", peak.split()[1], file=sys.stderr)
sys.exit(code)
"""


# --- the streamed writer against the old whole-video writer ---

def _write_old_way(frames: np.ndarray, audio: np.ndarray, sample_rate: int, path) -> None:
    """The writer before streaming: every frame in memory, the AAC track first, then the video."""
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"crf": "23"}
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        size, pts = stream.codec_context.frame_size or 1024, 0
        samples = audio[: round(len(frames) / 25 * sample_rate)]
        for start in range(0, len(samples), size):
            chunk = np.ascontiguousarray(samples[start:start + size], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, pts, Fraction(1, sample_rate)
            pts += len(chunk)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)


def _decoded(path) -> tuple[np.ndarray, np.ndarray]:
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio


def test_the_streamed_mp4_equals_the_whole_video_writer_frame_by_frame_and_sample_by_sample(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (23, 32, 48, 3), dtype=np.uint8)
    audio = (0.3 * np.sin(np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE * 2 * np.pi * 220)).astype(np.float32)
    _write_old_way(frames, audio, SAMPLE_RATE, tmp_path / "old.mp4")
    chunks = [frames[:9], frames[9:13], frames[13:17], frames[17:21], frames[21:]]
    write_mp4_stream(tmp_path / "new.mp4", iter(chunks), count=len(frames), audio=audio, sample_rate=SAMPLE_RATE)
    (old_v, old_a), (new_v, new_a) = _decoded(tmp_path / "old.mp4"), _decoded(tmp_path / "new.mp4")
    assert old_v.shape == new_v.shape == (23, 32, 48, 3) and np.array_equal(old_v, new_v)
    assert old_a.shape == new_a.shape and np.array_equal(old_a, new_a)


def test_a_stream_that_ends_short_of_its_announced_frames_leaves_no_file(tmp_path):
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(Exception, match="announced"):
        write_mp4_stream(tmp_path / "short.mp4", iter([frames]), count=9, audio=None, sample_rate=SAMPLE_RATE)
    assert list(tmp_path.iterdir()) == []


# --- end to end on tiny weights ---

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    for module in ("dit", "vae", "t5", "clip", "audio"):
        pytest.importorskip(f"itk.runtime.models.{module}")
    from itk.runtime.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


def _wav(path, seconds: float) -> None:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    speech = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes((np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes())


def _job(folder, weights, side: int, seconds: float = 3.0):
    """A square face, speech long enough for 16 clips, and a model config whose one bucket is side x side."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(1).integers(60, 200, (side, side, 3), dtype=np.uint8)).save(
        folder / "face.png")
    _wav(folder / "speech.wav", seconds)
    (folder / "job.json").write_text(json.dumps({
        "prompt": "a person talking", "cond_video": str(folder / "face.png"),
        "cond_audio": {"person1": str(folder / "speech.wav")}}))
    config = json.loads((weights.ckpt_dir / "itk_model_config.json").read_text())
    config["buckets"] = {size: {"1.00": [side, side]} for size in config["buckets"]}
    (folder / "model.json").write_text(json.dumps(config))
    return folder


def _argv(weights, job, *extra: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, "--ckpt_dir", str(weights.ckpt_dir),
            "--wav2vec_dir", str(weights.wav2vec_dir), "--infinitetalk_dir", str(weights.infinitetalk),
            "--model_config", str(job / "model.json"), "--input_json", str(job / "job.json"),
            "--save_file", str(job / "out" / "talk"), "--sample_steps", "2", "--mode", "streaming",
            "--frame_num", str(FRAME_NUM), "--motion_frame", str(MOTION), *extra]


def _generate(argv: list[str], env: dict[str, str] | None = None) -> tuple[list[dict], int]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("ITK-TEST-MAXRSS")]
    return [e for e in map(parse_event, proc.stderr.splitlines()) if e], rss[0] * 1024


def _frames_for(clips: int) -> str:
    return str(FRAME_NUM + (clips - 1) * (FRAME_NUM - MOTION))


# The flat-memory run's geometry: 21-frame clips anchored on 1 motion frame (20 new frames each), so even the
# 4-clip run (81 frames) fills libx264's lookahead (~60 frames held, its own bounded memory: the rise of a
# shorter run would read as growth), and one clip's frames (3.9 MB at 128x128) stand far above the noise.
FLAT_SIDE, FLAT_FRAME_NUM, FLAT_MOTION = 128, 21, 1
# glibc settings for the measured subprocess only (the measurement, not the product): one arena and every
# buffer over 64 KiB mmap'd and returned when freed, so RSS follows live memory, not the allocator's caches.
FLAT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def test_peak_host_memory_stays_flat_from_4_to_16_clips(weights, tmp_path):
    frames = {clips: FLAT_FRAME_NUM + (clips - 1) * (FLAT_FRAME_NUM - FLAT_MOTION) for clips in (4, 16)}
    job = _job(tmp_path / "job", weights, FLAT_SIDE, seconds=frames[16] / 25 + 0.5)
    peaks = {}
    for clips in (4, 16):
        argv = _argv(weights, job, "--frame_num", str(FLAT_FRAME_NUM), "--motion_frame", str(FLAT_MOTION),
                     "--sample_steps", "1", "--max_frame_num", str(frames[clips]))
        events, peaks[clips] = _generate(argv, env={**os.environ, **FLAT_MALLOC})
        assert [e["clips"] for e in events if e["event"] == "clip"][-1] == clips
    one_clip = 3 * FLAT_FRAME_NUM * FLAT_SIDE * FLAT_SIDE * 4  # one clip's decoded float32 frames
    assert peaks[16] - peaks[4] < one_clip, (peaks, one_clip)


def test_clip_events_count_clips_done_and_seconds_of_video_written_after_a_start_naming_the_attention(weights,
                                                                                                      tmp_path):
    job = _job(tmp_path / "job", weights, 32, seconds=1.0)
    events, _ = _generate(_argv(weights, job))
    clips = [e for e in events if e["event"] == "clip"]
    start = next(e for e in events if e.get("stage") == "generate")
    assert (start["clips"], start["attention"]) == (len(clips), "sdpa")  # no other kernel runs on a CPU
    assert [e["clips_done"] for e in clips] == list(range(len(clips)))
    assert [e["video_s"] for e in clips] == [0.0] + [(FRAME_NUM + k * (FRAME_NUM - MOTION)) / 25
                                                     for k in range(len(clips) - 1)]


def _kill_after_clip(argv: list[str], done: int, output) -> None:
    """Start the run, SIGKILL it once the state of `done` clips is committed; no mp4 under the final name. The
    clip event comes when clip `done` is sampled; its save (on the writer's thread) commits a moment later."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    record = Path(f"{output}.itk-resume") / "state.json"
    try:
        for line in proc.stderr:
            event = parse_event(line)
            assert not output.exists()
            if event and event["event"] == "clip" and event["clips_done"] == done:
                deadline = time.monotonic() + 60
                while not (record.is_file() and json.loads(record.read_text())["clips_done"] == done):
                    assert time.monotonic() < deadline, "the state of the finished clips was never committed"
                    time.sleep(0.01)
                os.kill(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail("the run ended before the clip to kill it after")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not output.exists()


def test_a_run_killed_after_clip_3_resumes_there_and_writes_the_identical_video(weights, tmp_path):
    job = _job(tmp_path / "job", weights, 32)
    output, state = job / "out" / "talk.mp4", job / "out" / "talk.mp4.itk-resume"
    argv = _argv(weights, job, "--max_frame_num", _frames_for(6))
    _generate(argv)
    whole = _decoded(output)
    output.unlink()
    assert not state.exists()

    _kill_after_clip(argv, 3, output)
    saved = json.loads((state / "state.json").read_text())
    assert (saved["clips"], saved["clips_done"]) == (6, 3)

    events, _ = _generate([*argv, "--resume"])
    resumed = [e for e in events if e["event"] == "stage" and e["stage"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["from_clip"] == 4
    assert [e["clip"] for e in events if e["event"] == "clip"] == [4, 5, 6]
    frames, audio = _decoded(output)
    assert np.array_equal(frames, whole[0]) and np.array_equal(audio, whole[1])
    assert not state.exists() and sorted(p.name for p in output.parent.iterdir()) == ["talk.mp4"]


def test_resume_refuses_a_changed_job_naming_what_changed(weights, tmp_path):
    job = _job(tmp_path / "job", weights, 32)
    output = job / "out" / "talk.mp4"
    argv = _argv(weights, job, "--max_frame_num", _frames_for(4))
    _kill_after_clip(argv, 1, output)
    _wav(job / "speech.wav", 3.5)
    proc = subprocess.run([*argv, "--resume", "--sample_steps", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")][0]
    assert "cannot resume" in line and "input person1" in line and "setting steps" in line
    assert (job / "out" / "talk.mp4.itk-resume" / "state.json").is_file() and not output.exists()


def test_without_resume_an_old_state_folder_is_replaced_and_removed_on_success(weights, tmp_path):
    job = _job(tmp_path / "job", weights, 32)
    output = job / "out" / "talk.mp4"
    argv = _argv(weights, job, "--max_frame_num", _frames_for(4))
    _kill_after_clip(argv, 2, output)
    events, _ = _generate(argv)
    assert not any(e["event"] == "stage" and e["stage"] == "resume" for e in events)
    assert [e["clip"] for e in events if e["event"] == "clip"] == [1, 2, 3, 4]
    assert sorted(p.name for p in output.parent.iterdir()) == ["talk.mp4"]


# --- a damaged state is named with its fix, never trusted (issue 31, item 5) ------------------------------------
# One interrupted run (2 of 4 clips saved) is made once; each test restores its state folder and damages it.

@pytest.fixture(scope="module")
def interrupted(weights, tmp_path_factory):
    job = _job(tmp_path_factory.mktemp("interrupted") / "job", weights, 32)
    output, state = job / "out" / "talk.mp4", job / "out" / "talk.mp4.itk-resume"
    argv = _argv(weights, job, "--max_frame_num", _frames_for(4))
    _kill_after_clip(argv, 2, output)
    pristine = job / "pristine-state"
    shutil.copytree(state, pristine)
    return argv, output, state, pristine


@pytest.fixture
def saved(interrupted):
    """(argv, output, state folder): the interrupted run's state as it was saved."""
    argv, output, state, pristine = interrupted
    if state.is_symlink() or state.is_file():
        state.unlink()
    elif state.exists():
        shutil.rmtree(state)
    shutil.copytree(pristine, state)
    output.unlink(missing_ok=True)
    return argv, output, state


def _refused_resume(argv: list[str], state, *words: str) -> str:
    """The resumed run stops before any model loads: exit 2, one `error:` line naming the damaged file, and a
    fix that says how to start over (`itk run ... --restart`, or the folder to delete)."""
    proc = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    events = [e for e in map(parse_event, proc.stderr.splitlines()) if e]
    assert not any(e["event"] == "stage" and e["stage"] == "load_models" for e in events)
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")][0]
    for word in ("cannot resume", "--restart", str(state), *words):
        assert word in line, line
    return line


def test_a_swapped_segment_is_refused_on_resume_naming_it(saved):
    argv, output, state = saved
    first, second = state / "clip-00000.mkv", state / "clip-00001.mkv"
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    _refused_resume(argv, state, "clip-00000.mkv", "changed since it was saved")
    assert not output.exists()


def test_a_segment_with_its_frames_flipped_is_refused_on_resume_naming_it(saved):
    from itk.runtime.resume import read_segment, write_segment

    argv, output, state = saved
    segment = state / "clip-00001.mkv"
    write_segment(segment, read_segment(segment)[:, ::-1].copy())  # a valid FFV1 file, upside down
    _refused_resume(argv, state, "clip-00001.mkv", "changed since it was saved")


def test_a_truncated_carry_is_refused_on_resume_naming_it(saved):
    argv, _, state = saved
    carry = state / json.loads((state / "state.json").read_text())["carry"]
    carry.write_bytes(carry.read_bytes()[:100])
    _refused_resume(argv, state, carry.name)


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute"])
def test_a_carry_path_outside_the_state_folder_is_neither_loaded_nor_deleted(saved, where):
    argv, _, state = saved
    outside = state.parent / "outside.safetensors"
    shutil.copy(state / json.loads((state / "state.json").read_text())["carry"], outside)
    record = json.loads((state / "state.json").read_text())
    record["carry"] = str(outside) if where == "absolute" else where
    (state / "state.json").write_text(json.dumps(record))
    _refused_resume(argv, state, "state.json", "carry")
    assert outside.is_file()
    events, _ = _generate(argv)  # starting over (itk run --restart: no --resume) removes only the state folder
    assert events[-1]["event"] == "done" and outside.is_file() and not state.exists()


@pytest.mark.parametrize("damage", ["truncated", "clips_done is text", "a segment is missing"])
def test_an_edited_or_truncated_state_is_refused_with_how_to_start_over(saved, damage):
    argv, output, state = saved
    record = state / "state.json"
    if damage == "truncated":
        record.write_text(record.read_text()[:40])
    elif damage == "clips_done is text":
        record.write_text(record.read_text().replace('"clips_done": 2', '"clips_done": "2"'))
    else:
        (state / "clip-00001.mkv").unlink()
    _refused_resume(argv, state, "state.json" if damage != "a segment is missing" else "clip-00001.mkv")
    events, _ = _generate(argv)  # and the way out it names works
    assert events[-1]["event"] == "done" and output.is_file() and not state.exists()


def test_a_state_folder_replaced_by_a_link_is_unlinked_on_a_fresh_start_and_its_target_kept(saved, tmp_path):
    argv, output, state = saved
    elsewhere = tmp_path / "elsewhere"
    shutil.move(state, elsewhere)
    state.symlink_to(elsewhere, target_is_directory=True)
    events, _ = _generate(argv)
    assert events[-1]["event"] == "done" and not state.exists() and not state.is_symlink()
    assert (elsewhere / "state.json").is_file()


def test_a_same_size_edit_of_the_speech_is_refused_on_resume_by_its_modification_time(saved):
    argv, output, state = saved
    speech = next(p for p in state.parent.parent.iterdir() if p.name == "speech.wav")
    original, stat = speech.read_bytes(), speech.stat()
    edited = bytearray(original)
    edited[1000:2000] = bytes(1000)  # 500 samples of silence: the same size, other words
    try:
        speech.write_bytes(bytes(edited))
        os.utime(speech, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited a second later
        assert speech.stat().st_size == stat.st_size
        proc = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = [x for x in proc.stderr.splitlines() if x.startswith("error:")][0]
        assert "changed since the interrupted run: input person1" in line and "--restart" in line
    finally:
        speech.write_bytes(original)
        os.utime(speech, ns=(stat.st_atime_ns, stat.st_mtime_ns))
