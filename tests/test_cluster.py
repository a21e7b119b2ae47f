"""`itk batch --ray` and `itk serve --ray` on a real Ray cluster of two nodes on this machine (ray.cluster_utils,
started once for the module), with the real warm workers on tiny weights: jobs served over HTTP by both nodes'
workers; twelve jobs across both nodes with one node killed mid-job (its raylet and every process under it
SIGKILLed, as a machine that dies), every job done exactly once with the frames of a plain `itk run`. Without Ray
installed, the single-machine path never imports it and `--ray` says how to install it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from run_media import decoded, itk, psnr, saved_clips, write_image, write_wav

from itk import selftest
from itk.runtime.tiny import write_tiny_weights
from itk.store import JobRecord, JobStore, StoreError

SETTINGS = {"sample_steps": 2, "frame_num": 9, "motion_frame": 5}  # tiny clips: a job takes a second or two
SPEECH_S = 0.84  # 21 frames: four 9-frame clips (9 + 4 + 4 + 4) of the tiny model
LONG_S = 1.8  # 45 frames: ten clips, time to stop it mid-way
STOP_GRACE_S = "60"  # the stop ladder's wait before SIGTERM in the nodes' workers: a SIGINT they miss shows
STOP_WITHIN_S = 20
# Ray declares a node dead after 3 missed health checks a second apart (its default waits about 15 s).
HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
HEAD = ("import json, sys; from pathlib import Path; from itk.batch import run_batch; a = json.loads(sys.argv[1]); "
        "r = run_batch(Path(a['jobs']), out=Path(a['out']), weights_dir=Path(a['weights']), ray=a['ray']); "
        "print(json.dumps(r.to_json()))")
SERVE = ("import json, sys; from itk.console import run_friendly; from itk.serve import show_serve; "
         "run_friendly(lambda: show_serve(**json.loads(sys.argv[1])), False, True)")
NO_RAY = "import sys; sys.modules['ray'] = None; "  # `import ray` fails as where it is not installed


class TwoNodes:
    """A Ray cluster of a head node and one more on this machine, each with one CPU for the actors' bookkeeping."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="itk-ray-")  # short: Ray's socket paths must fit 107 bytes
        node = {"num_cpus": 1, "temp_dir": self.temp, "env_vars": {"ITK_STOP_GRACE_S": STOP_GRACE_S}}
        self.cluster = Cluster(initialize_head=True, head_node_args={**node, "_system_config": HEALTH})
        self.second = self.cluster.add_node(**node)
        self.raylets = [raylet(node) for node in (self.cluster.head_node, self.second)]

    @property
    def address(self) -> str:
        return self.cluster.address

    def kill_second(self) -> None:
        """The second node dies as a machine does: every process under its raylet, then the raylet, SIGKILLed."""
        for proc in raylet(self.second).children(recursive=True):
            proc.kill()
        self.cluster.remove_node(self.second, allow_graceful=False)

    def workers(self) -> list[psutil.Process]:
        """The warm workers (`python -m itk.runtime.worker`) living under this cluster's nodes."""
        found = []
        for node in self.raylets:
            try:
                found += [p for p in node.children(recursive=True) if "itk.runtime.worker" in " ".join(p.cmdline())]
            except psutil.Error:
                continue
        return found

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


def raylet(node: Any) -> psutil.Process:
    return psutil.Process(node.all_processes["raylet"][0].process.pid)


