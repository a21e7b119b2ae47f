"""Reading official checkpoint files into modules without ever holding two copies of the weights.

Modules are built on the meta device; tensors come from the file by mmap (safetensors, or `.pth` zip
archives with `mmap=True`) and are cast once, straight to their final dtype and device, then assigned.
Key coverage is strict: a missing or unexpected key is an error naming the key and the file, because a
silently uninitialised weight produces plausible-looking garbage video hours later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


class WeightsError(Exception):
    """A checkpoint that cannot be used as it is: missing, unreadable, or with the wrong keys or shapes."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or `.pth` file, memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read ({exc})") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def read_state_dicts(paths: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """Several files merged into one dict; a later file's key replaces an earlier one's (official order)."""
    merged: dict[str, torch.Tensor] = {}
    for path in paths:
        merged.update(read_state_dict(path))
    return merged


def check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming the first missing/unexpected keys and mismatched shapes."""
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(
            f"unexpected key {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key])}")
            break
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems))


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Assign `state` into `module` (usually built on meta) after one cast to `dtype`/`device`.

    Floating tensors take `dtype` when given; integer tensors keep theirs.
    """
    check_keys(module, state, source)
    cast = {}
    for key, value in state.items():
        target_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
        cast[key] = value.to(device=device or value.device, dtype=target_dtype)
    module.load_state_dict(cast, strict=True, assign=True)
    return module
