"""`python -m itk.runtime.generate`: flags, input JSON and the bad-input contract (exit 2, one line, no file).

The end-to-end run on tiny weights in the official layout is in test_selftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest
from PIL import Image

from itk.runtime.generate import main
from itk.runtime.protocol import EVENT_PREFIX as PREFIX
from itk.runtime.protocol import parse_event as parse
from itk.supervisor import Outcome


def _wav(path, samples: np.ndarray, sr: int = 16000) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture
def job(tmp_path):
    """A valid job folder: a small portrait, one second of tone-like speech, and its input JSON."""
    Image.fromarray(np.full((60, 44, 3), 120, np.uint8)).save(tmp_path / "face.png")
    t = np.arange(16000) / 16000
    _wav(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2)
    data = {"prompt": "a person talking", "cond_video": str(tmp_path / "face.png"),
            "cond_audio": {"person1": str(tmp_path / "speech.wav")}}
    (tmp_path / "job.json").write_text(json.dumps(data))
    return tmp_path, data


def _run(tmp_path, *extra: str) -> list[str]:
    return ["--ckpt_dir", str(tmp_path / "nowhere"), "--wav2vec_dir", str(tmp_path / "nowhere"),
            "--infinitetalk_dir", str(tmp_path / "nowhere" / "infinitetalk.safetensors"),
            "--input_json", str(tmp_path / "job.json"), "--save_file", str(tmp_path / "out" / "talk"), *extra]


def _fails(capsys, argv, code: int, *words: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.splitlines()
    plain = [line for line in err if not line.startswith(PREFIX)]
    events = [parse(line) for line in err if line.startswith(PREFIX)]
    assert len(plain) == 1, err
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == code
    for word in words:
        assert word in plain[0]
    return plain[0]


def _no_output(tmp_path) -> None:
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_missing_image_is_a_one_line_error_naming_it(job, capsys):
    tmp_path, data = job
    data["cond_video"] = str(tmp_path / "gone.png")
    (tmp_path / "job.json").write_text(json.dumps(data))
    _fails(capsys, _run(tmp_path), 2, "gone.png", "does not exist")
    _no_output(tmp_path)


def test_a_missing_input_json_is_a_one_line_error(job, capsys):
    tmp_path, _ = job
    (tmp_path / "job.json").unlink()
    _fails(capsys, _run(tmp_path), 2, "job.json", "does not exist")


def test_an_image_that_does_not_decode_is_a_one_line_error(job, capsys):
    tmp_path, _ = job
    (tmp_path / "face.png").write_bytes(b"this is not a png")
    _fails(capsys, _run(tmp_path), 2, "face.png", "cannot read")
    _no_output(tmp_path)


def test_a_non_audio_file_as_audio_is_a_one_line_error(job, capsys):
    tmp_path, _ = job
    (tmp_path / "speech.wav").write_bytes(b"RIFF....garbage" * 10)
    _fails(capsys, _run(tmp_path), 2, "speech.wav", "cannot read audio")
    _no_output(tmp_path)


def test_silent_audio_is_a_one_line_error(job, capsys):
    tmp_path, _ = job
    _wav(tmp_path / "speech.wav", np.zeros(16000))
    _fails(capsys, _run(tmp_path), 2, "speech.wav", "silent")
    _no_output(tmp_path)


def test_a_json_without_cond_audio_is_a_one_line_error(job, capsys):
    tmp_path, data = job
    del data["cond_audio"]
    (tmp_path / "job.json").write_text(json.dumps(data))
    _fails(capsys, _run(tmp_path), 2, "cond_audio", "person1")


def test_an_official_flag_we_do_not_implement_is_refused_by_name(job, capsys):
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--dit_path", "x.pth"), 2, "--dit_path", "not supported yet")
    _fails(capsys, _run(tmp_path, "--scene_seg"), 2, "--scene_seg", "not supported yet")


def test_quant_without_its_file_is_refused_naming_quant_dir(job, capsys):
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--quant", "fp8"), 2, "--quant_dir")
    _fails(capsys, _run(tmp_path, "--quant", "int8", "--quant_dir", "x"), 2, "int8", "not supported yet")


@pytest.mark.parametrize(("value", "words"), [("0", "a whole number of at least 1"), ("two", "a whole number")])
def test_a_bad_itk_environment_switch_is_one_line_naming_it(job, capsys, monkeypatch, value, words):
    tmp_path, _ = job
    monkeypatch.setenv("ITK_COMPILE_THREADS", value)
    _fails(capsys, _run(tmp_path), 2, f"ITK_COMPILE_THREADS={value}: expected {words}", "unset ITK_COMPILE_THREADS")


def test_a_frame_num_that_is_not_4n_plus_1_is_refused(job, capsys):
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--frame_num", "80"), 2, "4n+1")


def test_an_unknown_flag_is_a_one_line_usage_error(job, capsys):
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--no_such_flag"), 2, "--no_such_flag")


@pytest.mark.parametrize(("layout", "words"), [
    ("2x1", ("--gpu_layout 2x1 is a layout of 2 GPUs, but this run has 1 process (WORLD_SIZE)",)),
    ("two", ("--gpu_layout two: expected GROUPSxSP",)),
])
def test_a_gpu_layout_this_launch_cannot_run_is_refused_before_loading(job, capsys, monkeypatch, layout, words):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--gpu_layout", layout), 2, *words)
    _no_output(tmp_path)


def test_missing_weights_exit_3_naming_the_file(job, capsys):
    tmp_path, _ = job
    pytest.importorskip("itk.runtime.models.audio")
    _fails(capsys, _run(tmp_path), 3, "config.json", "itk fetch")
    _no_output(tmp_path)


def test_the_module_entry_point_runs_as_a_subprocess(job):
    tmp_path, _ = job
    proc = subprocess.run([sys.executable, "-m", "itk.runtime.generate", *_run(tmp_path, "--frame_num", "8")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "4n+1" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- end to end on tiny weights in the official layout (needs every model module) ---

MODELS = ("dit", "vae", "t5", "clip", "audio")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    for module in MODELS:
        pytest.importorskip(f"itk.runtime.models.{module}")
    from itk.runtime.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


def _tiny_args(layout, job_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(layout.ckpt_dir),
            "--wav2vec_dir", str(layout.wav2vec_dir), "--infinitetalk_dir", str(layout.infinitetalk),
            "--input_json", str(job_dir / "job.json"), "--save_file", str(job_dir / "out" / "talk"),
            "--sample_steps", "2", "--frame_num", "9", "--motion_frame", "5", *extra]


def _video_facts(path) -> tuple[float, int, float]:
    import av

    with av.open(str(path)) as c:
        assert sorted(s.type for s in c.streams) == ["audio", "video"]
        fps, frames = float(c.streams.video[0].average_rate), sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        audio = sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate
    return fps, frames, audio


def _generate(layout, job_dir, *extra: str) -> list[dict]:
    proc = subprocess.run(_tiny_args(layout, job_dir, *extra), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [e for e in map(parse, proc.stderr.splitlines()) if e]


def test_a_streaming_run_writes_25_fps_video_as_long_as_the_speech(weights, job):
    tmp_path, _ = job
    events = _generate(weights, tmp_path, "--mode", "streaming")
    fps, frames, audio = _video_facts(tmp_path / "out" / "talk.mp4")
    assert (fps, frames) == (25.0, 25) and abs(audio - 1.0) < 0.1
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and "clip" in kinds and "step" in kinds
    # the toolkit finds the video where the generator says it wrote it: both take the field from the protocol
    assert Outcome(0, False, 1.0, tmp_path / "log", events).output == str(tmp_path / "out" / "talk.mp4")
    clips = [e for e in events if e["event"] == "clip"]
    assert clips[-1]["clip"] == clips[-1]["clips"] == 1 + -(-(25 - 9) // 4)


def test_clip_mode_writes_one_clip_of_frame_num_frames(weights, job):
    tmp_path, data = job
    t = np.arange(32000) / 16000
    _wav(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 200 * t) * np.abs(np.sin(2 * np.pi * 2 * t)))
    _generate(weights, tmp_path, "--mode", "clip")
    fps, frames, audio = _video_facts(tmp_path / "out" / "talk.mp4")
    assert (fps, frames) == (25.0, 9) and abs(audio - 9 / 25) < 0.1


def test_audio_shorter_than_one_clip_gives_a_video_as_long_as_the_audio(weights, job):
    tmp_path, _ = job
    t = np.arange(4800) / 16000  # 0.3 s = 7 frames, shorter than a 9-frame clip
    _wav(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 200 * t))
    _generate(weights, tmp_path, "--mode", "streaming")
    assert _video_facts(tmp_path / "out" / "talk.mp4")[1] == 7


def test_a_30_fps_video_input_is_dubbed_at_25_fps(weights, job):
    import av

    tmp_path, data = job
    with av.open(str(tmp_path / "source.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 64, "yuv420p"
        for i in range(45):
            frame = np.full((64, 48, 3), (i * 5) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data["cond_video"] = str(tmp_path / "source.mp4")
    (tmp_path / "job.json").write_text(json.dumps(data))
    _generate(weights, tmp_path, "--mode", "streaming")
    assert _video_facts(tmp_path / "out" / "talk.mp4")[:2] == (25.0, 25)


def test_the_fp8_files_with_low_vram_streaming_give_a_video(weights, job):
    tmp_path, _ = job
    args = _tiny_args(weights, tmp_path, "--mode", "streaming", "--quant", "fp8", "--quant_dir",
                      str(weights.fp8_dit), "--num_persistent_param_in_dit", "0")
    args.remove("--infinitetalk_dir")
    args.remove(str(weights.infinitetalk))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _video_facts(tmp_path / "out" / "talk.mp4")[:2] == (25.0, 25)


def test_sigint_stops_cleanly_with_exit_130_and_no_partial_video(weights, job):
    import signal

    tmp_path, _ = job
    proc = subprocess.Popen(_tiny_args(weights, tmp_path, "--mode", "streaming", "--sample_steps", "40"),
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if (parse(line) or {}).get("event") == "step":
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, rest[-2000:]
    assert "Traceback" not in rest
    _no_output(tmp_path)


def test_a_second_speaker_on_the_single_speaker_adapter_is_refused_before_loading(job, capsys):
    tmp_path, data = job
    data["cond_audio"]["person2"] = data["cond_audio"]["person1"]
    data["audio_type"] = "add"
    (tmp_path / "job.json").write_text(json.dumps(data))
    argv = _run(tmp_path)
    argv[argv.index("--infinitetalk_dir") + 1] = str(tmp_path / "single" / "infinitetalk.safetensors")
    _fails(capsys, argv, 2, "two speakers need the multi-speaker InfiniteTalk DiT", "--variant multi")
    _no_output(tmp_path)


def test_relative_job_paths_missing_here_are_read_beside_the_job_file(job, capsys, monkeypatch, tmp_path_factory):
    tmp_path, data = job
    data.update(cond_video="face.png", cond_audio={"person1": "speech.wav"})
    (tmp_path / "job.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    # The inputs are found and read; the run stops only at the (absent) weights.
    _fails(capsys, _run(tmp_path), 3, "itk fetch")
