"""Real inputs for `itk run` tests: a PNG portrait, speech-length wavs, an mp4, and a weights folder holding
every file of a preset under its real name (tiny contents, valid safetensors headers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).parent
FAKE = TESTS / "fake_generator.py"
LOGS = TESTS / "fixtures" / "logs"


def write_image(path: Path, size: tuple[int, int] = (96, 128)) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def write_weights(folder: Path, preset: str = "rtx4090-24g") -> list[Path]:
    from safetensors.numpy import save_file

    from itk.presets import get_preset
    from itk.runtime.manifest import load_manifest

    paths = []
    for f in load_manifest().files_for(get_preset(preset).components):
        path = f.local_path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(path))
        elif path.suffix == ".pth":
            import torch

            torch.save({"w": torch.zeros(2, 2)}, path)
        elif f.role == "config":
            path.write_text("{}")  # the official config.json with nothing changed: the official sizes
        else:
            path.write_text(json.dumps({"tiny": True}))
        paths.append(path)
    return paths


def itk(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "itk", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def fake_env(mode: str, **extra: str) -> dict[str, str]:
    return {"ITK_GENERATOR": f"{sys.executable} {FAKE}", "FAKE_MODE": mode, **extra}


def wait_for_json(path: Path, seconds: float = 30) -> list[int]:
    """The JSON a child process writes (its pids, say), polled until it appears; bounded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def decoded(path: Path) -> np.ndarray:
    """Every video frame of an mp4, [T, H, W, 3] uint8."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def saved_clips(video: Path) -> int:
    """How many clips of the video being made are committed to its resume state (0 before the first): a clip's
    save runs on the generator's writer thread just after its clip event."""
    record = Path(f"{video}.itk-resume") / "state.json"
    try:
        return int(json.loads(record.read_text())["clips_done"])
    except (OSError, ValueError, KeyError):
        return 0
