"""`itk run --gpus N`: the torchrun command and layout it plans, the counts it refuses, and the ranks as one
job: a crash on one rank names it and leaves no process, SIGTERM stops every rank (tiny weights, gloo)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from run_media import itk, write_image, write_wav, write_weights

from itk import selftest
from itk.run import GENERATOR, plan_run, run_job
from itk.spec import RunSpec


@pytest.fixture
def media(tmp_path) -> tuple[Path, Path]:
    return write_image(tmp_path / "face.png"), write_wav(tmp_path / "speech.wav", 1.0)


def survivors(marker: str) -> list[str]:
    """Live processes whose command line names `marker` (a run's own folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found


def test_dry_run_with_two_gpus_shows_the_torchrun_command_and_the_layout(tmp_path, media):
    image, audio = media
    write_weights(tmp_path / "w")
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--weights-dir",
               str(tmp_path / "w"), "--gpus", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 -m itk.runtime.generate "
            "--ckpt_dir") in proc.stdout
    assert "2 GPUs: 1 guidance group (3 passes each) x sequence parallel 2" in proc.stderr


def test_a_gpu_count_the_heads_cannot_split_is_refused_with_the_valid_counts(tmp_path, media):
    image, audio = media
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--gpus", "3",
               "--set", "sample_text_guide_scale=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert ("--gpus 3: the model's 40 attention heads do not divide by the sequence-parallel degree 3 (2 guidance "
            "passes per step); valid GPU counts: 1, 2, 4, 5, 8, 10, 16") in proc.stderr


def plan(tiny: Path, media: tuple[Path, Path], out: Path, steps: int, generator: list[str] | None = GENERATOR):
    """Two GPUs' plan on the tiny weights (`generator` None: $ITK_GENERATOR's)."""
    spec = RunSpec.from_options(image=str(media[0]), audio=str(media[1]), output=out, preset=selftest.PRESET,
                                sets=(f"sample_steps={steps}",), weights_dir=tiny, gpus=2)
    return plan_run(replace(spec, generator=tuple(generator) if generator else None))


def test_more_sequence_parallel_gpus_than_a_clip_has_latent_frames_split_its_tokens(tmp_path, media):
    """The tokens split evenly, not by whole latent frames: 8 GPUs take a clip of 7 latent frames."""
    image, audio = media
    write_weights(tmp_path / "w")
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--weights-dir",
               str(tmp_path / "w"), "--gpus", "8", "--set", "frame_num=25", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "8 GPUs: 1 guidance group (3 passes each) x sequence parallel 8" in proc.stderr


def test_a_rank_that_crashes_ends_the_job_naming_the_rank_with_no_process_left(tmp_path, tiny, media, monkeypatch):
    # The real generator, wrapped so that rank 1 raises at its first guidance gather (the test injects the
    # failure: the runtime has no switch for it).
    crash_generator = Path(__file__).parent / "crash_rank_generator.py"
    monkeypatch.setenv("ITK_GENERATOR", f"{sys.executable} {crash_generator}")
    result = run_job(plan(tiny, media, tmp_path / "talk.mp4", 2, generator=None))
    assert not result.ok and result.exit_code == 1
    assert result.verdict.diagnosis.startswith("rank 1 failed first: RuntimeError: rank 1 crashed on purpose. ")
    assert survivors(str(tmp_path)) == []


RUN_TWO_RANKS = """
import sys
from dataclasses import replace
from pathlib import Path
from itk.run import plan_run, run_job
from itk.spec import RunSpec
image, audio, out, weights, preset = sys.argv[1:6]
spec = RunSpec.from_options(image=image, audio=audio, output=out, preset=preset, weights_dir=weights,
                            sets=["sample_steps=1000"])
sys.exit(run_job(plan_run(replace(spec, gpus=2))).exit_code)
"""


def test_sigterm_to_itk_stops_every_rank(tmp_path, tiny, media):
    """Two generator processes on this GPU-less box (the library allows CPU ranks; `itk run --gpus 2` itself
    refuses a machine without two GPUs): SIGTERM to itk stops both ranks and itk ends with 130."""
    image, audio = media
    proc = subprocess.Popen([sys.executable, "-c", RUN_TWO_RANKS, str(image), str(audio), str(tmp_path / "talk.mp4"),
                             str(tiny), selftest.PRESET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path)
    log = tmp_path / "talk.run" / "generate.log"
    try:
        wait_for_step(log)
        ranks = [c for c in survivors(str(tmp_path)) if "itk.runtime.generate" in c and "distributed" not in c]
        assert len(ranks) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert survivors(str(tmp_path)) == []
    finally:
        proc.kill()


def test_itk_run_refuses_more_gpus_than_the_machine_has_before_anything_starts(tmp_path, media):
    image, audio = media
    proc = itk("run", "--image", str(image), "--audio", str(audio), "--gpus", "3", cwd=tmp_path)  # 3 guidance groups
    assert proc.returncode == 2 and "--gpus 3: this machine has 0 usable NVIDIA GPUs" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").glob("*.run/generate.log"))


def wait_for_step(log: Path, seconds: float = 120) -> None:
    """Until rank 0 reports a denoising step (bounded, polled like run_media.wait_for_json): the ranks are
    then in the middle of the run."""
    deadline = time.monotonic() + seconds
    while '"step"' not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, f"no step in {log}"
        time.sleep(0.05)


def test_the_doctor_reports_how_many_gpus_there_are():
    from itk.checks import gpu

    h200 = [gpu.Gpu(i, "NVIDIA H200", 143771, 143000, 9.0) for i in range(2)]
    result = gpu.judge(gpu.GpuFacts("570.124.06", "12.8", tuple(h200)), min_vram_gb=70, own_pid=1)
    assert result.summary == "2 GPUs, the best: NVIDIA H200, 140.4 GiB, CUDA 12.8, cc 9.0"


def test_gpus_auto_without_a_usable_gpu_is_one_and_a_count_below_one_is_refused():
    from itk.runtime.protocol import UserError
    from itk.spec import parse_gpus

    assert parse_gpus("auto") == 1 and parse_gpus("4") == 4  # this CI box has no NVIDIA driver
    for bad in ("0", "two"):
        with pytest.raises(UserError, match=f"--gpus {bad}: expected a count of 1 or more, or auto"):
            parse_gpus(bad)


def test_the_failed_ranks_error_line_is_cut_where_another_ranks_event_landed_inside_it():
    from itk.runtime.protocol import failed_rank

    log = ('error: rank 1 of 2 failed: RuntimeError: boom'
           'ITK-EVENT {"event": "step", "clip": 1, "step": 2, "steps": 4}\n'
           'Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1\n')
    assert failed_rank(log) == "rank 1 failed first: RuntimeError: boom"
