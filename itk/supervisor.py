"""Run the generator as a child in its own process group, read its progress events, keep its full log, and
make sure nothing of it survives: a stray worker that keeps 20 GB of VRAM after Ctrl-C is the failure this
module exists to prevent.

The child gets its own session (start_new_session), so a Ctrl-C in the terminal reaches only itk; itk then
stops the whole group in steps: SIGINT (the generator exits cleanly with 130), SIGTERM after a grace
period, SIGKILL after another, and it waits until no process of the group is left. SIGTERM and SIGHUP (the
terminal or the SSH session closed) to itk itself are handled the same way: the child's own session gets no
SIGHUP of its own, so without this it would run on, an orphan holding the GPU.

Several GPUs (`itk run --gpus N`): the child is torchrun, which starts each rank in a session of its own
and forwards SIGINT/SIGTERM to them. The ranks are one job here: only rank 0 emits events (one progress
display), the supervisor remembers every descendant it saw, and a stop is done only when none of them is
left (SIGKILL reaches them too). `failed_rank` reads which rank failed first from the log.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.runtime.protocol import EVENT_PREFIX, parse_event

GRACE_S = float(os.environ.get("ITK_STOP_GRACE_S", "10"))  # per escalation step
TAIL_LINES = 200


@dataclass
class Outcome:
    returncode: int  # negative: killed by that signal (subprocess convention)
    interrupted: bool
    elapsed_s: float
    log_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)  # the last log lines, events included

    @property
    def last_stage(self) -> str | None:
        return next((e.get("stage") for e in reversed(self.events) if e.get("stage")), None)

    @property
    def phase(self) -> str | None:
        """Where the run was when it ended. The VAE decode of a clip has no event of its own: it runs right
        after the clip's last step, so a last event that is a clip's final step means "decode"."""
        last = self.events[-1] if self.events else {}
        if last.get("event") == "step" and last.get("step") and last.get("step") == last.get("steps"):
            return f"decode (after the last step of clip {last.get('clip', '?')})"
        if last.get("event") == "step":
            return f"{self.last_stage or 'generate'} (clip {last.get('clip', '?')}, step {last.get('step')})"
        return self.last_stage

    @property
    def output(self) -> str | None:
        """The video the done event names (`path`, as the runtime writes it; `output` also accepted)."""
        done = self.done or {}
        return done.get("path") or done.get("output")

    @property
    def done(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == "done"), None)


class _Stop(Exception):
    """SIGTERM or SIGHUP to itk itself: handled like Ctrl-C."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


# torchrun's error summary and the generator's own line per failed rank (runtime/generate.py)
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+) \(local_rank: \d+\)"
                        r"\s*exitcode\s*:\s*(-?\d+)", re.S)
RANK_ERROR = re.compile(r"^error: rank (\d+) of (\d+) failed: (.+)$", re.M)
DESCENDANTS_EVERY_S = 1.0


def failed_rank(log_text: str) -> str | None:
    """"rank K failed first: WHY" for a multi-GPU run that failed (None for a single process): the root cause
    torchrun names, with that rank's own error line, or its exit status when it left none (killed)."""
    errors: dict[int, str] = {}
    for m in RANK_ERROR.finditer(log_text):
        # The ranks share one stderr: another rank's event line can land inside this line; cut it off there.
        errors.setdefault(int(m[1]), m[3].split(EVENT_PREFIX)[0].strip())
    root = ROOT_CAUSE.search(log_text)
    if root is None and not errors:
        return None
    rank = int(root[1]) if root else next(iter(errors))
    why = errors.get(rank)
    if why is None and root is not None:
        code = int(root[2])
        why = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit status {code}"
    return f"rank {rank} failed first: {why}"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


class Supervisor:
    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None, grace_s: float = GRACE_S):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.on_event = on_event or (lambda e: None)
        self.grace_s = grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid = 0
        self.descendants: dict[int, Any] = {}  # pid -> psutil.Process: torchrun's ranks live in other sessions
        self._looked = 0.0

    def _note_descendants(self) -> None:
        """Remember the leader's descendants (at most once a second): a rank outlives its reparenting."""
        import psutil

        if time.monotonic() - self._looked < DESCENDANTS_EVERY_S:
            return
        self._looked = time.monotonic()
        try:
            for child in psutil.Process(self.pgid).children(recursive=True):
                self.descendants.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def _live_descendants(self) -> list[Any]:
        import psutil

        live = []
        for proc in self.descendants.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc)
            except psutil.Error:
                continue
        return live

    def _read(self, lines: queue.Queue[tuple[str, dict[str, Any] | None] | None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                lines.put((line, parse_event(line)))
        lines.put(None)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if sig == signal.SIGKILL:  # gentler signals reach the ranks through torchrun, which forwards them
            for proc in self._live_descendants():
                try:
                    proc.kill()
                except Exception:  # noqa: BLE001 - gone meanwhile
                    pass

    def _wait_gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            assert self.proc is not None
            self.proc.poll()  # reap the leader so it does not linger as a zombie member
            if not group_members(self.pgid) and not self._live_descendants():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop_group(self, first: int = signal.SIGINT) -> None:
        """Escalate until no process of the group is left. A second Ctrl-C skips to SIGKILL."""
        steps = [first, signal.SIGTERM] if first == signal.SIGINT else [first]
        try:
            for sig in steps:
                self._signal(sig)
                if self._wait_gone(self.grace_s):
                    return
        except (KeyboardInterrupt, _Stop):
            pass
        self._signal(signal.SIGKILL)
        self._wait_gone(30)

    def run(self) -> Outcome:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True,
        )
        self.pgid = self.proc.pid  # a new session's leader is its group's id
        lines: queue.Queue[tuple[str, dict[str, Any] | None] | None] = queue.Queue()
        reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        reader.start()
        events: list[dict[str, Any]] = []
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        interrupted = False
        previous = self._trap_stops()
        leader_gone = 0.0
        try:
            while True:
                self._note_descendants()
                try:
                    item = lines.get(timeout=0.2)
                except queue.Empty:
                    if self.proc.poll() is not None:
                        # The leader is gone: end whatever it left behind, which also closes the pipe. A process
                        # that left the group (setsid) could hold the pipe forever: stop waiting after a while.
                        self.stop_group(signal.SIGTERM)
                        leader_gone = leader_gone or time.monotonic()
                        if time.monotonic() - leader_gone > 5:
                            break
                    continue
                if item is None:
                    break
                line, event = item
                tail.append(line)
                if event is not None:
                    events.append(event)
                    self.on_event(event)
        except (KeyboardInterrupt, _Stop):
            interrupted = True
            self.stop_group(signal.SIGINT)
        finally:
            self._restore(previous)
        self.stop_group(signal.SIGTERM)  # no-op when the group is already gone
        reader.join(timeout=5)
        while not lines.empty():
            item = lines.get()
            if item is not None:
                tail.append(item[0])
                if item[1] is not None:
                    events.append(item[1])
        returncode = self.proc.wait()
        return Outcome(returncode, interrupted, time.monotonic() - start, self.log_path, events, list(tail))

    @staticmethod
    def _trap_stops() -> dict[int, Any]:
        """SIGTERM and SIGHUP raise _Stop in the main thread (signal handlers can only be set there; a web
        page's worker thread keeps the process's own handling)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def raise_stop(signum: int, frame: Any) -> None:
            raise _Stop()

        return {sig: signal.signal(sig, raise_stop) for sig in STOP_SIGNALS}

    @staticmethod
    def _restore(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
