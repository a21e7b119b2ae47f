"""Renaming an official checkpoint's keys to the keys of a transformers module, strictly.

T5 and CLIP run on transformers' own classes (they compute what the official modules compute), but the
official files spell their keys differently. Each model owns one explicit table of rules (official
pattern -> transformers key(s)); this module applies it and checks coverage in the OFFICIAL
names, so an error points at the key a person can find in their file, not at a transformers-internal name.

A rule with several targets splits the tensor evenly along dim 0 in that order (fused qkv -> q, k, v);
a rule with no target marks a key that must be present but is not used (the CLIP projection head).
Renaming makes views, never copies: the tensors stay memory-mapped until `load_strict` casts them once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from itk.runtime.loading import WeightsError


@dataclass(frozen=True)
class Rule:
    """`official` is a full-match regex; `targets` are `re.sub` templates over its groups."""

    official: str
    targets: tuple[str, ...]
    squeeze: bool = False  # drop leading size-1 dims (official [1, 1, C] parameters vs transformers [C])


def _first(keys: list[str]) -> str:
    return keys[0] + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def remap(
    state: Mapping[str, torch.Tensor],
    rules: Iterable[Rule],
    *,
    expected: Iterable[str],
    module: nn.Module,
    source: str,
    hint: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> dict[str, torch.Tensor]:
    """The official `state` under `module`'s keys; WeightsError naming the official key and `source`.

    `expected` lists every official key the model needs (the ones `rules` map, plus required-but-unused
    ones); keys for which `ignore` is true may be present and are dropped (e.g. CLIP's text tower).
    """
    rules = tuple(rules)
    expected = set(expected)
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in set(state) - expected if not ignore(k))
    problems = []
    if missing:
        problems.append(f"missing key {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected key {_first(unexpected)}")
    if problems:
        raise WeightsError(f"{source}: {'; '.join(problems)} ({hint})")

    shapes = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(expected):
        rule = next((r for r in rules if re.fullmatch(r.official, key)), None)
        if rule is None:
            raise WeightsError(f"{source}: no key-map rule for {key} (a bug in the key map)")
        if not rule.targets:
            continue
        names = [re.sub(rule.official, t, key) for t in rule.targets]
        tensor = state[key]
        if rule.squeeze:
            while tensor.dim() > 1 and tensor.shape[0] == 1:
                tensor = tensor[0]
        parts = tensor.chunk(len(names), dim=0)
        if len(parts) != len(names):
            parts = (tensor,) * len(names)  # too small to split: the shape check below names the key
        for name, part in zip(names, parts, strict=True):
            if name not in shapes:
                raise WeightsError(f"{source}: key map sends {key} to unknown {name} (a bug in the key map)")
            if tuple(part.shape) != shapes[name]:
                raise WeightsError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, which does not fit the configured "
                    f"model ({hint})"
                )
            out[name] = part
    return out
