"""What the web page (itk.ui) does besides drawing: stage uploads into the output folder, build the job's RunSpec
as `itk run` does, run one job at a time through itk.run's plan_run + run_job in a worker thread, turn its events
into a progress line, stop its whole process group however the job ends, drop the uploads Gradio kept once a job
has used them, say errors in the page's words (its controls, the names the person uploaded, never the server's
folders), read a job store for the queue view, and run `itk fetch` as a cancellable child.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, Flag, UserError, is_video, stage_words

SAFE_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")
MULTI_COMPONENTS = ("infinitetalk-multi-fp8", "infinitetalk-multi")  # either variant DiT enables a second speaker
# `itk run`'s options as the page's controls name them (errors come from the same checks as the command line).
OPTION_WORDS = MappingProxyType({
    "--image": "the portrait", "--video": "the source video", "--audio2": "the second speaker's speech",
    "--audio-mode": "the two-speaker mode", "--audio": "the speech", "--bbox1": "speaker 1's box",
    "--bbox2": "speaker 2's box", "--text-file": "the text", "--text": "the text to say",
    "--voice2": "speaker 2's voice", "--voice": "the voice", "--speed": "the speed", "--dub-region": "the dub region",
    "--prompt": "the prompt", "--preset": "the preset", "--output": "the video", "--input-json": "the job",
})
# Commands a person runs on the server (fetch, doctor, installs) keep their options as typed.
COMMAND = re.compile(r"(?:\bitk (?!run\b)\w+|\bpip install|\bpython -m|\bapt-get)[^;()]*")


def page_error(exc: BaseException) -> UserError:
    """Any failure as the one-line error + fix the page shows (never a stack trace)."""
    if isinstance(exc, UserError):
        return exc
    return UserError(f"{type(exc).__name__}: {exc}", "rerun the same job with `itk run --debug` for the full "
                     "traceback, and report it", EXIT_FAILED)


# -- the page's words ----------------------------------------------------------------------------------------
def web_words(text: str) -> str:
    """A line of the command line's checks in the page's words: `--set NAME=VALUE` is the Advanced field NAME,
    a generator flag `--NAME` is that field's name, `itk run`'s options are the controls they stand for; commands
    to run on the server stay as they are."""
    from itk.runtime.protocol import FLAG

    def option(match: re.Match[str]) -> str:
        name = match.group(0)
        if name in OPTION_WORDS:
            return OPTION_WORDS[name]
        return name[2:] if name[2:] in FLAG else name

    def rewrite(part: str) -> str:
        part = re.sub(r"`?--set (\w+)=([^\s`:;,]*)`?", r"Advanced: \1 = \2", part)
        part = re.sub(r"\bitk run (?=--)", "", part)
        return re.sub(r"--[a-z][a-z0-9_-]*", option, part)

    out, at = [], 0
    for command in COMMAND.finditer(text):
        out += [rewrite(text[at:command.start()]), command.group(0)]
        at = command.end()
    return "".join(out) + rewrite(text[at:])


def hide_paths(text: str, names: Mapping[str, str], folders: Mapping[Path, str]) -> str:
    """`text` with each file the person uploaded named as they named it (`names`: server path -> their name) and
    the server's folders left out (`folders`: folder -> what to call it; a path inside one is kept relative, an
    option naming one, like `--weights-dir DIR`, becomes "(with the server's --weights-dir)")."""
    for path in sorted(names, key=len, reverse=True):
        text = text.replace(path, names[path])
    for folder in sorted(folders, key=lambda f: len(str(f)), reverse=True):
        text = re.sub(rf"(--[a-z][a-z-]*) {re.escape(str(folder))}(?=$|[\s;,)])", r"(with the server's \1)", text)
        text = text.replace(f"{folder}{os.sep}", "").replace(str(folder), folders[folder])
    return text


def public_error(error: UserError, names: Mapping[str, str], folders: Mapping[Path, str]) -> UserError:
    """The error as the page shows it: the page's words, the person's file names, no server folder."""
    return UserError(web_words(hide_paths(error.message, names, folders)),
                     web_words(hide_paths(error.fix, names, folders)), error.exit_code)


def requirement(flag: Flag) -> str:
    """What a value of `flag` must be, in words: "a whole number of at least 1", "one of fp8, int8"."""
    if flag.choices:
        return "one of " + ", ".join(map(str, flag.choices))
    kind = {int: "a whole number", float: "a number"}.get(flag.type, "a value")
    if flag.nargs:
        kind = kind.replace("a ", "", 1) + "s separated by commas"
    bounds = []
    if flag.minimum is not None and flag.maximum is not None:
        bounds.append(f"from {flag.minimum:g} to {flag.maximum:g}")
    elif flag.minimum is not None:
        bounds.append(f"of at least {flag.minimum:g}")
    elif flag.maximum is not None:
        bounds.append(f"of at most {flag.maximum:g}")
    if flag.above is not None:
        bounds.append(f"greater than {flag.above:g}")
    return " ".join([kind, *bounds])


def advanced_setting(flag: Flag, text: str) -> str:
    """An Advanced field's text as a `--set` item, checked by the protocol's table; UserError (exit 2) in the
    page's words: "Advanced: sample_steps must be a whole number of at least 1 (given: 0)"."""
    from itk.runtime.protocol import parse_setting

    try:
        parse_setting(flag.name, text)
    except BadInput as exc:
        fix = f"change {flag.name} under Advanced settings, or clear it for the preset's value"
        try:
            value = [flag.type(p) for p in text.split(",")] if flag.nargs else flag.type(text)
            shape_ok = flag.check(value) is None and (not flag.choices or value in flag.choices)
        except ValueError:
            shape_ok = False
        if shape_ok:  # the value has the right shape but is refused (not supported yet): say why
            raise UserError(f"Advanced: {web_words(exc.message)}", fix, EXIT_BAD_INPUT) from None
        raise UserError(f"Advanced: {flag.name} must be {requirement(flag)} (given: {text})", fix,
                        EXIT_BAD_INPUT) from None
    return f"{flag.name}={text}"


