"""`itk serve` end to end: the real HTTP server (uvicorn, in a process of its own as the command runs it) on
127.0.0.1, driven by a real client (httpx), with the real warm worker on tiny weights: submit, poll, download,
cancel, refused requests, the token with --listen, paths inside --allow-paths only, a job given as text
forgotten with its spoken speech, and a server SIGKILLed and started again with every job intact."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import psutil
import pytest
import soundfile
from run_media import itk, saved_clips, write_image, write_wav

from itk import selftest
from itk.runtime.tiny import write_tiny_weights

SETTINGS = {"sample_steps": 2, "frame_num": 9, "motion_frame": 5}  # tiny clips: a job takes a second or two
SPEECH_S = 0.84  # 21 frames: four 9-frame clips (9 + 4 + 4 + 4)
LONG_S = 1.8  # 45 frames: ten clips, time to cancel or stop it mid-way
# The server as `itk serve --json` starts it (itk.cli wires the same function to click's options).
LAUNCH = ("import json, sys; from itk.console import run_friendly; from itk.serve import show_serve; "
          "run_friendly(lambda: show_serve(**json.loads(sys.argv[1])), False, True)")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    write_image(folder / "face.png")
    write_wav(folder / "speech.wav", SPEECH_S)
    write_wav(folder / "long.wav", LONG_S)
    soundfile.write(folder / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    return folder


class Server:
    """One `itk serve --json` process and an httpx client on its address."""

    def __init__(self, out: Path, tiny: Path, **options: Any) -> None:
        self.options = {"out": str(out), "port": 0, "listen": False, "token": None, "allow_paths": None,
                        "gpus": None, "preset": selftest.PRESET, "weights_dir": str(tiny), "max_upload_mb": 200,
                        "as_json": True, **options}
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(self.options)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ready = self.read_line(120)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.ready['port']}", timeout=60)

    def read_line(self, seconds: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], seconds)
        assert readable, "the server wrote nothing"
        line = self.proc.stdout.readline()
        assert line, self.proc.communicate(timeout=60)
        return json.loads(line)

    def submit(self, media: Path, speech: str = "speech.wav", **job: Any) -> dict[str, Any]:
        files = {"image": ("face.png", (media / "face.png").read_bytes(), "image/png"),
                 "speech": (speech, (media / speech).read_bytes(), "audio/wav")}
        reply = self.client.post("/v1/videos", files=files,
                                 data={"job": json.dumps({"seed": 3, "settings": SETTINGS, **job})})
        assert reply.status_code == 202, reply.text
        return reply.json()

    def get(self, job_id: str) -> dict[str, Any]:
        reply = self.client.get(f"/v1/videos/{job_id}")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def wait_for(self, job_id: str, ready: Any, seconds: float = 300) -> dict[str, Any]:
        """Poll the job until `ready(job)` holds."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if ready(job):
                return job
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never got there: {self.get(job_id)}")

    def forget(self, job_id: str, seconds: float = 60) -> dict[str, Any]:
        """DELETE an ended job, again while it answers 409 (a cancelled job's worker is still letting it go)."""
        deadline = time.monotonic() + seconds
        while (reply := self.client.delete(f"/v1/videos/{job_id}")).status_code == 409 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def worker(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.proc.pid).children(recursive=True)
                    if "itk.runtime.worker" in " ".join(p.cmdline()))

    def stop(self, sig: int = signal.SIGINT) -> dict[str, Any]:
        """Stop it as Ctrl-C (or SIGTERM) does; its closing JSON line."""
        self.client.close()
        self.proc.send_signal(sig)
        stdout, stderr = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0 and "Traceback" not in stderr, stderr
        return json.loads(stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny) -> Server:
    running = Server(tmp_path_factory.mktemp("serve") / "out", tiny)
    yield running
    if running.proc.poll() is None:
        running.stop()


def done(job: dict[str, Any]) -> bool:
    return job["state"] in ("done", "failed", "cancelled")


def frames_and_seconds(path: Path) -> tuple[int, float]:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0)), container.duration / 1e6


