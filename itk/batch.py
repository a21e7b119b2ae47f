"""`itk batch`: many videos on one machine, one warm generator per GPU, every job's state in a durable store.

The jobs go into the output folder's store (itk.store); one worker per GPU (`python -m itk.runtime.worker`,
the generator in a job loop that keeps its models loaded) takes them one after another, each planned and
checked like `itk run` (itk.run.plan_run) right before it runs. A job's bad input fails that job only; a
worker that crashes (or runs out of memory) fails its job with the advice rules' verdict and is started again
for the next one. Killed at any moment, the same command carries on: done jobs are skipped, a job that was
running resumes from its last finished clip (the generator's resume state), and a job whose video was already
written when the batch died is recorded as done without being made again.

The same dispatcher serves `itk serve` (itk.serve): there its workers start at once and keep taking jobs from
the store as they arrive, until told to stop, and a job can be cancelled (a queued one never runs; a running one
is stopped by its worker, which stays warm, and keeps its resume state until the job is deleted).

With `--ray` the workers run on the nodes of a Ray cluster instead (itk.cluster: one per GPU of the cluster), and
this process stays the head: it keeps the store and plans every job. A worker whose node is lost gives its job
back to the queue; another worker resumes it from its last finished clip when the output folder is on a
filesystem every node sees (its resume state lives there), else makes it from clip 1; the job's note says which.

Nothing here prints: `run_batch` returns a BatchResult and reports progress through `on_change`; the console
renders both.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from itk.jobfile import BatchJob, read_job_file
from itk.runtime.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING_WEIGHTS,
    EXIT_OK,
    UserError,
    job_request,
)
from itk.store import JobRecord, JobStore
from itk.supervisor import restore, trap_stops
from itk.workers import LocalWorker, Worker

LOCK_FILE = ".itk-batch.lock"
RECOVERED = "its runner stopped before it ended: resumed from its last finished clip"
INTERRUPTED = "interrupted: resumes from its last finished clip"
LOST = "its node was lost"  # the start of the note of a job given back by a worker whose node left the cluster
SHARED_FS_WAIT_S = 10.0  # how long a video a worker on another node has written may take to appear here


def batch_gpus(value: str | None) -> list[int | None]:
    """The GPUs of `--gpus all|N` (default all): their indices, or [None] for one worker on the CPU when this
    machine has no usable NVIDIA GPU. A count above the GPUs present is refused."""
    from itk.launch import usable_gpus

    present = usable_gpus()
    if value is None or str(value).strip().lower() in ("all", "auto"):
        return list(range(present)) or [None]
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--gpus {value}: expected all or a count of 1 or more", "e.g. --gpus 2", EXIT_BAD_INPUT)
    if present == 0:
        if count > 1:
            raise UserError(f"--gpus {count}: this machine has no usable NVIDIA GPU", "leave out --gpus (one worker "
                            "runs on the CPU: tiny test weights only)", EXIT_BAD_INPUT)
        return [None]
    if count > present:
        raise UserError(f"--gpus {count}: this machine has {present} usable GPU(s)", f"--gpus {present} or --gpus all",
                        EXIT_BAD_INPUT)
    return list(range(count))


@dataclass(frozen=True)
class Placement:
    """Where a batch's workers run: on this machine's `gpus`, or with `ray` (auto, or the cluster's address) on
    every GPU of a Ray cluster, one per node on a cluster without GPUs (itk.cluster)."""

    gpus: tuple[int | None, ...] = ()
    ray: str | None = None

    @classmethod
    def choose(cls, *, gpus: str | None, ray: str | None) -> Placement:
        """`--gpus` and `--ray` checked before anything starts (UserError: a count this machine lacks, both at
        once, Ray not installed, nothing at the cluster's address); joins no cluster yet."""
        if ray is None:
            return cls(gpus=tuple(batch_gpus(gpus)))
        from itk.cluster import check_ray

        if gpus is not None:
            raise UserError("--gpus counts this machine's GPUs; --ray uses every GPU of the cluster",
                            "leave out --gpus", EXIT_BAD_INPUT)
        check_ray(ray)
        return cls(ray=ray)

    @contextlib.contextmanager
    def open(self, folder: Path) -> Iterator[list[Worker]]:
        """The workers, not yet started; on a Ray cluster its actors, which are gone again once this ends."""
        if self.ray is None:
            yield [LocalWorker(folder, gpu=gpu) for gpu in self.gpus]
            return
        from itk.cluster import cluster_workers

        with cluster_workers(self.ray, folder) as workers:
            yield workers


@dataclass
class WorkerView:
    """What one worker is doing, for the display; the gaps between its job's consecutive steps of one clip give
    the job's ETA."""

    label: str
    job: str | None = None
    clip: int = 0
    clips: int = 0
    step: int = 0
    steps: int = 0
    stage: str = "starting"
    restarts: int = 0
    step_times: list[float] = field(default_factory=list)
    last_step_at: float | None = None

    def begin(self, job: str) -> None:
        self.job, self.clip, self.clips, self.step, self.steps = job, 0, 0, 0, 0
        self.step_times, self.last_step_at = [], None

    def stepped(self, clip: int, step: int, steps: int, now: float) -> None:
        if self.last_step_at is not None and clip == self.clip:
            self.step_times.append(now - self.last_step_at)
        self.clip, self.step, self.steps, self.last_step_at = clip, step, steps, now
        self.stage = "generating"

    def eta_s(self) -> float | None:
        """Seconds until the job's last step, from its own step times (None before two steps of one clip)."""
        from itk.progress import eta_s

        if not (self.steps and self.clips):
            return None
        left = (self.clips - max(self.clip, 1)) * self.steps + self.steps - self.step
        return eta_s(self.step_times, [], left, 0)


@dataclass
class BatchResult:
    """How a batch ended: every job of its file as recorded, and whether it was stopped."""

    folder: Path
    jobs: list[JobRecord]
    elapsed_s: float
    interrupted: bool = False

    @property
    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "queued": 0, "running": 0, "cancelled": 0}
        for job in self.jobs:
            out[job.state] = out.get(job.state, 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if all(j.state in ("done", "cancelled") for j in self.jobs) else EXIT_FAILED

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "elapsed_s": round(self.elapsed_s, 1), "interrupted": self.interrupted,
                "counts": self.counts, "exit_code": self.exit_code, "jobs": [j.to_json() for j in self.jobs]}


POLL_S = 1.0  # an idle worker looks at the store this often (a submission, or a job given back, wakes it at once)


@dataclass
class Batch:
    """The store of one output folder, the workers that take its jobs and what the display reads: one `itk batch`
    run (`jobs`: the jobs of its file; it ends once none of them is queued or running) or one `itk serve`
    (`polling`: every job of the store, taken as it arrives until `stopping`)."""

    folder: Path
    store: JobStore
    jobs: dict[str, BatchJob] | None
    workers: list[Worker]
    preset: str | None = None
    weights_dir: Path | None = None
    polling: bool = False
    evaluate: bool = False  # each finished video gets its `itk eval` beside it (VIDEO.eval.json)
    on_change: Callable[[Batch], None] = lambda batch: None
    views: list[WorkerView] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    job_times: list[float] = field(default_factory=list)  # seconds per job finished by this run
    slots: list[WorkerSlot] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)  # jobs cancelled while this run holds the store
    startup_failure: Path | None = None  # a worker's log when it died before it was ready

    def job_for(self, record: JobRecord) -> BatchJob:
        """The job of a store row: this batch's own line, else the job its spec describes (BadInput)."""
        if self.jobs is not None and record.name in self.jobs:
            return self.jobs[record.name]
        return BatchJob.from_json(record.spec_data)

    def run_spec(self, name: str, job: BatchJob) -> Any:
        """The RunSpec of job `name`: its video in this folder, on one GPU, the batch's preset unless its own; a
        job given as text has its speech made by plan_run, beside its video (reused when the job runs again)."""
        from itk.spec import RunSpec

        return RunSpec(job=job.job, speech=job.speech, output=self.folder / f"{name}.mp4",
                       preset=job.preset or self.preset, settings=job.settings, gpus=1, weights_dir=self.weights_dir)

    def write_eval(self, name: str, video: Path, plan: Any) -> None:
        """`itk eval` of a finished video, written beside it as VIDEO.eval.json (against the job's portrait or
        source video, lip-sync when SyncNet's weights are here); a video it cannot measure gets a note, and the
        job stays done."""
        from itk.evaluate import EvalRequest, eval_path, evaluate, syncnet_weights
        from itk.runtime.atomic import atomic_write_text
        from itk.runtime.paths import weights_dir

        try:
            result = evaluate(EvalRequest(video=video, reference=plan.job.cond_video,
                                          syncnet=syncnet_weights(weights_dir(self.weights_dir).absolute())))
            atomic_write_text(eval_path(video), json.dumps(result.to_json(), indent=2) + "\n")
        except UserError as exc:
            self.store.note(name, f"not measured by itk eval: {exc.message}")

    def counts(self) -> dict[str, int]:
        return self.store.counts(names=self.jobs)

    def eta_s(self, counts: dict[str, int] | None = None) -> float | None:
        """Seconds until every queued and running job is done, from this batch's own finished jobs (`counts`: the
        batch's counts when the caller has them)."""
        if not self.job_times:
            return None
        counts = counts or self.counts()
        left = counts["queued"] + counts["running"]
        return mean(self.job_times) * left / max(1, self.live_workers())

    def live_workers(self) -> int:
        """How many workers can still take jobs: those whose node has not left the cluster."""
        return sum(1 for slot in self.slots if slot.worker.lost is None)

    def changed(self) -> None:
        self.on_change(self)

    # --- the workers --------------------------------------------------------------------------------------
    def start(self) -> None:
        """A slot per worker, each in its own thread."""
        self.views = [WorkerView(worker.label) for worker in self.workers]
        self.slots = [WorkerSlot(self, worker, view) for worker, view in zip(self.workers, self.views, strict=True)]
        for slot in self.slots:
            slot.thread.start()

    def wake(self) -> None:
        """A job was queued or given back, or ended (or the run is stopping): idle workers look at the store now."""
        for slot in self.slots:
            slot.wake.set()

    def cancel(self, name: str) -> bool:
        """Cancel a queued or running job: the store marks it cancelled at once and the worker running it stops it
        (its resume state stays). False when it had already ended (or is unknown)."""
        if not self.store.cancel(name):
            return False
        self.cancelled.add(name)
        for slot in self.slots:
            slot.cancel_job(name)
        self.changed()
        return True

    def busy_with(self, name: str) -> bool:
        """Whether a worker still holds `name` (a cancelled job until its worker has let it go)."""
        return any(slot.current == name for slot in self.slots)

    def all_lost(self) -> bool:
        """Whether every worker's node has left the cluster (nothing can run any more)."""
        return bool(self.slots) and not self.live_workers()

    def stop(self) -> None:
        """Stop every worker as Ctrl-C does: a job in progress goes back to the queue with its resume state."""
        self.stopping.set()
        self.wake()
        for slot in self.slots:
            slot.stop()
        self.changed()

    def kill(self) -> None:
        for slot in self.slots:
            slot.kill()

    def wait(self) -> None:
        wait_for(self.slots)


