"""`itk run --gpus N`: how many GPUs, in which layout, and the torchrun command that starts one generator
per GPU (PyTorch's own launcher, `python -m torch.distributed.run`, so no `torchrun` script on PATH is needed).

torchrun runs each rank in its own session and forwards SIGINT/SIGTERM to all of them; when one rank fails
it stops the others and prints an error summary naming the failed rank, which the supervisor reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from itk.runtime.layout import Layout, LayoutError, choose_layout
from itk.runtime.protocol import EXIT_BAD_INPUT, UserError

LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def usable_gpus() -> int:
    """GPUs that pass the doctor's GPU checks (every GPU of a model with bf16, as the gpu check judges the
    best one): what `--gpus auto` uses; 0 without a driver."""
    from itk.checks.gpu import BF16_MIN_CC, gather

    return sum(1 for g in gather().gpus if g.compute_capability >= BF16_MIN_CC)


def model_heads(ckpt_dir: Path | None, model_config: Path | None = None) -> int:
    """The DiT's attention heads, as the generator will build it (itk.runtime.configs: the official sizes, the
    folder's config.json, then `model_config` or the folder's itk_model_config.json)."""
    from itk.runtime.configs import load_model_config

    try:
        return load_model_config(folder=ckpt_dir, file=model_config).dit.num_heads
    except (OSError, ValueError) as exc:
        raise UserError(f"model config: {exc}", "give a valid itk_model_config.json or leave it out",
                        EXIT_BAD_INPUT) from None


def layout_for(gpus: int, passes: int, heads: int) -> Layout:
    """The layout `choose_layout` gives, its refusal as a usage error."""
    try:
        return choose_layout(gpus, passes, heads)
    except LayoutError as exc:
        raise UserError(str(exc), "pick --gpus as the line says", EXIT_BAD_INPUT) from None


def launch_argv(generator: list[str], gpus: int) -> list[str]:
    """The command that runs `generator` on `gpus` GPUs: itself for one, under torchrun for more (a Python
    generator only: torchrun starts each rank as `python -m MODULE` or `python SCRIPT`)."""
    if gpus == 1:
        return list(generator)
    python = Path(generator[0]).name.startswith("python") or generator[0] == sys.executable
    if not python or len(generator) < 2:
        raise UserError(f"--gpus {gpus}: cannot start {generator[0]} once per GPU (torchrun runs Python programs)",
                        "run with --gpus 1, or point ITK_GENERATOR at a Python script", EXIT_BAD_INPUT)
    return [*LAUNCHER, f"--nproc_per_node={gpus}", *generator[1:]]