@pytest.fixture(scope="module")
def cluster() -> TwoNodes:
    pytest.importorskip("ray", reason="the cluster tests need Ray: pip install 'itk[cluster]'")
    nodes = TwoNodes()
    try:
        yield nodes
    finally:
        nodes.shutdown()
    assert not [p for p in nodes.raylets if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    weights = tmp_path_factory.mktemp("tiny") / "weights"
    write_tiny_weights(weights)
    selftest.record_tiny_verdicts(weights)
    return weights


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, Path]:
    """The portrait and the speech; beside it long.wav, a job of ten clips."""
    folder = tmp_path_factory.mktemp("media")
    write_wav(folder / "long.wav", LONG_S)
    return write_image(folder / "face.png"), write_wav(folder / "speech.wav", SPEECH_S)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, tiny, media) -> np.ndarray:
    """The frames of a plain `itk run` of the jobs below."""
    face, speech = media
    video = tmp_path_factory.mktemp("fresh") / "fresh.mp4"
    fresh = itk("run", "--image", str(face), "--audio", str(speech), "--preset", selftest.PRESET, "--weights-dir",
                str(tiny), "--output", str(video),
                *(a for k, v in {**SETTINGS, "base_seed": 3}.items() for a in ("--set", f"{k}={v}")), timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    return decoded(video)


def line(face: Path, speech: Path, **extra: object) -> dict:
    return {"prompt": "A person is talking.", "cond_video": str(face), "cond_audio": {"person1": str(speech)},
            "preset": selftest.PRESET, "settings": SETTINGS, "seed": 3, **extra}


def same_frames(video: Path, expected: np.ndarray) -> bool:
    """The frames of `video` are those of a plain `itk run`, up to what libx264 itself varies between two encodings
    of the same frames on a loaded machine (a wrongly resumed clip differs by tens of grey levels throughout)."""
    frames = decoded(video)
    return frames.shape == expected.shape and psnr(frames, expected) > 30


def run_label(out: Path, name: str) -> str:
    """The worker that made job `name`'s last attempt, from the first line the head writes into its log."""
    first = (out / f"{name}.run" / "generate.log").read_text().splitlines()[0]
    return first.removeprefix("# itk batch, ").split(": ", 1)[0]


def test_itk_serve_on_the_cluster_serves_jobs_on_both_nodes_and_a_stop_gives_back_the_running_job_at_once(
        cluster, tiny, media, expected, tmp_path):
    """Two jobs over HTTP, made on the cluster's workers; then a long one, and Ctrl-C while it runs: the server
    stops within seconds (the nodes' workers get the stop ladder's first signal, SIGINT, although Ray's threads
    block it) and the job waits in the store to resume."""
    face, speech = media
    options = {"out": str(tmp_path / "out"), "port": 0, "listen": False, "token": None, "allow_paths": None,
               "gpus": None, "preset": selftest.PRESET, "weights_dir": str(tiny), "max_upload_mb": 200,
               "as_json": True, "ray": cluster.address}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, json.dumps(options)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline() or "null")
        assert ready, proc.communicate(timeout=60)
        assert len(ready["workers"]) == 2 and all(label.endswith(" CPU") for label in ready["workers"])
        with httpx.Client(base_url=f"http://127.0.0.1:{ready['port']}", timeout=60) as client:
            ids = [submit(client, face, speech) for _ in range(2)]
            wait_for(client, ids, lambda job: job["state"] == "done", proc)
            for job_id in ids:
                reply = client.get(f"/v1/videos/{job_id}/content")
                assert reply.status_code == 200
                (tmp_path / f"{job_id}.mp4").write_bytes(reply.content)
                assert same_frames(tmp_path / f"{job_id}.mp4", expected)
            long = submit(client, face, speech.with_name("long.wav"))
            wait_for(client, [long], lambda job: job["state"] == "running" and job["progress"]["step"], proc)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert time.monotonic() - stopped < STOP_WITHIN_S
        assert json.loads(stdout.splitlines()[-1])["counts"] == {"queued": 1, "running": 0, "done": 2, "failed": 0,
                                                                 "cancelled": 0}
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not wait_for_no_workers(cluster)
    record = read_jobs(tmp_path / "out", [long])[0]
    assert record.note == "interrupted: resumes from its last finished clip"


def submit(client: httpx.Client, face: Path, speech: Path) -> str:
    files = {"image": ("face.png", face.read_bytes(), "image/png"),
             "speech": ("speech.wav", speech.read_bytes(), "audio/wav")}
    reply = client.post("/v1/videos", files=files, data={"job": json.dumps({"seed": 3, "settings": SETTINGS})})
    assert reply.status_code == 202, reply.text
    return reply.json()["id"]


def wait_for(client: httpx.Client, ids: list[str], ready: Any, server: subprocess.Popen) -> list[dict[str, Any]]:
    """Poll the jobs until `ready(job)` holds for each; the jobs as last seen."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        jobs = [client.get(f"/v1/videos/{job_id}").json() for job_id in ids]
        if all(ready(job) for job in jobs):
            return jobs
        assert server.poll() is None, server.communicate()
        time.sleep(0.05)
    raise AssertionError(f"the jobs never got there: {jobs}")


def test_twelve_jobs_across_two_nodes_are_each_made_once_when_a_node_dies_mid_job(cluster, tiny, media, expected,
                                                                                  tmp_path):
    """The second node is killed while it is inside a job (past its first clip) and after it has finished one:
    the head gives that job back, the head node's worker resumes it from its last finished clip and takes the
    rest; every job ends done exactly once with a complete video of the frames of a plain `itk run`."""
    face, speech = media
    names = [f"r{n:02d}" for n in range(12)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line(face, speech, output=f"{n}.mp4")) + "\n" for n in names))
    out = tmp_path / "out"
    args = {"jobs": str(jobs), "out": str(out), "weights": str(tiny), "ray": cluster.address}
    head = subprocess.Popen([sys.executable, "-c", HEAD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_until_second_node_is_mid_job(cluster, out, names, head)
        cluster.kill_second()
        stdout, stderr = head.communicate(timeout=600)
    finally:
        if head.poll() is None:
            head.kill()
    assert head.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.splitlines()[-1])
    assert result["exit_code"] == 0 and result["counts"]["done"] == 12
    records = {job["name"]: job for job in result["jobs"]}
    assert sorted(records) == names and all(job["state"] == "done" for job in records.values())
    assert {name: job["attempts"] for name, job in records.items()} == {n: 1 + (n == victim) for n in names}
    note = records[victim]["note"]
    assert note.startswith("its node was lost") and "resumes from its last finished clip" in note, note
    assert "resumed at clip" in note, note
    second = cluster_label(cluster.second)
    assert any(second in run_label(out, n) for n in names if n != victim)  # the second node finished jobs
    assert second not in run_label(out, victim)  # the head node's worker finished the victim
    for name in names:
        assert same_frames(out / f"{name}.mp4", expected), name
    assert not [p.name for p in out.iterdir() if p.suffix == ".mp4" and p.stem not in names]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".mp4")]
    assert not wait_for_no_workers(cluster)


def cluster_label(node: Any) -> str:
    """The part of a worker's label that names this node (both nodes of the test share one address)."""
    return f"/{node.node_id[:6]} "


