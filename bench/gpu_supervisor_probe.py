"""On a real GPU: the supervisor and the advice rules against real CUDA failures (run on the device machine).

1. A process holds VRAM; a supervised child raises torch's real CUDA OOM: the verdict must be cuda-oom with
   the numbers of this torch's message and, from NVML, the holder listed by pid with a kill command.
2. A supervised child that ignores SIGINT holds VRAM and starts a grandchild that holds VRAM too; stopping
   the group must leave no process of it and give the memory back (read from NVML).

Writes results/gpu_supervisor_<gpu>.json and the real OOM log to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HOLD = """
import sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
print("ready", flush=True)
time.sleep(600)
"""
OOM = """
import torch
print("[itk-probe] INFO: Creating WanModel on", torch.cuda.get_device_name(0), flush=True)
x = torch.empty(int(4 * 2**40), dtype=torch.uint8, device="cuda")
"""
HANG = """
import signal, subprocess, sys, time, torch
signal.signal(signal.SIGINT, signal.SIG_IGN)
x = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
G = "import signal, time, torch; signal.signal(signal.SIGINT, signal.SIG_IGN); "
G += "y = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda'); time.sleep(600)"
g = subprocess.Popen([sys.executable, "-c", G])
time.sleep(20)
sys.stderr.write('ITK-EVENT {"event": "stage", "stage": "load"}\\n')
time.sleep(600)
"""


def used_mib() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used // 2**20
    finally:
        pynvml.nvmlShutdown()


def main() -> None:
    from itk.advice import diagnose, machine_facts
    from itk.supervisor import Supervisor, group_members

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"torch": __import__("torch").__version__}

    holder = subprocess.Popen([sys.executable, "-c", HOLD, "3"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    log = out / "real_cuda_oom.log"
    outcome = Supervisor([sys.executable, "-c", OOM], log, env=dict(os.environ), grace_s=2).run()
    facts = machine_facts()
    verdict = diagnose(log.read_text(), outcome.returncode, facts, str(log))
    result["oom"] = {"returncode": outcome.returncode, "holder_pid": holder.pid, "facts": facts,
                     "verdict": verdict.to_json()}
    holder.kill()
    holder.wait()

    time.sleep(1)
    baseline = used_mib()
    sup = Supervisor([sys.executable, "-c", HANG], out / "hang.log", env=dict(os.environ), grace_s=3)
    import threading

    def interrupt() -> None:
        time.sleep(25)
        result["hang_used_mib_while_running"] = used_mib()
        result["hang_group_members"] = group_members(sup.pgid)
        sup.stop_group()

    threading.Thread(target=interrupt, daemon=True).start()
    started = time.monotonic()
    hang = sup.run()
    time.sleep(1)
    result["hang"] = {"returncode": hang.returncode, "stopped_after_s": round(time.monotonic() - started, 1),
                      "survivors": group_members(sup.pgid), "used_mib_before": baseline,
                      "used_mib_after": used_mib()}
    name = facts.get("gpu_name", "gpu").replace(" ", "_")
    (out / f"gpu_supervisor_{name}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
