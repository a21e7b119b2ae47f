"""`python -m itk.runtime.generate` called directly with hostile or careless inputs: each is exit 2 with ONE
`error:` line naming the file or flag, no traceback, no file written, and found before any model loads
(the weights folders here do not exist: reaching them would be exit 3).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itk.runtime.protocol import FLAG, parse_event


def _wav(path: Path, samples: np.ndarray, sr: int = 16000) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return 0.3 * np.sin(2 * np.pi * 180 * t)


@pytest.fixture
def job(tmp_path) -> Path:
    """A usable job: a small portrait and one second of tone; the run would stop only at the weights."""
    Image.fromarray(np.full((60, 44, 3), 120, np.uint8)).save(tmp_path / "face.png")
    _wav(tmp_path / "speech.wav", _tone(1.0))
    _job(tmp_path, tmp_path / "face.png")
    return tmp_path


def _job(folder: Path, image: Path) -> None:
    data = {"prompt": "a person talking", "cond_video": str(image),
            "cond_audio": {"person1": str(folder / "speech.wav")}}
    (folder / "job.json").write_text(json.dumps(data))


def generate(folder: Path, *extra: str, save_file: str | None = None, prefix: tuple[str, ...] = ()):
    stem = save_file or str(folder / "out" / "talk")
    argv = [*prefix, sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(folder / "nowhere"),
            "--wav2vec_dir", str(folder / "nowhere"),
            "--infinitetalk_dir", str(folder / "nowhere" / "infinitetalk.safetensors"),
            "--input_json", str(folder / "job.json"), "--save_file", stem, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def refused(proc, *words: str) -> str:
    """Exit 2, no traceback, exactly one plain stderr line, `error: ...` holding every word."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    plain = [line for line in proc.stderr.splitlines() if parse_event(line) is None]
    assert len(plain) == 1 and plain[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in plain[0], plain[0]
    return plain[0]


def nothing_written(folder: Path) -> None:
    out = folder / "out"
    assert not out.exists() or not any(out.iterdir())
    assert not list(folder.glob("talk*.mp4")) and not list(folder.glob(".*.mp4"))


def test_the_job_is_usable_so_each_refusal_below_is_its_own(job):
    # Reaching the (absent) weights is exit 3: the inputs themselves passed.
    proc = generate(job)
    assert proc.returncode == 3, proc.stderr[-2000:]


# --- item 6: settings out of range (the ranges live in the protocol's flag table) ---------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("max_frame_num", "-1", ("--max_frame_num -1", "at least 1")),
    ("max_frame_num", "0", ("--max_frame_num 0", "at least 1")),
    ("num_persistent_param_in_dit", "-5", ("--num_persistent_param_in_dit -5", "at least 0")),
    ("sample_shift", "0", ("--sample_shift 0", "greater than 0")),
    ("sample_shift", "-3", ("--sample_shift -3", "greater than 0")),
    ("sample_shift", "nan", ("--sample_shift nan", "finite")),
    ("sample_steps", "0", ("--sample_steps 0", "at least 1")),
    ("sample_steps", "-2", ("--sample_steps -2", "at least 1")),
    ("base_seed", str(2**64), ("--base_seed", "at most")),
    ("color_correction_strength", "1.5", ("--color_correction_strength 1.5", "at most 1")),
])
def test_an_out_of_range_setting_is_one_line_naming_the_flag(job, flag, value, words):
    nothing_written(job)
    refused(generate(job, f"--{flag}", value), *words)
    nothing_written(job)


def test_the_ranges_are_in_the_flag_table():
    assert FLAG["max_frame_num"].minimum == 1
    assert FLAG["num_persistent_param_in_dit"].minimum == 0
    assert FLAG["sample_shift"].above == 0
    assert FLAG["sample_steps"].minimum == 1


# --- item 6: media the pipeline cannot use -------------------------------------------------------------------