class WorkerSlot:
    """One warm worker (one GPU's, here or on a cluster's node), and the jobs it takes from the store one after
    another, in a thread."""

    def __init__(self, batch: Batch, worker: Worker, view: WorkerView) -> None:
        self.batch, self.worker, self.view = batch, worker, view
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.current: str | None = None  # the job this slot took, until it has ended here
        self.live: str | None = None  # the job the worker runs: from its "job" event to its end
        self.signalled: str | None = None  # the job a cancel signal was sent for
        self.lock = threading.Lock()  # live and signalled, between this thread and a cancel
        self.wake = threading.Event()
        self.ended = threading.Event()  # set as the job loop ends
        self.thread = threading.Thread(target=self.work, name=f"itk-batch-{view.label}", daemon=True)

    # --- the worker process -------------------------------------------------------------------------------
    def start_worker(self) -> bool:
        """Start the worker and wait until it is ready; False if it died (or its node was lost) first."""
        self.events = queue.Queue()
        if self.batch.stopping.is_set():
            self.worker.stop()  # a stop that came before this start: the worker never starts
        self.worker.launch(self.events.put)
        self.view.stage = "starting the generator"
        self.batch.changed()
        while True:
            event = self.events.get()
            if event is None:
                return False
            if event.get("event") == "ready":
                self.view.stage = "ready"
                self.batch.changed()
                return True

    def could_not_start(self) -> None:
        """The worker died before it was ready: the whole run stops (its log says why), unless it was stopping or
        its node was lost (the other workers carry on)."""
        if not self.batch.stopping.is_set() and self.worker.lost is None:
            self.view.restarts += 1
            self.batch.startup_failure = self.worker.log_path
            self.batch.stopping.set()
            self.batch.wake()

    # --- the job loop -------------------------------------------------------------------------------------
    def work(self) -> None:
        ready = False
        try:
            while not self.batch.stopping.is_set() and self.worker.lost is None:
                if self.batch.polling and not ready:  # serving: warm before the first job comes
                    ready = self.start_worker()
                    if not ready:
                        self.could_not_start()
                        break
                record = self.next_job()
                if record is None:
                    break
                self.current = record.name
                self.view.begin(record.name)
                self.batch.changed()
                if not ready:
                    ready = self.start_worker()
                    if not ready:
                        self.batch.store.requeue(record.name, self.lost_note(record.name) or "the worker could not "
                                                 "start")
                        self.could_not_start()
                        break
                ready = self.run_job(record)
                self.current = None
                self.batch.wake()  # a job ended or came back: a worker waiting for one looks at the store
        finally:
            self.current = None
            self.view.job = None
            self.view.stage = f"lost: {self.worker.lost}" if self.worker.lost else "stopped"
            self.worker.close()  # an idle worker exits at the end of its input; it has ended (and is reaped) here
            if self.worker.lost is not None and self.batch.all_lost():
                self.batch.stopping.set()  # nothing can run any more: a server stops too
            self.batch.wake()
            self.batch.changed()
            self.ended.set()

    def next_job(self) -> JobRecord | None:
        """The next queued job, now running here. A batch's slot waits while one of its jobs runs elsewhere (it may
        come back to the queue when its worker's node is lost) and gets None once none is queued or running; a
        serving slot waits for one (a submission wakes it) and gets None only when the run stops."""
        while not self.batch.stopping.is_set():
            self.wake.clear()  # before the claim: a job queued after it sets the event again
            record = self.batch.store.claim(self.view.label, self.batch.jobs)
            if record is not None:
                return record
            if not self.batch.polling:
                counts = self.batch.counts()
                if counts["queued"]:
                    continue  # given back between the claim and the count
                if not counts["running"]:
                    return None
            if self.view.stage != "waiting for jobs":
                self.view.job, self.view.stage = None, "waiting for jobs"
                self.batch.changed()
            self.wake.wait(POLL_S)
        return None

    def run_job(self, record: JobRecord) -> bool:
        """Plan and run one job on the worker; record how it ended. Returns whether the worker is still ready."""
        from itk.run import output_lock, plan_run

        store, name = self.batch.store, record.name
        try:
            plan = plan_run(self.batch.run_spec(name, self.batch.job_for(record)))
            plan.require_weights()
        except UserError as exc:
            store.fail(name, exc.message, exc.fix, exc.exit_code)
            return True
        try:
            with output_lock(plan):
                plan.write_job()
                plan.log_path.write_text(f"# itk batch, {self.view.label}: {plan.command_line}\n", encoding="utf-8")
                return self.follow(plan, record)
        except UserError as exc:  # the output is being written by another itk run
            store.fail(name, exc.message, exc.fix, exc.exit_code)
            return True

    def follow(self, plan: Any, record: JobRecord) -> bool:
        store, name = self.batch.store, record.name
        if name in self.batch.cancelled:  # cancelled while it was being planned: the store says so already
            return True
        kills_before = self.worker.oom_kills()
        if not self.worker.send(job_request(name, plan.flags)):
            store.requeue(name, self.lost_note(name, plan) or "the worker was gone before the job was sent")
            return False
        events: list[dict[str, Any]] = []
        started, first_step = time.monotonic(), True
        try:
            while True:
                event = self.events.get()
                if event is None:  # the worker died with this job
                    return self.worker_died(plan, record, events, kills_before)
                if event.get("job") != name:
                    continue
                events.append(event)
                kind = event.get("event")
                if kind == "job":
                    self.started_live(name)
                elif kind == "step":
                    if first_step:
                        first_step = False
                        store.progress(name, setup_s=round(time.monotonic() - started, 2))
                    self.view.stepped(int(event.get("clip") or 0), int(event.get("step") or 0),
                                      int(event.get("steps") or 0), time.monotonic())
                    store.progress(name, clip=self.view.clip, step=self.view.step, steps=self.view.steps)
                elif kind == "clip":
                    self.view.clip, self.view.clips = int(event.get("clip") or 0), int(event.get("clips") or 0)
                    self.view.last_step_at = None
                    store.progress(name, clip=self.view.clip, clips=self.view.clips)
                elif kind == "stage":
                    self.view.stage = str(event.get("stage") or "")
                    if event.get("clips"):
                        self.view.clips = int(event["clips"])
                elif kind == "done":
                    self.ended_live()  # the job is over: a cancel from now on must not signal the worker
                    video = Path(event.get("path") or plan.output)
                    seconds = written_seconds(video, 0 if isinstance(self.worker, LocalWorker) else SHARED_FS_WAIT_S)
                    if seconds is None:
                        store.fail(name, f"the generator said done but {video} is not a readable video",
                                   "run the job again; if it repeats, report it with its log", EXIT_FAILED)
                    elif store.finish(name, video, seconds, note=finish_note(record, events, plan.media.warnings)):
                        self.batch.job_times.append(time.monotonic() - started)
                        if self.batch.evaluate:
                            self.batch.write_eval(name, video, plan)
                    self.batch.changed()
                    return True
                elif kind == "error":
                    self.ended_live()
                    self.job_error(plan, name, event, events, kills_before)
                    self.batch.changed()
                    return True
                self.batch.changed()
        finally:
            self.ended_live()

    def job_error(self, plan: Any, name: str, event: dict[str, Any], events: list[dict[str, Any]],
                  kills_before: int | None) -> None:
        """Record a job's error event: bad input (failed with its fix), else as `unfinished`."""
        code = int(event.get("exit_code") or EXIT_FAILED)
        if code in (EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS):
            self.batch.store.fail(name, str(event.get("message") or "bad input"), str(event.get("fix") or ""), code)
        else:
            self.unfinished(plan, name, events=events, kills_before=kills_before, code=code,
                            interrupted=code == EXIT_INTERRUPTED)

    def worker_died(self, plan: Any, record: JobRecord, events: list[dict[str, Any]],
                    kills_before: int | None) -> bool:
        """The worker ended during the job: with its node (the job goes back to the queue, to resume where the
        output folder says), stopped by us, or crashed (the next job starts a new worker); then as `unfinished`."""
        name, code = record.name, self.worker.returncode or EXIT_FAILED
        note = None if name in self.batch.cancelled else self.lost_note(name, plan)
        if note is not None:
            self.batch.store.requeue(name, note)
            return False
        interrupted = self.batch.stopping.is_set() or code == EXIT_INTERRUPTED
        if not interrupted and name not in self.batch.cancelled:
            self.view.restarts += 1
        self.unfinished(plan, name, events=events, kills_before=kills_before, code=code, interrupted=interrupted,
                        crashed=not interrupted)
        self.batch.changed()
        return False

    def unfinished(self, plan: Any, name: str, *, events: list[dict[str, Any]], kills_before: int | None, code: int,
                   interrupted: bool, crashed: bool = False) -> None:
        """A job that ended without its video: a cancelled one stays cancelled, an interrupted one is queued again
        (it resumes from its last finished clip), any other fails with the advice rules' verdict on its log and
        events (`crashed`: the worker died with it)."""
        from itk.run import explain_failure

        store = self.batch.store
        if name in self.batch.cancelled:
            store.cancel(name)
        elif interrupted:
            store.requeue(name, INTERRUPTED)
        else:
            log_text = plan.log_path.read_text(encoding="utf-8", errors="replace") if plan.log_path.is_file() else ""
            verdict = explain_failure(plan, log_text=log_text, returncode=code, events=events,
                                      oom_kills_before=kills_before)
            store.fail(name, f"{'the worker crashed: ' if crashed else ''}{verdict.diagnosis}",
                       verdict.fixes[0] if verdict.fixes else "", EXIT_FAILED)

    def lost_note(self, name: str, plan: Any = None) -> str | None:
        """The note of a job given back because this worker's node was lost (None while it is not): whether the
        next worker resumes it (its resume state is in the output folder, which every node sees) or makes it
        from clip 1."""
        from itk.runtime.protocol import resume_folder

        if self.worker.lost is None:
            return None
        output = plan.output if plan is not None else self.batch.folder / f"{name}.mp4"
        then = ("resumes from its last finished clip" if resume_folder(output).is_dir() else
                "restarts from clip 1 (no finished clip of it in the output folder)")
        return f"{LOST} ({self.view.label}): {then}"

    # --- stopping -----------------------------------------------------------------------------------------
    def started_live(self, name: str) -> None:
        """The worker has started `name` (its "job" event): a cancel that came earlier is sent now."""
        with self.lock:
            self.live = name
            self.signal_cancel()

    def ended_live(self) -> None:
        with self.lock:
            self.live = None

    def cancel_job(self, name: str) -> None:
        """Stop `name` if this worker runs it (the worker stays, warm, for the next job). The signal goes only to
        a worker inside that job (between its "job" event and its end), once."""
        with self.lock:
            if self.live == name:
                self.signal_cancel()

    def signal_cancel(self) -> None:
        """With the lock held: SIGUSR1 to the worker if its live job is cancelled and not yet signalled."""
        if self.live is not None and self.live in self.batch.cancelled and self.signalled != self.live:
            self.signalled = self.live
            self.worker.cancel_job()

    def stop(self) -> None:
        """Stop the job in progress and the worker, as Ctrl-C does (the job keeps its resume state)."""
        self.wake.set()
        self.worker.stop()

    def kill(self) -> None:
        self.worker.kill()


