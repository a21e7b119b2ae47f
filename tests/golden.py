"""Loading the official implementation's goldens (tests/fixtures/goldens, copied from shared/goldens).

A golden is NAME.json plus the safetensors files it lists; tensors are merged, aliases resolved and the
bf16-stored weights upcast, so a test sees exactly what the official run used, in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"


def load_golden(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((GOLDENS / f"{name}.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in meta["files"]:
        tensors.update(load_file(GOLDENS / file))
    for alias, stored in meta.get("aliases", {}).items():
        tensors[alias] = tensors[stored]
    for key, value in tensors.items():
        if value.dtype == torch.bfloat16:
            tensors[key] = value.float()
    return meta, tensors


def weights_of(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The golden's weights under their official checkpoint key names."""
    return {k: tensors[k] for k in meta["state_dict_keys"]}


def golden_weights_file(name: str, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The golden `name`, its model weights written to the safetensors file `path` (official key names), as
    the loaders under test read a checkpoint."""
    from safetensors.torch import save_file

    meta, tensors = load_golden(name)
    save_file(weights_of(meta, tensors), str(path))
    return meta, tensors


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the goldens' "relative to the output scale"."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