def test_one_millisecond_of_audio_is_refused_as_shorter_than_a_frame(job):
    _wav(job / "speech.wav", _tone(0.001))
    refused(generate(job), "speech.wav", "1 ms", "shorter than one video frame (40 ms)")
    nothing_written(job)


def _png_header(path: Path, width: int, height: int) -> None:
    """A tiny PNG that CLAIMS width x height (a decompression bomb's header; the pixel data is one row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\0" * (1 + (width + 7) // 8))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 20_000])  # above PIL's limit (a warning), above twice it (an error)
def test_a_decompression_bomb_image_is_refused_with_the_pixel_limit(job, side):
    _png_header(job / "bomb.png", side, side)
    _job(job, job / "bomb.png")
    refused(generate(job), "bomb.png", str(Image.MAX_IMAGE_PIXELS))
    nothing_written(job)


def test_a_1x1_image_is_refused_with_the_minimum_size(job):
    Image.new("RGB", (1, 1), (120, 100, 90)).save(job / "dot.png")
    _job(job, job / "dot.png")
    # Official 480p buckets (no tiny config here): a square image becomes 640x640, one pixel per 16x16.
    refused(generate(job), "dot.png", "1x1", "minimum size is 40x40")
    nothing_written(job)


def test_a_video_with_frames_below_the_minimum_size_is_refused(job):
    import av

    with av.open(str(job / "small.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 90, np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    _job(job, job / "small.mp4")
    refused(generate(job), "small.mp4", "16x16", "minimum size is 40x40")
    nothing_written(job)


def test_the_minimum_size_is_one_pixel_per_dit_token_of_the_chosen_bucket():
    from itk.runtime.buckets import bucket_table
    from itk.runtime.request import minimum_size

    table = bucket_table("infinitetalk-480")
    assert minimum_size(1, 1, table) == (40, 40)  # 640x640
    assert minimum_size(9, 16, table) == (28, 56)  # ratio 0.56 -> the "0.50" bucket, 448x896


# --- items 4 and 6: an output that cannot be written, found before any model loads --------------------------

def test_an_output_that_is_an_existing_folder_is_refused(job):
    (job / "out" / "talk.mp4").mkdir(parents=True)
    refused(generate(job), "--save_file", "talk.mp4", "is an existing folder")
    assert not any((job / "out" / "talk.mp4").iterdir())


def test_an_output_folder_that_cannot_be_created_is_refused(job):
    (job / "blocker").write_text("a file where a folder should be")
    refused(generate(job, save_file=str(job / "blocker" / "sub" / "talk")), "--save_file", "blocker", "is a file")
    assert (job / "blocker").read_text() == "a file where a folder should be"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a 0500 folder; the read-only mount case covers root")
def test_an_output_folder_without_write_permission_is_refused(job):
    locked = job / "locked"
    locked.mkdir(mode=0o500)
    try:
        refused(generate(job, save_file=str(locked / "talk")), "--save_file", "locked", "cannot write")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def _read_only_mount_prefix(folder: Path) -> tuple[str, ...]:
    """A command prefix that runs the rest with `folder` mounted read-only (a private tmpfs in a new user
    and mount namespace, so it works for root and non-root alike and touches no real mount)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux unshare for a private read-only mount")
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o ro none '{folder}'"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable here: {probe.stderr.strip()}")
    return (unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o ro none '{folder}' && exec \"$@\"", "sh")


def test_an_output_on_a_read_only_mount_is_refused_even_for_root(job):
    ro = job / "ro"
    ro.mkdir()
    prefix = _read_only_mount_prefix(ro)
    refused(generate(job, save_file=str(ro / "talk"), prefix=prefix), "--save_file", "cannot write",
            "Read-only file system")
    assert not any(ro.iterdir())


def test_the_write_check_leaves_no_probe_file_behind(job):
    proc = generate(job)
    assert proc.returncode == 3
    assert [p.name for p in job.iterdir() if p.name.startswith(".itk")] == []
