"""`make setup` as its recipes read (make -n prints them without running anything): the long package install
says what it does and shows pip's progress instead of a silent minute and a half."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def setup_recipe(tmp_path: Path) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    venv = tmp_path / "venv"  # absent: make plans every step of a fresh setup
    # as a person types it: not as a sub-make of `make test`, which would add "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "setup", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_make_setup_says_what_it_installs_and_lets_pip_show_its_progress(tmp_path):
    lines = setup_recipe(tmp_path)
    install = next(i for i, line in enumerate(lines) if "install" in line and line.rstrip().endswith("-e ."))
    assert " -q" not in lines[install] and "--progress-bar on" in lines[install]
    said = lines[install - 1]
    assert said.startswith("echo") and "itk setup:" in said and "minute or two" in said


def test_make_setup_still_ends_with_the_selftest_whose_line_ci_checks(tmp_path):
    lines = setup_recipe(tmp_path)
    assert lines[-1].endswith("itk selftest") and "doctor || true" in lines[-2]
