"""Dubbing regions on synthetic videos: the source's framing, exact source pixels outside the region, a blend
band of the stated width, motion surviving inside, the union of two speakers, and a face found and tracked
smoothly (scikit-image's bundled cascade on a real face photo that ships with scikit-image)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from itk.runtime import dub
from itk.runtime.protocol import EXIT_BAD_INPUT, BadInput
from itk.runtime.video import write_mp4


def face_patch(scale: float = 0.4) -> np.ndarray:
    """The astronaut photo's head and shoulders (scikit-image's sample data), scaled."""
    from PIL import Image
    from skimage.data import astronaut

    crop = astronaut()[20:260, 120:340]
    h, w = crop.shape[:2]
    return np.asarray(Image.fromarray(crop).resize((round(w * scale), round(h * scale)), Image.BILINEAR))


def moving_face_video(frames: int = 40, size: tuple[int, int] = (160, 240), step: float = 1.5,
                      blank: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Frames with the face sliding right by `step` px per frame over grey (none in the `blank` frames), and
    the face patch's left column per frame."""
    patch = face_patch()
    video = np.full((frames, *size, 3), 110, np.uint8)
    lefts = np.array([20 + step * i for i in range(frames)])
    for i, left in enumerate(lefts):
        if i not in blank:
            video[i, 20:20 + patch.shape[0], round(left):round(left) + patch.shape[1]] = patch
    return video, lefts


def test_source_frames_are_fitted_exactly_as_the_generator_frames_its_reference():
    import torch
    from PIL import Image

    from itk.runtime.pipeline import preprocess_reference

    frame = np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8)
    for target in ((48, 64), (64, 48), (90, 150)):
        fitted = dub.fit_frame(frame, target)
        assert fitted.shape == (*target, 3) and fitted.dtype == np.uint8
        reference = preprocess_reference(Image.fromarray(frame), target)[0, :, 0].permute(1, 2, 0)
        assert torch.equal((torch.from_numpy(fitted) / 255 - 0.5) * 2, reference)


def test_a_box_in_source_pixels_lands_on_the_same_pixels_after_fitting():
    source = np.zeros((90, 150, 3), np.uint8)
    source[30:60, 70:110] = 255
    target = (48, 64)
    r0, c0, r1, c1 = dub.box_to_output((30, 70, 60, 110), (90, 150), target)
    lit = np.argwhere(dub.fit_frame(source, target)[..., 0] > 127)
    assert abs(lit[:, 0].min() - r0) <= 1 and abs(lit[:, 0].max() + 1 - r1) <= 1
    assert abs(lit[:, 1].min() - c0) <= 1 and abs(lit[:, 1].max() + 1 - c1) <= 1


