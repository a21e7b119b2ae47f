"""One warm worker process (`python -m itk.runtime.worker`), as a batch's slot drives it, wherever it runs.

`Worker` is what a slot of itk.batch needs from one: start it and get its events (then None once it has ended),
send it a job request, cancel the job in progress, stop or kill it, close it. `LocalWorker` is the process on
this machine under a Supervisor; itk.cluster's `RemoteWorker` is the same LocalWorker inside a Ray actor on
another node, driven from the head through that actor. A worker that is `lost` (its node left the cluster) can
never run again: its slot gives its job back to the queue and ends.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from itk.runtime.protocol import CANCEL_JOB_SIGNAL

WORKER = [sys.executable, "-m", "itk.runtime.worker"]
OnEvent = Callable[[dict[str, Any] | None], None]  # a worker's events, then None once it has ended


def worker_label(gpu: int | None) -> str:
    return "CPU" if gpu is None else f"GPU {gpu}"


def worker_log(folder: Path, label: str) -> Path:
    """The log of a worker's own lines (those outside its jobs) in a batch's output folder."""
    return folder / "workers" / f"{re.sub(r'[^a-z0-9.]+', '-', label.lower()).strip('-')}.log"


def job_log(folder: Path, job: str) -> Path:
    """The log of job `job`'s lines: the generator's log in its run folder (as itk.run.Plan.log_path)."""
    from itk.run import run_folder

    return run_folder(folder / f"{job}.mp4") / "generate.log"


class Worker(Protocol):
    """One warm worker as a slot uses it. `lost`: why it can never run again (None while it can)."""

    label: str
    lost: str | None

    @property
    def log_path(self) -> Path: ...

    @property
    def returncode(self) -> int | None: ...

    def launch(self, on_event: OnEvent) -> None: ...

    def send(self, line: str) -> bool: ...

    def cancel_job(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...

    def oom_kills(self) -> int | None: ...


class LocalWorker:
    """A warm worker on this machine: the process under a Supervisor that runs in a thread living as long as it
    (the worker's parent-death signal is tied to the thread that started it), with no signal blocked. `gpu`: the
    CUDA device it gets
    (None: the device setting this process has, e.g. the one Ray gave its actor). Each `launch` starts a new
    process; a stop is final (a later launch ends at once)."""

    def __init__(self, folder: Path, *, gpu: int | None = None, label: str | None = None) -> None:
        self.folder, self.gpu = folder, gpu
        self.label = label or worker_label(gpu)
        self.lost: str | None = None
        self.supervisor: Any = None
        self.runner: threading.Thread | None = None
        self.stopped = False

    @property
    def log_path(self) -> Path:
        return worker_log(self.folder, self.label)

    @property
    def returncode(self) -> int | None:
        proc = self.supervisor.proc if self.supervisor is not None else None
        return proc.returncode if proc is not None else None

    def launch(self, on_event: OnEvent) -> None:
        from itk.run import child_env
        from itk.supervisor import Supervisor

        env = child_env()
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        supervisor = Supervisor(list(WORKER), self.log_path, env=env, on_event=on_event, fed=True,
                                job_log=lambda job: job_log(self.folder, job))
        self.supervisor = supervisor
        if self.stopped:
            supervisor.cancel()  # a stop that came before this Supervisor existed: it never starts the worker

        def run() -> None:
            # A process inherits the starting thread's blocked signals across exec: a Ray actor's threads block
            # SIGINT, which would leave the worker deaf to the stop ladder's first step.
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            supervisor.run()
            on_event(None)

        self.runner = threading.Thread(target=run, name=f"itk-worker-{self.label}", daemon=True)
        self.runner.start()

    def send(self, line: str) -> bool:
        return self.supervisor is not None and self.supervisor.send(line)

    def cancel_job(self) -> None:
        """SIGUSR1: the worker stops its job in progress (resume state kept) and stays, warm."""
        if self.supervisor is not None:
            self.supervisor.signal_child(CANCEL_JOB_SIGNAL)

    def stop(self) -> None:
        """Stop the job in progress and the worker, as Ctrl-C does (the job keeps its resume state)."""
        self.stopped = True
        if self.supervisor is not None:
            self.supervisor.cancel()

    def kill(self) -> None:
        if self.supervisor is not None:
            self.supervisor.kill()

    def close(self) -> None:
        """End the worker's input (an idle worker exits; a busy one after its job) and wait until it has ended and
        is reaped."""
        if self.supervisor is not None:
            self.supervisor.close_input()
        if self.runner is not None:
            self.runner.join()

    def oom_kills(self) -> int | None:
        """This machine's OOM kills so far (the advice rules compare them after a crash)."""
        from itk.checks.ram import read_cgroup

        return read_cgroup().oom_kills
