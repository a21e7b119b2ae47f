"""The page's browser tests (tests/test_ui.py) need Debian's chromium and chromium-driver. Without them, outside
CI they are skipped with one reason naming the install command (instead of selenium's "Unable to obtain driver"
errors); in CI (CI set) they fail, so a CI machine without a browser is noticed. pytest runs on test_ui.py with a
PATH that has no browser on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ui_page import BROWSER_INSTALL, ROOT


def pytest_without_a_browser(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(Path(sys.executable).parent)  # python and the venv's tools, no chromium
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "t"), "tests/test_ui.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_outside_ci_the_browser_tests_are_skipped_with_one_reason_naming_the_install(tmp_path: Path) -> None:
    proc = pytest_without_a_browser(tmp_path, ci=False)
    assert proc.returncode in (0, 5), proc.stdout[-3000:]  # 5: nothing left to run in that file
    reasons = re.findall(r"^SKIPPED \[(\d+)\] .*$", proc.stdout, re.M)
    assert reasons == ["1"], proc.stdout[-3000:]  # one line, not one per test
    assert BROWSER_INSTALL in proc.stdout and "Unable to obtain driver" not in proc.stdout


def test_in_ci_a_missing_browser_fails_the_browser_tests(tmp_path: Path) -> None:
    proc = pytest_without_a_browser(tmp_path, ci=True)
    assert proc.returncode != 0 and " error" in proc.stdout and " passed" not in proc.stdout, proc.stdout[-3000:]
    assert BROWSER_INSTALL in proc.stdout and "skipped" not in proc.stdout
