"""What the web page (itk.ui) does besides drawing: stage uploads into the output folder, run one job through
itk.run's plan_run + run_job in a worker thread, turn its events into a progress line, and stop its whole
process group on Cancel; and run `itk fetch` as a cancellable child with a progress fraction.

No Gradio here: the page's handlers call these, and tests can too.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_FAILED, VIDEO_EXTENSIONS, Job, UserError, write_job

SAFE_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")
MULTI_COMPONENTS = ("infinitetalk-multi-fp8", "infinitetalk-multi")  # either variant DiT enables a second speaker


def page_error(exc: BaseException) -> UserError:
    """Any failure as the one-line error + fix the page shows (never a stack trace)."""
    if isinstance(exc, UserError):
        return exc
    return UserError(f"{type(exc).__name__}: {exc}", "rerun the same job with `itk run --debug` for the full "
                     "traceback, and report it", EXIT_FAILED)


# -- the job folder -----------------------------------------------------------------------------------------
@dataclass
class Staged:
    """One job's folder in --output-dir: the uploads (renamed by role), job.json and the video's path."""

    folder: Path
    job_file: Path
    output: Path
    names: dict[Path, str] = field(default_factory=dict)  # staged copy -> the browser's file name

    def explain(self, error: UserError) -> UserError:
        """The error naming the files as the person uploaded them, not by their staged copies."""
        message, fix = error.message, error.fix
        for path, name in self.names.items():
            message, fix = message.replace(str(path), name), fix.replace(str(path), name)
        return UserError(message, fix, error.exit_code)


def job_stem() -> str:
    """A job's name: the time and a random suffix (two jobs in one second never share a folder)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def stage_upload(source: str | Path, folder: Path, role: str) -> Path:
    """Copy an uploaded file into the job folder as `role` + its suffix. The browser's name chooses nothing
    but a short alphanumeric suffix (which tells an image from a video, as the generator does): no path
    from outside ever reaches the file system."""
    suffix = Path(str(source)).suffix.lower()
    dest = folder / (role + (suffix if SAFE_SUFFIX.fullmatch(suffix) else ""))
    shutil.copyfile(source, dest)
    return dest


def stage_job(output_dir: Path, face: str | None, speech: list[str | None], prompt: str, mode: str = "add",
              boxes: tuple[str | None, str | None] = (None, None)) -> Staged:
    """The job folder with copies of the uploads and the job file `itk run --input-json` repeats it from.
    UserError (exit 2) when the portrait or the speech is missing. mode and boxes (`--bbox1` text): two speakers."""
    if not face:
        raise UserError("no portrait image or source video", "upload a PNG/JPEG portrait or an mp4 to dub",
                        EXIT_BAD_INPUT)
    tracks = [s for s in speech if s]
    if not tracks:
        raise UserError("no speech track", "upload the speech to lip-sync (wav/mp3/m4a)", EXIT_BAD_INPUT)
    bbox = None
    if len(tracks) > 1 and any(b and b.strip() for b in boxes):
        from itk.spec import parse_box

        if not all(b and b.strip() for b in boxes):
            raise UserError("give both speakers' boxes, or neither (the official left/right split)",
                            "fill in the other box: row_min,col_min,row_max,col_max", EXIT_BAD_INPUT)
        bbox = {f"person{n}": parse_box(str(b), f"box {n}") for n, b in enumerate(boxes, 1)}
    stem = job_stem()
    folder = (output_dir / stem).absolute()
    folder.mkdir(parents=True, exist_ok=False)
    names: dict[Path, str] = {}
    is_video = Path(face).suffix.lower() in VIDEO_EXTENSIONS
    cond = stage_upload(face, folder, "video" if is_video else "image")
    names[cond] = Path(face).name
    audio: dict[str, Path | None] = {}
    for n, track in enumerate(tracks, 1):
        staged = stage_upload(track, folder, f"speech{n}")
        names[staged] = Path(track).name
        audio[f"person{n}"] = staged
    job = Job(prompt=prompt.strip() or "A person is talking.", cond_video=cond, cond_audio=audio,
              audio_type=mode if len(audio) > 1 else None, bbox=bbox)
    job_file = write_job(job, folder / "job.json")
    return Staged(folder, job_file, folder / f"{stem}.mp4", names)


def repeat_command(staged: Staged, preset: str, sets: list[str], weights_dir: Path | None) -> str:
    """The `itk run` line that repeats this job from the command line."""
    argv = ["itk", "run", "--input-json", str(staged.job_file), "--preset", preset,
            *(a for s in sets for a in ("--set", s))]
    if weights_dir:
        argv += ["--weights-dir", str(weights_dir)]
    return shlex.join(argv)


