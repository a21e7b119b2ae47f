"""`python -m itk.runtime.worker`: the generator in a job loop, keeping its models loaded between jobs.

Each line on stdin is one job, `{"job": ID, "argv": [flags]}` with the flags `python -m itk.runtime.generate`
takes (protocol.job_request). A job runs exactly as that command would (same checks, events, files and exit
meanings), its events tagged with its id; the models it loaded stay for the next job as far as its memory plan
allows (runtime/warm.py). A job's bad input (exit 2) or missing weights (exit 3) ends that job only; SIGUSR1
stops the job in progress (exit 130 for it, resume state kept) and the worker waits for the next; SIGINT,
SIGTERM, SIGHUP or the parent's death stop the job and the worker (130). Any other failure is a crash: its
traceback goes to the log and the worker exits 1, so whoever feeds it sees the crash and starts a new one (a
process after a CUDA out-of-memory or a broken kernel is not one to trust with the next job).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from itk.runtime.generate import STOP_SIGNALS, exit_now, run_flags
from itk.runtime.lifeline import die_with_parent
from itk.runtime.protocol import (
    CANCEL_JOB_SIGNAL,
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BadInput,
    Events,
    parse_job_request,
)


class JobCancelled(KeyboardInterrupt):
    """SIGUSR1: the job in progress stops, unwinding like Ctrl-C (its resume state is kept); the worker stays."""


def main() -> int:
    """Serve jobs from stdin until it ends (0) or a stop signal (130)."""
    # A list, not a threading.Event: a handler may interrupt another handler, and Event.set takes a lock the
    # interrupted one may hold (a worker deadlocked so under a second stop signal).
    stopping: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signum)
        raise KeyboardInterrupt

    def cancel_job(signum: int, frame: Any) -> None:
        raise JobCancelled

    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, stop)
    signal.signal(CANCEL_JOB_SIGNAL, cancel_job)
    if not die_with_parent():
        return EXIT_INTERRUPTED  # the parent died while this process started
    from itk.runtime.warm import WarmModels

    events, models = Events(), WarmModels()
    events.emit("ready")
    while not stopping:
        job_events: Events | None = None
        ended = False
        try:  # a stop or a cancel may land anywhere in here, also between the job's own handlers
            line = sys.stdin.readline()
            if not line:
                return EXIT_OK
            if not line.strip():
                continue
            try:
                job, argv = parse_job_request(line)
            except BadInput as exc:
                events.emit("error", message=exc.message, fix=exc.fix, exit_code=EXIT_BAD_INPUT)
                continue
            job_events = events.for_job(job)
            job_events.emit("job")
            run_flags(argv, job_events, models=models)  # its last event: done or error
            ended = True
            events.emit("ready")
        except KeyboardInterrupt:
            if job_events is not None and not ended:  # the job had not started its own handling: end it here
                job_events.emit("error", message="interrupted before the job started", exit_code=EXIT_INTERRUPTED)
            if stopping:
                return EXIT_INTERRUPTED
            if job_events is not None:
                events.emit("ready")
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    exit_now(main())
