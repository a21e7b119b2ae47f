"""`python -m itk.runtime.generate`: the guide's `generate_infinitetalk.py` command line, on our runtime.

The official flags that matter keep their names and meanings, so a command from the guide works with only
the program name changed; official flags we do not implement are refused by name ("not supported yet")
instead of being silently ignored. The flags, the job file, the events and the exit codes are the
contract in runtime/protocol.py: 0 done, 2 bad input (one line on stderr), 3 missing weights, 130
interrupted (Ctrl-C, SIGTERM, SIGHUP, or the parent process dying); progress goes to stderr as
`ITK-EVENT {json}` lines. This module only parses, builds the Request and hands it to the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from itk.runtime.lifeline import die_with_parent
from itk.runtime.options import Launch, RuntimeOptions
from itk.runtime.protocol import (
    DONE_VIDEO,
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_MISSING_WEIGHTS,
    EXIT_OK,
    RESUME_STATE,
    BadInput,
    Events,
    build_parser,
    check_values,
    rank_failure_line,
    resume_folder,
)
from itk.runtime.request import Request
from itk.runtime.weights import MissingWeights

if TYPE_CHECKING:
    from itk.runtime.parallel import Parallel
    from itk.runtime.warm import WarmModels


def _options() -> RuntimeOptions:
    try:
        return RuntimeOptions.from_env()
    except ValueError as exc:
        raise BadInput(str(exc), f"unset {str(exc).split('=')[0]} or give it one of the values named") from None


def _start_parallel(request: Request, options: RuntimeOptions) -> tuple[Parallel | None, Request]:
    """Under torchrun: join the process group in the request's --gpu_layout (as `itk run --gpus` chose it) or,
    without one, in the layout the step's passes and the model's heads allow; then take rank 0's seed (a
    negative --base_seed draws one per process)."""
    from itk.runtime import parallel
    from itk.runtime.engine import model_config
    from itk.runtime.layout import LayoutError, check_layout, choose_layout

    launch, given = options.launch, request.gpu_layout
    if given is not None and given.world != launch.world_size:
        raise BadInput(f"--gpu_layout {given.flag} is a layout of {given.world} GPUs, but this run has "
                       f"{launch.world_size} process{'es' if launch.world_size > 1 else ''} (WORLD_SIZE)",
                       f"start {given.world} processes (torchrun --nproc_per_node {given.world}), or leave out "
                       "--gpu_layout")
    if launch.world_size == 1:
        return None, request
    passes, heads = len(request.sampling.passes), model_config(request).dit.num_heads
    try:
        layout = check_layout(given, passes, heads) if given else choose_layout(launch.world_size, passes, heads)
    except LayoutError as exc:
        raise BadInput(str(exc), "run on one of the valid GPU counts (itk run --gpus N), which writes "
                       "--gpu_layout itself") from None
    group = parallel.start(launch, layout)
    seed = parallel.agree(request.sampling.seed, group)
    return group, dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=seed))


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP unwind like Ctrl-C, so temp files are removed on the way out


# SIGHUP: the terminal or SSH session closed. SIGTERM: `itk run` stopping it, or its parent's death (lifeline).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str] | None = None, lifeline: bool = False) -> int:
    """Run the generator on `argv` (default: the command line). `lifeline`: end when the parent process
    dies (set when run as a program; a test calling main() in-process leaves its own process alone)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    launch = Launch.from_env()
    events = Events(enabled=launch.rank == 0)  # one progress stream and one error line: rank 0's
    if lifeline and not die_with_parent():  # the parent died while this process started: nobody wants the video
        return _fail(events, EXIT_INTERRUPTED, "interrupted; no video was written")
    return run_flags(argv, events, launch=launch)


def run_flags(argv: list[str] | None, events: Events, *, launch: Launch | None = None,
              models: WarmModels | None = None) -> int:
    """One generation from the generator's flags: its events end with `done` or `error`, and its exit code is
    returned (0, 2 bad input, 3 missing weights, 130 interrupted). Any other failure is raised, after a line
    naming the rank on several GPUs. `models`: a warm worker's models, kept for its next job (default: a
    one-shot run, each model freed once used)."""
    launch = launch or Launch()
    started = time.monotonic()
    request: Request | None = None
    group: Parallel | None = None
    finished = False  # the video is written: the ranks meet before leaving their process group
    try:
        flags = vars(build_parser(description=__doc__.splitlines()[0]).parse_args(argv))
        check_values(flags)
        request = Request.from_flags(flags)
        options = dataclasses.replace(_options(), launch=launch)
        from itk.runtime import engine  # torch: only once the flags and the job are known to be usable
        from itk.runtime.warm import WarmModels

        group, request = _start_parallel(request, options)
        output = engine.run(request, events, options, resume=bool(flags.get("resume")), parallel=group,
                            models=models or WarmModels(keep=False))
        finished = True
    except BadInput as exc:
        return _fail(events, EXIT_BAD_INPUT, exc.message, exc.fix)
    except MissingWeights as exc:
        return _fail(events, EXIT_MISSING_WEIGHTS, str(exc))
    except KeyboardInterrupt:
        state = resume_folder(request.output) if request is not None else None
        if state is not None and (state / RESUME_STATE).is_file():
            return _fail(events, EXIT_INTERRUPTED, f"interrupted; the finished clips are kept in {state}",
                         "run the same command with --resume to continue (itk run does so by itself)")
        return _fail(events, EXIT_INTERRUPTED, "interrupted; no video was written")
    except Exception as exc:
        if launch.world_size > 1:  # every rank's own line, so a crash names the rank it happened on
            print(rank_failure_line(launch.rank, launch.world_size, exc), file=sys.stderr, flush=True)
        raise
    finally:
        if group is not None:
            from itk.runtime.parallel import stop

            stop(group, wait=finished)
    events.emit("done", **{DONE_VIDEO: str(output)}, seconds=round(time.monotonic() - started, 2))
    if events.enabled and events.job is None:
        print(output)
    return EXIT_OK


def _fail(events: Events, code: int, message: str, fix: str = "") -> int:
    # A dead parent closed the pipe these lines go to: the exit code still has to get out.
    with contextlib.suppress(OSError):
        events.emit("error", message=message, exit_code=code, **({"fix": fix} if fix else {}))
        if events.enabled:
            print(f"error: {message}" + (f" (fix: {fix})" if fix else ""), file=sys.stderr)
    return code


def exit_now(code: int) -> None:
    """End the process with `code` once stdout and stderr are flushed, skipping the interpreter's teardown.

    Why: by then the mp4 is in place (or the error reported) and nothing is left to clean, but tearing down
    frees ~19 GB of pinned DiT blocks page by page and the CUDA context: 6.5 s measured on an H200 after the
    video was done (bench/results/whole-run-h200.json), time the user waits for nothing."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(lifeline=True))
