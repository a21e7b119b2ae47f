"""Import the heavy stack (torch, flash-attn, numpy, numba, librosa) in a child process and report as JSON.

Why a child: the doctor itself must start fast and must survive whatever these imports do (an ABI
`undefined symbol`, a NumPy/numba clash, even a segfault). Run as `python -m itk.checks.probe`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from typing import Any

from itk.checks.base import gathered_once

TIMEOUT_S = 120


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def declared_range(dist: str, requirement: str) -> str | None:
    """The version range `dist` declares for `requirement` in its metadata (numba: "numpy<2.6,>=1.22" -> "<2.6,>=1.22"),
    None when it is not installed or declares none."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() == requirement.lower() and not req.marker and str(req.specifier):
            return str(req.specifier)
    return None


def _import_error(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a fact to report
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def probe() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": sys.version.split()[0]}
    for dist in ("torch", "flash-attn", "numpy", "numba", "librosa"):
        facts[dist] = {"version": _version(dist)}
    for dist, module in (("numpy", "numpy"), ("torch", "torch"), ("numba", "numba"), ("librosa", "librosa")):
        if facts[dist]["version"]:
            facts[dist]["import_error"] = _import_error(module)
    facts["numba"]["numpy_range"] = declared_range("numba", "numpy")
    if facts["torch"]["version"] and not facts["torch"]["import_error"]:
        import torch

        facts["torch"].update(
            cuda_build=torch.version.cuda,
            cuda_available=torch.cuda.is_available(),
            device_count=torch.cuda.device_count(),
            cxx11_abi=bool(torch.compiled_with_cxx11_abi()),
        )
    if facts["flash-attn"]["version"]:
        facts["flash-attn"]["import_error"] = _import_error("flash_attn")
    return facts


@gathered_once
def run_probe() -> dict[str, Any]:
    """The probe's facts, or {"error": ...} when the child died (crash, timeout)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "itk.checks.probe"], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"error": f"importing torch/numpy/librosa took over {TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the import probe exited with {proc.returncode}: {tail}"}
    return json.loads(proc.stdout)


if __name__ == "__main__":
    print(json.dumps(probe()))
