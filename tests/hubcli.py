"""Run `itk` as a real subprocess against a test hub: HF_ENDPOINT must be set before huggingface_hub is
imported, and a separate process is also what a user runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hfserver import Hub

LOCAL_DIRS = {"Wan-AI/Wan2.1-I2V-14B-480P": "Wan2.1-I2V-14B-480P",
              "TencentGameMate/chinese-wav2vec2-base": "chinese-wav2vec2-base",
              "MeiGen-AI/InfiniteTalk": "InfiniteTalk"}


def itk_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "ITK_"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    return env | extra


def itk_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "itk", *args]


def run_itk(endpoint: str, home: Path, *args: str, timeout: float = 60, **extra: str):
    return subprocess.run(itk_cmd(*args), env=itk_env(endpoint, home, **extra), capture_output=True, text=True,
                          timeout=timeout)


def doctor_weights(endpoint: str, home: Path, weights: Path, preset: str, *flags: str) -> dict:
    """The doctor's weights check result as JSON."""
    proc = run_itk(endpoint, home, "doctor", "--only", "weights", "--preset", preset, "--weights-dir",
                   str(weights), "--json", *flags)
    return json.loads(proc.stdout)["results"][0]


def hub_bytes(hub: Hub, repo_id: str, path: str, branch: str = "main") -> bytes:
    f = hub.repos[repo_id][branch][path]
    return f.read(0, f.size)