def resume_note(events: list[dict[str, Any]]) -> str | None:
    resumed = next((e for e in events if e.get("event") == "stage" and e.get("stage") == "resume"), None)
    return f"resumed at clip {resumed.get('from_clip')}" if resumed else None


def finish_note(record: JobRecord, events: list[dict[str, Any]], warnings: Sequence[str] = ()) -> str | None:
    """A done job's note: where it resumed, after why, when its last attempt was given back by a lost node; then
    what `itk run` would have warned about its inputs (a video stopped before its speech ends at max_frame_num,
    colours that may drift in a long video), which a batch has no terminal to print."""
    resumed = resume_note(events)
    if record.note and record.note.startswith(LOST):
        resumed = f"{record.note}; {resumed or 'made from clip 1'}"
    return "; ".join(part for part in (resumed, *warnings) if part) or None


def written_seconds(video: Path, wait_s: float) -> float | None:
    """The length of a video a worker says it has written; one written on another node may take a moment to
    appear on a shared filesystem here (NFS caches attributes), so a missing or unreadable file is looked at
    again for up to `wait_s`. None: it is not a readable video."""
    from itk.run import video_seconds

    deadline = time.monotonic() + wait_s
    while True:
        seconds = video_seconds(video) if video.is_file() else None
        if seconds is not None or time.monotonic() >= deadline:
            return seconds
        time.sleep(0.5)


