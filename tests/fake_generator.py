"""A stand-in for `python -m itk.runtime.generate` that speaks the same protocol (ITK-EVENT lines on stderr,
the official flags, exit codes 0/2/3/130) and fails on request, so the supervisor meets real processes.

FAKE_MODE: ok | sigkill | log (print FAKE_LOG, exit FAKE_EXIT) | decode-oom | hang (ignore SIGINT, start a
grandchild that ignores it too, write both pids to FAKE_PIDS, then wait) | hang-hard (ignore SIGTERM too).
FAKE_ARGV: a file to write the received argv to (JSON).
FAKE_SIGNALS: a file the hanging child appends the name of every signal it receives to, one a line (so a
test sees the supervisor's escalation itself, not only that the processes ended).
FAKE_STARTS: a file each hanging child appends a JSON line to as it starts: its own and its grandchild's pids, and
which pids of the children before it were still alive at that moment (so a test sees two generators side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from itk.runtime.protocol import DONE_VIDEO


def event(kind: str, **fields) -> None:
    sys.stderr.write("ITK-EVENT " + json.dumps({"event": kind, **fields}) + "\n")
    sys.stderr.flush()


def write_mp4(path: Path, frames: int = 10) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            image = np.full((64, 64, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def recorder(path: str | None, ends: bool) -> Any:
    """A handler that appends the signal's name to `path` and then ignores it or (ends) exits as SIGTERM's
    default would; without a path, plain SIG_IGN / SIG_DFL."""
    if not path:
        return signal.SIG_DFL if ends else signal.SIG_IGN
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(signum: int, frame: object) -> None:
        os.write(fd, f"{signal.Signals(signum).name}\n".encode())
        if ends:
            os._exit(128 + signum)

    return record


def still_alive(starts: Path) -> list[int]:
    """The pids the earlier lines of `starts` name that are alive now (zombies are not)."""
    import psutil

    earlier = [json.loads(line)["pids"] for line in starts.read_text().splitlines() if line] if starts.exists() else []
    living = []
    for pid in (p for pids in earlier for p in pids):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.Error:
            continue
    return living


def hang(ignore_term: bool) -> None:
    starts = os.environ.get("FAKE_STARTS")
    before = still_alive(Path(starts)) if starts else []
    record = os.environ.get("FAKE_SIGNALS")
    signal.signal(signal.SIGINT, recorder(record, ends=False))
    signal.signal(signal.SIGTERM, recorder(record, ends=not ignore_term))
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
    grandchild = subprocess.Popen([sys.executable, "-c", code])
    Path(os.environ["FAKE_PIDS"]).write_text(json.dumps([os.getpid(), grandchild.pid]))
    if starts:
        with open(starts, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pids": [os.getpid(), grandchild.pid], "alive_before": before}) + "\n")
    event("stage", stage="load_models")
    while True:
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save_file")
    parser.add_argument("--input_json")
    parser.add_argument("--sample_steps", type=int, default=4)
    args, _ = parser.parse_known_args()
    if os.environ.get("FAKE_ARGV"):
        Path(os.environ["FAKE_ARGV"]).write_text(json.dumps(sys.argv[1:]))
    mode = os.environ.get("FAKE_MODE", "ok")
    print("[2025-09-09 14:02:11,006] INFO: Creating infinitetalk pipeline.", flush=True)
    event("stage", stage="load_models")
    if mode == "sigkill":
        print("[2025-09-09 14:02:52,330] INFO: Creating WanModel from weights/Wan2.1-I2V-14B-480P", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "log":
        sys.stderr.write(Path(os.environ["FAKE_LOG"]).read_text())
        return int(os.environ.get("FAKE_EXIT", "1"))
    if mode in ("hang", "hang-hard"):
        hang(mode == "hang-hard")
    steps = min(args.sample_steps, 3)
    event("stage", stage="generate", clips=2, frames=150)  # the runtime's shapes: runtime/pipeline.py
    for clip in (1, 2):
        event("clip", clip=clip, clips=2)
        for step in range(1, steps + 1):
            event("step", clip=clip, step=step, steps=steps, elapsed_s=0.01 * step)
        if mode == "decode-oom":  # the decode runs right after a clip's last step
            sys.stderr.write(
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.33 GiB. GPU 0 has a total capacity "
                "of 23.55 GiB of which 912.00 MiB is free. Including non-PyTorch memory, this process has 22.61 GiB "
                "memory in use.\n")
            return 1
    out = Path(args.save_file + ".mp4")
    write_mp4(out)
    event("done", **{DONE_VIDEO: str(out)}, seconds=0.5, elapsed_s=0.5, gpu_peak_gb=12.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
