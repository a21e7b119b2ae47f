"""`itk selftest`: prove the install works end to end before a 32 GB download.

It writes tiny random weights in the exact official layout (runtime.tiny) and records them as verified,
draws a portrait-like image, synthesises a few seconds of speech-like sound, and then goes the way of
`itk run`: the rtx4090-24g preset's plan (FP8 files, every DiT block streamed) with settings for tiny
weights, the REAL generator under the Supervisor, and the advice rules if it fails. Then it checks the mp4:
25 fps, one frame per 40 ms of speech, and an AAC track as long as the video. Everything a real run touches
is exercised: the run plan, file formats, loaders, tokenizer, wav2vec2, the streaming loop, colour
correction, the PyAV writer, the event protocol and the supervisor.

By default it works in one cache folder (~/.cache/itk/selftest) with fixed names: the tiny weights are written
once per tiny-weights version, seed and kind (single- and two-speaker sets side by side), into a partial folder
renamed into place when complete (an interrupted write is never reused), and reused after. Each kind writes its
own video (selftest.mp4, selftest-two-speakers.mp4). A passing run then removes its inputs (<stem>.inputs) and
its run folder (<stem>.run), so nothing but the cached weights and the mp4 it prints is left behind; a failing
run keeps both for a look, and its result names them. With --workdir everything stays in that folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from itk.machine import MachineFacts
from itk.run import GENERATOR, RunResult
from itk.runtime.protocol import EXIT_OK, FPS, SAMPLE_RATE, UserError

SPEECH_SECONDS = 3.6
# --two-speakers: two turns (`add`) as long as the one speaker's track together, on tiny multi-speaker weights
TWO_SPEAKER_SECONDS = (2.0, 1.6)
PRESET = "rtx4090-24g"  # the tested low-VRAM path: FP8 + num_persistent_param_in_dit 0
TINY_SETTINGS = ("sample_steps=4",)  # random tiny weights: more steps would prove nothing more
PROMPT = "A person is talking to the camera."
SEED = 0
PARTIAL = ".partial-"  # a tiny-weights folder being written: <name>.partial-<pid>
MULTI = "-multi"  # the two-speaker set's key ends with it
LEGACY_INPUTS = ("portrait.png", "speech.wav", "speech1.wav")  # before <stem>.inputs/


def video_stem(two_speakers: bool) -> str:
    """Each kind of selftest has its own video (and so its own run folder): neither replaces the other's."""
    return "selftest-two-speakers" if two_speakers else "selftest"


