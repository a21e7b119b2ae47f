"""The generator never outlives its parent, and SIGHUP ends it like Ctrl-C (exit 130, nothing written).

The generator is held at a known point without weights: its job file is a FIFO, so it blocks reading the
job (after start-up, where the lifeline is armed) until the test writes to it, which it never does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from itk.runtime.protocol import parse_event

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
GONE_WITHIN_S = 10


def _argv(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(tmp_path), "--wav2vec_dir",
            str(tmp_path), "--infinitetalk_dir", str(tmp_path / "it.safetensors"),
            "--input_json", str(tmp_path / "job.fifo"), "--save_file", str(tmp_path / "out" / "talk")]


def _wait_until_reading(fifo: Path, proc: psutil.Process) -> int:
    """Poll until the generator has the job FIFO open for reading; returns a writer fd that keeps it
    blocked in read() (never written to)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, "the generator ended early"
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the generator never opened its job file")


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # exited; waiting for a reaper
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def fifo(tmp_path):
    os.mkfifo(tmp_path / "job.fifo")
    return tmp_path / "job.fifo"


def test_the_generator_ends_itself_when_its_parent_is_killed(tmp_path, fifo):
    # The parent starts the generator in its own session with a pipe on stderr, as `itk run` does (the
    # pipe breaks with the parent), and prints its pid.
    parent_code = (
        "import subprocess, sys, json\n"
        "p = subprocess.Popen(json.loads(sys.argv[1]), start_new_session=True, stderr=subprocess.PIPE)\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code, json.dumps(_argv(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    generator = psutil.Process(int(parent.stdout.readline()))
    writer = _wait_until_reading(fifo, generator)
    try:
        parent.kill()  # SIGKILL: the parent gets no chance to stop its child
        parent.wait(timeout=30)
        assert _gone(generator.pid, GONE_WITHIN_S), "the generator outlived its killed parent"
    finally:
        os.close(writer)
        if not _gone(generator.pid, 0):
            generator.kill()
    assert not (tmp_path / "out").exists()


def test_sighup_ends_the_generator_like_ctrl_c_with_exit_130_and_one_line(tmp_path, fifo):
    proc = subprocess.Popen(_argv(tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        writer = _wait_until_reading(fifo, psutil.Process(proc.pid))
        try:
            proc.send_signal(signal.SIGHUP)
            err = proc.communicate(timeout=30)[1]
        finally:
            os.close(writer)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    plain = [line for line in err.splitlines() if parse_event(line) is None]
    assert plain == ["error: interrupted; no video was written"], err
    assert not (tmp_path / "out").exists()


def test_the_lifeline_reports_a_parent_that_died_before_it_was_armed():
    # In a child process: arming it here would tie pytest itself to its parent.
    code = ("import os\nfrom itk.runtime.lifeline import die_with_parent\n"
            "print(die_with_parent(parent=os.getppid()), die_with_parent(parent=-1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr  # -1: a parent this process never had