def flag_choice_words(flag: Flag) -> str:
    """A flag's help in the page's words, without the "itk only, for ...:" preamble."""
    return web_words(re.sub(r"^itk only[^:]*:\s*", "", flag.help))


# -- the job folder -----------------------------------------------------------------------------------------
@dataclass
class Staged:
    """One job's folder in --output-dir: the uploads (renamed by role), job.json and the video's path."""

    folder: Path
    output: Path
    face: Path
    speech: list[Path] = field(default_factory=list)
    names: dict[Path, str] = field(default_factory=dict)  # staged copy -> the browser's file name

    @property
    def job_file(self) -> Path:
        return self.folder / "job.json"

    @property
    def is_video(self) -> bool:
        return is_video(self.face)

    def explain(self, error: UserError) -> UserError:
        """The error naming the files as the person uploaded them, not by their staged copies."""
        names = {str(path): name for path, name in self.names.items()}
        return UserError(hide_paths(error.message, names, {}), hide_paths(error.fix, names, {}), error.exit_code)


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


def stage_uploads(output_dir: Path, face: str | None, speech: list[str | None], text: str = "") -> Staged:
    """The job folder with copies of the uploads. UserError (exit 2) when the portrait is missing, or the speech
    (a recording, or `text` to say), or both a recording and text are given, or an upload is gone (uploads are
    dropped once a job has used them)."""
    if not face:
        raise UserError("no portrait image or source video", "upload a PNG/JPEG portrait or an mp4 to dub",
                        EXIT_BAD_INPUT)
    tracks = [s for s in speech if s]
    if not tracks and not text.strip():
        raise UserError("no speech", "upload the speech to lip-sync (wav/mp3/m4a), or type what to say",
                        EXIT_BAD_INPUT)
    if tracks and text.strip():
        raise UserError("both a speech recording and text to say", "remove the recording to have the text "
                        "spoken, or clear the text box to use the recording", EXIT_BAD_INPUT)
    for upload in [face, *tracks]:
        if not Path(upload).is_file():
            raise UserError(f"{Path(upload).name} is no longer on the server (uploads are removed once a job has "
                            "used them)", "upload it again", EXIT_BAD_INPUT)
    stem = job_stem()
    folder = (output_dir / stem).absolute()
    folder.mkdir(parents=True, exist_ok=False)
    cond = stage_upload(face, folder, "video" if is_video(face) else "image")
    staged = Staged(folder, folder / f"{stem}.mp4", cond, names={cond: Path(face).name})
    for n, track in enumerate(tracks, 1):
        copy = stage_upload(track, folder, f"speech{n}")
        staged.names[copy] = Path(track).name
        staged.speech.append(copy)
    return staged


