"""Size buckets: the output resolution picked from the reference image's aspect ratio (the official tables),
and the one way a picture is framed into its bucket (`cover_crop`, `fit_frame`): the generator's reference,
the dub's source frames, eval's reference and the speakers' masks all go through it.

The tables are data (buckets.toml). A tiny model config may add its own table (ModelConfig.buckets), which
then replaces the official one of the same name, so tests and `itk selftest` run at a few dozen pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from itk.runtime.toml import read_toml

if TYPE_CHECKING:
    import numpy as np


def official_tables() -> dict[str, dict[str, list[int]]]:
    data = read_toml(Path(__file__).with_name("buckets.toml"))
    return {name: {ratio: list(hw) for ratio, hw in table.items()} for name, table in data.items()}


def bucket_table(size: str, extra: dict[str, dict[str, list[int]]] | None = None) -> dict[str, list[int]]:
    """The ratio -> [h, w] table for `size` (infinitetalk-480 | infinitetalk-720 | a tiny config's name)."""
    tables = {**official_tables(), **(extra or {})}
    if size not in tables:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(sorted(tables))}")
    return tables[size]


def choose_bucket(height: int, width: int, table: dict[str, list[int]]) -> tuple[int, int]:
    """(h, w) of the bucket whose ratio key is nearest to height/width (first one on a tie, as sorted)."""
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    h, w = table[key]
    return int(h), int(w)


def cover_crop(height: int, width: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """How an H x W picture is framed into the bucket `target` (th, tw): (h, w, top, left). It is resized to
    h x w, which covers the target (scale max(th/H, tw/W), each side rounded up), then cropped to th x tw at
    (top, left) = round((size - target) / 2), Python's round() as torchvision's centre crop uses it, so the
    framing matches the official code to the pixel."""
    scale = max(target[0] / height, target[1] / width)
    h, w = math.ceil(scale * height), math.ceil(scale * width)
    return h, w, round((h - target[0]) / 2), round((w - target[1]) / 2)


def fit_frame(frame: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> a new [th, tw, 3] uint8 array, framed by `cover_crop` with PIL's bilinear resize (which
    antialiases when it shrinks, unlike torch's interpolate), exactly as the generator frames its reference."""
    import numpy as np
    from PIL import Image

    th, tw = target
    h, w, top, left = cover_crop(frame.shape[0], frame.shape[1], target)
    if (h, w) == frame.shape[:2]:
        resized = frame
    else:
        resized = np.asarray(Image.fromarray(frame).resize((w, h), resample=Image.BILINEAR))
    return resized[top:top + th, left:left + tw].copy()
