"""The page's work without a browser: uploads staged inside the output folder whatever their browser
names, the job they make (RunSpec.from_options, as `itk run`), the progress line from events (stages in words),
errors in the page's words without the server's folders, the Advanced fields as settings, dropping Gradio's
copies of the uploads, the queue view's rows, the busy-port line, the second speaker's control text, and a
cancel's verdict on a real process group."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from itk.runtime.protocol import FLAG, UserError
from itk.ui import Page, code_html, port_in_use, status_cell
from itk.ui_jobs import (
    Progress,
    Running,
    advanced_setting,
    drop_uploads,
    job_spec,
    multi_speaker,
    public_error,
    queue_rows,
    stage_upload,
    stage_uploads,
    web_words,
)


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


def test_staged_uploads_are_copies_in_the_output_folder_that_the_job_spec_names(tmp_path: Path) -> None:
    from run_media import write_image, write_wav

    face, speech = write_image(tmp_path / "me.JPG"), write_wav(tmp_path / "talk.wav", 1.0)
    staged = stage_uploads(tmp_path / "outputs", str(face), [str(speech), None])
    spec = job_spec(staged, prompt="")
    assert spec.job.cond_video == staged.folder / "image.jpg"
    assert spec.job.cond_audio == {"person1": staged.folder / "speech1.wav"}
    assert spec.output == staged.output and staged.output.parent == staged.folder and staged.output.suffix == ".mp4"


def test_a_staged_two_speaker_job_keeps_the_mode_and_the_boxes(tmp_path: Path) -> None:
    face, one, two = tmp_path / "me.png", tmp_path / "a.wav", tmp_path / "b.wav"
    for path in (face, one, two):
        path.write_bytes(b"x")
    staged = stage_uploads(tmp_path / "outputs", str(face), [str(one), str(two)])
    job = job_spec(staged, mode="para", boxes=("0,0,10,10", "0,10,10,20")).job
    assert job.audio_type == "para" and job.bbox == {"person1": [0, 0, 10, 10], "person2": [0, 10, 10, 20]}


def test_a_source_video_gets_the_dub_region_and_a_portrait_never_does(tmp_path: Path) -> None:
    video, image, speech = tmp_path / "src.mp4", tmp_path / "me.png", tmp_path / "a.wav"
    for path in (video, image, speech):
        path.write_bytes(b"x")
    dubbed = job_spec(stage_uploads(tmp_path / "o", str(video), [str(speech)]), dub_region="face")
    assert dubbed.settings["dub_region"] == "face" and dubbed.job.cond_video.name == "video.mp4"
    boxed = job_spec(stage_uploads(tmp_path / "o", str(video), [str(speech)]), dub_region="bbox",
                     boxes=("1,2,30,40", ""))
    assert boxed.job.bbox == {"person1": [1, 2, 30, 40]}
    assert "dub_region" not in job_spec(stage_uploads(tmp_path / "o", str(image), [str(speech)]),
                                        dub_region="face").settings


@pytest.mark.parametrize(("speech", "text", "words"), [
    ([None, None], "", "no speech"),
    (["a.wav", None], "Hello.", "both a speech recording and text to say"),
])
def test_the_speech_is_a_recording_or_text_to_say(tmp_path: Path, speech, text, words) -> None:
    (tmp_path / "me.png").write_bytes(b"x")
    (tmp_path / "a.wav").write_bytes(b"x")
    with pytest.raises(UserError, match=words):
        stage_uploads(tmp_path / "o", str(tmp_path / "me.png"), [s and str(tmp_path / s) for s in speech], text)


def test_an_upload_dropped_after_its_job_is_asked_for_again_by_its_name(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"x")
    with pytest.raises(UserError) as caught:
        stage_uploads(tmp_path / "o", str(tmp_path / "gone" / "me.png"), [str(tmp_path / "a.wav")])
    assert caught.value.message.startswith("me.png is no longer on the server") and "upload it again" in \
        caught.value.fix and str(tmp_path) not in caught.value.message


def test_progress_reads_clip_step_eta_and_gpu_memory_from_events() -> None:
    progress = Progress()
    progress.add({"event": "stage", "stage": "generate", "clips": 2}, 0.0)
    progress.add({"event": "clip", "clip": 1, "clips": 2}, 0.0)
    for step, now in ((1, 1.0), (2, 3.0), (3, 5.0)):
        progress.add({"event": "step", "clip": 1, "step": step, "steps": 4, "gpu_peak_gb": 12.25}, now)
    assert progress.line == "clip 1 of 2 · step 3 of 4 · ETA 10 s · GPU memory peak 12.2 GB"
    assert progress.fraction == 3 / 8


def test_the_generator_s_stages_are_said_in_words() -> None:
    progress = Progress()
    progress.add({"event": "stage", "stage": "audio_embedding"}, 0.0)
    assert progress.line == "reading the speech"
    progress.add({"event": "stage", "stage": "load_models"}, 0.0)
    assert progress.line == "loading the models"
    progress.add({"event": "stage", "stage": "some_new_stage"}, 0.0)
    assert progress.line == "some new stage"
    progress.add({"event": "stage", "stage": "resume", "message": "resuming from clip 3 of 4"}, 0.0)
    assert progress.line == "resuming from clip 3 of 4"  # itk's own line as it is


@pytest.mark.parametrize(("name", "text", "words"), [
    ("sample_steps", "0", "Advanced: sample_steps must be a whole number of at least 1 (given: 0)"),
    ("sample_steps", "many", "Advanced: sample_steps must be a whole number of at least 1 (given: many)"),
    ("color_correction_strength", "2", "Advanced: color_correction_strength must be a number from 0 to 1 (given: 2)"),
    ("quant", "int8", "Advanced: quant int8 is not supported yet"),
])
def test_a_bad_advanced_value_names_its_field_without_command_line_syntax(name: str, text: str, words: str) -> None:
    with pytest.raises(UserError) as caught:
        advanced_setting(FLAG[name], text)
    assert caught.value.message.startswith(words), caught.value.message
    for line in (caught.value.message, caught.value.fix):
        assert "--" not in line
    assert f"change {name} under Advanced settings" in caught.value.fix


def test_command_line_options_in_an_error_become_the_page_s_controls() -> None:
    assert web_words("--set sample_steps=abc: not a valid int") == "Advanced: sample_steps = abc: not a valid int"
    assert web_words("give both --bbox1 and --bbox2, or neither") == "give both speaker 1's box and speaker 2's box, " \
        "or neither"
    assert web_words("lower --sample_steps, or --quant fp8") == "lower sample_steps, or quant fp8"
    # commands to run on the server stay runnable
    assert web_words("itk fetch --preset rtx4090-24g --component tts") == "itk fetch --preset rtx4090-24g " \
        "--component tts"
    assert web_words("bbox: the job's bbox (itk run --bbox1), fixed") == "bbox: the job's bbox (speaker 1's box), fixed"


def test_a_refusal_names_the_uploads_as_given_and_no_server_folder(tmp_path: Path) -> None:
    weights, outputs, uploads = tmp_path / "w", tmp_path / "out", tmp_path / "gradio" / "itk-ui-x"
    error = UserError(f"{uploads}/ab12/notes.png is not a readable image; weights missing: {weights}/Wan/x.safetensors",
                      f"see {outputs}/20250101-1-abc/run.log; itk fetch --weights-dir {weights}")
    shown = public_error(error, {f"{uploads}/ab12/notes.png": "notes.png"},
                         {weights: "the weights folder", outputs: "the output folder", uploads: "the upload folder"})
    assert shown.message == "notes.png is not a readable image; weights missing: Wan/x.safetensors"
    assert shown.fix == "see 20250101-1-abc/run.log; itk fetch (with the server's --weights-dir)"


def test_switches_are_settings_only_where_they_differ_from_the_preset_and_blanks_are_the_preset_s(
        tmp_path: Path) -> None:
    from itk.selftest import PRESET
    from itk.ui import advanced_flags

    page = Page(tmp_path, tmp_path, None, 1.0)
    defaults = {f.name: (bool(page.preset_settings(PRESET).get(f.name, f.default)) if f.is_switch else "")
                for f in advanced_flags()}
    assert page.sets(PRESET, 7, list(defaults.values())) == ["base_seed=7"]
    changed = {**defaults, "use_apg": not defaults["use_apg"], "size": "infinitetalk-720", "sample_steps": " 8 "}
    assert page.sets(PRESET, None, list(changed.values())) == [
        "size=infinitetalk-720", "sample_steps=8", f"use_apg={'true' if changed['use_apg'] else 'false'}"]


def test_the_doctor_table_s_cells_say_words_and_show_code_as_code() -> None:
    assert status_cell("fail").endswith("problem</td>") and ">fail<" not in status_cell("fail")
    assert code_html("run `itk fetch` <now>") == "run <code>itk fetch</code> &lt;now&gt;"
    assert "`" not in code_html("a stray ` backtick")


def test_only_gradio_s_copies_of_a_job_s_uploads_are_dropped(tmp_path: Path) -> None:
    root = tmp_path / "gradio"
    upload = root / "ab12" / "me.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"x")
    outside = tmp_path / "mine.png"
    outside.write_bytes(b"x")
    drop_uploads([str(upload), str(outside), None], root)
    assert not upload.exists() and not upload.parent.exists() and root.is_dir() and outside.exists()


def test_the_queue_rows_read_a_batch_s_store(tmp_path: Path) -> None:
    from itk.store import JobStore, StoreError

    with pytest.raises(StoreError):
        queue_rows(tmp_path)
    store = JobStore.open(tmp_path)
    store.add("a", {}, "1")
    store.add("b", {}, "2")
    store.claim("GPU 1", ["a"])
    store.progress("a", clip=1, clips=3, step=2, steps=4)
    store.claim("GPU 0", ["b"])
    store.fail("b", "out of memory", "lower the resolution", 1)
    store.close()
    assert queue_rows(tmp_path) == [
        {"name": "a", "state": "running", "worker": "GPU 1", "where": "clip 1 of 3, step 2 of 4", "error": ""},
        {"name": "b", "state": "failed", "worker": "", "where": "",
         "error": "out of memory · fix: lower the resolution"}]


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
