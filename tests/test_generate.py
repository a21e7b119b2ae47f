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
from itk.runtime.events import PREFIX, parse
from itk.runtime.generate import main
from PIL import Image


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
    _fails(capsys, _run(tmp_path), 2, "gone.png", "not found")
    _no_output(tmp_path)


def test_a_missing_input_json_is_a_one_line_error(job, capsys):
    tmp_path, _ = job
    (tmp_path / "job.json").unlink()
    _fails(capsys, _run(tmp_path), 2, "job.json", "not found")


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
    _fails(capsys, _run(tmp_path, "--lora_dir", "x.safetensors"), 2, "--lora_dir", "not supported yet")
    _fails(capsys, _run(tmp_path, "--use_teacache"), 2, "--use_teacache", "not supported yet")


def test_a_frame_num_that_is_not_4n_plus_1_is_refused(job, capsys):
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--frame_num", "80"), 2, "4n+1")


def test_an_unknown_flag_is_a_one_line_usage_error(job, capsys):
    tmp_path, _ = job
    _fails(capsys, _run(tmp_path, "--no_such_flag"), 2, "--no_such_flag")


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
