"""Several machines through Ray (`itk batch --ray`, `itk serve --ray`): one Ray actor per GPU of the cluster (one
per node on a cluster without GPUs), each holding a warm worker on its node.

The process that runs the command is the head: it keeps the output folder's store (the one truth), plans every
job as `itk run` would (itk.run.plan_run) and hands the job's generator flags to a free actor; the actor's
`WorkerHost` runs them on its node's warm worker (itk.workers.LocalWorker) and keeps its events until the head
asks for them (a call that waits up to POLL_WAIT_S for the next ones). Ray starts, places and watches the actors:
when a node dies Ray says the actor died, and the head gives that worker's job back to the queue (itk.batch).

Every node reads the jobs' files and the weights and writes the videos at the same paths as the head, so the
output folder (and the inputs and weights) must be on a filesystem every node mounts at the same path; the start
refuses a node that does not see the output folder. The resume state lives there too: a job whose node died
resumes on another node from its last finished clip. Ray is an optional extra (`pip install 'itk[cluster]'`),
imported only here and only on the `--ray` path.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_FAILED, UserError
from itk.workers import LocalWorker, OnEvent, worker_log

INSTALL_FIX = "pip install 'itk[cluster]'"
START_S = 120.0  # how long the actors may take to be placed and started
POLL_WAIT_S = 0.5  # the head's call for a worker's events returns after this long when none came
UNAVAILABLE_RETRY_S = 1.0  # an actor Ray calls unavailable (its node may be dying) is asked again after this long
CALLS = 4  # calls an actor serves at once: the head's waiting poll beside a send, a cancel or a stop
PROBE = ".itk-cluster-probe"  # written in the output folder by the head, read by every actor
ADDRESS_TIMEOUT_S = 5.0
NODE_GONE = "its node left the Ray cluster"  # why a worker is lost


def require_ray() -> None:
    """UserError (exit 2) with the install command when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed here", INSTALL_FIX, EXIT_BAD_INPUT) from None


def check_ray(address: str) -> None:
    """Before anything starts: Ray is installed, and something answers at `address` (refused within seconds: Ray
    itself would retry for minutes). UserError (exit 2) otherwise."""
    require_ray()
    if address != "auto" and not answers(address):
        raise UserError(f"--ray {address}: nothing answers there", "start the cluster's head there (`ray start "
                        "--head`) and give the address it prints, or --ray auto on a node of the cluster",
                        EXIT_BAD_INPUT)


class WorkerHost:
    """The actor on a node (run there by Ray, serving up to `CALLS` calls at once): the node's warm worker and its
    events, kept until the head asks for them."""

    def __init__(self) -> None:
        self.worker: LocalWorker | None = None
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.ended = False

    def where(self) -> dict[str, Any]:
        """This actor's node: its id, address and the GPUs Ray gave this actor."""
        import ray

        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def sees(self, probe: str, token: str) -> bool:
        """Whether this node reads the head's probe file with its token (the output folder is shared)."""
        try:
            return Path(probe).read_text(encoding="utf-8") == token
        except OSError:
            return False

    def launch(self, folder: str, label: str) -> None:
        """Start a new worker process on this node (the device Ray gave this actor, set in its environment)."""
        self.events, self.ended = queue.Queue(), False
        self.worker = LocalWorker(Path(folder), label=label)
        self.worker.launch(self.events.put)

    def poll(self, wait_s: float) -> tuple[list[dict[str, Any]], bool, int | None]:
        """The worker's events since the last call (waiting up to `wait_s` for the first), whether it has ended, and
        then its exit status."""
        found: list[dict[str, Any]] = []
        with contextlib.suppress(queue.Empty):
            item = self.events.get(timeout=wait_s)
            while True:
                if item is None:
                    self.ended = True
                    break
                found.append(item)
                item = self.events.get_nowait()
        returncode = self.worker.returncode if self.worker is not None and self.ended else None
        return found, self.ended, returncode

    def send(self, line: str) -> bool:
        return self.worker is not None and self.worker.send(line)

    def cancel_job(self) -> None:
        if self.worker is not None:
            self.worker.cancel_job()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def kill(self) -> None:
        if self.worker is not None:
            self.worker.kill()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


class RemoteWorker:
    """A worker on a cluster's node, as the head's slot drives it (itk.workers.Worker): each call goes to its actor;
    a thread of the head fetches its events. Once Ray says the actor died (its node is gone), it is `lost`."""

    def __init__(self, actor: Any, label: str, folder: Path) -> None:
        self.actor, self.label, self.folder = actor, label, folder
        self.lost: str | None = None
        self.stopped = False
        self.exit_status: int | None = None
        self.pump: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        return worker_log(self.folder, self.label)

    @property
    def returncode(self) -> int | None:
        return self.exit_status

    def launch(self, on_event: OnEvent) -> None:
        import ray

        self.exit_status = None
        try:
            ray.get(self.actor.launch.remote(str(self.folder), self.label))
        except ray.exceptions.RayError:
            self.lose()
            on_event(None)
            return
        if self.stopped:
            self.stop()  # a stop that came while the worker was being started
        self.pump = threading.Thread(target=self.fetch, args=(on_event,), name=f"itk-ray-{self.label}", daemon=True)
        self.pump.start()

    def fetch(self, on_event: OnEvent) -> None:
        """Pass the worker's events on until it has ended or its actor died (Ray decides when an unavailable
        actor is dead: until then it is asked again; any other failure of the call gives the actor up), then None."""
        import ray

        while True:
            try:
                events, ended, returncode = ray.get(self.actor.poll.remote(POLL_WAIT_S))
            except ray.exceptions.ActorUnavailableError:
                time.sleep(UNAVAILABLE_RETRY_S)
                continue
            except ray.exceptions.RayError:
                self.lose()
                break
            for event in events:
                on_event(event)
            if ended:
                self.exit_status = returncode
                break
        on_event(None)

    def lose(self) -> None:
        """The actor is gone for good: it is never called again (and is killed if Ray still can reach it)."""
        import ray

        self.lost = NODE_GONE
        with contextlib.suppress(Exception):
            ray.kill(self.actor)

    def send(self, line: str) -> bool:
        """The job request to the worker. A request Ray could not deliver for sure counts as not sent, and the
        actor is given up (killed), so the job never runs both there and after it is given back."""
        import ray

        try:
            return bool(ray.get(self.actor.send.remote(line)))
        except ray.exceptions.RayError:
            self.lose()
            return False

    def cancel_job(self) -> None:
        if self.lost is None:
            self.actor.cancel_job.remote()

    def stop(self) -> None:
        self.stopped = True
        if self.lost is None:
            self.actor.stop.remote()

    def kill(self) -> None:
        if self.lost is None:
            self.actor.kill.remote()

    def close(self) -> None:
        """End the worker's input and wait until it has ended (at once when the actor is gone)."""
        import ray

        if self.lost is None:
            with contextlib.suppress(ray.exceptions.RayError):  # it died meanwhile: the pump ends as it sees that
                ray.get(self.actor.close.remote())
        if self.pump is not None:
            self.pump.join()

    def oom_kills(self) -> int | None:
        return None  # the node's OOM kills are not this machine's: the advice rules go without them


