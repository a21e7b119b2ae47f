"""`itk serve`: the job queue of one folder over HTTP (FastAPI on uvicorn), its OpenAPI page at /docs.

POST /v1/videos takes a job (multipart: the portrait `image` or the `video` to dub, the `speech` and for two
people `speech2`, and a `job` field of JSON settings; or, from a server started with `--allow-paths FOLDER`, a
JSON job line naming files inside that folder), checks it as `itk run` would and answers with its id at once;
GET /v1/videos/{id} says where it is (state, clip and step, ETA, error + fix), /content is its mp4, DELETE
cancels it (a second DELETE, once it has ended, forgets it and its files), GET /v1/videos lists the jobs.

The jobs live in the folder's durable store (itk.store) as lines of the job file format (itk.jobfile), so
`itk batch --status DIR` shows them too; the dispatcher of `itk batch` (itk.batch.Batch, polling) runs them,
one warm worker per GPU started at once. Uploads are streamed straight into `DIR/<id>.inputs/` under role
names (image.png, speech1.wav, ...; a client's file name chooses nothing but a short suffix), each one
size-limited. 127.0.0.1 only, unless `--listen`, which needs `--token` (clients send `Authorization: Bearer`).
Killed (even with kill -9), the same command carries on: queued jobs wait in the store, a running one resumes
from its last finished clip. Ctrl-C or SIGTERM stops it cleanly (its running jobs go back to the queue).

Errors are the command line's one-line error + fix + exit code as JSON, with 400 (a malformed request),
401/403 (token; a path outside --allow-paths), 404 (unknown id), 409 (no video yet), 413 (too large) or 422
(a job that cannot run, in the words `itk run` uses). Nothing here prints except `render_ready`/`render_end`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from itk import __version__
from itk.batch import Batch, Placement, folder_lock, recover_finished, wind_down
from itk.jobfile import OFFICIAL_KEYS, BatchJob, parse_line
from itk.run import run_folder
from itk.runtime.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    SILENT_SPEAKER,
    VIDEO_EXTENSIONS,
    BadInput,
    UserError,
    resume_folder,
)
from itk.spec import DEFAULT_PROMPT
from itk.speech import speech_files, speech_sidecar
from itk.store import STATES, JobRecord, JobStore
from itk.supervisor import restore, trap_stops
from itk.ui_jobs import hide_paths

DEFAULT_PORT = 8419
MAX_UPLOAD_MB = 200  # per uploaded file
JOB_FIELD_BYTES = 64 * 1024  # the `job` field, or a whole JSON request
FILE_FIELDS = {"image": "image", "video": "video", "speech": "speech1", "speech2": "speech2"}  # form field -> name
UPLOAD_JOB_KEYS = ("prompt", "audio_type", "bbox", "preset", "seed", "settings")  # the `job` field beside files
SHUTDOWN_S = 5  # how long a stopping server lets open requests finish


class ApiError(Exception):
    """A refused request: its HTTP status and the command line's error, fix and exit code."""

    def __init__(self, status: int, message: str, fix: str = "", *, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.status, self.message, self.fix, self.exit_code = status, message, fix, exit_code

    @classmethod
    def of(cls, status: int, error: UserError) -> ApiError:
        return cls(status, error.message, error.fix, exit_code=error.exit_code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": self.message, "fix": self.fix, "exit_code": self.exit_code},
                            status_code=self.status, headers=headers)


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """How `itk serve` runs. out: the job folder (store, uploads, videos). port: 0 takes any free one. listen:
    every network interface instead of 127.0.0.1. token: the Bearer token every request must carry (required
    with listen). allow_paths: the folder whose files a job may name by path (None: uploads only). gpus, preset,
    weights_dir, ray: as `itk batch`. max_upload_mb: the limit per uploaded file."""

    out: Path
    port: int = DEFAULT_PORT
    listen: bool = False
    token: str | None = None
    allow_paths: Path | None = None
    gpus: str | None = None
    preset: str | None = None
    weights_dir: Path | None = None
    max_upload_mb: int = MAX_UPLOAD_MB
    ray: str | None = None

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen else "127.0.0.1"

    def check(self) -> None:
        """UserError (exit 2) for options that must not start a server."""
        from itk.presets import resolve_preset

        if self.token is not None and not self.token.strip():
            raise UserError("--token is empty", "give a long random token, e.g. --token $(openssl rand -hex 24)",
                            EXIT_BAD_INPUT)
        if self.listen and self.token is None:
            raise UserError("--listen without --token would let anyone who reaches this machine use its GPU",
                            "add --token SECRET (clients send `Authorization: Bearer SECRET`), or leave out "
                            "--listen to serve 127.0.0.1 only", EXIT_BAD_INPUT)
        if self.allow_paths is not None and not self.allow_paths.is_dir():
            raise UserError(f"--allow-paths {self.allow_paths} is not a folder",
                            "give the folder whose files jobs may name by path", EXIT_BAD_INPUT)
        if self.preset is not None:
            resolve_preset(self.preset)  # an unknown name is refused before anything starts


# --- uploads ------------------------------------------------------------------------------------------------
def staged_name(field: str, filename: str) -> str:
    """The file name an upload gets in the job's inputs folder: its role (`FILE_FIELDS`) and a suffix that keeps
    an image an image and a video a video for the generator (which tells them apart by suffix). The client's name
    gives at most a short alphanumeric suffix (ui_jobs' rule); nothing else of it reaches the file system."""
    from itk.ui_jobs import SAFE_SUFFIX

    suffix = Path(filename).suffix.lower()
    safe = suffix if SAFE_SUFFIX.fullmatch(suffix) else ""
    if field == "video":
        safe = safe if safe in VIDEO_EXTENSIONS else ".mp4"
    elif field == "image":
        safe = safe if safe and safe not in VIDEO_EXTENSIONS else ".png"
    return FILE_FIELDS[field] + (safe or ".wav")


class UploadReader:
    """One multipart/form-data body, read as it arrives (python-multipart's parser, as Starlette uses it): each
    file part written straight into `folder` under its staged name, never held whole in memory, and refused
    (413) past `limit` bytes; the `job` field kept as text (at most JOB_FIELD_BYTES). ApiError for anything
    else: an unknown field, a field given twice."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.files: dict[str, Path] = {}  # form field -> its staged file
        self.seen: set[str] = set()
        self.job_text = ""
        self._name, self._value, self._disposition = b"", b"", b""
        self._field: str | None = None
        self._out: IO[bytes] | None = None
        self._size = 0
        self._text = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._disposition, self._field, self._size, self._text = b"", None, 0, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name, self._value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._disposition)
        field = params.get(b"name", b"").decode("utf-8", errors="replace")
        if field not in FILE_FIELDS and field != "job":
            raise ApiError(400, f"unknown form field {field!r}",
                           "send image or video, speech (speech2 for a second person) and job (JSON settings)")
        if field in self.seen:
            raise ApiError(400, f"form field {field!r} is given twice", "send each field once")
        self.seen.add(field)
        self._field = field
        if field in FILE_FIELDS:
            filename = params.get(b"filename", b"").decode("utf-8", errors="replace")
            path = self.folder / staged_name(field, filename)
            self.files[field] = path
            self._out = open(path, "wb")  # closed by _end, or by close() when the body is refused

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._out is not None:
            if self._size > self.limit:
                raise ApiError(413, f"the uploaded {self._field} is larger than {self.limit // 2**20} MB",
                               "send a smaller file, or start the server with a larger --max-upload-mb")
            self._out.write(data[start:end])
        elif self._field is not None:
            if self._size > JOB_FIELD_BYTES:
                raise ApiError(413, f"the job field is larger than {JOB_FIELD_BYTES // 1024} KB",
                               "the job field holds settings only: the files go in their own fields")
            self._text += data[start:end]

    def _end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._field == "job":
            self.job_text = self._text.decode("utf-8", errors="replace") or "{}"

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def drain(request: Request, limit: int) -> None:
    """Read and drop the rest of a refused body (at most `limit` bytes), so the client gets to read the answer
    instead of a reset connection."""
    read = 0
    with contextlib.suppress(RuntimeError, ClientDisconnect):  # RuntimeError: the body was already read whole
        async for chunk in request.stream():
            read += len(chunk)
            if read > limit:
                return


# --- what the API does ------------------------------------------------------------------------------------------
class Service:
    """The API's work on one folder's dispatcher (itk.batch.Batch, polling): submit, describe, list, hand out the
    video, cancel and delete. The HTTP layer (`create_app`) only routes to it."""

    def __init__(self, batch: Batch, options: ServeOptions) -> None:
        self.batch, self.options = batch, options
        self.store: JobStore = batch.store
        self.limit = options.max_upload_mb * 2**20
        # the largest body a request may have: three files at the limit, the job field and the multipart framing
        self.body_limit = 3 * self.limit + 2 * JOB_FIELD_BYTES

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """401 without the token, 403 with another one; nothing to check when the server has no token."""
        if self.options.token is None:
            return
        if credentials is None:
            raise ApiError(401, "this server needs its token", "send the header `Authorization: Bearer TOKEN` "
                           "(TOKEN: the server's --token)")
        if not secrets.compare_digest(credentials.credentials.encode(), self.options.token.encode()):
            raise ApiError(403, "wrong token", "send the server's --token as `Authorization: Bearer TOKEN`")

    def new_id(self) -> str:
        """A short random job id, safe as a file name, used by no job and no file of the folder."""
        while True:
            name = secrets.token_hex(6)
            if self.store.get(name) is None and not any(self.batch.folder.glob(f"{name}.*")):
                return name

    # --- submitting -----------------------------------------------------------------------------------------
    async def submit(self, request: Request) -> JobRecord:
        """A new job from the request (multipart uploads, or a JSON line of paths with --allow-paths), checked
        as `itk run` checks a job, queued, and the idle workers woken."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_limit:
            raise ApiError(413, f"the request is larger than {self.body_limit // 2**20} MB",
                           f"each file may have at most {self.limit // 2**20} MB (--max-upload-mb)")
        name = self.new_id()
        try:
            if kind == "multipart/form-data":
                folder = self.batch.folder / f"{name}.inputs"
                folder.mkdir()
                job, staged = await self.from_upload(request, name, folder)
                await run_in_threadpool(self.check_job, name, job, staged)
            elif kind == "application/json":
                job = await self.from_paths(request, name)
                await run_in_threadpool(self.check_job, name, job, {})
            else:
                await drain(request, self.body_limit)
                raise ApiError(400, f"a job is sent as multipart/form-data, not {kind or 'a body without a type'}",
                               "curl -F image=@face.png -F speech=@speech.wav -F 'job={\"seed\": 7}' "
                               "URL/v1/videos")
        except BaseException:  # the id is new: every file of its name was made by this request
            remove(job_files(self.batch.folder, name, spoken=True))
            raise
        self.store.add(name, job.to_json(), job.fingerprint)
        self.batch.wake()
        record = self.store.get(name)
        assert record is not None
        return record

    async def from_upload(self, request: Request, name: str, folder: Path) -> tuple[BatchJob, dict[Path, str]]:
        """The job of a multipart body, its files staged in `folder`; the staged files with the words errors
        should use for them."""
        _, params = parse_options_header(request.headers.get("content-type", ""))
        if not params.get(b"boundary"):
            raise ApiError(400, "the multipart body has no boundary", "let the HTTP client build the form")
        reader = UploadReader(folder, self.limit)
        parser = MultipartParser(params[b"boundary"], reader.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except ApiError:
            reader.close()
            await drain(request, self.body_limit)
            raise
        except (FormParserError, ClientDisconnect):
            reader.close()
            raise ApiError(400, "the multipart body is malformed or cut short", "let the HTTP client build the "
                           "form, and send it whole") from None
        files = reader.files
        if ("image" in files) == ("video" in files):
            raise ApiError(400, "send exactly one of the fields image (a portrait) or video (to dub)",
                           "curl -F image=@face.png -F speech=@speech.wav URL/v1/videos")
        if "speech" not in files:
            raise ApiError(400, "the field speech (the speech to lip-sync) is missing",
                           "curl -F image=@face.png -F speech=@speech.wav URL/v1/videos")
        settings = self.json_object(reader.job_text or "{}", "the job field")
        given = [key for key in settings if key not in UPLOAD_JOB_KEYS]
        if given:
            raise ApiError(422, f"the job field holds {given[0]!r}", f"it holds {', '.join(UPLOAD_JOB_KEYS)}; the "
                           "files go in the fields image or video, speech and speech2; the video is named by its id")
        picture = files.get("image") or files["video"]
        audio = {"person1": str(files["speech"])}
        if "speech2" in files:
            audio["person2"] = str(files["speech2"])
            settings.setdefault("audio_type", "add")
        line = {"prompt": DEFAULT_PROMPT, **settings, "cond_video": str(picture), "cond_audio": audio}
        words = {path: f"the uploaded {field}" for field, path in files.items()}
        return self.parse(line, name, words), words

    async def from_paths(self, request: Request, name: str) -> BatchJob:
        """The job of a JSON line that names files on this server: only with --allow-paths, only inside it."""
        root = self.options.allow_paths
        if root is None:
            await drain(request, self.body_limit)
            raise ApiError(400, "this server takes uploads only: it was started without --allow-paths",
                           "send the files as multipart/form-data (image or video, speech, job), or start the "
                           "server with --allow-paths FOLDER")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > JOB_FIELD_BYTES:
                raise ApiError(413, f"the JSON job is larger than {JOB_FIELD_BYTES // 1024} KB",
                               "a job names its files; it does not carry them")
        data = self.json_object(body.decode("utf-8", errors="replace"), "the JSON job")
        if "output" in data:
            raise ApiError(422, "a served job cannot choose its output", "leave out output: the video is named by "
                           "the job's id and fetched from /v1/videos/ID/content")
        data.setdefault("prompt", DEFAULT_PROMPT)
        if "cond_video" in data:
            data["cond_video"] = self.inside(root, data["cond_video"], "cond_video")
        if isinstance(data.get("cond_audio"), dict):
            data["cond_audio"] = {k: self.inside(root, v, f"cond_audio.{k}") for k, v in data["cond_audio"].items()}
        return self.parse(data, name, {})

    @staticmethod
    def inside(root: Path, value: Any, key: str) -> Any:
        """A path of a JSON job resolved in `root` (relative ones from it; symbolic links followed); 403 when it
        leads outside. Anything else is left for the job file's checks to name."""
        if not isinstance(value, str) or not value or value == SILENT_SPEAKER:
            return value
        base = root.resolve()
        path = (base / Path(value).expanduser()).resolve()
        if not path.is_relative_to(base):
            raise ApiError(403, f"{key} {value} is outside the folder this server allows",
                           f"name a file inside {base} (--allow-paths), or upload it")
        return str(path)

    @staticmethod
    def json_object(text: str, what: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else f"{exc.msg} at column {exc.colno}"
            raise ApiError(400, f"{what} is not valid JSON ({why})", '{"seed": 7, "settings": {"sample_steps": 8}}')\
                from None
        if not isinstance(data, dict):
            raise ApiError(400, f"{what} is not a JSON object", '{"seed": 7, "settings": {"sample_steps": 8}}')
        return data

    def parse(self, line: dict[str, Any], name: str, words: dict[Path, str]) -> BatchJob:
        """The job as a job file's line (its output named by the id), checked as `itk batch` checks one (422)."""
        try:
            return parse_line({**line, "output": f"{name}.mp4"}, 0, self.batch.folder)
        except BadInput as exc:  # said as `itk batch` says a line's problem
            error = UserError(exc.message.replace("the job: ", ""), exc.fix, exc.exit_code)
            raise ApiError.of(422, explained(error, words)) from None

    def check_job(self, name: str, job: BatchJob, words: dict[Path, str]) -> None:
        """`itk run`'s checks (inputs readable, speech not silent, output writable, weights present) before the
        job is queued, so a job that cannot run is refused now (422) instead of failing later."""
        from itk.run import plan_run

        try:
            plan_run(self.batch.run_spec(name, job)).require_weights()
        except UserError as exc:
            raise ApiError.of(422, explained(exc, words)) from None

    # --- reading --------------------------------------------------------------------------------------------
    def record(self, name: str) -> JobRecord:
        record = self.store.get(name)
        if record is None:
            raise ApiError(404, f"no job {name!r}", "GET /v1/videos lists the jobs")
        return record

    def describe(self, record: JobRecord, queued: list[str] | None = None) -> dict[str, Any]:
        """A job for its client: state, progress, queue position and ETA, the video's address, or its error."""
        if queued is None:
            queued = [job.name for job in self.store.jobs(["queued"])] if record.state == "queued" else []
        clips, steps = record.clips or 0, record.steps or 0
        total = clips * steps
        made = ((record.clip or 1) - 1) * steps + (record.step or 0) if total else 0
        fraction = 1.0 if record.state == "done" else round(min(1.0, made / total), 3) if total else 0.0
        position = queued.index(record.name) + 1 if record.name in queued else None
        failed = record.state == "failed"
        return {
            "id": record.name, "state": record.state, "created_at": record.created, "started_at": record.started,
            "finished_at": record.finished, "attempts": record.attempts, "worker": record.worker,
            "progress": {"clip": record.clip, "clips": record.clips, "step": record.step, "steps": record.steps,
                         "fraction": fraction},
            "queue_position": position, "eta_s": self.eta_s(record, position),
            "video_s": record.video_s, "busy_s": round(record.busy_s, 2),
            "content_url": f"/v1/videos/{record.name}/content" if record.state == "done" else None,
            "error": {"error": record.error, "fix": record.fix, "exit_code": record.exit_code} if failed else None,
            "note": record.note, "job": record.spec_data,
        }

    def eta_s(self, record: JobRecord, position: int | None) -> float | None:
        """Seconds until the job is done: a running one from its own step times; a queued one from this server's
        finished jobs (None before the first) and its live workers (those whose node is still there)."""
        if record.state == "running":
            view = next((v for v in self.batch.views if v.job == record.name), None)
            eta = view.eta_s() if view is not None else None
            return round(eta, 1) if eta is not None else None
        if position is None or not self.batch.job_times:
            return None
        running = self.store.counts()["running"]
        workers = max(1, self.batch.live_workers())
        return round(mean(self.batch.job_times) * ((running + position - 1) // workers + 1), 1)

    def listing(self, states: list[str]) -> dict[str, Any]:
        unknown = [s for s in states if s not in STATES]
        if unknown:
            raise ApiError(422, f"state {unknown[0]!r} is not a job state", f"one of: {', '.join(STATES)}")
        jobs = self.store.jobs(states or None)
        queued = [job.name for job in self.store.jobs(["queued"])]
        return {"videos": [self.describe(job, queued) for job in jobs], "counts": self.store.counts()}

    def content(self, name: str) -> Path:
        record = self.record(name)
        if record.state != "done":
            if record.state == "failed":
                raise ApiError(409, f"job {name} failed: {record.error}", record.fix or "",
                               exit_code=record.exit_code or EXIT_FAILED)
            raise ApiError(409, f"job {name} has no video: it is {record.state}",
                           f"GET /v1/videos/{name} until its state is done", exit_code=EXIT_FAILED)
        video = Path(record.output or self.batch.folder / f"{name}.mp4")
        if not video.is_file():
            raise ApiError(409, f"job {name} is done but its video {video.name} is gone from the server",
                           "submit the job again", exit_code=EXIT_FAILED)
        return video

    # --- cancelling and deleting ----------------------------------------------------------------------------
    def delete(self, name: str) -> dict[str, Any]:
        """A queued or running job is cancelled (a running one's worker stops it and stays warm; its resume state
        stays). A job that has ended is forgotten with the files it made (`job_files`); the files it names by
        path stay."""
        record = self.record(name)
        if record.state in ("queued", "running"):
            self.batch.cancel(name)  # False when it ended meanwhile: its state says how, and it stays
            return self.describe(self.record(name))
        if self.batch.busy_with(name) or not self.store.delete(name):
            raise ApiError(409, f"job {name} is still being stopped", f"DELETE /v1/videos/{name} again in a moment",
                           exit_code=EXIT_FAILED)
        remove(job_files(self.batch.folder, name, spoken="text" in record.spec_data))
        return {"id": name, "deleted": True}


def job_files(folder: Path, name: str, *, spoken: bool) -> list[Path]:
    """The files and folders job `name` makes in `folder`: its uploads, video, run folder and resume state, and
    for a job given as text (`spoken`) its speech: the wavs of one or two speakers and their sidecar
    (itk.speech). The files a job names by path (inside --allow-paths) are not among them."""
    video = folder / f"{name}.mp4"
    made = [folder / f"{name}.inputs", run_folder(video), resume_folder(video), video]
    if spoken:
        made += [*speech_files(video, 1), *speech_files(video, 2), speech_sidecar(video)]
    return made


def remove(paths: list[Path]) -> None:
    """Delete each path that exists: a folder with everything in it, a file."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def explained(error: UserError, words: dict[Path, str]) -> UserError:
    """The error naming uploads by their role ("the uploaded image"), not by the server's path of them."""
    names = {str(path): word for path, word in words.items()}
    return UserError(hide_paths(error.message, names, {}), hide_paths(error.fix, names, {}), error.exit_code)


# --- the HTTP layer ----------------------------------------------------------------------------------------
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["speech"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "the portrait (PNG/JPEG); or give video"},
        "video": {"type": "string", "format": "binary", "description": "a video to dub instead of an image"},
        "speech": {"type": "string", "format": "binary", "description": "the speech to lip-sync (wav/mp3/m4a)"},
        "speech2": {"type": "string", "format": "binary", "description": "a second person's speech (two people)"},
        "job": {"type": "string", "description": 'JSON: optional prompt, preset, seed, settings (generator '
                'settings as --set takes them), audio_type ("add"/"para"), bbox; e.g. {"seed": 7, "settings": '
                '{"sample_steps": 8}}'}}}},
    "application/json": {"schema": {"type": "object", "description": "only on a server started with "
                                    "--allow-paths FOLDER: a job file line (" + ", ".join(OFFICIAL_KEYS) +
                                    ", preset, seed, settings) whose paths are inside FOLDER"}}}}}
