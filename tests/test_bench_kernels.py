"""A benchmark asked for an attention kernel that does not import refuses in one line naming the package,
instead of measuring torch SDPA under the requested name (the runtime's silent fallback is right for a
user's video, wrong for a measurement). Run here, on a CPU box without FlashAttention-4 or SageAttention."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = ("bench_dit_step.py", "bench_fusion.py")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def bench(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(("kernel", "package", "module"), [("fa4", "flash-attn-4", "flash_attn.cute"),
                                                           ("sage", "sageattention", "sageattention")])
def test_an_explicit_kernel_that_does_not_import_is_refused_naming_its_package(script, kernel, package, module,
                                                                               tmp_path):
    if importable(module):
        pytest.skip(f"{module} is installed here")
    proc = bench(script, tmp_path, "--attention", kernel)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"--attention {kernel}:") and package in lines[0] and module in lines[0]
    assert "sdpa" in lines[0] and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_kernel_name_that_does_not_exist_is_refused_with_the_choices(script, tmp_path):
    proc = bench(script, tmp_path, "--attention", "fa5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--attention fa5" in proc.stderr and "fa4, flash, sage, sdpa" in proc.stderr