def wait_until_second_node_is_mid_job(cluster: TwoNodes, out: Path, names: list[str],
                                      head: subprocess.Popen) -> str:
    """Until the second node's worker has finished a job and is past the first clip of another; that job's name."""
    second = cluster_label(cluster.second)
    deadline = time.monotonic() + 300
    finished_one = False
    while time.monotonic() < deadline:
        assert head.poll() is None, head.communicate()
        jobs = read_jobs(out, names)
        finished_one = finished_one or any(j.state == "done" and second in run_label(out, j.name) for j in jobs)
        for job in jobs:
            if finished_one and job.state == "running" and second in (job.worker or "") and (job.clip or 0) >= 2 \
                    and job.step and saved_clips(out / f"{job.name}.mp4") >= 1:
                return job.name
        time.sleep(0.02)
    raise AssertionError("the second node never got past the first clip of a second job")


def read_jobs(out: Path, names: list[str]) -> list[JobRecord]:
    """The jobs as the head's store holds them now (none while the store is being made)."""
    try:
        store = JobStore.open(out, create=False)
    except StoreError:
        return []
    try:
        return store.jobs(names=names)
    finally:
        store.close()


def wait_for_no_workers(cluster: TwoNodes, seconds: float = 30) -> list[psutil.Process]:
    """The warm workers still alive under the cluster's nodes once `seconds` have passed (none, at once, when all
    have ended)."""
    deadline = time.monotonic() + seconds
    while (left := cluster.workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_ray_address_where_nothing_answers_and_gpus_beside_ray_are_refused_before_anything_starts(tmp_path,
                                                                                                   media):
    pytest.importorskip("ray", reason="the cluster tests need Ray: pip install 'itk[cluster]'")
    face, speech = media
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(line(face, speech)) + "\n")
    started = time.monotonic()
    nowhere = run_head(jobs, tmp_path / "out", "--ray 127.0.0.1:9", ray="127.0.0.1:9")
    assert nowhere["exit_code"] == 2 and "nothing answers" in nowhere["error"] and "ray start --head" in nowhere["fix"]
    assert time.monotonic() - started < 30
    both = run_head(jobs, tmp_path / "out", "--gpus 1 --ray auto", ray="auto", gpus="1")
    assert both["exit_code"] == 2 and "--gpus" in both["error"] and both["fix"] == "leave out --gpus"
    assert not (tmp_path / "out").exists()


def run_head(jobs: Path, out: Path, what: str, prelude: str = "", **options: str) -> dict[str, Any]:
    """`run_batch` with `options` as the command line runs it (--json): its JSON, and its exit status."""
    code = (f"{prelude}import json, sys; from pathlib import Path; from itk.console import run_friendly; "
            "from itk.batch import run_batch; a = json.loads(sys.argv[1]); "
            "run_friendly(lambda: run_batch(Path(a.pop('jobs')), out=Path(a.pop('out')), **a).exit_code, False, True)")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps({"jobs": str(jobs), "out": str(out), **options})],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout, f"{what}: {proc.stderr}"
    return {**json.loads(proc.stdout), "exit_code": proc.returncode}


def test_without_ray_installed_the_ray_option_of_batch_and_serve_says_how_to_install_it(tmp_path, media):
    face, speech = media
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(line(face, speech)) + "\n")
    batch = run_head(jobs, tmp_path / "out", "itk batch --ray auto", prelude=NO_RAY, ray="auto")
    assert batch == {"error": "--ray needs Ray, which is not installed here", "fix": "pip install 'itk[cluster]'",
                     "exit_code": 2}
    options = {"out": str(tmp_path / "served"), "port": 0, "listen": False, "token": None, "allow_paths": None,
               "gpus": None, "preset": None, "weights_dir": None, "max_upload_mb": 200, "as_json": True,
               "ray": "auto"}
    serve = subprocess.run([sys.executable, "-c", NO_RAY + SERVE, json.dumps(options)], capture_output=True,
                           text=True, timeout=120)
    assert serve.returncode == 2 and json.loads(serve.stdout)["fix"] == "pip install 'itk[cluster]'"
    assert not (tmp_path / "out").exists() and not (tmp_path / "served").exists()


def test_the_single_machine_path_never_imports_ray():
    code = ("import sys; from click.testing import CliRunner; from itk.cli import cli; "
            "import itk.batch, itk.serve, itk.workers, itk.console; "
            "runs = [CliRunner().invoke(cli, [c, '--help']) for c in ('batch', 'serve')]; "
            "assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]; "
            "itk.batch.Placement.choose(gpus=None, ray=None); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
