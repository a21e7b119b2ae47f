"""`itk eval` on synthetic videos with planted defects: a colour shift growing per clip, a jump at one join, a
dub composited or regenerated outside the speaker, a video without sound or with sound of another length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itk import evaluate as ev
from itk.runtime import dub
from itk.runtime.protocol import EXIT_BAD_INPUT, UserError
from itk.runtime.video import write_mp4

RATE = 16000
LAYOUT_FRAMES = 81 + 72 * 3  # four clips as the generator lays them out


def speech(frames: int, extra_s: float = 0.0) -> np.ndarray:
    t = np.arange(round((frames / 25 + extra_s) * RATE)) / RATE
    return (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)


def talk(path: Path, frames: np.ndarray, crf: int = 23, sound: bool = True) -> Path:
    return write_mp4(frames, speech(len(frames)) if sound else None, RATE, path, crf=crf)


def clip_of(i: int) -> int:
    """0-based clip of frame i in the default layout, stated independently of ClipLayout."""
    return 0 if i < 81 else 1 + (i - 81) // 72


def sliding_pattern(frames: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A smooth periodic pattern sliding one pixel per frame: the same small change between any two frames."""
    h, w = size
    cols = np.arange(w + frames)
    row = 128 + 60 * np.sin(2 * np.pi * cols / 32)
    out = np.empty((frames, h, w, 3), np.uint8)
    for i in range(frames):
        out[i] = np.clip(row[i:i + w], 0, 255).astype(np.uint8)[None, :, None]
    return out


def test_clips_are_laid_out_as_the_generator_makes_them():
    assert ev.ClipLayout().spans(81 + 72 + 10) == [(0, 81), (81, 153), (153, 163)]
    assert ev.ClipLayout().spans(40) == [(0, 40)]
    assert ev.ClipLayout(first=33, step=24).spans(81) == [(0, 33), (33, 57), (57, 81)]
    assert [ev.ClipLayout().clip_of(i) for i in (0, 80, 81, 152, 153)] == [0, 0, 1, 1, 2]
    with pytest.raises(UserError) as caught:
        ev.ClipLayout(first=0)
    assert caught.value.exit_code == EXIT_BAD_INPUT


def test_a_colour_shift_growing_per_clip_is_reported_with_the_right_slope(tmp_path):
    from skimage.color import deltaE_ciede2000, rgb2lab

    base = np.array([120.0, 110.0, 100.0])
    shift = np.array([4.0, 0.0, -4.0])  # per clip
    colours = np.stack([base + shift * clip_of(i) for i in range(LAYOUT_FRAMES)])
    frames = np.broadcast_to(colours[:, None, None, :], (LAYOUT_FRAMES, 32, 48, 3)).round().astype(np.uint8)
    result = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "drift.mp4", frames, crf=0)))

    lab = [rgb2lab(((base + shift * k) / 255)[None, None]) for k in range(4)]
    expected = [float(deltaE_ciede2000(lab[k], lab[0]).mean()) for k in range(4)]
    mids_min = np.array([40.5, 117, 189, 261]) / 25 / 60  # clip middles (frames) in minutes
    slope = np.polyfit(mids_min, expected, 1)[0]
    reported = [c.delta_e_vs_first for c in result.clips]
    assert len(result.clips) == 4 and reported[0] == 0
    np.testing.assert_allclose(reported, expected, atol=0.3)
    assert result.drift_vs_first_per_minute == pytest.approx(slope, rel=0.05)
    assert slope > 20  # ~2 ΔE per 2.9 s clip


def test_a_jump_planted_at_one_join_is_the_one_flagged(tmp_path):
    frames = sliding_pattern(LAYOUT_FRAMES).astype(np.int16)
    frames[153:] += 25  # the third clip (and the rest) starts brighter: a seam at its join only
    result = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "seam.mp4", np.clip(frames, 0, 255).astype(np.uint8))))
    ratios = {c.index: c.seam_ratio for c in result.clips}
    assert ratios[1] is None
    assert result.seams == [3]
    assert ratios[3] > ev.SEAM_FLAG and ratios[2] < 1.5 and ratios[4] < 1.5


def dub_inputs(tmp_path: Path, mode: str) -> tuple[Path, np.ndarray, dub.Dubber]:
    """A source video with texture and motion (a sliding face for "face"), a Dubber for a smaller output, and
    "generated" frames: the fitted source made brighter everywhere."""
    from test_dub import moving_face_video

    if mode == "face":
        source, _ = moving_face_video(frames=40, step=0.5)
        target, boxes = (144, 216), ()
    else:
        texture = np.random.default_rng(5).integers(40, 200, (72, 96 + 40, 3)).astype(np.uint8)
        source = np.stack([texture[:, i:i + 96] for i in range(40)])
        target, boxes = (48, 64), ((10, 30, 60, 70),)
    path = write_mp4(source, None, RATE, tmp_path / "source.mp4", crf=12)
    dubber = dub.Dubber.open(path, target=target, length=40, mode=mode, boxes=boxes)
    generated = np.stack([np.clip(dubber.source_frame(i).astype(int) + 30, 0, 255).astype(np.uint8)
                          for i in range(40)])
    return path, generated, dubber


