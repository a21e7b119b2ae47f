"""Throughput of a 1 GB fetch from the local HF-compatible test server: `itk fetch` (huggingface_hub's
hf_hub_download + sha256 verification), bare hf_hub_download, and a plain `curl` of the same URL.

The server (tests/hfserver.py, sendfile for the body) runs in this process; every client is a separate
process, so the numbers are what one connection over loopback gives on this machine, not network speed.
Writes bench/results/fetch-throughput.json.   Usage: python bench/fetch_throughput.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hfserver import BIG, ITK, HubFile, HubServer, standard_hub  # noqa: E402
from hubcli import itk_cmd, itk_env  # noqa: E402

HF_ONLY = """
import sys, time
from huggingface_hub import hf_hub_download
t = time.perf_counter()
hf_hub_download(sys.argv[1], sys.argv[2], local_dir=sys.argv[3])
print(time.perf_counter() - t)
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="itk-bench-"))
    try:
        src = work / "big.safetensors"
        n = args.mib << 20
        header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(src, "wb") as f:  # a valid safetensors file of random bytes (nothing can compress them)
            f.write(struct.pack("<Q", len(header)) + header)
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        hub = standard_hub(big_floats=16)
        hub.repos[ITK]["main"][BIG] = HubFile(src)
        size = src.stat().st_size
        results: dict[str, float] = {}
        with HubServer(hub) as server:
            env = itk_env(server.endpoint, work / "hf-home")
            url = f"{server.endpoint}/{ITK}/resolve/main/{BIG}"
            runs = {
                "curl": ["curl", "-sf", "-o", str(work / "curl.out"), url],
                "hf_hub_download": [sys.executable, "-c", HF_ONLY, ITK, BIG, str(work / "hf")],
                "itk_fetch": itk_cmd("fetch", "--component", "infinitetalk-single-fp8", "--weights-dir",
                                     str(work / "itk"), "--json"),
            }
            for name, cmd in runs.items():
                results[name] = timed(cmd, env)
                for leftover in ("curl.out", "hf", "itk"):
                    target = work / leftover
                    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        report = {
            "file_bytes": size,
            "seconds": {k: round(v, 3) for k, v in results.items()},
            "MB_per_s": {k: round(size / v / 1e6, 1) for k, v in results.items()},
            "notes": "loopback, one connection, server uses sendfile; itk_fetch includes its plan (3 API calls) "
                     "and the sha256 of the downloaded file",
            "load_avg_1m_after": os.getloadavg()[0],
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "huggingface_hub": __import__("importlib.metadata").metadata.version("huggingface_hub"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = ROOT / "bench" / "results" / "fetch-throughput.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        for k in results:
            print(f"{k:>16}: {report['MB_per_s'][k]:8.1f} MB/s  ({report['seconds'][k]:.2f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