def test_every_pixel_outside_the_region_is_the_source_frame_exactly():
    rng = np.random.default_rng(1)
    generated = rng.integers(0, 256, (4, 60, 80, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (4, 60, 80, 3), dtype=np.uint8)
    region = dub.DubRegion.from_boxes([(10, 20, 50, 60)], (60, 80), (60, 80))
    mask = region.mask_for(0)
    out = dub.composite(generated, source, np.stack([mask] * 4))
    outside, core = mask == 0, mask == 1
    assert outside.sum() > 2000 and core.sum() > 500
    assert np.array_equal(out[:, outside], source[:, outside])
    assert np.array_equal(out[:, core], generated[:, core])
    assert np.array_equal(dub.composite(generated[0], source[0], mask), out[0])


def test_the_blend_band_has_the_stated_width_and_no_hard_step():
    shape = dub.face_shape((40, 60, 100, 110))  # a 60x50 face
    mask = shape.mask((200, 200))
    row = mask[round((shape.top + shape.bottom) / 2)]  # through the middle: the band runs along the row
    left = round(shape.left)
    ramp = np.flatnonzero((row > 0) & (row < 1))
    rising = ramp[ramp < 100]
    assert rising.min() == left  # the band starts at the region's outer edge ...
    assert len(rising) == pytest.approx(shape.band, abs=1.5)  # ... and is `band` pixels wide
    assert row[left - 1] == 0 and row[left + int(np.ceil(shape.band))] == 1
    assert np.abs(np.diff(row)).max() <= 1.5 / shape.band + 1e-6  # smoothstep: no jump larger than its slope
    assert shape.band == pytest.approx(dub.FEATHER * min(shape.bottom - shape.top, shape.right - shape.left))


def test_motion_inside_the_region_survives_compositing():
    still = np.full((6, 60, 80, 3), 90, np.uint8)
    moving = np.stack([np.roll(np.tile(np.arange(80, dtype=np.uint8) * 3, (60, 1)), 4 * i, axis=1)
                       for i in range(6)])[..., None].repeat(3, axis=-1)
    region = dub.DubRegion.from_boxes([(10, 20, 50, 60)], (60, 80), (60, 80))
    mask = region.mask_for(0)
    out = dub.composite(moving, still, np.stack([mask] * 6))
    motion_in = np.abs(np.diff(out.astype(int), axis=0))
    assert np.array_equal(motion_in[:, mask == 1], np.abs(np.diff(moving.astype(int), axis=0))[:, mask == 1])
    assert motion_in[:, mask == 1].mean() > 5 and not motion_in[:, mask == 0].any()


def test_two_speakers_get_the_union_of_both_regions():
    region = dub.DubRegion.from_boxes([(5, 5, 40, 35), (20, 45, 55, 75)], (60, 80), (60, 80))
    first, second = (s.mask((60, 80)) for s in region.shapes_at(0))
    union = region.mask_for(0)
    assert np.array_equal(union, np.maximum(first, second))
    assert union[20, 20] == 1 and union[40, 60] == 1 and union[55, 5] == 0


def test_two_speakers_faces_are_tracked_left_to_right_and_masked_together():
    patch = face_patch()
    video = np.full((10, 160, 320, 3), 110, np.uint8)
    video[:, 20:20 + patch.shape[0], 20:20 + patch.shape[1]] = patch
    video[:, 30:30 + patch.shape[0], 200:200 + patch.shape[1]] = patch
    region = dub.DubRegion.from_frames(video, speakers=2)
    left, right = region.shapes_at(5)
    assert left.right < 160 < right.left  # speaker 1 is the left face, speaker 2 the right one
    mask = region.mask_for(5)
    centres = [(round((s.top + s.bottom) / 2), round((s.left + s.right) / 2)) for s in (left, right)]
    assert all(mask[c] == 1 for c in centres) and mask[:, 150:170].max() == 0


def test_bbox_mode_needs_a_box_inside_the_picture():
    with pytest.raises(BadInput) as caught:
        dub.DubRegion.from_boxes([], (60, 80), (60, 80))
    assert caught.value.exit_code == EXIT_BAD_INPUT and "--bbox1" in caught.value.fix
    with pytest.raises(BadInput):
        dub.DubRegion.from_boxes([(70, 0, 90, 10)], (60, 80), (60, 80))


def test_the_face_is_found_and_tracked_smoothly_through_frames_without_a_detection():
    blank = (10, 11, 12, 20)  # the detector looks at 0, 5, 10, ...: frames 10 and 20 show no face
    video, lefts = moving_face_video(blank=blank)
    found = dub.FaceDetector()(video[0])
    assert len(found) >= 1
    offset = (found[0][1] + found[0][3]) / 2 - lefts[0]  # the face's centre column within the patch
    track = dub.track_faces(dub.sampled(video, len(video)), len(video))[0]
    centre = (track[:, 1] + track[:, 3]) / 2
    assert np.abs(centre - (lefts + offset)).max() < 4  # follows the face, the blank frames included
    assert np.abs(np.diff(centre, 2)).max() < 0.5  # and smoothly: no jumps between frames
    region = dub.DubRegion.from_frames(video)
    mask = region.mask_for(10)
    face_row, face_col = round((track[10, 0] + track[10, 2]) / 2), round(centre[10])
    assert mask[face_row, face_col] == 1 and mask[:, :5].max() == 0


def test_a_source_without_a_face_is_a_one_line_error_with_the_fix(tmp_path):
    path = write_mp4(np.full((10, 64, 96, 3), 128, np.uint8), None, 16000, tmp_path / "wall.mp4")
    with pytest.raises(BadInput) as caught:
        dub.DubRegion.for_video(path, target=(64, 96), mode="face", length=10)
    assert "\n" not in caught.value.message and "--dub-region bbox" in caught.value.fix


def test_the_dubber_composites_generated_clips_onto_the_source_video(tmp_path):
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (12, 72, 120, 3), dtype=np.uint8)
    path = write_mp4(source, None, 16000, tmp_path / "source.mp4", crf=0)
    target = (48, 64)
    dubber = dub.Dubber.open(path, target=target, length=12, mode="bbox", boxes=[(10, 30, 60, 90)])
    generated = rng.integers(0, 256, (5, *target, 3), dtype=np.uint8)
    out = dubber.apply(generated, start=7)
    from itk.runtime.video import frames_at_25fps

    decoded = list(frames_at_25fps(path))
    for j in range(5):
        outside = dubber.region.mask_for(7 + j) == 0
        assert np.array_equal(out[j][outside], dub.fit_frame(decoded[7 + j], target)[outside])
    assert dub.Dubber.open(path, target=target, length=12, mode="full") is None
    with pytest.raises(BadInput):
        dub.Dubber.open(path, target=target, length=12, mode="mouth")


def test_the_face_region_of_a_source_video_file_is_tracked_at_the_output_size(tmp_path):
    video, lefts = moving_face_video(frames=20)
    path = write_mp4(video, None, 16000, tmp_path / "face.mp4", crf=12)
    region = dub.DubRegion.for_video(path, target=(144, 216), mode="face", length=30)  # longer: the last held
    assert region.size == (144, 216) and len(region.shapes[0]) == 30
    end = region.shapes_at(29)[0]  # where the face ends (frame 19), at 0.9x
    patch_width = face_patch().shape[1]
    assert 0.9 * lefts[19] < (end.left + end.right) / 2 < 0.9 * (lefts[19] + patch_width)


def test_dubbing_imports_no_torch():
    code = "import sys, itk.runtime.dub; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
