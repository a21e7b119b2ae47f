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
left (SIGKILL reaches them too). The protocol's `failed_rank` reads which rank failed first from the log.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.runtime.protocol import DONE_VIDEO, EXIT_INTERRUPTED, parse_event

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
        """The video the done event names (its protocol field, DONE_VIDEO)."""
        done = self.done or {}
        return done.get(DONE_VIDEO)

    @property
    def done(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == "done"), None)


class _Stop(Exception):
    """SIGTERM or SIGHUP to itk itself: handled like Ctrl-C."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def trap_stops(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """SIGTERM and SIGHUP go to `handler`; returns the previous handlers for `restore`. Only the main thread can
    set signal handlers: elsewhere (a web page's worker thread) the process keeps its own handling."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


DESCENDANTS_EVERY_S = 1.0


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


def stop_process_group(leader: subprocess.Popen[Any], grace_s: float, *, first: int = signal.SIGINT,
                       extra: Callable[[], list[Any]] = list) -> bool:
    """The one stop ladder, as Ctrl-C does it, for a child started in a session of its own (its pid is its
    group's id): `first` (SIGINT: the generator exits cleanly with 130) to the whole group, SIGTERM after
    `grace_s`, SIGKILL after another, waiting until no process of the group is left.
    `extra` lists other live processes (psutil) that belong to the job outside the group (torchrun's ranks run
    in sessions of their own; the gentler signals reach them through torchrun, SIGKILL directly). A second
    Ctrl-C or a SIGTERM to itk during the wait skips to SIGKILL. True once nothing is left."""

    pgid = leader.pid

    def gone() -> bool:
        leader.poll()  # reap the leader so it does not linger as a zombie member
        return not group_members(pgid) and not extra()

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not gone():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        if sig == signal.SIGKILL:
            for proc in extra():
                with contextlib.suppress(Exception):  # gone meanwhile
                    proc.kill()

    steps = [first, signal.SIGTERM] if first == signal.SIGINT else [first]
    try:
        for sig in steps:
            send(sig)
            if wait(grace_s):
                return True
    except (KeyboardInterrupt, _Stop):
        pass
    send(signal.SIGKILL)
    return wait(30)


class Supervisor:
    """One child (the generator, torchrun, or a warm worker) in a session of its own, its output kept in a log and
    its events passed to `on_event` as they come, stopped as a whole group.

    A warm worker (`fed`): its stdin is a pipe `send` writes job requests to, and each job's lines go to the log
    `job_log(job id)` names (from the job's "job" event to its "done" or "error"), the rest to `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None, grace_s: float = GRACE_S, *,
                 fed: bool = False, job_log: Callable[[str], Path] | None = None):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.on_event = on_event or (lambda e: None)
        self.grace_s = grace_s
        self.fed = fed
        self.job_log = job_log
        self._send_lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid = 0
        self.descendants: dict[int, Any] = {}  # pid -> psutil.Process: torchrun's ranks live in other sessions
        self._looked = 0.0
        self._cancel = threading.Event()

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
        main = open(self.log_path, "a", encoding="utf-8")  # closed in the finally below
        log = main
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                event = parse_event(line)
                if event is not None and event["event"] == "job" and self.job_log is not None:
                    path = self.job_log(str(event.get("job")))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    log = open(path, "a", encoding="utf-8")  # closed at the job's end
                log.write(line + "\n")
                log.flush()
                if event is not None and event["event"] in ("done", "error") and log is not main:
                    log.close()
                    log = main
                lines.put((line, event))
        finally:
            if log is not main:
                log.close()
            main.close()
        lines.put(None)

    def send(self, line: str) -> bool:
        """Write one line to a fed child's stdin (a job request); False when the child is gone."""
        if self.proc is None or self.proc.stdin is None:
            return False
        try:
            with self._send_lock:
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def close_input(self) -> None:
        """End a fed child's input: a warm worker finishes its job in progress, then exits."""
        if self.proc is not None and self.proc.stdin is not None:
            with self._send_lock, contextlib.suppress(OSError):
                self.proc.stdin.close()

    def signal_child(self, sig: int) -> None:
        """Send `sig` to the child process itself (a warm worker's SIGUSR1: stop the job in progress)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the whole group and every descendant seen, now (a second Ctrl-C)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
            for proc in self._live_descendants():
                with contextlib.suppress(Exception):  # gone meanwhile
                    proc.kill()

    def stop_group(self, first: int = signal.SIGINT) -> None:
        """Escalate until no process of the group (nor a descendant seen) is left; a second Ctrl-C skips to
        SIGKILL (`stop_process_group`)."""
        assert self.proc is not None
        stop_process_group(self.proc, self.grace_s, first=first, extra=self._live_descendants)

    def cancel(self) -> None:
        """Stop the run as Ctrl-C does, from any thread: the thread running `run` sees it within 0.2 s, stops the
        whole group and returns an interrupted Outcome. Before the child starts, the run never starts it."""
        self._cancel.set()

    def run(self) -> Outcome:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        if self._cancel.is_set():
            return Outcome(EXIT_INTERRUPTED, True, 0.0, self.log_path)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if self.fed else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        self.pgid = self.proc.pid  # a new session's leader is its group's id
        lines: queue.Queue[tuple[str, dict[str, Any] | None] | None] = queue.Queue()
        reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        reader.start()
        events: list[dict[str, Any]] = []
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        interrupted = False
        previous = trap_stops(_raise_stop)
        leader_gone = 0.0
        try:
            while True:
                self._note_descendants()
                if self._cancel.is_set() and not interrupted:
                    interrupted = True
                    self.stop_group(signal.SIGINT)
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
            restore(previous)
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

