"""Speaker masks: the official fixed split and person boxes (rows first), resized and cropped like the
image, down to the latent and token grids (golden dit_multi_A records the official masks)."""

from __future__ import annotations

import pytest
import torch

from itk.runtime.speakers import check_boxes, latent_masks, source_masks, speaker_masks

from golden import load_golden


@pytest.fixture(scope="module")
def golden():
    meta, tensors = load_golden("dit_multi_A")
    info = meta["mask_construction"]
    return tuple(info["source_image_hw"]), tuple(info["target_hw (bucket size, tiny)"]), tensors


def test_without_boxes_the_source_masks_are_the_official_left_right_split(golden):
    image_hw, _, t = golden
    masks = source_masks(image_hw)
    for n in range(3):
        assert torch.equal(masks[n], t[f"intermediate.human_mask_src.{n}"])


def test_the_latent_masks_are_resized_and_cropped_like_the_image_as_officially(golden):
    image_hw, target_hw, t = golden
    assert torch.equal(latent_masks(image_hw, target_hw), t["input.ref_target_masks"])


def test_the_token_masks_are_what_the_official_forward_derives(golden):
    image_hw, target_hw, t = golden
    assert torch.equal(speaker_masks(image_hw, target_hw), t["intermediate.token_ref_target_masks"])


def test_a_box_is_read_rows_first_as_the_official_code_reads_it():
    masks = source_masks((40, 60), [[2, 10, 12, 30], [20, 35, 38, 58]])
    rows, cols = torch.nonzero(masks[0], as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 11, 10, 29)
    rows, cols = torch.nonzero(masks[1], as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 37, 35, 57)
    assert torch.equal(masks[2], ((masks[0] + masks[1]) == 0).float())


def test_box_masks_reach_the_token_grid_of_the_bucket():
    tokens = speaker_masks((480, 640), (480, 640), [[0, 0, 480, 320], [0, 320, 480, 640]])
    grid = tokens.view(3, 30, 40)
    assert torch.equal(grid[0, :, :20], torch.ones(30, 20)) and not grid[0, :, 20:].any()
    assert torch.equal(grid[1, :, 20:], torch.ones(30, 20)) and not grid[1, :, :20].any()
    assert not grid[2].any()


def test_a_box_outside_the_image_is_a_one_line_error_with_the_fix():
    with pytest.raises(ValueError, match=r"speaker 2's box .* reaches outside the 200x120 image.*rows first"):
        check_boxes([[0, 0, 50, 50], [10, 150, 130, 190]], (120, 200))
    with pytest.raises(ValueError, match=r"speaker 1's box .* is empty"):
        check_boxes([[-5, 0, 50, 50], [10, 150, 100, 190]], (120, 200))


def test_an_empty_or_malformed_box_is_refused():
    with pytest.raises(ValueError, match="empty"):
        check_boxes([[50, 0, 50, 50], [10, 150, 100, 190]], (120, 200))
    with pytest.raises(ValueError, match="does not have 4 numbers"):
        check_boxes([[0, 0, 50], [10, 150, 100, 190]], (120, 200))
    with pytest.raises(ValueError, match="one box per speaker"):
        check_boxes([[0, 0, 50, 50]], (120, 200))


def test_overlapping_boxes_are_allowed_with_a_warning():
    assert check_boxes([[0, 0, 60, 120], [30, 100, 120, 200]], (120, 200)) == [
        "the two person boxes overlap: a face inside both listens to both speakers there"]
    assert check_boxes([[0, 0, 60, 100], [0, 100, 120, 200]], (120, 200)) == []


def test_a_box_the_crop_removes_is_refused_because_its_speaker_would_have_no_tokens():
    # 400x200 (wide) into a 128x128 bucket: the crop keeps the middle, a box at the far left vanishes.
    with pytest.raises(ValueError, match="speaker 1's box covers no 16-pixel cell"):
        speaker_masks((200, 400), (128, 128), [[0, 0, 200, 40], [0, 180, 200, 220]])
