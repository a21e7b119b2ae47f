"""The supervisor with real child processes that speak the generator protocol: success, a SIGKILL'd child,
the real CUDA OOM text, every other message, and Ctrl-C with a child (and grandchild) that ignore SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from run_media import FAKE, LOGS, fake_env, itk, wait_for_json, write_image, write_wav, write_weights

from itk.advice import diagnose
from itk.runtime.protocol import parse_event
from itk.runtime.toml import read_toml
from itk.supervisor import Supervisor

EXPECTED = read_toml(LOGS / "expected.toml")


def supervise(tmp_path, mode: str, grace_s: float = 1.0, **env: str):
    seen = []
    sup = Supervisor([sys.executable, str(FAKE), "--save_file", str(tmp_path / "out")], tmp_path / "gen.log",
                     env={**os.environ, "FAKE_MODE": mode, **env}, on_event=seen.append, grace_s=grace_s)
    return sup.run(), seen


@pytest.fixture()
def ready(tmp_path):
    """An image, 6 s of speech and every weight file of the 4090 preset: what `itk run` checks before launch."""
    write_weights(tmp_path / "w")
    return ["--image", str(write_image(tmp_path / "face.png")), "--audio", str(write_wav(tmp_path / "s.wav", 6.0)),
            "--weights-dir", str(tmp_path / "w"), "--output", str(tmp_path / "out" / "talk.mp4")]


def test_protocol_lines_parse_and_anything_else_is_a_log_line():
    assert parse_event('ITK-EVENT {"event": "step", "step": 3}') == {"event": "step", "step": 3}
    assert parse_event('[rank0] ITK-EVENT {"event": "done"}') is None  # an event STARTS its line
    assert parse_event("ITK-EVENT {broken") is None and parse_event("ITK-EVENT [1]") is None
    assert parse_event("100%|##########| 40/40") is None


def test_a_successful_child_is_followed_event_by_event_and_its_log_kept(tmp_path):
    outcome, seen = supervise(tmp_path, "ok")
    assert outcome.returncode == 0 and not outcome.interrupted
    assert [e["event"] for e in seen][:4] == ["stage", "stage", "clip", "step"]
    assert outcome.output == str(tmp_path / "out.mp4") and (tmp_path / "out.mp4").stat().st_size > 0
    log = (tmp_path / "gen.log").read_text()
    assert "Creating infinitetalk pipeline" in log and log.count("ITK-EVENT") == len(seen)


def test_a_child_killed_by_sigkill_is_diagnosed_as_host_oom(tmp_path):
    outcome, _ = supervise(tmp_path, "sigkill")
    assert outcome.returncode == -signal.SIGKILL and outcome.last_stage == "load_models"
    verdict = diagnose("\n".join(outcome.tail), outcome.returncode, {"total_ram_gb": 64.0, "usable_ram_gb": 64.0})
    assert verdict.rule == "host-oom" and "64.0 GB of RAM is usable" in verdict.diagnosis


def test_a_child_printing_the_real_cuda_oom_and_exiting_1_gets_its_numbers_back(tmp_path):
    log = LOGS / "official_cuda_oom_fp8_without_persistent0.log"
    outcome, _ = supervise(tmp_path, "log", FAKE_LOG=str(log), FAKE_EXIT="1")
    assert outcome.returncode == 1
    verdict = diagnose((tmp_path / "gen.log").read_text(), outcome.returncode, {})
    assert verdict.rule == "cuda-oom" and "26.00 MiB with only 18.38 MiB free of 23.51 GiB" in verdict.diagnosis


@pytest.mark.parametrize("name", sorted(n for n, c in EXPECTED.items() if c["rule"] not in ("ok", "unknown")))
def test_a_child_exiting_with_each_known_message_is_recognised(tmp_path, name):
    outcome, _ = supervise(tmp_path, "log", FAKE_LOG=str(LOGS / f"{name}.log"), FAKE_EXIT="1")
    assert outcome.returncode == 1
    assert diagnose((tmp_path / "gen.log").read_text(), 1, {}).rule == EXPECTED[name]["rule"]


def test_an_oom_while_decoding_is_told_apart_by_the_stage_event(tmp_path):
    outcome, _ = supervise(tmp_path, "decode-oom")
    assert outcome.phase == "decode (after the last step of clip 1)"
    verdict = diagnose((tmp_path / "gen.log").read_text(), 1, {"phase": outcome.phase})
    assert verdict.rule == "cuda-oom-decode"
    assert "expandable_segments:True" in verdict.fixes[0]


def test_itk_run_end_to_end_prints_the_video_its_length_and_the_time(tmp_path, ready):
    argv_file = tmp_path / "argv.json"
    proc = itk("run", *ready, env=fake_env("ok", FAKE_ARGV=str(argv_file)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    video = tmp_path / "out" / "talk.mp4"
    assert f"done: {video} (0.4 s of video) in" in proc.stdout and "GPU peak 12.5 GB" in proc.stdout
    assert (tmp_path / "out" / "talk.run" / "generate.log").read_text().count("ITK-EVENT") >= 10
    argv = json.loads(argv_file.read_text())
    assert argv[argv.index("--save_file") + 1] == str(tmp_path / "out" / "talk")


def test_itk_run_explains_a_failed_child_and_keeps_the_verdict(tmp_path, ready):
    env = fake_env("log", FAKE_LOG=str(LOGS / "multitalk_torch_load_cve.log"), FAKE_EXIT="1")
    proc = itk("run", *ready, "--json", env=env)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["verdict"]["rule"] == "torch-load-cve"
    saved = json.loads((tmp_path / "out" / "talk.run" / "verdict.json").read_text())
    assert saved["rule"] == "torch-load-cve" and saved["log"] == report["log"]


def test_itk_run_passes_the_generators_missing_weights_exit_code_through(tmp_path, ready):
    log = tmp_path / "m.log"
    log.write_text('ITK-EVENT {"event": "error", "message": "x", "exit_code": 3}\n'
                   "error: /w/Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth: missing weights file (run `itk fetch` or check "
                   "--ckpt_dir/--wav2vec_dir)\n")
    proc = itk("run", *ready, env=fake_env("log", FAKE_LOG=str(log), FAKE_EXIT="3"))
    assert proc.returncode == 3 and "weights-missing" in proc.stdout and "itk fetch --preset rtx4090-24g" in proc.stdout
    assert "missing: /w/Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth." in proc.stdout




def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(("mode", "sig"), [("hang", signal.SIGINT), ("hang-hard", signal.SIGINT),
                                           ("hang", signal.SIGTERM), ("hang", signal.SIGHUP)])
def test_ctrl_c_stops_a_child_and_grandchild_that_ignore_sigint_and_exits_130(tmp_path, ready, mode, sig):
    """hang: SIGTERM ends them; hang-hard: only SIGKILL does; a SIGTERM to itk itself, or a SIGHUP (the
    terminal or SSH session closed), is handled like Ctrl-C. The child records the signals it receives: the
    group is asked to stop with SIGINT, then SIGTERM, before any SIGKILL."""
    pids_file, signals = tmp_path / "pids.json", tmp_path / "signals.txt"
    env = {**os.environ, **fake_env(mode, FAKE_PIDS=str(pids_file), FAKE_SIGNALS=str(signals)),
           "ITK_STOP_GRACE_S": "1"}
    itk_proc = subprocess.Popen([sys.executable, "-m", "itk", "run", *ready], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child, grandchild = wait_for_json(pids_file)
    pgid = os.getpgid(child)
    assert pgid != os.getpgid(itk_proc.pid) and os.getpgid(grandchild) == pgid  # its own group
    itk_proc.send_signal(sig)
    out, err = itk_proc.communicate(timeout=30)
    assert itk_proc.returncode == 130, out + err
    assert "interrupted" in out and "stopped" in out
    assert gone(child) and gone(grandchild)
    survivors = [p.pid for p in psutil.process_iter() if not gone(p.pid) and _pgid(p.pid) == pgid]
    assert survivors == []
    assert signals.read_text().split() == ["SIGINT", "SIGTERM"]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_grandchild_left_behind_by_a_crashed_child_is_stopped_too(tmp_path):
    code = ("import subprocess, sys, json, os; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(tmp_path / 'g')!r}, 'w').write(str(g.pid)); sys.exit(1)")
    outcome = Supervisor([sys.executable, "-c", code], tmp_path / "gen.log", grace_s=1.0).run()
    assert outcome.returncode == 1
    assert gone(int((tmp_path / "g").read_text()))


def test_steps_far_slower_than_the_preset_measured_are_called_out_once():
    from rich.console import Console

    from itk.progress import ProgressView, slow_step_note

    assert slow_step_note([70.0, 72.0, 69.0], 70) is None and slow_step_note([900.0] * 2, 70) is None
    console = Console(record=True, width=200)
    with ProgressView(console, clips=2, steps=40, expected_step_s=70) as view:
        view.handle({"event": "stage", "stage": "generate", "clips": 2})
        for step in range(1, 7):
            view.handle({"event": "step", "clip": 1, "step": step, "steps": 40, "elapsed_s": 300.0 + 1000 * step})
    text = console.export_text()
    assert text.count("warning: steps take 1000 s, 14x the 70 s measured") == 1 and "Sysmem Fallback" in text


def test_a_bad_input_the_generator_reports_is_shown_in_its_own_words(tmp_path, ready):
    log = tmp_path / "bad.log"
    log.write_text('ITK-EVENT {"event": "error", "message": "--frame_num 80: must be 4n+1 (e.g. 81)", "exit_code": 2}\n'
                   "error: --frame_num 80: must be 4n+1 (e.g. 81)\n")
    proc = itk("run", *ready, "--json", env=fake_env("log", FAKE_LOG=str(log), FAKE_EXIT="2"))
    assert proc.returncode == 2
    verdict = json.loads(proc.stdout)["verdict"]
    assert verdict["rule"] == "bad-input"
    assert verdict["diagnosis"] == "The generator refused its input: --frame_num 80: must be 4n+1 (e.g. 81)"