def test_a_job_submitted_over_http_is_polled_to_done_downloaded_and_shown_by_itk_batch_status(server, media,
                                                                                               tmp_path):
    files = {"image": ("../../etc/evil name.PNG", (media / "face.png").read_bytes(), "image/png"),
             "speech": ("my talk.wav", (media / "speech.wav").read_bytes(), "audio/wav")}
    reply = server.client.post("/v1/videos", files=files, data={"job": json.dumps({"seed": 3, "settings": SETTINGS})})
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    assert reply.headers["location"] == f"/v1/videos/{job_id}" and len(job_id) == 12 and job_id.isalnum()
    assert sorted(p.name for p in (server.out / f"{job_id}.inputs").iterdir()) == ["image.png", "speech1.wav"]
    seen = server.wait_for(job_id, lambda job: job["state"] == "running" and job["progress"]["steps"])
    assert seen["worker"] == "CPU" and 0 <= seen["progress"]["fraction"] < 1
    job = server.wait_for(job_id, done)
    assert job["state"] == "done" and job["progress"]["fraction"] == 1.0 and job["video_s"] == SPEECH_S
    assert job["error"] is None and job["content_url"] == f"/v1/videos/{job_id}/content"
    video = server.client.get(job["content_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(video.content)
    assert frames_and_seconds(tmp_path / "got.mp4")[0] == round(SPEECH_S * 25)
    assert [v["id"] for v in server.client.get("/v1/videos", params={"state": "done"}).json()["videos"]].count(
        job_id) == 1
    assert job_id not in [v["id"] for v in server.client.get("/v1/videos?state=queued,running").json()["videos"]]
    status = itk("batch", "--status", str(server.out), "--json")
    assert status.returncode == 0, status.stderr
    listed = {j["name"]: j for j in json.loads(status.stdout)["jobs"]}
    assert listed[job_id]["state"] == "done" and listed[job_id]["job"]["output"] == f"{job_id}.mp4"


def test_cancelling_stops_the_running_job_keeps_its_resume_state_and_the_warm_worker_takes_the_next(server, media):
    running = server.submit(media, "long.wav")["id"]
    following, waiting = server.submit(media)["id"], server.submit(media)["id"]
    server.wait_for(running, lambda job: (job["progress"]["clip"] or 0) >= 3)
    worker = server.worker()
    cancelled = server.client.delete(f"/v1/videos/{waiting}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    stopped = server.client.delete(f"/v1/videos/{running}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "cancelled"
    assert server.wait_for(following, done)["state"] == "done"
    assert server.get(running)["state"] == "cancelled" and server.worker().pid == worker.pid
    assert (server.out / f"{running}.mp4.itk-resume" / "state.json").is_file()
    assert not (server.out / f"{running}.mp4").exists()
    never = server.get(waiting)
    assert never["attempts"] == 0 and not (server.out / f"{waiting}.run").exists()
    assert server.client.get(f"/v1/videos/{waiting}/content").status_code == 409
    forgotten = server.client.delete(f"/v1/videos/{running}")  # a second DELETE forgets it, files and all
    assert forgotten.json() == {"id": running, "deleted": True}
    assert server.client.get(f"/v1/videos/{running}").status_code == 404
    assert not [p for p in server.out.iterdir() if p.name.startswith(running)]


def test_bad_requests_get_the_command_lines_one_line_errors_and_leave_nothing_behind(server, media):
    face, speech = (media / "face.png").read_bytes(), (media / "speech.wav").read_bytes()
    before = {p.name for p in server.out.iterdir()}
    cases = [
        (400, "speech (the speech to lip-sync) is missing", {"files": {"image": ("f.png", face)}}),
        (400, "exactly one of the fields image", {"files": {"image": ("f.png", face), "video": ("v.mp4", face),
                                                            "speech": ("s.wav", speech)}}),
        (400, "unknown form field 'picture'", {"files": {"picture": ("f.png", face), "speech": ("s.wav", speech)}}),
        (400, "the job field is not valid JSON", {"files": {"image": ("f.png", face), "speech": ("s.wav", speech)},
                                                  "data": {"job": "{seed"}}),
        (422, "the job field holds 'cond_video'", {"files": {"image": ("f.png", face), "speech": ("s.wav", speech)},
                                                   "data": {"job": '{"cond_video": "/etc/passwd"}'}}),
        (422, "settings: sample_steps=many: not a valid int", {
            "files": {"image": ("f.png", face), "speech": ("s.wav", speech)},
            "data": {"job": '{"settings": {"sample_steps": "many"}}'}}),
        (422, "the uploaded image is not a readable image", {"files": {"image": ("f.png", b"hello"),
                                                                       "speech": ("s.wav", speech)}}),
        (400, "started without --allow-paths", {"json": {"cond_video": str(media / "face.png")}}),
        (400, "sent as multipart/form-data", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ]
    for status, words, request in cases:
        reply = server.client.post("/v1/videos", **request)
        body = reply.json()
        assert reply.status_code == status and words in body["error"], (words, reply.text)
        assert set(body) == {"error", "fix", "exit_code"} and body["fix"] and body["exit_code"] == 2
    assert {p.name for p in server.out.iterdir()} == before  # no upload folder left, no job queued
    assert server.client.get("/v1/videos/nope").status_code == 404
    assert server.client.get("/v1/videos/nope/content").status_code == 404
    assert server.client.get("/v1/videos", params={"state": "lost"}).status_code == 422
    silent = server.submit(media, "silent.wav")["id"]  # readable, so accepted; the generator refuses it
    failed = server.wait_for(silent, done)
    assert failed["state"] == "failed" and "silent" in failed["error"]["error"] and failed["error"]["exit_code"] == 2
    content = server.client.get(f"/v1/videos/{silent}/content")
    assert content.status_code == 409 and "silent" in content.json()["error"] and content.json()["fix"]


def test_listen_without_a_token_refuses_to_start(tmp_path, tiny):
    options = {"out": str(tmp_path / "out"), "port": 0, "listen": True, "token": None, "allow_paths": None,
               "gpus": None, "preset": None, "weights_dir": str(tiny), "max_upload_mb": 200, "as_json": True}
    proc = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(options)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    error = json.loads(proc.stdout)
    assert "--listen without --token" in error["error"] and "--token" in error["fix"]
    assert not (tmp_path / "out").exists()


def test_a_listening_server_wants_its_token_takes_paths_only_inside_its_folder_and_limits_uploads(tmp_path, tiny,
                                                                                                 media):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    write_image(allowed / "face.png")
    write_wav(allowed / "speech.wav", SPEECH_S)
    (allowed / "escape.wav").symlink_to(media / "speech.wav")
    server = Server(tmp_path / "out", tiny, listen=True, token="s3cret-token", allow_paths=str(allowed),
                    max_upload_mb=1)
    try:
        anonymous = server.client.get("/v1/videos")
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        assert "token" in anonymous.json()["error"]
        wrong = server.client.get("/v1/videos", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 403
        assert server.client.get("/openapi.json").json()["paths"].keys() >= {"/v1/videos", "/v1/videos/{video_id}"}
        assert server.client.get("/docs").status_code == 200
        server.client.headers["Authorization"] = "Bearer s3cret-token"
        assert server.client.get("/v1/videos").json()["videos"] == []
        line = {"prompt": "A person is talking.", "cond_video": "face.png", "cond_audio": {"person1": "speech.wav"},
                "seed": 3, "settings": SETTINGS}
        for bad in ("../" + str(media.name) + "/speech.wav", str(media / "speech.wav"), "escape.wav"):
            outside = server.client.post("/v1/videos", json={**line, "cond_audio": {"person1": bad}})
            assert outside.status_code == 403 and "outside the folder" in outside.json()["error"], bad
        accepted = server.client.post("/v1/videos", json=line)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["job"]["cond_video"] == str((allowed / "face.png").resolve())
        big = {"image": ("f.png", (allowed / "face.png").read_bytes()), "speech": ("s.wav", os.urandom(1_100_000))}
        too_big = server.client.post("/v1/videos", files=big)
        assert too_big.status_code == 413 and "larger than 1 MB" in too_big.json()["error"]
        huge = server.client.post("/v1/videos", files={**big, "speech": ("s.wav", os.urandom(4_000_000))})
        assert huge.status_code == 413 and huge.json()["fix"]
        assert not list(server.out.glob("*.inputs"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def spoken_weights(tmp_path_factory) -> Path:
    """The tiny generator weights with a tiny Kokoro beside them (tests/test_tts.py), for jobs given as text."""
    pytest.importorskip("kokoro", reason="speech from text needs the tts extra: pip install 'itk[tts]'")
    from test_tts import write_tiny_tts

    folder = tmp_path_factory.mktemp("tts") / "weights"
    write_tiny_weights(folder)
    selftest.record_tiny_verdicts(folder)
    write_tiny_tts(folder)
    return folder


def test_a_job_given_as_text_is_forgotten_with_its_spoken_speech_and_never_with_the_files_it_names(tmp_path,
                                                                                                 spoken_weights,
                                                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    out.mkdir()
    face = write_image(out / "face.png")  # the user's own files, in the served folder itself
    (out / "broken.png").write_bytes(b"hello")
    server = Server(out, spoken_weights, allow_paths=str(out))
    try:
        line = {"prompt": "p", "cond_video": "face.png", "text": "Hello there, welcome.", "seed": 3,
                "settings": SETTINGS}
        before = {p.name for p in out.iterdir()}
        refused = server.client.post("/v1/videos", json={**line, "cond_video": "broken.png"})
        assert refused.status_code == 422 and "not a readable image" in refused.json()["error"], refused.text
        assert {p.name for p in out.iterdir()} == before  # the speech made before the image was read is gone
        accepted = server.client.post("/v1/videos", json=line)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        assert (out / f"{job_id}.speech.wav").is_file() and (out / f"{job_id}.speech.json").is_file()
        assert server.client.delete(f"/v1/videos/{job_id}").status_code == 200  # cancelled (or already done)
        server.wait_for(job_id, done)
        assert server.forget(job_id) == {"id": job_id, "deleted": True}
        assert not [p.name for p in out.iterdir() if p.name.startswith(job_id)]
        assert face.read_bytes() == write_image(tmp_path / "same.png").read_bytes()
        assert (out / "broken.png").read_bytes() == b"hello"
    finally:
        server.stop()


def test_a_server_stopped_by_ctrl_c_or_killed_with_sigkill_carries_on_with_every_job_when_started_again(tmp_path,
                                                                                                        tiny, media):
    out = tmp_path / "out"
    first = Server(out, tiny)
    long_id, short_id = first.submit(media, "long.wav")["id"], first.submit(media)["id"]
    first.wait_for(long_id, lambda job: (job["progress"]["clip"] or 0) >= 3)
    worker = first.worker()
    assert first.stop(signal.SIGINT)["counts"]["queued"] == 2 and not worker.is_running()
    second = Server(out, tiny)  # Ctrl-C put the running job back in the queue
    assert (second.ready["queued"], second.ready["recovered"]) == (2, 0)
    resumed_at = second.wait_for(long_id, lambda job: job["progress"]["steps"])["progress"]["clip"]
    second.wait_for(long_id, lambda job: saved_clips(out / f"{long_id}.mp4") >= resumed_at + 1)
    worker = second.worker()
    second.proc.kill()
    second.proc.communicate(timeout=60)
    worker.wait(60)  # the kernel's parent-death signal ends the worker with the server
    third = Server(out, tiny)  # kill -9 left the job running in the store: it is recovered
    assert (third.ready["queued"], third.ready["recovered"]) == (2, 1)
    finished = third.wait_for(long_id, done)
    assert finished["state"] == "done" and finished["attempts"] == 3
    assert int(finished["note"].removeprefix("resumed at clip ")) >= resumed_at + 2
    assert frames_and_seconds(out / f"{long_id}.mp4")[0] == round(LONG_S * 25)
    assert third.wait_for(short_id, done)["state"] == "done"
    assert third.stop(signal.SIGTERM)["counts"]["done"] == 2
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


def test_a_queued_jobs_eta_counts_only_the_workers_whose_node_is_still_in_the_cluster(tmp_path):
    from itk.batch import Batch, WorkerSlot, WorkerView
    from itk.serve import ServeOptions, Service
    from itk.store import JobStore
    from itk.workers import LocalWorker

    store = JobStore.open(tmp_path)
    workers = [LocalWorker(tmp_path, gpu=0), LocalWorker(tmp_path, gpu=1)]
    workers[1].lost = "its node left the Ray cluster"
    batch = Batch(folder=tmp_path, store=store, jobs=None, workers=workers, polling=True, job_times=[10.0])
    batch.views = [WorkerView(worker.label) for worker in workers]  # as Batch.start makes them, no thread started
    batch.slots = [WorkerSlot(batch, worker, view) for worker, view in zip(workers, batch.views, strict=True)]
    for name in ("first", "second"):
        store.add(name, {"prompt": "p"}, name)
    try:
        service = Service(batch, ServeOptions(out=tmp_path))
        etas = [service.describe(record)["eta_s"] for record in store.jobs(["queued"])]
        assert etas == [10.0, 20.0]  # one worker left: the second job waits for the first
    finally:
        store.close()
