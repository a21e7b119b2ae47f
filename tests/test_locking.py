"""Every itk lock is itk.locking's: `itk fetch`'s weights-folder lock and `itk batch`'s output-folder lock, each
held by a real second process, refuse naming that process's pid, and are taken over once it is killed (its pid
file left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from itk.batch import folder_lock
from itk.fetch import fetch_lock
from itk.runtime.protocol import UserError

HOLD = """import sys, time
from pathlib import Path
from itk.{module} import {lock}
with {lock}(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("module, lock", [("fetch", fetch_lock), ("batch", folder_lock)])
def test_a_lock_names_its_live_holder_and_is_taken_over_when_the_holder_is_killed(tmp_path, module, lock):
    folder = tmp_path / "folder"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(module=module, lock=lock.__name__), str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        with pytest.raises(UserError) as refused, lock(folder):
            pass
        assert f"(pid {holder.pid})" in refused.value.message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)
    [pid_file] = folder.rglob("*.lock.pid")  # the killed holder had no chance to remove it
    assert pid_file.read_text().strip() == str(holder.pid)
    with lock(folder):
        assert pid_file.read_text().strip() == str(os.getpid())
    assert not pid_file.exists()
