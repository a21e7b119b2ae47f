"""Where each of two speakers is in the picture: the masks the two-speaker DiT routes audio with.

Three masks in the order [speaker 1, speaker 2, background], built at the original image
size, then resized and centre-cropped exactly like the reference image (nearest neighbour), nearest-sampled
down to the latent grid and then to the DiT's token grid, thresholded > 0 and flattened to [3, N_h*N_w]:
the `speaker_masks` argument of the DiT.

A person box is the official job file's `bbox` entry `[a, b, c, d]`. The official code names its elements
x_min, y_min, x_max, y_max but uses rows a:c and columns b:d; we keep that meaning, so job files
written for the official generator frame the same people. Without boxes the official fixed split applies:
rows 5-95 % of the height, speaker 1 in 5-95 % of the left half, speaker 2 the same in the right half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from itk.runtime.buckets import cover_crop

if TYPE_CHECKING:  # torch only where masks are built: `itk run` checks boxes without it
    import torch

Box = Sequence[float]  # [row_min, col_min, row_max, col_max] in pixels of the original image
FACE_SCALE = 0.05  # the official split's margin, as a fraction of the height and of each half's width
VAE_STRIDE = 8  # pixels per latent cell
PATCH = (2, 2)  # latent cells per DiT token (height, width)


def _rows_cols(box: Box) -> tuple[int, int, int, int]:
    """The official slice bounds: each value truncated by int(), rows a:c and columns b:d."""
    a, b, c, d = (int(v) for v in box)
    return a, c, b, d


def check_boxes(boxes: Sequence[Box], image_hw: tuple[int, int]) -> list[str]:
    """Warnings for usable boxes; ValueError (one line: what and how to fix) for a box that cannot be used.

    A box must have four numbers and lie inside the image with a non-empty extent. Overlapping boxes are
    allowed, as officially (a pixel in both counts for both speakers); they come back as a warning.
    """
    height, width = image_hw
    if len(boxes) != 2:
        raise ValueError(f"{len(boxes)} person boxes given: give one box per speaker (two), or none")
    spans = []
    for n, box in enumerate(boxes, start=1):
        if len(box) != 4:
            raise ValueError(f"speaker {n}'s box {list(box)} does not have 4 numbers: give"
                             " [row_min, col_min, row_max, col_max] in pixels of the image")
        r0, r1, c0, c1 = _rows_cols(box)
        if not (0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width):
            raise ValueError(
                f"speaker {n}'s box {list(box)} is empty or reaches outside the {width}x{height} image:"
                f" give [row_min, col_min, row_max, col_max] with rows within 0..{height} and columns within"
                f" 0..{width} (rows first, as the official bbox is read)")
        spans.append((r0, r1, c0, c1))
    (a0, a1, a2, a3), (b0, b1, b2, b3) = spans
    if max(a0, b0) < min(a1, b1) and max(a2, b2) < min(a3, b3):
        return ["the two person boxes overlap: a face inside both listens to both speakers there"]
    return []


def source_masks(image_hw: tuple[int, int], boxes: Sequence[Box] | None = None) -> torch.Tensor:
    """[3, H, W] float32 at the original image size: speaker 1, speaker 2, background (1 where no speaker).

    With `boxes` (checked by `check_boxes`) each speaker is its rectangle; without, the official split.
    """
    height, width = image_hw
    import torch

    people = torch.zeros(2, height, width)
    if boxes is not None:
        for mask, box in zip(people, boxes, strict=True):
            r0, r1, c0, c1 = _rows_cols(box)
            mask[r0:r1, c0:c1] = 1
    else:
        r0, r1 = int(height * FACE_SCALE), int(height * (1 - FACE_SCALE))
        half = width // 2
        c0, c1 = int(half * FACE_SCALE), int(half * (1 - FACE_SCALE))
        people[0, r0:r1, c0:c1] = 1
        people[1, r0:r1, int(half * FACE_SCALE + half):int(half * (1 - FACE_SCALE) + half)] = 1
    background = (people.sum(0) == 0).float()
    return torch.cat([people, background[None]])


def fit_to_target(masks: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] -> [C, th, tw]: framed as the image is (`buckets.cover_crop`), with a nearest resize."""
    th, tw = target_hw
    h, w, top, left = cover_crop(masks.shape[1], masks.shape[2], target_hw)
    import torch.nn.functional as F

    resized = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0]
    return resized[:, top:top + th, left:left + tw]


def downsample(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-sample [C, H, W] masks to `size`, thresholded > 0, as float."""
    import torch.nn.functional as F

    return (F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0).float()


def latent_masks(image_hw: tuple[int, int], target_hw: tuple[int, int],
                 boxes: Sequence[Box] | None = None) -> torch.Tensor:
    """[3, th/8, tw/8]: the masks on the latent grid (the official pipeline's `ref_target_masks`)."""
    th, tw = target_hw
    return downsample(fit_to_target(source_masks(image_hw, boxes), target_hw), (th // VAE_STRIDE, tw // VAE_STRIDE))


def speaker_masks(image_hw: tuple[int, int], target_hw: tuple[int, int], boxes: Sequence[Box] | None = None,
                  patch: tuple[int, int] = PATCH) -> torch.Tensor:
    """[3, N_h*N_w] float32: speaker 1, speaker 2 and background on the DiT's token grid, what
    `InfiniteTalkDiT.forward(..., speaker_masks=...)` takes for two speakers.

    image_hw: the original image (or first video frame) size; target_hw: its bucket size; boxes: the two
    person boxes (rows first, see the module doc), or None for the official left/right split. Raises
    ValueError when a speaker covers no token (a box that the crop removes or that is smaller than a
    token): the official code would divide by zero there.
    """
    lat = latent_masks(image_hw, target_hw, boxes)
    tokens = downsample(lat, (lat.shape[1] // patch[0], lat.shape[2] // patch[1])).flatten(1)
    for n in (0, 1):
        if not tokens[n].any():
            pixels = VAE_STRIDE * patch[0]
            raise ValueError(
                f"speaker {n + 1}'s box covers no {pixels}-pixel cell of the {target_hw[1]}x{target_hw[0]}"
                " picture the model sees (after resizing and cropping): draw it larger or inside the kept area")
    return tokens
