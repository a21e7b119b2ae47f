"""How fast the CLI answers: `itk --help`, and `itk doctor` with and without the import probe.

The doctor's light checks (NVML, RAM/cgroup, disk, packages, ffmpeg, port, weights with recorded verdicts)
must finish in under 1 s; the torch/flash-attn/numpy probe imports torch in a child process and is timed
apart. Writes bench/results/cli-startup-<machine>.json. Run: python bench/cli_startup.py [--weights-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LIGHT = "gpu,ram,disk,packages,ffmpeg,port"


def timed(cmd: list[str], runs: int) -> dict:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        samples.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3), "runs": runs}


def machine_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()
        return out[0] if out else "no GPU"
    except (OSError, subprocess.CalledProcessError):
        return "no GPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    itk = [sys.executable, "-m", "itk"]
    wd = ["--weights-dir", args.weights_dir] if args.weights_dir else []
    light = LIGHT + (",weights" if args.weights_dir else "")
    gpu = machine_name()
    result = {
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "itk_help": timed([*itk, "--help"], args.runs),
        "doctor_light_checks": timed([*itk, "doctor", "--only", light, *wd], args.runs),
        "doctor_light_checks_ids": light,
        "import_probe": timed([sys.executable, "-m", "itk.checks.probe"], max(1, args.runs // 2)),
        "doctor_all_checks": timed([*itk, "doctor", *wd], max(1, args.runs // 2)),
        "target": "itk --help and doctor's light checks (cached weight verdicts) under 1 s each",
    }
    slug = "cpu" if gpu == "no GPU" else gpu.lower().replace("nvidia ", "").split()[0]
    out = Path(args.out) if args.out else RESULTS / f"cli-startup-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
