"""Size buckets: the output resolution picked from the reference image's aspect ratio (the official tables).

The tables are data (buckets.toml). A tiny model config may add its own table (ModelConfig.buckets), which
then replaces the official one of the same name, so tests and `itk selftest` run at a few dozen pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

from itk.runtime.toml import read_toml


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


def resized_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size before the centre crop: scale by max(th/H, tw/W), each side rounded up."""
    scale = max(target[0] / height, target[1] / width)
    return math.ceil(scale * height), math.ceil(scale * width)