ERRORS = {code: {"description": words, "content": {"application/json": {"example": {
    "error": "what went wrong", "fix": "what to do", "exit_code": 2}}}} for code, words in {
    400: "a malformed request", 401: "no token", 403: "a wrong token, or a path outside --allow-paths",
    404: "no such job", 409: "no video (yet)", 413: "too large", 422: "a job that cannot run"}.items()}


Credentials = Annotated[HTTPAuthorizationCredentials | None,
                        Depends(HTTPBearer(auto_error=False, description="the server's --token"))]
StateFilter = Annotated[list[str] | None, Query(description="only jobs in these states (repeatable, or "
                                                            "comma-separated)")]


def create_app(service: Service) -> FastAPI:
    """The ASGI app: the /v1/videos routes on `service`, errors as {"error", "fix", "exit_code"}."""
    app = FastAPI(title="itk serve", version=__version__, redoc_url=None,
                  description="InfiniteTalk talking-head videos from a job queue: submit, poll, download, cancel.")

    def authorize(credentials: Credentials = None) -> None:
        service.authorize(credentials)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses={401: ERRORS[401], 403: ERRORS[403]})

    @v1.post("/videos", status_code=202, openapi_extra=UPLOAD_BODY,
             responses={k: ERRORS[k] for k in (400, 413, 422)}, summary="Submit a job; its id comes back at once")
    async def submit(request: Request) -> JSONResponse:
        record = await service.submit(request)
        return JSONResponse(service.describe(record), status_code=202,
                            headers={"Location": f"/v1/videos/{record.name}"})

    @v1.get("/videos", summary="The jobs, in queue order", responses={422: ERRORS[422]})
    def list_videos(state: StateFilter = None) -> dict[str, Any]:
        return service.listing([s.strip() for item in state or [] for s in item.split(",") if s.strip()])

    @v1.get("/videos/{video_id}", summary="A job: state, progress, ETA, error + fix", responses={404: ERRORS[404]})
    def get_video(video_id: str) -> dict[str, Any]:
        return service.describe(service.record(video_id))

    @v1.get("/videos/{video_id}/content", summary="The finished mp4", response_class=FileResponse,
            responses={404: ERRORS[404], 409: ERRORS[409], 200: {"content": {"video/mp4": {}}}})
    def get_content(video_id: str) -> FileResponse:
        return FileResponse(service.content(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")

    @v1.delete("/videos/{video_id}", summary="Cancel a queued or running job; delete one that has ended",
               responses={404: ERRORS[404], 409: ERRORS[409]})
    def delete_video(video_id: str) -> dict[str, Any]:
        return service.delete(video_id)

    app.include_router(v1)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response({"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        "the API is under /v1/videos; /docs describes it").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in problem.get("loc", ()))
        return ApiError(422, f"{where}: {problem.get('msg', 'invalid')}", "/docs describes every parameter") \
            .response()

    return app


# --- running it ----------------------------------------------------------------------------------------------
@dataclass
class ServeResult:
    """How a server ended: the folder's jobs by state when it stopped."""

    folder: Path
    counts: dict[str, int]
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return {"stopped": True, "folder": str(self.folder), "counts": self.counts,
                "elapsed_s": round(self.elapsed_s, 1)}


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts (port 0: any free one); UserError when it is taken.
    Its protocol is named (IPPROTO_TCP): asyncio turns Nagle's algorithm off only on such sockets' connections,
    and with it on, every keep-alive response waits ~40 ms for the client's delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        from itk.checks.port import _owner

        sock.close()
        owner = _owner(port) if exc.errno == errno.EADDRINUSE else exc.strerror
        raise UserError(f"port {port} on {host} cannot be used ({owner})",
                        f"stop that process, or choose another port: itk serve --port {port + 1}",
                        EXIT_BAD_INPUT) from None
    sock.listen(128)
    return sock


def serve(options: ServeOptions, on_ready: Callable[[dict[str, Any]], None] = lambda info: None) -> ServeResult:
    """Serve the folder's queue until Ctrl-C or SIGTERM (then the workers stop, their jobs back in the queue);
    `on_ready` gets the server's address once it answers. Prints nothing. UserError for options that must not
    start, a busy port or folder, or a worker that cannot start."""
    options.check()
    placement = Placement.choose(gpus=options.gpus, ray=options.ray)
    out = options.out.expanduser().absolute()
    sock = bind(options.host, options.port)
    try:
        with folder_lock(out):
            store = JobStore.open(out)
            try:
                carried = store.counts()
                recover_finished(store, out, [job.name for job in store.jobs()])
                with placement.open(out) as workers:
                    batch = Batch(folder=out, store=store, jobs=None, workers=workers, preset=options.preset,
                                  weights_dir=options.weights_dir, polling=True)
                    port = sock.getsockname()[1]
                    address = f"http://{socket.gethostname() if options.listen else '127.0.0.1'}:{port}"
                    info = {"url": f"{address}/v1/videos", "docs": f"{address}/docs", "port": port,
                            "listen": options.listen, "folder": str(out), "workers": [],
                            "queued": carried["queued"] + carried["running"], "recovered": carried["running"]}
                    run_http(batch, app=create_app(Service(batch, options)), sock=sock, announce=lambda: on_ready(
                        {**info, "workers": [view.label for view in batch.views]}))
                return ServeResult(out, store.counts(), time.monotonic() - batch.started)
            finally:
                store.close()
    finally:
        sock.close()


def run_http(batch: Batch, *, app: FastAPI, sock: socket.socket, announce: Callable[[], None]) -> None:
    """uvicorn in a thread of its own (the main thread keeps the signals: uvicorn's own handling would re-raise
    them once it is done) beside the dispatcher's workers; a Ctrl-C, SIGTERM or SIGHUP, or a worker that cannot
    start, stops both: the server first, then the workers (a second Ctrl-C kills them)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                           server_header=False, timeout_graceful_shutdown=SHUTDOWN_S))
    served = threading.Event()

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            served.set()

    previous = trap_stops(signal.default_int_handler)  # SIGTERM and SIGHUP unwind like Ctrl-C
    try:
        batch.start()
        threading.Thread(target=http, name="itk-serve-http", daemon=True).start()
        announced = interrupted = False
        try:
            while not served.wait(0.05) and not batch.stopping.is_set():
                if server.started and not announced:
                    announced = True
                    announce()
        except KeyboardInterrupt:
            interrupted = True
        server.should_exit = True
        wind_down(batch)
        try:
            served.wait(SHUTDOWN_S + 5)
        except KeyboardInterrupt:
            server.force_exit = True
    finally:
        restore(previous)
    if batch.startup_failure is not None:
        raise UserError(f"the generator's worker ended before it was ready (its log: {batch.startup_failure})",
                        f"`itk selftest` shows what is wrong; the queued jobs wait in the store for the next "
                        f"`itk serve --out {batch.folder}`", EXIT_FAILED)
    if batch.all_lost():
        raise UserError("every worker's node has left the Ray cluster", "start the nodes again (`ray start --address "
                        f"HEAD:6379` on each), then the same itk serve: the queued jobs wait in the store of "
                        f"{batch.folder}", EXIT_FAILED)
    if not (announced or interrupted):
        raise UserError("the HTTP server did not start", "rerun with --debug", EXIT_FAILED)


# --- for the command line -----------------------------------------------------------------------------------
def render_ready(info: dict[str, Any], as_json: bool) -> None:
    """The server's address once it answers: one JSON line with --json, else a few lines for people."""
    from itk.console import say

    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        return
    workers = ", ".join(info["workers"])
    say(f"itk serve: {info['url']} · API page {info['docs']} · workers: {workers} · jobs in {info['folder']}")
    if info["queued"]:
        recovered = (f"; {info['recovered']} running when the last server died resume from their last finished clip"
                     if info["recovered"] else "")
        say(f"carrying on {info['queued']} queued job(s) of the store{recovered}")
    if info["listen"]:
        say("listening on every network interface: requests need `Authorization: Bearer <your --token>`")
    say("Ctrl-C stops it; queued jobs wait in the store for the next `itk serve` on this folder")


def render_end(result: ServeResult, as_json: bool) -> None:
    from itk.console import batch_headline, say

    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        sys.stdout.flush()
        return
    left = result.counts["queued"] + result.counts["running"]
    again = f"; `itk serve --out {result.folder}` carries on with the {left} left" if left else ""
    say(f"itk serve stopped: {batch_headline(result.counts)}{again}")


def show_serve(*, out: str | None, port: int, listen: bool, token: str | None, allow_paths: str | None,
               gpus: str | None, preset: str | None, weights_dir: str | None, max_upload_mb: int,
               as_json: bool, ray: str | None = None) -> int:
    """`itk serve`: serve until stopped, rendering the ready line and the end; the exit code."""
    options = ServeOptions(out=Path(out or "outputs/serve"), port=port, listen=listen, token=token,
                           allow_paths=Path(allow_paths).expanduser() if allow_paths else None, gpus=gpus,
                           preset=preset, weights_dir=Path(weights_dir).expanduser() if weights_dir else None,
                           max_upload_mb=max_upload_mb, ray=ray)
    result = serve(options, on_ready=lambda info: render_ready(info, as_json))
    render_end(result, as_json)
    return EXIT_OK
