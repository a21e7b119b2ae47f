"""The `itk` command as scripts and pipes see it: help with no arguments, --json errors on stdout for every
command, and output that never breaks a path or a fix mid-word outside a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from run_media import LOGS

from itk.console import clip_words

LONG = "/".join(["a-rather-long-folder-name-that-goes-on"] * 5)


def itk(*args: str, env: dict[str, str] | None = None, input_text: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m itk ARGS` with stdout and stderr pipes (not a terminal), like a CI log or `| tee`."""
    return subprocess.run([sys.executable, "-m", "itk", *args], capture_output=True, text=True, input=input_text,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_itk_with_no_arguments_shows_help_and_exits_0():
    proc = itk()
    assert proc.returncode == 0, proc.stderr
    assert "Usage: itk" in proc.stdout and "doctor" in proc.stdout and "_ITK_COMPLETE=bash_source" in proc.stdout


@pytest.mark.parametrize(("args", "code", "says"), [
    (["run", "--image", "/nonexistent/p.png", "--audio", "/nonexistent/a.wav"], 2, "does not exist"),
    (["diagnose", "/nonexistent/run.log"], 2, "cannot read"),
    (["doctor", "--only", "bogus"], 2, "unknown check id(s): bogus"),
    (["presets", "--bogus"], 2, "No such option"),
    (["fetch", "--preset", "nope"], 2, "unknown preset 'nope'"),
    (["selftest", "--workdir", str(LOGS / "expected.toml")], 2, "is a file"),
])
def test_with_json_every_commands_error_is_json_on_stdout_with_its_exit_code(args, code, says):
    proc = itk(*args, "--json")
    assert proc.returncode == code, proc.stdout + proc.stderr
    error = json.loads(proc.stdout)
    assert set(error) == {"error", "fix", "exit_code"} and error["exit_code"] == code
    assert says in error["error"] and "Traceback" not in proc.stderr


def test_without_json_the_same_error_is_two_lines_on_stderr_and_stdout_stays_empty():
    proc = itk("fetch", "--preset", "nope")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: unknown preset 'nope'") and "fix: `itk presets` lists them" in proc.stderr


def test_through_a_pipe_a_long_path_and_its_fix_stay_whole_on_one_line(tmp_path):
    weights = tmp_path / LONG
    proc = itk("doctor", "--only", "weights", "--weights-dir", str(weights), env={"COLUMNS": "60"})
    fix = next(line for line in proc.stdout.splitlines() if "weights fix:" in line)
    assert fix.endswith(f"--weights-dir {weights}")
    proc = itk("diagnose", str(weights / "generate.log"), env={"COLUMNS": "60"})
    assert f"cannot read {weights / 'generate.log'}: No such file or directory" in proc.stderr.splitlines()[0]


def test_through_a_pipe_tables_are_rows_of_whole_cells(tmp_path):
    proc = itk("presets", env={"COLUMNS": "40"})
    row = next(line for line in proc.stdout.splitlines() if line.startswith("gpu80g-480p |"))
    assert "70 GB VRAM, 64 GB RAM, compute capability 8.0" in row and "every weight resident on an 80 GB card" in row


def test_missing_weight_files_are_summarised_unless_verbose(tmp_path):
    quiet = itk("doctor", "--only", "weights", "--weights-dir", str(tmp_path)).stdout
    loud = itk("doctor", "--only", "weights", "--weights-dir", str(tmp_path), "-v").stdout
    assert "more (itk doctor -v lists them all)" in quiet
    assert sum("weights: " in ln for ln in quiet.splitlines()) == 5 + 1
    assert sum(": missing" in ln for ln in loud.splitlines()) > 5 and "more (itk doctor -v" not in loud


def test_the_seen_line_is_cut_at_a_word_never_inside_one():
    text = "word " * 30 + "averyveryverylongword tail"
    cut = clip_words(text, 160)
    assert len(cut) <= 160 and cut.endswith("word…") and clip_words("short", 160) == "short"
    log = "RuntimeError: CUDA error: no kernel image is available for execution on the device " + "x" * 5 + \
          " padding" * 30 + "\n"
    proc = itk("diagnose", "-", "--exit-code", "1", input_text=log)
    seen = next(line for line in proc.stdout.splitlines() if "seen:" in line)
    assert seen.endswith(" padding…")


def test_diagnose_reads_the_log_from_standard_input_and_documents_its_exit_codes():
    proc = itk("diagnose", "-", "--exit-code", "137", "--json", input_text="Killed\n")
    assert proc.returncode == 0 and json.loads(proc.stdout)["rule"] == "host-oom"
    assert itk("diagnose", "-", "--exit-code", "1", input_text="nothing known\n").returncode == 1
    helptext = itk("diagnose", "--help").stdout
    assert "Exit codes:" in helptext and "0  the failure is recognised" in helptext and "2  the log cannot" in helptext


@pytest.mark.parametrize("name", ["face[/x].png", "[bold]x.png", ":smile:.png", "[red]wave[/red].wav"])
def test_a_file_name_that_looks_like_markup_is_printed_as_it_is(tmp_path, name):
    """rich reads `[...]` as markup and `:smile:` as an emoji; a user's name is printed literally instead."""
    face = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "itk", "run", "--dry-run", "--image", str(face), "--audio",
                           str(tmp_path / "speech.wav")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FORCE_COLOR": "1"})  # rendered as a terminal would be
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "MarkupError" not in proc.stderr
    assert str(face) in proc.stderr.replace("\x1b[0m", "").replace("\x1b[1;31m", "").replace("\x1b[1m", "")


def test_an_output_that_is_the_source_video_is_refused_before_anything_runs(tmp_path):
    import numpy as np
    from run_media import write_wav

    from itk.runtime.video import write_mp4

    source = write_mp4(np.zeros((5, 32, 32, 3), np.uint8), None, 16000, tmp_path / "src.mp4")
    before = source.read_bytes()
    proc = itk("run", "--video", str(source), "--audio", str(write_wav(tmp_path / "s.wav", 1.0)), "--output",
               str(source))
    assert proc.returncode == 2 and "is the input" in proc.stderr and "would replace it" in proc.stderr
    assert source.read_bytes() == before and not (tmp_path / "src.run").exists()