def recover_finished(store: JobStore, folder: Path, names: list[str]) -> None:
    """The jobs a dead runner left `running` (the caller holds the folder's lock: no runner is alive): one whose
    video was completely written after it started (the runner died between the file and the record) is done,
    never made twice and with no attempt added; the others go back to the queue and resume from their last
    finished clip."""
    from itk.run import video_seconds

    for record in store.jobs(["running"]):
        video = folder / f"{record.name}.mp4"
        written = (record.name in names and record.started is not None and video.is_file()
                   and video.stat().st_mtime >= record.started - 1)
        seconds = video_seconds(video) if written else None
        if seconds is not None:
            store.finish(record.name, video, seconds, note="its video was written before its runner stopped")
        else:
            store.requeue(record.name, RECOVERED)


def folder_lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    """One batch or server per output folder: a lock in it naming its holder's pid (itk.locking)."""
    from itk.locking import held

    return held(folder / LOCK_FILE, lambda holder: UserError(
        f"{folder} is being worked on by another itk batch or itk serve ({holder})",
        f"wait for it, look at it with `itk batch --status {folder}`, or use another --out", EXIT_BAD_INPUT))


def prepare(jobs_file: Path, *, preset: str | None) -> list[BatchJob]:
    """The job file read and checked as a whole (UserError listing every bad line), and the preset name."""
    from itk.presets import resolve_preset

    if preset is not None:
        resolve_preset(preset)  # an unknown name is refused before anything runs
    return read_job_file(jobs_file)


