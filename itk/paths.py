"""Where the weights live: --weights-dir, else $ITK_WEIGHTS, else ./weights."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "ITK_WEIGHTS"


def weights_dir(option: str | Path | None = None) -> Path:
    if option:
        return Path(option).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    return Path("weights")
