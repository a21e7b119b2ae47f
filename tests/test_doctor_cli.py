"""`itk doctor` and `itk --help` as a person runs them: real subprocesses on this GPU-less machine."""

from __future__ import annotations

import json
import subprocess
import sys


def itk(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "itk", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_doctor_json_on_this_gpu_less_machine_fails_the_gpu_check_and_exits_1(tmp_path):
    proc = itk("doctor", "--json", "--weights-dir", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"preset", "preset_reason", "weights_dir", "results", "summary", "ok", "elapsed_s"}
    by_id = {r["id"]: r for r in report["results"]}
    assert {"gpu", "torch", "ram", "disk", "flash_attn", "numpy", "packages", "ffmpeg", "port"} <= set(by_id)
    for r in report["results"]:
        assert set(r) == {"id", "status", "summary", "details", "fix", "facts"}
        assert r["status"] in {"ok", "warn", "fail", "skip"}
    assert by_id["gpu"]["status"] == "fail" and "itk selftest" in by_id["gpu"]["summary"]
    assert report["preset"] == "rtx4090-24g" and "fallback" in report["preset_reason"]
    assert report["ok"] is False


def test_doctor_exits_0_when_only_passing_checks_are_asked_for():
    proc = itk("doctor", "--only", "packages,ffmpeg")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 ok, 0 warnings, 0 failures" in proc.stdout


def test_the_table_is_followed_by_every_fix_and_a_summary_line(tmp_path):
    proc = itk("doctor", "--only", "gpu,packages", "--weights-dir", str(tmp_path))
    assert "gpu fix: install the NVIDIA driver" in proc.stdout
    assert "1 ok, 0 warnings, 1 failure" in proc.stdout


def test_an_unknown_check_id_is_one_line_and_exit_2():
    proc = itk("doctor", "--only", "gpu,bogus")
    assert proc.returncode == 2
    assert "unknown check id(s): bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_preset_is_one_line_and_exit_2():
    proc = itk("doctor", "--preset", "rtx9090")
    assert proc.returncode == 2 and "unknown preset 'rtx9090'" in proc.stderr and "Traceback" not in proc.stderr


def test_help_and_the_light_checks_never_import_torch_transformers_or_numpy():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from itk.cli import cli\n"
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0\n"
        "CliRunner().invoke(cli, ['doctor', '--only', 'gpu,ram,disk,packages,ffmpeg,port'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
