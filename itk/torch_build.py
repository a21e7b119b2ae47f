"""Which torch build `make setup` installs, from what this machine's NVIDIA driver can run.

Run by the Makefile BEFORE anything is installed (`python3 itk/torch_build.py`), so it uses the standard
library only. Why it exists: `pip install torch` takes the newest CUDA build whatever the driver supports, and
a 4090 with an older driver then fails with "CUDA driver version is insufficient" at the first kernel. The
driver's maximum CUDA version is what `nvidia-smi` prints as "CUDA Version" (the doctor reads the same number
through NVML); each torch wheel index below needs at least that version.

Prints three lines: the pip arguments to try first, the arguments to try if that fails (may be empty), and one
sentence saying which build and why. The CPU build is tried from the configured index first (a local wheel
serves), then from PyTorch's CPU index. `TORCH_SPEC` / `TORCH_INDEX` in the environment override the
choice (e.g. `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

CPU_VERSION = "2.13.0"
INDEX = "https://download.pytorch.org/whl/{tag}"
# (lowest driver CUDA version, wheel index tag), newest first: the CUDA builds torch publishes for this line.
CUDA_BUILDS = ((13.0, "cu130"), (12.8, "cu128"), (12.6, "cu126"))


def driver_cuda() -> float | None:
    """The driver's maximum CUDA version from `nvidia-smi`, or None without a working NVIDIA driver."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return float(f"{match.group(1)}.{match.group(2)}") if match else None


def choose(cuda: float | None) -> tuple[list[str], list[str], str]:
    """(pip arguments, fallback arguments, the reason in one sentence) for a driver that supports CUDA `cuda`
    (None: no GPU)."""
    if cuda is None:
        cpu = f"torch=={CPU_VERSION}+cpu"
        return ([cpu], [cpu, "--index-url", INDEX.format(tag="cpu")],
                f"torch {CPU_VERSION} CPU build: no NVIDIA driver answers here (nvidia-smi), so the ~200 MB CPU "
                "wheel instead of a multi-GB CUDA one")
    for lowest, tag in CUDA_BUILDS:
        if cuda >= lowest:
            return (["torch", "--index-url", INDEX.format(tag=tag)], [],
                    f"torch {tag} build: the driver supports CUDA up to {cuda:g} (nvidia-smi), and {tag} is the "
                    "newest torch build it can run")
    oldest, tag = CUDA_BUILDS[-1]
    return (["torch", "--index-url", INDEX.format(tag=tag)], [],
            f"torch {tag} build, but the driver only supports CUDA {cuda:g} (< {oldest:g}): it will fail with "
            "'CUDA driver version is insufficient' until the NVIDIA driver is updated (560 or newer)")


def main() -> int:
    spec, index = os.environ.get("TORCH_SPEC"), os.environ.get("TORCH_INDEX")
    args, fallback, why = choose(driver_cuda())
    if spec or index:
        args, fallback = [spec or "torch", *(["--index-url", index] if index else [])], []
        why = f"{' '.join(args)}: chosen with TORCH_SPEC/TORCH_INDEX (automatic choice: {why})"
    print(" ".join(args))
    print(" ".join(fallback))
    print(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