def run_batch(jobs_file: Path, *, out: Path, gpus: str | None = None, preset: str | None = None,
              weights_dir: Path | None = None, ray: str | None = None, evaluate: bool = False,
              on_change: Callable[[Batch], None] | None = None) -> BatchResult:
    """Run every job of `jobs_file` not yet done into `out`, on this machine's GPUs or (`ray`: auto or an address)
    on every GPU of a Ray cluster; returns when all have ended, or after a Ctrl-C (a second one stops at once).
    `evaluate`: each finished video's `itk eval` beside it. Prints nothing."""
    out = out.absolute()
    jobs = prepare(jobs_file, preset=preset)
    placement = Placement.choose(gpus=gpus, ray=ray)
    with folder_lock(out):
        store = JobStore.open(out)
        try:
            for position, job in enumerate(jobs, 1):
                store.add(job.name, job.to_json(), job.fingerprint, position)
            recover_finished(store, out, [j.name for j in jobs])
            with placement.open(out) as workers:
                batch = Batch(folder=out, store=store, jobs={j.name: j for j in jobs}, workers=workers,
                              preset=preset, weights_dir=weights_dir, evaluate=evaluate,
                              on_change=on_change or (lambda b: None))
                interrupted = drive(batch)
            return BatchResult(out, store.jobs(names=batch.jobs), time.monotonic() - batch.started, interrupted)
        finally:
            store.close()


