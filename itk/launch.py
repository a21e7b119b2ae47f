"""`itk run --gpus N`: how many GPUs, in which layout, and the torchrun command that starts one generator
per GPU (PyTorch's own launcher, `python -m torch.distributed.run`, so no `torchrun` script on PATH is needed).

torchrun runs each rank in its own session and forwards SIGINT/SIGTERM to all of them; when one rank fails
it stops the others and prints an error summary naming the failed rank, which the supervisor reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from itk.errors import EXIT_USAGE, UserError
from itk.runtime.layout import Layout, LayoutError, choose_layout

OFFICIAL_HEADS = 40
MODEL_CONFIG_FILE = "itk_model_config.json"  # a tiny test config beside the weights (runtime/configs.py)
LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def usable_gpus() -> int:
    """GPUs that pass the doctor's GPU checks (every GPU of a model with bf16, as the gpu check judges the
    best one): what `--gpus auto` uses; 0 without a driver."""
    from itk.checks.gpu import BF16_MIN_CC, gather

    return sum(1 for g in gather().gpus if g.compute_capability >= BF16_MIN_CC)


def parse_gpus(value: str | int) -> int:
    """`--gpus` as given: a count, or "auto" (every usable GPU, at least 1)."""
    if str(value).strip().lower() == "auto":
        return max(1, usable_gpus())
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--gpus {value}: expected a count of 1 or more, or auto", "e.g. --gpus 2", EXIT_USAGE)
    return count


def model_heads(ckpt_dir: Path | None) -> int:
    """The DiT's attention heads: the official 40, or those of a tiny config beside the weights."""
    config = ckpt_dir / MODEL_CONFIG_FILE if ckpt_dir else None
    if config is None or not config.is_file():
        return OFFICIAL_HEADS
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["dit"]["num_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return OFFICIAL_HEADS


def layout_for(gpus: int, passes: int, heads: int) -> Layout:
    """The layout `choose_layout` gives, its refusal as a usage error."""
    try:
        return choose_layout(gpus, passes, heads)
    except LayoutError as exc:
        raise UserError(str(exc), "pick --gpus as the line says", EXIT_USAGE) from None


def launch_argv(generator: list[str], gpus: int) -> list[str]:
    """The command that runs `generator` on `gpus` GPUs: itself for one, under torchrun for more (a Python
    generator only: torchrun starts each rank as `python -m MODULE` or `python SCRIPT`)."""
    if gpus == 1:
        return list(generator)
    python = Path(generator[0]).name.startswith("python") or generator[0] == sys.executable
    if not python or len(generator) < 2:
        raise UserError(f"--gpus {gpus}: cannot start {generator[0]} once per GPU (torchrun runs Python programs)",
                        "run with --gpus 1, or point ITK_GENERATOR at a Python script", EXIT_USAGE)
    return [*LAUNCHER, f"--nproc_per_node={gpus}", *generator[1:]]