@pytest.mark.parametrize("mode", ["bbox", "face"])
def test_a_composited_dub_has_zero_drift_outside_the_region_and_a_regenerated_one_does_not(tmp_path, mode):
    source, generated, dubber = dub_inputs(tmp_path, mode)
    composited = dubber.apply(generated, start=0)
    for i in (0, 17, 39):  # before encoding: exactly zero
        mask = dubber.region.mask_for(i)
        assert ev.outside_difference(composited[i], dubber.source_frame(i), mask) == 0.0
        assert ev.outside_difference(generated[i], dubber.source_frame(i), mask) > 20
    request = {"reference": source, "boxes": ((10, 30, 60, 70),) if mode == "bbox" else ()}
    kept = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "dub.mp4", composited), **request))
    redone = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "regen.mp4", generated), **request))
    assert kept.outside is not None and redone.outside is not None and kept.outside.region == mode
    assert kept.outside.floor > 0  # the codec's own noise
    assert kept.outside.drift < 0.5 and kept.outside.mad < 1.5 * kept.outside.floor + 0.2
    assert redone.outside.drift > 10
    assert all(c.outside_mad is not None for c in kept.clips)


def test_a_video_without_sound_is_a_one_line_error(tmp_path):
    video = talk(tmp_path / "mute.mp4", sliding_pattern(30), sound=False)
    with pytest.raises(UserError) as caught:
        ev.evaluate(ev.EvalRequest(video=video))
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert "no sound" in caught.value.message and "\n" not in caught.value.message
    assert "--audio" in caught.value.fix


def test_sound_of_another_length_is_a_one_line_error(tmp_path):
    import soundfile

    video = talk(tmp_path / "talk.mp4", sliding_pattern(50))
    wav = tmp_path / "long.wav"
    soundfile.write(wav, speech(50, extra_s=3.0), RATE)
    with pytest.raises(UserError) as caught:
        ev.evaluate(ev.EvalRequest(video=video, audio=wav))
    assert caught.value.exit_code == EXIT_BAD_INPUT and "\n" not in caught.value.message
    assert "5.00 s" in caught.value.message and "2.00 s" in caught.value.message
    soundfile.write(wav, speech(50), RATE)
    assert ev.evaluate(ev.EvalRequest(video=video, audio=wav)).frames == 50


def test_a_missing_or_undecodable_video_is_a_one_line_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    for path in (tmp_path / "absent.mp4", junk):
        with pytest.raises(UserError) as caught:
            ev.evaluate(ev.EvalRequest(video=path))
        assert caught.value.exit_code == EXIT_BAD_INPUT and "\n" not in caught.value.message


def test_json_lists_the_clips_in_order_with_their_numbers(tmp_path):
    frames = sliding_pattern(81 + 72 + 20)
    result = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "talk.mp4", frames, crf=12)))
    data = json.loads(json.dumps(result.to_json()))
    clips = data["clips"]
    assert [c["index"] for c in clips] == [1, 2, 3]
    assert [c["start_frame"] for c in clips] == [0, 81, 153]
    assert clips[0]["seam_ratio"] is None and all(isinstance(c["seam_ratio"], float) for c in clips[1:])
    assert all(isinstance(c["delta_e_vs_first"], float) for c in clips)
    assert all(c["delta_e_vs_reference"] is None for c in clips)  # no reference given
    assert data["layout"] == {"first": 81, "step": 72} and data["frames"] == 173
    assert data["whole"]["sync"] is None
    assert any(ev.FETCH_SYNCNET in note for note in data["notes"])
    assert ev.eval_path(tmp_path / "talk.mp4") == tmp_path / "talk.eval.json"


def test_drift_against_a_reference_image_compares_it_framed_as_the_generator_frames_it(tmp_path):
    from PIL import Image
    from skimage.data import astronaut

    portrait = astronaut()  # 512x512
    ref = tmp_path / "portrait.png"
    Image.fromarray(portrait).save(ref)
    framed = dub.fit_frame(portrait, (96, 128))  # the square portrait cropped to a 96x128 bucket
    frames = np.stack([framed] * 81 + [np.clip(framed.astype(int) + [20, 0, -20], 0, 255).astype(np.uint8)] * 40)
    result = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "talk.mp4", frames, crf=4), reference=ref))
    first, second = (c.delta_e_vs_reference for c in result.clips)
    assert first < 1.0 and second > 5, (first, second)


def test_the_plot_is_one_png_a_person_can_open(tmp_path):
    pytest.importorskip("matplotlib")
    frames = sliding_pattern(81 + 72 + 30)
    result = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "talk.mp4", frames)))
    png = ev.plot(result, tmp_path / "talk.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_evaluating_without_syncnet_weights_imports_no_torch(tmp_path):
    video = talk(tmp_path / "talk.mp4", sliding_pattern(30))
    code = ("import sys; from pathlib import Path; from itk import evaluate as ev; "
            f"ev.evaluate(ev.EvalRequest(video=Path({str(video)!r}))); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_lip_sync_is_measured_per_clip_with_weights_in_the_official_layout(tmp_path):
    import torch
    from test_dub import moving_face_video
    from test_syncnet import random_state

    weights = tmp_path / "syncnet_v2.model"
    torch.save(random_state(), weights)
    video, _ = moving_face_video(frames=20, step=0.5)
    result = ev.evaluate(ev.EvalRequest(video=talk(tmp_path / "face.mp4", video, crf=12), syncnet=weights,
                                        layout=ev.ClipLayout(first=9, step=8)))
    assert result.sync is not None and result.sync.windows == 15
    assert np.isfinite([result.sync.confidence, result.sync.distance]).all()
    assert [c.sync_c is not None for c in result.clips] == [True, True, False]  # windows start at 0..14
    assert not any("lip-sync not measured" in note for note in result.notes)
