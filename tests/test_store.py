"""The durable job store and the job file of `itk batch`: states that survive the process, a job never taken
twice, a changed job made again, and every bad line of a job file named with its number before anything runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest
from run_media import write_image, write_wav

from itk.jobfile import BatchJob, read_job_file
from itk.runtime.protocol import UserError
from itk.store import STORE_FILE, JobStore, StoreError


def store_in(folder: Path) -> JobStore:
    return JobStore.open(folder)


def test_a_job_added_twice_is_one_job_and_a_finished_one_stays_finished(tmp_path):
    store = store_in(tmp_path)
    assert store.add("a", {"x": 1}, "f1") == "new"
    assert store.add("a", {"x": 1}, "f1") == "queued"
    job = store.claim("GPU 0")
    assert job is not None and job.name == "a" and job.state == "running" and job.attempts == 1
    store.finish("a", tmp_path / "a.mp4", 3.2)
    assert store.add("a", {"x": 1}, "f1") == "done" and store.claim("GPU 0") is None
    assert store.get("a").state == "done" and store.get("a").video_s == 3.2


def test_a_job_changed_under_the_same_name_is_queued_again_with_a_note(tmp_path):
    store = store_in(tmp_path)
    store.add("a", {"x": 1}, "f1")
    store.claim("GPU 0")
    store.finish("a", tmp_path / "a.mp4", 3.2)
    assert store.add("a", {"x": 2}, "f2") == "changed"
    job = store.get("a")
    assert job.state == "queued" and job.spec_data == {"x": 2} and "changed" in job.note and job.output is None


def test_a_failed_job_is_tried_again_by_the_next_run_and_keeps_its_error_in_the_note(tmp_path):
    store = store_in(tmp_path)
    store.add("a", {}, "f")
    store.claim("CPU")
    store.fail("a", "cond_video x.png: file not found", "check the path", 2)
    failed = store.get("a")
    assert (failed.state, failed.error, failed.fix, failed.exit_code) == ("failed", "cond_video x.png: file not "
                                                                         "found", "check the path", 2)
    assert store.add("a", {}, "f") == "retry" and "file not found" in store.get("a").note


def test_jobs_are_taken_in_their_position_order_and_only_from_the_names_asked_for(tmp_path):
    store = store_in(tmp_path)
    for position, name in [(3, "c"), (1, "a"), (2, "b")]:
        store.add(name, {}, name, position)
    assert store.claim("w", ["b", "c"]).name == "b"
    assert [store.claim("w").name for _ in range(2)] == ["a", "c"] and store.claim("w") is None


def test_a_dead_runners_jobs_are_queued_again_but_one_whose_video_it_finished_is_done_without_a_new_attempt(
        tmp_path):
    import numpy as np

    from itk.batch import RECOVERED, recover_finished
    from itk.runtime.video import write_mp4_stream

    store = store_in(tmp_path)
    for name in ("written", "unwritten", "old-video", "not-in-the-batch"):
        store.add(name, {}, name)
        store.claim("GPU 1")
    frames = [np.zeros((10, 16, 16, 3), np.uint8)]
    for name in ("written", "not-in-the-batch"):
        write_mp4_stream(tmp_path / f"{name}.mp4", frames, count=10, audio=None, sample_rate=16000)
    write_mp4_stream(tmp_path / "old-video.mp4", frames, count=10, audio=None, sample_rate=16000)
    os.utime(tmp_path / "old-video.mp4", (0, 0))  # a video from before this attempt started
    store.close()
    again = store_in(tmp_path)  # a new process would open it like this
    recover_finished(again, tmp_path, ["written", "unwritten", "old-video"])
    jobs = {job.name: job for job in again.jobs()}
    assert jobs["written"].state == "done" and jobs["written"].attempts == 1 and jobs["written"].video_s == 0.4
    assert "written before its runner stopped" in jobs["written"].note
    for name in ("unwritten", "old-video", "not-in-the-batch"):
        job = jobs[name]
        assert (job.state, job.worker, job.note, job.attempts) == ("queued", None, RECOVERED, 1), name


def test_a_job_cancelled_while_running_stays_cancelled_whatever_its_worker_reports_then(tmp_path):
    store = store_in(tmp_path)
    for name in ("a", "b", "c"):
        store.add(name, {}, name)
    store.claim("GPU 0")
    assert store.cancel("a") and store.cancel("b") and not store.cancel("a")
    assert not store.finish("a", tmp_path / "a.mp4", 1.0) and not store.requeue("a", "interrupted")
    assert not store.fail("a", "crashed", "", 1)
    assert [(j.name, j.state) for j in store.jobs()] == [("a", "cancelled"), ("b", "cancelled"), ("c", "queued")]
    assert store.get("a").busy_s > 0 and store.get("b").busy_s == 0 and store.get("b").attempts == 0
    assert store.claim("GPU 0").name == "c"


def test_only_a_job_that_has_ended_can_be_deleted(tmp_path):
    store = store_in(tmp_path)
    for name in ("queued", "running", "done", "failed", "cancelled"):
        store.add(name, {}, name)
    for name in ("running", "done", "failed"):
        store.claim("w", [name])
    store.finish("done", tmp_path / "done.mp4", 1.0)
    store.fail("failed", "bad", "fix", 2)
    store.cancel("cancelled")
    deleted = {name: store.delete(name) for name in ("queued", "running", "done", "failed", "cancelled", "nope")}
    assert deleted == {"queued": False, "running": False, "done": True, "failed": True, "cancelled": True,
                       "nope": False}
    assert [j.name for j in store.jobs()] == ["queued", "running"]


def claim_all(folder: str, worker: str, found: multiprocessing.Queue) -> None:
    store = JobStore.open(Path(folder))
    while (job := store.claim(worker)) is not None:
        found.put(job.name)
    found.put(None)


def test_two_processes_claiming_at_once_never_take_the_same_job(tmp_path):
    store = store_in(tmp_path)
    for n in range(60):
        store.add(f"j{n:02d}", {}, str(n))
    found: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=claim_all, args=(str(tmp_path), f"w{i}", found)) for i in range(2)]
    for p in procs:
        p.start()
    names, ended = [], 0
    while ended < 2:
        item = found.get(timeout=60)
        ended += item is None
        if item is not None:
            names.append(item)
    for p in procs:
        p.join(10)
    assert sorted(names) == [f"j{n:02d}" for n in range(60)]


def test_the_store_is_sqlite_in_wal_mode_in_the_output_folder(tmp_path):
    store_in(tmp_path).add("a", {}, "f")
    db = sqlite3.connect(tmp_path / STORE_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reading_a_folder_without_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="holds no itk job store"):
        JobStore.open(tmp_path, create=False)
    (tmp_path / STORE_FILE).write_text("not a database")
    with pytest.raises(StoreError, match="not a readable itk job store"):
        JobStore.open(tmp_path, create=False)


# --- the job file ----------------------------------------------------------------------------------------
def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def job_line(face: Path, speech: Path, **extra: object) -> dict:
    return {"prompt": "A person is talking.", "cond_video": str(face), "cond_audio": {"person1": str(speech)},
            **extra}


def test_every_bad_line_is_named_with_its_number_before_anything_runs(tmp_path):
    face, speech = write_image(tmp_path / "face.png"), write_wav(tmp_path / "s.wav", 2.0)
    path = write_lines(tmp_path / "jobs.jsonl", [
        job_line(face, speech),
        "{not json",
        job_line(face, speech, settings={"sample_steps": "many"}),
        {"prompt": "no picture"},
        job_line(face, speech, seeds=3),
        job_line(face, speech, output="../escape.mp4"),
        "[" * 200_000,
    ])
    with pytest.raises(UserError) as caught:
        read_job_file(path)
    message = caught.value.message
    assert "6 bad line(s)" in message and caught.value.exit_code == 2
    for number, words in [(2, "not valid JSON"), (3, "settings: sample_steps=many: not a valid int"),
                          (4, "lacks cond_video, cond_audio"), (5, "unknown key 'seeds'")]:
        assert f"line {number}: {words}" in message
    assert "(and 1 more)" in message and "line 1:" not in message


def test_a_job_file_with_comments_gets_default_names_made_unique_in_order(tmp_path):
    face, speech = write_image(tmp_path / "anna.png"), write_wav(tmp_path / "hello.wav", 2.0)
    path = write_lines(tmp_path / "jobs.jsonl", [
        "# a season of greetings", job_line(face, speech), "", job_line(face, speech, seed=3),
        job_line(face, speech, output="anna-hello-2.mp4"), job_line(face, speech, preset="rtx4090-24g-fast"),
    ])
    jobs = read_job_file(path)
    assert [(j.line, j.name) for j in jobs] == [(2, "anna-hello"), (4, "anna-hello-3"), (5, "anna-hello-2"),
                                               (6, "anna-hello-4")]
    assert jobs[1].settings == {"base_seed": 3} and jobs[3].preset == "rtx4090-24g-fast"
    assert len({j.fingerprint for j in jobs}) == 3  # lines 2 and 5 are the same job under two names


def test_an_output_name_given_twice_is_refused_naming_both_lines(tmp_path):
    face, speech = write_image(tmp_path / "f.png"), write_wav(tmp_path / "s.wav", 2.0)
    path = write_lines(tmp_path / "jobs.jsonl", [job_line(face, speech, output="x.mp4"),
                                                 job_line(face, speech, output="x.mp4")])
    with pytest.raises(UserError, match="line 2: output x.mp4 is also given on line 1"):
        read_job_file(path)


def test_relative_paths_in_a_job_file_are_found_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "season"
    folder.mkdir()
    write_image(folder / "face.png")
    write_wav(folder / "s.wav", 2.0)
    path = write_lines(folder / "jobs.jsonl", [job_line(Path("face.png"), Path("s.wav"))])
    monkeypatch.chdir(tmp_path)
    (job,) = read_job_file(path)
    assert job.job.cond_video == folder / "face.png" and job.job.cond_audio["person1"] == folder / "s.wav"


def test_a_jobs_store_spec_is_a_job_file_line_that_makes_the_same_job_again(tmp_path):
    face, speech = write_image(tmp_path / "f.png"), write_wav(tmp_path / "s.wav", 2.0)
    settings = {"sample_steps": 6, "use_teacache": True, "teacache_thresh": 0.3}
    path = write_lines(tmp_path / "jobs.jsonl", [job_line(face, speech, output="x.mp4", preset="rtx4090-24g-fast",
                                                          seed=4, settings=settings)])
    (job,) = read_job_file(path)
    spec = json.loads(json.dumps(job.to_json()))  # as the store keeps it
    assert spec["output"] == "x.mp4" and spec["cond_video"] == str(face) and spec["settings"]["base_seed"] == 4
    again = BatchJob.from_json(spec)
    assert (again.name, again.job, again.preset, again.settings) == (job.name, job.job, job.preset, job.settings)
    assert again.fingerprint == job.fingerprint


def test_a_line_with_text_instead_of_cond_audio_is_a_job_whose_speech_is_made_when_it_runs(tmp_path):
    from itk.jobfile import BatchJob

    face = write_image(tmp_path / "face.png")
    path = write_lines(tmp_path / "jobs.jsonl", [
        {"prompt": "p", "cond_video": str(face), "text": "(s1) Hello. (s2) Hi!", "voice": "af_heart", "speed": 1.1},
        {"prompt": "p", "cond_video": str(face), "text": "Hello.", "cond_audio": {"person1": "x.wav"}},
        {"prompt": "p", "cond_video": str(face), "text": "(s1) Hi. (s3) Who?"},
        {"prompt": "p", "cond_video": str(face), "cond_audio": {"person1": "x.wav"}, "voice": "am_adam"},
    ])
    with pytest.raises(UserError) as caught:
        read_job_file(path)
    assert "line 2: give cond_audio or text, not both" in caught.value.message
    assert "line 3: line 1: unknown speaker tag (s3)" in caught.value.message
    assert "line 4: voice is for speech from text, and the line has no text" in caught.value.message
    (job,) = read_job_file(write_lines(tmp_path / "one.jsonl", [
        {"prompt": "p", "cond_video": str(face), "text": "(s1) Hello. (s2) Hi!", "voice": "af_heart", "speed": 1.1}]))
    assert job.speech is not None and job.speech.speed == 1.1 and job.job.cond_audio == {}
    line = job.to_json()
    assert "cond_audio" not in line and line["text"] == "(s1) Hello. (s2) Hi!"
    assert BatchJob.from_json(line).fingerprint == job.fingerprint
