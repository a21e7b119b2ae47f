"""The page's work without a browser: uploads staged inside the output folder whatever their browser
names, the progress line from events, the busy-port line, the second speaker's control text, and a cancel's
verdict on a real process group."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil

from itk.runtime.protocol import read_job
from itk.ui import port_in_use
from itk.ui_jobs import Progress, Running, multi_speaker, stage_job, stage_upload


def test_a_browser_file_name_never_chooses_a_path_outside_the_job_folder(tmp_path: Path) -> None:
    evil = tmp_path / "up" / "..%2f..%2fetc" / "passwd.PNG"
    evil.parent.mkdir(parents=True)
    evil.write_bytes(b"x")
    folder = tmp_path / "job"
    folder.mkdir()
    assert stage_upload(evil, folder, "image") == folder / "image.png"
    odd = tmp_path / "up" / "speech.wav;rm -rf"
    odd.write_bytes(b"x")
    assert stage_upload(odd, folder, "speech1") == folder / "speech1"
    assert sorted(os.listdir(folder)) == ["image.png", "speech1"]


def test_a_staged_job_file_repeats_the_job_from_copies_in_the_output_folder(tmp_path: Path) -> None:
    face, speech = tmp_path / "me.jpg", tmp_path / "talk.mp3"
    face.write_bytes(b"j")
    speech.write_bytes(b"m")
    staged = stage_job(tmp_path / "outputs", str(face), [str(speech), None], "")
    job = read_job(staged.job_file)
    assert job.cond_video == staged.folder / "image.jpg"
    assert job.cond_audio == {"person1": staged.folder / "speech1.mp3"}
    assert staged.output.parent == staged.folder and staged.output.suffix == ".mp4"


def test_progress_reads_clip_step_eta_and_gpu_memory_from_events() -> None:
    progress = Progress()
    progress.add({"event": "stage", "stage": "generate", "clips": 2}, 0.0)
    progress.add({"event": "clip", "clip": 1, "clips": 2}, 0.0)
    for step, now in ((1, 1.0), (2, 3.0), (3, 5.0)):
        progress.add({"event": "step", "clip": 1, "step": step, "steps": 4, "gpu_peak_gb": 12.25}, now)
    assert progress.line == "clip 1 of 2 · step 3 of 4 · ETA 10 s · GPU memory peak 12.2 GB"
    assert progress.fraction == 3 / 8


def test_a_busy_port_is_one_line_naming_the_process_that_holds_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        error = port_in_use(port, "127.0.0.1")
    assert error is not None and f"port {port} is in use by pid {os.getpid()}" in error.message
    assert f"--port {port + 1}" in error.fix


def test_the_second_speaker_control_names_the_fetch_that_adds_its_weights(tmp_path: Path) -> None:
    enabled, note = multi_speaker(tmp_path)
    assert not enabled and f"itk fetch --variant multi --weights-dir {tmp_path}" in note


def test_the_second_speaker_control_is_enabled_when_the_multi_speaker_weights_are_here(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from itk.runtime.manifest import load_manifest
    from itk.selftest import record_tiny_verdicts

    for f in load_manifest().files_for(["infinitetalk-multi-fp8"]):
        path = f.local_path(tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(path))
        else:
            path.write_text("{}")
    record_tiny_verdicts(tmp_path, multi=True)
    enabled, note = multi_speaker(tmp_path)
    assert enabled and "rows first" in note


def test_a_staged_two_speaker_job_keeps_the_mode_and_the_boxes(tmp_path: Path) -> None:
    face, one, two = tmp_path / "me.png", tmp_path / "a.wav", tmp_path / "b.wav"
    for path in (face, one, two):
        path.write_bytes(b"x")
    staged = stage_job(tmp_path / "outputs", str(face), [str(one), str(two)], "", "para", ("0,0,10,10", "0,10,10,20"))
    job = read_job(staged.job_file)
    assert job.audio_type == "para" and job.bbox == {"person1": [0, 0, 10, 10], "person2": [0, 10, 10, 20]}


def test_a_cancel_from_another_thread_stops_the_whole_group_before_the_job_ends(tmp_path: Path) -> None:
    """The page's Cancel is `Supervisor.cancel()` called from its own thread: the job's thread returns only once
    no process of the generator's group is left (here a child and a grandchild that ignore SIGINT)."""
    from itk.supervisor import Supervisor

    pids = tmp_path / "pids"
    grandchild = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                  "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)']); "
                  f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{p.pid}}'); time.sleep(60)")
    plan = SimpleNamespace(argv=[sys.executable, "-c", grandchild], log_path=tmp_path / "run.log")
    job = Running(plan)
    job.supervisor = Supervisor(plan.argv, plan.log_path, grace_s=1.0, on_event=job.events.put)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(job.supervisor.run()))
    worker.start()
    while not pids.exists() or not pids.read_text():
        assert worker.is_alive()
        time.sleep(0.05)
    members = [int(p) for p in pids.read_text().split()]
    job.cancel()
    worker.join(60)
    assert not worker.is_alive() and outcome[0].interrupted and job.cancelled.is_set()
    assert not [p for p in members if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_a_cancel_before_the_generator_starts_means_it_never_starts(tmp_path: Path) -> None:
    from itk.supervisor import Supervisor

    marker = tmp_path / "started"
    supervisor = Supervisor([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], tmp_path / "run.log")
    supervisor.cancel()
    outcome = supervisor.run()
    assert outcome.interrupted and not marker.exists()
