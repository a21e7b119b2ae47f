"""`itk selftest`: prove the install works end to end before a 32 GB download.

It writes tiny random weights in the exact official layout (runtime.tiny), draws a portrait-like image,
synthesises a few seconds of speech-like sound, runs the REAL generator as a subprocess with the guide's
flags, and checks the mp4 it wrote: 25 fps, one frame per 40 ms of speech, and an AAC track as long as the
video. Everything a real run touches is exercised: file formats, loaders, tokenizer, wav2vec2, the
streaming loop, colour correction and the PyAV writer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from itk.console import UserError

SPEECH_SECONDS = 3.6
SAMPLE_RATE = 16000
FPS = 25


def write_portrait(path: Path) -> Path:
    """A 3:4 head-and-shoulders drawing: background, shoulders, face, eyes, mouth."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (240, 320), (70, 110, 150))
    draw = ImageDraw.Draw(img)
    draw.ellipse((30, 230, 210, 400), fill=(40, 60, 90))
    draw.rectangle((100, 190, 140, 250), fill=(225, 180, 150))
    draw.ellipse((60, 60, 180, 220), fill=(235, 190, 160))
    draw.chord((55, 40, 185, 140), 180, 360, fill=(60, 40, 30))
    for x in (90, 150):
        draw.ellipse((x - 10, 120, x + 10, 132), fill=(255, 255, 255))
        draw.ellipse((x - 4, 121, x + 4, 131), fill=(50, 40, 30))
    draw.chord((95, 168, 145, 192), 0, 180, fill=(170, 60, 70))
    img.save(path)
    return path


def write_speech(path: Path, seconds: float = SPEECH_SECONDS) -> Path:
    """Speech-like sound: a gliding voiced pitch with formant-shaped harmonics, in syllables with pauses."""
    import wave

    import numpy as np

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) * np.exp(-((k * pitch - 700) / 500) ** 2) / k for k in range(1, 25))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5 * (np.sin(2 * np.pi * 0.45 * t) > -0.8)
    noise = np.random.default_rng(0).normal(0, 0.01, t.size)
    samples = 0.5 * voice / np.abs(voice).max() * syllables + noise
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def check_mp4(path: Path, frames: int) -> dict:
    """Stream count, codec, fps, frame count and audio duration of the result; UserError on a mismatch."""
    import av

    with av.open(str(path)) as container:
        kinds = sorted(s.type for s in container.streams)
        video = container.streams.video[0]
        rate = float(video.average_rate or 0)
        count = sum(1 for _ in container.decode(video))
    with av.open(str(path)) as container:
        audio = container.streams.audio[0] if container.streams.audio else None
        seconds = sum(f.samples for f in container.decode(audio)) / audio.rate if audio else 0.0
    facts = {"streams": kinds, "fps": rate, "frames": count, "audio_s": round(seconds, 3)}
    problems = []
    if kinds != ["audio", "video"]:
        problems.append(f"streams {kinds}, expected audio+video")
    if rate != FPS:
        problems.append(f"{rate} fps, expected {FPS}")
    if count != frames:
        problems.append(f"{count} frames, expected {frames}")
    if abs(seconds - frames / FPS) > 0.1:
        problems.append(f"audio {seconds:.2f} s, expected {frames / FPS:.2f} s")
    if problems:
        raise UserError(f"selftest video {path} is wrong: {'; '.join(problems)}", "report this as a bug")
    return facts


def run_selftest(workdir: str | Path | None = None) -> tuple[Path, dict]:
    """Run the whole check in `workdir` (a new temp folder by default); return the mp4 and its facts."""
    from itk.runtime.tiny import write_tiny_weights

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="itk-selftest-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    layout = write_tiny_weights(root / "weights")
    image, speech = write_portrait(root / "portrait.png"), write_speech(root / "speech.wav")
    job = {"prompt": "A person is talking to the camera.", "cond_video": str(image),
           "cond_audio": {"person1": str(speech)}}
    (root / "job.json").write_text(json.dumps(job, indent=2))
    command = [
        sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(layout.ckpt_dir),
        "--wav2vec_dir", str(layout.wav2vec_dir), "--infinitetalk_dir", str(layout.infinitetalk),
        "--input_json", str(root / "job.json"), "--size", "infinitetalk-480", "--sample_steps", "4",
        "--mode", "streaming", "--motion_frame", "9", "--save_file", str(root / "selftest"),
        # the rtx4090-24g preset's path: FP8 files, every DiT block streamed from host memory
        "--quant", "fp8", "--quant_dir", str(layout.fp8_dit), "--num_persistent_param_in_dit", "0",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("ITK-EVENT")]
        last = lines[-1] if lines else "no message"
        raise UserError(f"selftest generator failed (exit {proc.returncode}): {last}",
                        f"the full log is in the command's stderr; files are in {root}")
    out = root / "selftest.mp4"
    frames = int(int(SPEECH_SECONDS * SAMPLE_RATE) / SAMPLE_RATE * FPS)  # the audio encoder's count
    facts = check_mp4(out, frames)
    facts["seconds"] = round(time.monotonic() - started, 1)
    return out, facts


def selftest_command(workdir: str | None) -> int:
    from itk.console import console

    out, facts = run_selftest(workdir)
    console.print(f"[green]selftest passed[/] in {facts['seconds']} s: {facts['frames']} frames at "
                  f"{facts['fps']:g} fps, {facts['audio_s']} s of audio", highlight=False)
    print(out)
    return 0