def drive(batch: Batch) -> bool:
    """Start a slot per worker and wait for them; Ctrl-C (or SIGTERM/SIGHUP) stops cleanly, a second one at once.
    Returns whether it was stopped."""
    previous = trap_stops(signal.default_int_handler)  # SIGTERM and SIGHUP unwind like Ctrl-C
    interrupted = False
    try:
        batch.start()
        try:
            batch.wait()
        except KeyboardInterrupt:
            interrupted = True
            wind_down(batch)
    finally:
        restore(previous)
    return interrupted


def wind_down(batch: Batch) -> None:
    """Stop every worker cleanly (a job in progress goes back to the queue) and wait until they have; a Ctrl-C
    (or SIGTERM/SIGHUP, under `trap_stops`) meanwhile kills them at once."""
    batch.stop()
    try:
        batch.wait()
    except KeyboardInterrupt:
        batch.kill()
        batch.wait()


def wait_for(slots: list[WorkerSlot]) -> None:
    """Until every slot's job loop has ended. Not Thread.join: a Ctrl-C arriving inside join() leaves CPython 3.11
    believing the thread has ended while it still runs (its state lock is released on the way out)."""
    for slot in slots:
        while not slot.ended.wait(0.2):
            pass


def batch_status(folder: Path) -> list[JobRecord]:
    """Every job of the store in `folder` (for `itk batch --status`, from another terminal while it runs)."""
    from itk.store import StoreError

    try:
        store = JobStore.open(folder.absolute(), create=False)
    except StoreError as exc:
        raise UserError(str(exc), f"give the --out folder of an itk batch (it holds {folder.name}/itk-jobs.sqlite)",
                        EXIT_BAD_INPUT) from None
    try:
        return store.jobs()
    finally:
        store.close()