@contextlib.contextmanager
def cluster_workers(address: str, folder: Path) -> Iterator[list[RemoteWorker]]:
    """Connect to the Ray cluster at `address` (auto: the one this machine belongs to; `check_ray` passed) and start
    one actor per GPU of it (one per node without GPUs); the workers, each seen to read `folder`. The actors (and
    with them their workers) are gone again, and this process disconnected, once this ends. UserError: no cluster
    there, no actor could start, a node that does not see `folder`."""
    import ray

    connect(ray, address)
    actors: list[Any] = []
    try:
        actors = start_actors(ray)
        placed = placed_actors(ray, actors)
        labels = worker_labels([where for _, where in placed])
        require_shared(ray, folder, [(actor, label) for (actor, _), label in zip(placed, labels, strict=True)])
        yield [RemoteWorker(actor, label, folder) for (actor, _), label in zip(placed, labels, strict=True)]
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        ray.shutdown()


def connect(ray: Any, address: str) -> None:
    """ray.init to an existing cluster, quietly (the workers' own logs stay on their nodes)."""
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise UserError(f"--ray {address}: no Ray cluster to join ({exc})", "start one with `ray start --head` "
                        "(and `ray start --address HEAD:6379` on the other machines)", EXIT_BAD_INPUT) from None


def answers(address: str) -> bool:
    """Whether something accepts a TCP connection at HOST:PORT (also ray://HOST:PORT); True for an address of
    another shape, which Ray judges itself."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def start_actors(ray: Any) -> list[Any]:
    """One actor per GPU of the cluster (Ray places them), or, on a cluster without GPUs, one per live node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    host = ray.remote(WorkerHost)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return [host.options(num_gpus=1, num_cpus=0, max_concurrency=CALLS).remote() for _ in range(gpus)]
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    return [host.options(num_cpus=0, max_concurrency=CALLS,
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes]


def placed_actors(ray: Any, actors: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """The actors that started within START_S, each with where it runs; the others are killed (their GPUs are
    busy with something else). UserError when none started."""
    asked = {actor.where.remote(): actor for actor in actors}
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=START_S)
    placed = []
    for ref, actor in asked.items():
        where = None
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayActorError):
                where = ray.get(ref)
        if where is None:
            ray.kill(actor)
        else:
            placed.append((actor, where))
    if not placed:
        raise UserError(f"no worker could start on the Ray cluster within {START_S:.0f} s",
                        "`ray status` shows what the cluster has free (each worker needs one GPU, or a node of its "
                        "own without GPUs)", EXIT_FAILED)
    return placed


def worker_labels(places: list[dict[str, Any]]) -> list[str]:
    """A name per actor for the board and the store: its node's address and its GPU ("10.0.0.7 GPU 0", or
    "10.0.0.7 CPU"), with the node's id where one address holds several nodes."""
    def device(where: dict[str, Any]) -> str:
        return f"GPU {','.join(where['gpus'])}" if where["gpus"] else "CPU"

    nodes_per_ip: dict[str, set[str]] = {}
    for where in places:
        nodes_per_ip.setdefault(where["ip"], set()).add(where["node"])
    return [f"{w['ip']}{'/' + w['node'][:6] if len(nodes_per_ip[w['ip']]) > 1 else ''} {device(w)}" for w in places]


def require_shared(ray: Any, folder: Path, actors: list[tuple[Any, str]]) -> None:
    """Every actor reads a file the head has just written in `folder`; UserError naming the workers whose node
    does not see it there."""
    token = secrets.token_hex(16)
    probe = folder / PROBE
    probe.write_text(token, encoding="utf-8")
    try:
        seen = ray.get([actor.sees.remote(str(probe), token) for actor, _ in actors])
    finally:
        probe.unlink(missing_ok=True)
    blind = [label for (_, label), ok in zip(actors, seen, strict=True) if not ok]
    if blind:
        raise UserError(f"{', '.join(blind)} cannot see {folder}: every node reads the jobs' files and weights and "
                        "writes the videos at the head's paths",
                        "put the output folder, inputs and weights on a filesystem every node mounts at the same path "
                        "(NFS, a cluster filesystem), e.g. itk batch JOBS.jsonl --out /shared/videos --ray auto",
                        EXIT_BAD_INPUT)
