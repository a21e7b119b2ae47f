"""The generator ends with its parent: a killed `itk run` must never leave a generator holding the GPU.

`itk run` starts the generator in its own session (so a terminal's Ctrl-C reaches only itk), which also
means nothing ends the generator when `itk run` is SIGKILLed: it would keep running as an orphan with the
GPU's memory. On Linux the kernel's parent-death signal (prctl PR_SET_PDEATHSIG) sends the generator
SIGTERM the moment its parent dies; the generator handles SIGTERM like Ctrl-C (exit 130, temporary files
removed). Elsewhere a daemon thread watches the parent id and interrupts the main thread when it changes.

Linux sends the signal when the parent THREAD that started the child ends, so the parent must start the
generator from a thread that lives as long as the run (the supervisor waits on it in the same thread).
"""

from __future__ import annotations

import _thread
import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 0.5

# The parent as early as the generator can see it: if it has died before the death signal is armed, the
# parent id has already changed to a reaper's and `die_with_parent` notices.
STARTED_BY = os.getppid()


def die_with_parent(sig: int = signal.SIGTERM, parent: int = STARTED_BY) -> bool:
    """Arm the parent-death signal `sig` (Linux) or the watch thread. False: `parent` is already gone (it
    died before anything was armed, so no signal will come) and the caller should end now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            _watch(parent)  # a seccomp policy may forbid prctl: fall back to watching
    else:
        _watch(parent)
    return os.getppid() == parent


def _watch(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(WATCH_INTERVAL_S)
        _thread.interrupt_main()  # KeyboardInterrupt in the main thread: the same unwinding as Ctrl-C

    threading.Thread(target=watch, name="itk-parent-watch", daemon=True).start()
