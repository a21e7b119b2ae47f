"""`make setup` picks the torch build from the NVIDIA driver's CUDA version (itk/torch_build.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from itk.torch_build import CUDA_BUILDS, choose

SCRIPT = Path(__file__).parents[1] / "itk" / "torch_build.py"


def test_a_machine_without_a_driver_gets_the_cpu_wheel_from_the_local_index_first():
    first, fallback, why = choose(None)
    assert first == ["torch==2.13.0+cpu"] and fallback[-1].endswith("/whl/cpu") and "CPU build" in why


def test_each_driver_gets_the_newest_build_it_can_run_and_the_boundary_itself_qualifies():
    for lowest, tag in CUDA_BUILDS:
        args, _, why = choose(lowest)
        assert args[-1].endswith(f"/whl/{tag}") and f"up to {lowest:g}" in why
    assert choose(12.9)[0][-1].endswith("/cu128")
    assert choose(12.7)[0][-1].endswith("/cu126")


def test_a_driver_older_than_every_build_is_told_to_update_the_driver():
    _, _, why = choose(12.2)
    assert "driver version is insufficient" in why and "12.2" in why


def test_the_environment_overrides_the_choice_and_the_reason_says_so():
    env = {"PATH": "/nonexistent", "TORCH_INDEX": "https://example.invalid/whl/cu126"}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, check=True)
    first, fallback, why = out.stdout.splitlines()
    assert first == "torch --index-url https://example.invalid/whl/cu126" and fallback == ""
    assert "TORCH_SPEC/TORCH_INDEX" in why