def job_spec(staged: Staged, *, prompt: str = "", mode: str | None = None,
             boxes: tuple[str | None, str | None] = (None, None), text: str = "",
             voices: tuple[str | None, str | None] = (None, None), dub_region: str | None = None,
             preset: str | None = None, sets: Iterable[str] = (), weights_dir: Path | None = None) -> Any:
    """The staged job as `itk run` would take it (itk.spec.RunSpec.from_options: the same checks): a second
    recording with its mode, the boxes, text to speak with its voices (spoken beside the video by plan_run), and
    for a source video the dub region."""
    from itk.spec import RunSpec

    box1, box2 = (b.strip() if b and b.strip() else None for b in boxes)
    two = len(staged.speech) > 1
    said = text.strip() or None
    return RunSpec.from_options(
        image=None if staged.is_video else str(staged.face), video=str(staged.face) if staged.is_video else None,
        audio=str(staged.speech[0]) if staged.speech else None, audio2=str(staged.speech[1]) if two else None,
        audio_mode=(mode or "add") if two else None, bbox1=box1, bbox2=box2, prompt=prompt.strip() or None,
        output=staged.output, preset=preset, sets=list(sets), weights_dir=weights_dir, text=said,
        voice=(voices[0] or None) if said else None, voice2=(voices[1] or None) if said else None,
        dub_region=(dub_region or None) if staged.is_video else None)


def repeat_command(staged: Staged, preset: str, sets: list[str], weights_dir: Path | str | None,
                   dub_region: str | None = None) -> str:
    """The `itk run` line that repeats this job from the command line."""
    argv = ["itk", "run", "--input-json", str(staged.job_file), "--preset", preset,
            *(a for s in sets for a in ("--set", s))]
    if dub_region and staged.is_video:
        argv += ["--dub-region", dub_region]
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


def speech_from_text(weights_dir: Path) -> tuple[list[str], UserError | None]:
    """The Kokoro voices in the weights folder, and why speech cannot be made from text here (None: it can); the
    reason names files inside the weights folder relative to it."""
    from itk.runtime.tts import TtsFolders, list_voices, problem

    folders = TtsFolders.under(weights_dir)
    why = problem(folders)
    if why is not None:
        why = UserError(hide_paths(why.message, {}, {weights_dir: "the weights folder"}), why.fix, why.exit_code)
    return list_voices(folders.kokoro), why


def drop_uploads(paths: Iterable[str | None], root: Path | None) -> None:
    """Delete the copies Gradio keeps of a job's uploads (each in a folder of its own under `root`, its temp
    folder) with their folders; nothing outside `root` is touched."""
    if root is None:
        return
    top = root.resolve()
    for name in paths:
        if not name:
            continue
        path = Path(name).resolve()
        if top not in path.parents:
            continue
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != top and top in folder.parents:
            try:
                folder.rmdir()  # only once empty
            except OSError:
                break
            folder = folder.parent


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
            name = str(event.get("stage") or "")
            self.stage = str(event.get("message") or (stage_words(name) if name else self.stage))
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


# -- one generation job at a time ---------------------------------------------------------------------------
class GpuSlot:
    """One generator at a time on this server. A job takes the slot before its generator starts, and the job's
    own thread gives it back only when run_job has returned, that is once its Supervisor found no process of the
    group left: however the job ended (Cancel, Gradio's cancel, a closed tab, the server stopping), the next one
    cannot start beside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def take(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)

    def give_back(self) -> None:
        self._lock.release()


class Running:
    """One job: run_job in a worker thread under a Supervisor this object keeps, its events in a queue, and a
    cancel that asks that Supervisor to stop the whole process group as Ctrl-C does (`Supervisor.cancel`).
    `release` (the GpuSlot's give_back) is called once the job's thread is done with every process."""

    def __init__(self, plan: Any, release: Callable[[], None] = lambda: None):
        from itk.run import supervisor_for

        self.plan = plan
        self.release = release
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
            try:
                self.release()
            finally:
                self.done.set()

    def cancel(self) -> None:
        """Stop the job (returns at once; the job's thread ends once no process of its group is left)."""
        self.cancelled.set()
        self.supervisor.cancel()


@dataclass
class Ticket:
    """A page's (one browser tab's or API client's) current job: a cancel that arrives before the generator
    starts means it never starts; one that arrives after stops it."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    job: Running | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if self.job is not None:
            self.job.cancel()


# -- the queue of `itk batch` / `itk serve` ------------------------------------------------------------------
def queue_rows(folder: Path) -> list[dict[str, str]]:
    """The jobs of the store in `folder`, read-only, as the page's queue table shows them: name, state, worker,
    where it is (clip/step) and its error with the fix. itk.store.StoreError when there is no store there."""
    from itk.store import JobStore

    store = JobStore.open(folder, create=False)
    try:
        rows = []
        for job in store.jobs():
            where = []
            if job.clip:
                where.append(f"clip {job.clip} of {job.clips or '?'}")
            if job.step:
                where.append(f"step {job.step} of {job.steps or '?'}")
            error = " · fix: ".join(x for x in (job.error, job.fix) if x)
            rows.append({"name": job.name, "state": job.state, "worker": job.worker or "",
                         "where": ", ".join(where), "error": error})
        return rows
    finally:
        store.close()


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
