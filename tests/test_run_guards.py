"""`itk run`'s guards around a run: one run per output (two real processes), an output that cannot be
written refused before anything runs, unusable weights named with their state and fix, the time estimate
from OUR measured step time, and an interrupted run resumed from the state folder beside its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from run_media import FAKE, fake_env, itk, wait_for_json, write_image, write_wav, write_weights

from itk.measured import expected_step_s
from itk.presets import get_preset
from itk.run import plan_run, resume_folder, run_job
from itk.runtime.manifest import load_manifest
from itk.runtime.verify import Record, VerdictStore
from itk.spec import RunSpec, output_path


def plan_for(image: Path, audio: Path, output: Path, preset: str | None = None, **spec: object):
    """The plan of `itk run --image --audio --output [--preset]`, with other RunSpec fields given directly."""
    return plan_run(replace(RunSpec.from_options(image=str(image), audio=str(audio), output=output, preset=preset),
                            **spec))


@pytest.fixture()
def media(tmp_path):
    return write_image(tmp_path / "face.png"), write_wav(tmp_path / "speech.wav", 6.0)




# --- one run per output ----------------------------------------------------------------------------------
def test_a_second_run_on_the_same_output_is_refused_naming_the_first_runs_pid(tmp_path, media):
    image, audio = media
    write_weights(tmp_path / "w")
    args = ["run", "--image", str(image), "--audio", str(audio), "--weights-dir", str(tmp_path / "w"),
            "--output", str(tmp_path / "out" / "talk.mp4")]
    pids = tmp_path / "pids.json"
    env = {**os.environ, **fake_env("hang", FAKE_PIDS=str(pids)), "ITK_STOP_GRACE_S": "1"}
    first = subprocess.Popen([sys.executable, "-m", "itk", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_json(pids)  # the first run's generator is running: it holds the output
        second = itk(*args, env=fake_env("ok", FAKE_ARGV=str(tmp_path / "second-argv.json")))
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is being written by another itk run (pid {first.pid})" in second.stderr
        assert "another --output" in second.stderr and "Traceback" not in second.stderr
        assert not (tmp_path / "second-argv.json").exists()  # its generator never started
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)
    assert first.returncode == 130
    again = itk(*args, env=fake_env("ok"))  # the lock went with the first run
    assert again.returncode == 0, again.stdout + again.stderr


def test_runs_without_output_started_in_the_same_second_get_different_videos(tmp_path, media):
    image, audio = media
    cmd = [sys.executable, "-m", "itk", "run", "--dry-run", "--json", "--image", str(image), "--audio", str(audio)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out)["output"])
    assert outputs[0] != outputs[1]
    assert output_path(None) != output_path(None)  # also within one process in one second (a web page)


# --- the output, checked before anything runs -----------------------------------------------------------
def test_an_output_that_is_an_existing_folder_is_refused_before_anything_runs(tmp_path, media):
    image, audio = media
    (tmp_path / "talk.mp4").mkdir()
    proc = itk("run", "--image", str(image), "--audio", str(audio), "--output", str(tmp_path / "talk.mp4"),
               env=fake_env("ok", FAKE_ARGV=str(tmp_path / "argv.json")), cwd=tmp_path)
    assert proc.returncode == 2 and f"--output {tmp_path / 'talk.mp4'} is an existing folder" in proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr and not (tmp_path / "argv.json").exists()


def test_an_output_whose_folder_cannot_be_created_is_refused_even_for_root(tmp_path, media):
    """A regular file where a folder must go stops root too (a 0500 folder would not)."""
    image, audio = media
    (tmp_path / "notes").write_text("a file, not a folder")
    out = tmp_path / "notes" / "videos" / "talk.mp4"
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot create the folder {out.parent} for --output: {tmp_path / 'notes'} is a file" in proc.stderr
    assert "fix: choose another --output" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0500 folder: the file-in-the-way case covers root")
def test_an_output_in_a_folder_without_write_permission_is_refused(tmp_path, media):
    image, audio = media
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio),
                   "--output", str(locked / "talk.mp4"), cwd=tmp_path)
    finally:
        locked.chmod(0o700)
    assert proc.returncode == 2 and f"cannot write in {locked} for --output" in proc.stderr


# --- unusable weights ------------------------------------------------------------------------------------
def record_as_hashed(weights: Path, path: Path, label: str, verdict: str = "ok", size: int | None = None) -> None:
    st = path.stat()
    VerdictStore(weights).put(label, Record(size=size or st.st_size, mtime_ns=st.st_mtime_ns, algo="sha256",
                                            digest="0" * 64, expected="0" * 64, revision="main", commit="c",
                                            verdict=verdict, verified_at=time.time()))


def test_unusable_weights_are_named_with_their_state_and_a_changed_file_gets_the_rehash_fix(tmp_path, media):
    image, audio = media
    weights = tmp_path / "w"
    paths = write_weights(weights)
    files = load_manifest().files_for(get_preset("rtx4090-24g").components)
    changed, corrupt, truncated = 0, 1, 2
    for i in (changed, corrupt, truncated):
        record_as_hashed(weights, paths[i], files[i].label, verdict="corrupt" if i == corrupt else "ok",
                         size=paths[i].stat().st_size + 10 if i == truncated else None)
    os.utime(paths[changed], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched since it was hashed
    proc = itk("run", "--image", str(image), "--audio", str(audio), "--weights-dir", str(weights),
               env=fake_env("ok"), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "preset rtx4090-24g: 3 weight file(s) not usable: " in proc.stderr and "missing" not in proc.stderr
    assert f"{files[changed].label} (changed: changed since it was verified" in proc.stderr
    assert f"{files[corrupt].label} (corrupt: sha256 does not match the hub)" in proc.stderr
    assert f"{files[truncated].label} (truncated: " in proc.stderr
    assert (f"itk fetch --preset rtx4090-24g --weights-dir {weights}; re-hash the changed file(s): "
            f"`itk doctor --deep --only weights --preset rtx4090-24g --weights-dir {weights}`") in proc.stderr


def test_on_a_machine_without_a_gpu_missing_weights_say_first_that_no_real_video_runs_here(tmp_path, media):
    image, audio = media
    proc = itk("run", "--image", str(image), "--audio", str(audio), "--weights-dir", str(tmp_path / "none"),
               cwd=tmp_path)  # this CI box has no NVIDIA GPU
    assert proc.returncode == 3
    first, fix = proc.stderr.splitlines()[:2]
    assert first.startswith("error: this machine has no NVIDIA GPU, so it cannot make real videos; and preset ")
    assert fix.startswith("fix: `itk selftest` checks the install here on tiny weights") and "itk fetch" in fix


def test_a_changed_file_alone_is_fixed_by_fetch_or_the_doctor(tmp_path, media):
    image, audio = media
    weights = tmp_path / "w"
    paths = write_weights(weights)
    label = load_manifest().files_for(get_preset("rtx4090-24g").components)[0].label
    record_as_hashed(weights, paths[0], label)
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    plan = plan_for(image, audio, tmp_path / "o.mp4", "rtx4090-24g", weights_dir=weights)
    assert [(st.label, st.state) for st in plan.unusable] == [(label, "changed")]
    assert plan.weights_fix == (f"re-hash the changed file(s): `itk fetch --preset rtx4090-24g --weights-dir "
                                f"{weights}` or `itk doctor --deep --only weights --preset rtx4090-24g "
                                f"--weights-dir {weights}`")
    assert plan.to_json()["unusable_weights"][0]["state"] == "changed"


# --- the time estimate -----------------------------------------------------------------------------------
def test_the_estimate_uses_our_measured_step_time_for_this_gpu_class(tmp_path, media):
    image, audio = media
    plan = plan_for(image, audio, tmp_path / "o.mp4", "rtx4090-24g",
                    gpu_name="NVIDIA H200")
    measured = expected_step_s("rtx4090-24g", "NVIDIA H200")
    assert measured is not None and plan.step_time == measured and plan.expected_step_s == measured.seconds
    assert plan.estimate_s == pytest.approx(2 * 40 * measured.seconds)  # 2 clips x 40 steps
    assert plan.estimate == f"about 10 min 43 s for 80 steps at {measured.label}"
    assert get_preset("rtx4090-24g").expected_step_s != measured.seconds  # not the guide's 70 s


def test_another_gpu_count_than_the_presets_gets_no_estimate_from_its_one_gpu_measurement(tmp_path, media):
    image, audio = media
    plan = plan_for(image, audio, tmp_path / "o.mp4", "gpu80g-fp8-480p",
                    gpu_name="NVIDIA H200", gpus=2)
    assert expected_step_s("gpu80g-fp8-480p", "NVIDIA H200") is not None and plan.step_time is None
    assert plan.estimate == ("no time estimate: preset gpu80g-fp8-480p's step time has not been measured on "
                             "2 x NVIDIA H200")
    two = plan_for(image, audio, tmp_path / "o2.mp4", "gpu80g-fp8-480p-x2",
                   gpu_name="NVIDIA H200")
    assert two.step_time == expected_step_s("gpu80g-fp8-480p-x2", "NVIDIA H200")


def test_without_a_measurement_for_this_gpu_the_estimate_says_so(tmp_path, media):
    image, audio = media
    plan = plan_for(image, audio, tmp_path / "o.mp4", "rtx4090-24g",
                    gpu_name="NVIDIA GeForce RTX 3060")
    assert plan.expected_step_s is None and plan.estimate_s is None
    assert plan.estimate == ("no time estimate: preset rtx4090-24g's step time has not been measured on an "
                             "NVIDIA GeForce RTX 3060")
    proc = itk("run", "--dry-run", "--json", "--image", str(image), "--audio", str(audio), cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert report["estimate_s"] is None and "has not been measured on this machine" in report["estimate"]


# --- resume ----------------------------------------------------------------------------------------------
def test_a_state_folder_beside_the_output_makes_the_run_resume_and_say_so_first(tmp_path, media, monkeypatch):
    image, audio = media
    weights = tmp_path / "w"
    write_weights(weights)
    out = tmp_path / "talk.mp4"
    state = resume_folder(out)
    assert state == tmp_path / "talk.mp4.itk-resume"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"clips_done": 3, "clips": 5, "video_s": 12.5}))
    argv_file = tmp_path / "argv.json"
    plan = plan_for(image, audio, out, "rtx4090-24g", weights_dir=weights,
                    generator=(sys.executable, str(FAKE)))
    assert plan.resume == f"resuming {out}: 3 of 5 clips already done" and plan.argv[-1] == "--resume"
    seen: list[dict] = []
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("FAKE_ARGV", str(argv_file))
    result = run_job(plan, on_event=seen.append)
    assert result.ok
    assert seen[0] == {"event": "stage", "stage": "resume", "message": plan.resume, "origin": "itk"}
    assert "--resume" in json.loads(argv_file.read_text())


def test_a_state_folder_without_counts_still_resumes_and_no_folder_means_a_fresh_run(tmp_path, media):
    image, audio = media
    out = tmp_path / "talk.mp4"
    fresh = plan_for(image, audio, out)
    assert fresh.resume is None and "--resume" not in fresh.argv
    resume_folder(out).mkdir()
    (resume_folder(out) / "motion.npy").write_bytes(b"\0" * 16)
    plan = plan_for(image, audio, out)
    assert plan.resume == f"resuming {out} from {resume_folder(out)}" and "--resume" in plan.argv