def cache_root() -> Path:
    """$XDG_CACHE_HOME/itk/selftest, else ~/.cache/itk/selftest."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "itk" / "selftest"


def tiny_key(seed: int = SEED, multi: bool = False) -> str:
    """The tiny weights' version: their writer's source and the manifest they follow (both decide every byte),
    and the seed. A toolkit update that changes either writes a fresh set; one that does not reuses it."""
    from importlib.util import find_spec

    from itk.runtime.manifest import MANIFEST

    digest = hashlib.sha256()
    for path in (find_spec("itk.runtime.tiny").origin, MANIFEST):
        digest.update(Path(path).read_bytes())
    return f"tiny-{digest.hexdigest()[:12]}-seed{seed}" + (MULTI if multi else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cached_tiny_weights(root: Path, seed: int = SEED,
                        on_stage: Callable[[str], None] = lambda _: None, multi: bool = False) -> Path:
    """The tiny weights under `root`, written (and recorded as verified) only when this version is not there
    yet: into `<key>.partial-<pid>`, renamed into place when complete. Older versions of the same kind
    (single- or two-speaker: each kind keeps its own set) and partial folders left by killed runs are removed;
    an interrupted write removes its own."""
    from itk.runtime.tiny import write_tiny_weights

    key = tiny_key(seed, multi)
    final = root / key
    for old in root.glob("tiny-*"):
        name, partial_pid = old.name.split(PARTIAL, 1) if PARTIAL in old.name else (old.name, "")
        if name.endswith(MULTI) != multi:
            continue  # the other kind's set (or its write in progress): not ours to judge
        stale_partial = bool(partial_pid) and not _alive(int(partial_pid or 0))
        if old != final and (stale_partial or not partial_pid):
            shutil.rmtree(old, ignore_errors=True)
    if final.is_dir():
        on_stage("tiny weights: reusing the cached set")
        return final
    on_stage("tiny weights: writing them (once per version)")
    partial = root / f"{key}{PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_tiny_weights(partial, seed, multi)
        record_tiny_verdicts(partial, multi=multi)
        partial.rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def write_two_portraits(path: Path) -> Path:
    """Two people side by side (speaker 1 left, speaker 2 right, as the official split without boxes): a
    landscape picture, so each half still spans whole tokens in the tiny bucket."""
    from PIL import Image

    one = Image.open(write_portrait(path))
    both = Image.new("RGB", (one.width * 2, one.height))
    both.paste(one, (0, 0))
    both.paste(one, (one.width, 0))
    both.save(path)
    return path


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


def record_tiny_verdicts(weights_dir: Path, preset: str = PRESET, multi: bool = False) -> int:
    """Record the files the selftest just wrote as verified, hashed as written: they are not the hub's files
    (so no hub checksum or size applies), and the run's weights check then judges them like fetched ones
    instead of passing them as "never verified". A file the tiny writer did not make stays missing, and
    the plan refuses to start, as it would for a real run. multi: the preset's multi-speaker files too.
    Returns the number recorded."""
    from itk.presets import get_preset
    from itk.runtime.manifest import load_manifest
    from itk.runtime.verify import Record, VerdictStore, file_digest
    from itk.variants import swap_components

    store = VerdictStore(weights_dir)
    recorded = 0
    components = get_preset(preset).components
    if multi:
        components = (*components, *swap_components(components, "multi"))
    for f in load_manifest().files_for(components):
        path = f.local_path(weights_dir)
        if not path.is_file():
            continue
        st = path.stat()
        digest = file_digest(path, "sha256")
        store.put(f.label, Record(size=st.st_size, mtime_ns=st.st_mtime_ns, algo="sha256", digest=digest,
                                  expected=digest, revision="itk selftest (tiny random weights)", commit="",
                                  verdict="ok", verified_at=time.time()))
        recorded += 1
    return recorded


def check_mp4(path: Path, frames: int) -> dict[str, Any]:
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


@dataclass
class SelftestResult:
    """The run (through the same plan, supervisor and advice as `itk run`) and, when it made a video, the
    facts check_mp4 confirmed."""

    workdir: Path
    run: RunResult
    video: dict[str, Any] | None
    seconds: float
    kept: tuple[Path, ...] = ()  # what a failing run left for a look: its inputs and its run folder

    @property
    def ok(self) -> bool:
        return self.run.ok and self.video is not None

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else self.run.exit_code

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "workdir": str(self.workdir), "seconds": self.seconds, "video": self.video,
                "run": self.run.to_json(), "kept": [str(p) for p in self.kept]}


def run_selftest(workdir: str | Path | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 two_speakers: bool = False) -> SelftestResult:
    """Run the whole check in `workdir` (fresh tiny weights in workdir/weights), or by default in the cache
    folder with cached tiny weights; prints nothing. Its own stages and the generator's events go to
    `on_event`. two_speakers: two turns (`add`, official left/right split) on tiny multi-speaker weights."""
    from itk.run import plan_run, run_job
    from itk.spec import RunSpec

    emit = on_event or (lambda _: None)

    def stage(name: str) -> None:
        emit({"event": "stage", "stage": name})

    root = Path(workdir) if workdir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    stem = video_stem(two_speakers)
    output, inputs = root / f"{stem}.mp4", root / f"{stem}.inputs"
    started = time.monotonic()
    if workdir:
        from itk.runtime.tiny import write_tiny_weights

        stage("tiny weights: writing them")
        weights = root / "weights"
        write_tiny_weights(weights, multi=two_speakers)
        record_tiny_verdicts(weights, multi=two_speakers)
    else:
        weights = cached_tiny_weights(root, SEED, stage, two_speakers)
        output.unlink(missing_ok=True)  # this kind's last video: replaced, never piled up
        for legacy in LEGACY_INPUTS:  # where older versions left their inputs
            (root / legacy).unlink(missing_ok=True)
    stage("inputs: a drawn portrait and speech-like sound")
    inputs.mkdir(exist_ok=True)
    image = (write_two_portraits if two_speakers else write_portrait)(inputs / "portrait.png")
    seconds = TWO_SPEAKER_SECONDS if two_speakers else (SPEECH_SECONDS,)
    tracks = [write_speech(inputs / f"speech{n or ''}.wav", s) for n, s in enumerate(seconds)]
    second = {"audio2": str(tracks[1]), "audio_mode": "add"} if two_speakers else {}
    spec = RunSpec.from_options(image=str(image), audio=str(tracks[0]), prompt=PROMPT, output=output,
                                preset=PRESET, sets=TINY_SETTINGS, weights_dir=weights, **second)
    # The real generator even when $ITK_GENERATOR names another: this checks the install.
    plan = plan_run(replace(spec, generator=tuple(GENERATOR)))
    stage("generator: loading the tiny models")
    result = run_job(plan, on_event)
    stage("checking the video")
    # the audio encoder's count; two turns (add) last as long as both tracks together
    frames = int(sum(int(s * SAMPLE_RATE) for s in seconds) / SAMPLE_RATE * FPS)
    video = check_mp4(result.output, frames) if result.ok and result.output else None
    if video is not None and not workdir:  # passed: only the cached weights and the mp4 stay
        for folder in (inputs, plan.run_dir):
            shutil.rmtree(folder, ignore_errors=True)
    kept = (inputs, plan.run_dir) if video is None else ()
    return SelftestResult(root, result, video, round(time.monotonic() - started, 1), kept)


def closing_line(facts: MachineFacts) -> str:
    """The one line `make setup` ends with: the selftest passed, what that means on this machine (no NVIDIA
    GPU: real videos cannot run here; a GPU no preset fits; or ready), and what to do next."""
    from itk.presets import choose_preset
    from itk.runtime.manifest import load_manifest

    if facts.vram_gb is None:
        return ("selftest passed: the install works (generator, file formats, video writer), but there is no "
                "NVIDIA GPU here, so real videos cannot be made on this machine: run `itk fetch` and `itk run` "
                "on a machine with an NVIDIA GPU")
    preset, _ = choose_preset(facts)
    if lacks := preset.unmet(facts):
        return (f"selftest passed on {facts.gpu_name}: the install works, but no preset fits this machine "
                f"({'; '.join(lacks)}): `itk presets` says what each needs")
    size = sum(f.size for f in load_manifest().files_for(preset.components)) / 1e9
    return (f"selftest passed on {facts.gpu_name}: ready for real videos with preset {preset.name}; next: "
            f"`itk fetch` ({size:.1f} GB), then `itk run --image portrait.png --audio speech.wav`")
