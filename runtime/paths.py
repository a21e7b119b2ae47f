"""Where the weights live: --weights-dir, else $ITK_WEIGHTS, else ./weights."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "ITK_WEIGHTS"
# Tests give the free-space figure here (a byte count) instead of filling a disk; read only by free_bytes.
FREE_BYTES_ENV = "ITK_TEST_FREE_BYTES"


def weights_dir(option: str | Path | None = None) -> Path:
    if option:
        return Path(option).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    return Path("weights")


def existing_parent(path: Path) -> Path:
    """The nearest folder that exists: free space is measured there before the weights folder is made."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free disk space where `path` is (or would be). The one place that reads it."""
    import shutil

    if os.environ.get(FREE_BYTES_ENV):
        return int(os.environ[FREE_BYTES_ENV])
    return shutil.disk_usage(existing_parent(path)).free