def multi_speaker(weights_dir: Path) -> tuple[bool, str]:
    """Whether a second speech track can be given (the multi-speaker DiT of either precision is here), and the
    line the page shows under that control."""
    from itk.runtime.manifest import load_manifest
    from itk.runtime.verify import UNUSABLE, check_files

    for component in MULTI_COMPONENTS:
        statuses = check_files(weights_dir, load_manifest().files_for([component]), deep=False)
        if not any(st.state in UNUSABLE for st in statuses):
            return True, ("two speakers: add the second speaker's track; `add` = taking turns, `para` = together; "
                          "boxes (optional, rows first: row_min,col_min,row_max,col_max) say where each one is, "
                          "else speaker 1 is the left half and speaker 2 the right")
    return False, (f"a second speaker needs the multi-speaker weights: `itk fetch --variant multi --weights-dir "
                   f"{weights_dir}` adds them (with your --preset)")


# -- progress ----------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """The run's events folded into what the page shows: clip, step, ETA (from this run's own step times)
    and the GPU's peak memory."""

    stage: str = "starting the generator"
    clip: int = 0
    clips: int = 0
    step: int = 0
    steps: int = 0
    gpu_peak_gb: float | None = None
    step_times: list[float] = field(default_factory=list)
    last_step_at: float | None = None

    def add(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("event")
        if isinstance(event.get("gpu_peak_gb"), (int, float)):
            self.gpu_peak_gb = float(event["gpu_peak_gb"])
        if kind == "stage":
            self.stage = str(event.get("message") or event.get("stage") or self.stage)
            self.clips = int(event.get("clips") or self.clips)
        elif kind == "clip":
            self.clip, self.clips = int(event.get("clip") or 0), int(event.get("clips") or self.clips)
            self.step, self.last_step_at = 0, None
        elif kind == "step":
            self.clip = int(event.get("clip") or self.clip)
            self.step, self.steps = int(event.get("step") or 0), int(event.get("steps") or self.steps)
            if self.last_step_at is not None:
                self.step_times.append(now - self.last_step_at)
            self.last_step_at = now
            self.stage = "generating"

    @property
    def fraction(self) -> float:
        if not (self.clips and self.steps):
            return 0.0
        return min(1.0, ((max(self.clip, 1) - 1) * self.steps + self.step) / (self.clips * self.steps))

    @property
    def line(self) -> str:
        from itk.progress import eta_s
        from itk.run import duration

        if not self.steps:
            parts = [self.stage]
        else:
            parts = [f"clip {max(self.clip, 1)} of {self.clips or '?'}", f"step {self.step} of {self.steps}"]
            left = (self.clips - max(self.clip, 1)) * self.steps + self.steps - self.step
            eta = eta_s(self.step_times, [], left, 0)
            parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA after the second step")
        if self.gpu_peak_gb is not None:
            parts.append(f"GPU memory peak {self.gpu_peak_gb:.1f} GB")
        return " · ".join(parts)


# -- one generation job --------------------------------------------------------------------------------------
class Running:
    """One job: run_job in a worker thread under a Supervisor this object keeps, its events in a queue, and a
    cancel that asks that Supervisor to stop the whole process group as Ctrl-C does (`Supervisor.cancel`)."""

    def __init__(self, plan: Any):
        from itk.run import supervisor_for

        self.plan = plan
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.supervisor = supervisor_for(plan, self.events.put)
        self.result: Any = None
        self.error: UserError | None = None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)

    def start(self) -> Running:
        self.thread.start()
        return self

    def _work(self) -> None:
        from itk.run import run_job

        try:
            self.result = run_job(self.plan, supervisor=self.supervisor)
        except BaseException as exc:  # noqa: BLE001 - shown on the page as one line + fix
            self.error = page_error(exc)
        finally:
            self.done.set()

    def cancel(self) -> None:
        """Stop the job (returns at once; the job's thread ends once no process of its group is left)."""
        self.cancelled.set()
        self.supervisor.cancel()


# -- fetching weights ----------------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    """Bytes under `folder`, partial downloads included (the fetch's progress without parsing its output)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class Fetching:
    """`itk fetch --preset NAME` as a child in its own session: a progress fraction from the bytes arriving
    in the weights folder, and a cancel that stops it as Ctrl-C does (finished files are kept)."""

    def __init__(self, preset: str, weights_dir: Path, to_download: int, log_path: Path, grace_s: float):
        self.weights_dir, self.to_download, self.log_path, self.grace_s = weights_dir, to_download, log_path, grace_s
        weights_dir.mkdir(parents=True, exist_ok=True)
        self.start_bytes = folder_bytes(weights_dir)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "160"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "itk", "fetch", "--preset", preset, "--weights-dir", str(weights_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.cancelled = False

    @property
    def fraction(self) -> float:
        if self.to_download <= 0:
            return 0.0
        return max(0.0, min(1.0, (folder_bytes(self.weights_dir) - self.start_bytes) / self.to_download))

    def poll(self) -> int | None:
        return self.proc.poll()

    def cancel(self) -> None:
        from itk.supervisor import stop_process_group

        self.cancelled = True
        stop_process_group(self.proc, self.grace_s)
        self.proc.wait()

    def last_lines(self, n: int = 4) -> list[str]:
        """The fetch's closing lines (its `done:` line, or its error and fix), progress bars left out."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
        return [ln for ln in lines if not re.search(r"━|\d+(\.\d+)?/\d+(\.\d+)? [kMG]?B", ln)][-n:]
