"""`itk run --video --dub-region` end to end on tiny weights: the generator composites each clip onto the
source's own frames, so outside the speaker's box the video is the source (up to the mp4 codec's own loss) and
`itk eval` sees no drift there, while a full-frame dub is regenerated everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from run_media import decoded, itk, write_wav

from itk import selftest
from itk.runtime.dub import fit_frame
from itk.runtime.video import write_mp4

TINY_RUN = ("--preset", selftest.PRESET, "--set", "sample_steps=2", "--set", "frame_num=9", "--set", "motion_frame=5")
BOX = "8,8,40,40"  # rows first, in source pixels (the source is 64x64)


@pytest.fixture(scope="module")
def weights(tiny: Path) -> Path:
    return tiny


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 64x64 source video of 1 s: a smooth colour pattern drifting one pixel per frame (smooth, so the
    codec's own loss stays small beside what regenerating the background changes)."""
    rows, cols = np.mgrid[0:64, 0:128].astype(np.float32)
    texture = np.stack([128 + 60 * np.sin(cols / 9), 128 + 60 * np.cos(rows / 11), 100 + cols / 2], axis=-1)
    frames = np.stack([texture[:, i:i + 64] for i in range(25)]).astype(np.uint8)
    return write_mp4(frames, None, 16000, tmp_path_factory.mktemp("src") / "source.mp4")


def dub(tmp_path: Path, weights: Path, source: Path, region: str, *extra: str) -> np.ndarray:
    speech = write_wav(tmp_path / "speech.wav", 0.84)
    out = tmp_path / f"{region}.mp4"
    proc = itk("run", "--video", str(source), "--audio", str(speech), "--weights-dir", str(weights), "--output",
               str(out), "--dub-region", region, *extra, *TINY_RUN, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return decoded(out)


def test_outside_the_box_the_dubbed_video_is_the_source_and_inside_it_is_generated(tmp_path, weights, source):
    made = dub(tmp_path, weights, source, "bbox", "--bbox1", BOX)
    src = decoded(source)
    fitted = np.stack([fit_frame(src[i], made.shape[1:3]) for i in range(len(made))]).astype(np.int16)
    outside = np.ones(made.shape[1:3], bool)
    outside[2:22, 2:22] = False  # the box mapped to the output (rows 8-40 of 64 -> 4-20 of 32) and a margin
    outside_diff = np.abs(made.astype(np.int16) - fitted)[:, outside].mean()
    floor_video = write_mp4(fitted.astype(np.uint8), None, 16000, tmp_path / "floor.mp4")
    floor = np.abs(decoded(floor_video).astype(np.int16) - fitted)[:, outside].mean()  # the codec's own loss
    full = dub(tmp_path, weights, source, "full")
    full_diff = np.abs(full.astype(np.int16) - fitted)[:, outside].mean()
    # the codec's 16x16 blocks straddle the region's edge on a 32x32 frame: a little above its floor there
    assert outside_diff < floor + 2.5 and full_diff > 2 * outside_diff


def test_a_dub_region_on_an_image_is_refused_by_the_generator_with_its_fix(tmp_path, weights):
    from run_media import write_image

    face = write_image(tmp_path / "face.png")
    speech = write_wav(tmp_path / "speech.wav", 0.84)
    proc = itk("run", "--image", str(face), "--audio", str(speech), "--weights-dir", str(weights), "--output",
               str(tmp_path / "x.mp4"), "--dub-region", "face", *TINY_RUN, "--json", timeout=600)
    assert proc.returncode == 2 and "is an image" in proc.stdout and not json.loads(proc.stdout)["ok"]
