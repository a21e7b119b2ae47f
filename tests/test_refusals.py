"""Hostile settings and files, refused the same way by `itk run --dry-run` and by the generator itself: exit 2
with one line naming the value or the file and a fix, never a traceback ("rerun with --debug"), and the rule
behind each refusal defined once in the runtime and used by both sides (issue 31, item 4).

Both sides are real subprocesses on real files. The generator is pointed at weights that do not exist, so an
input that passes reaches them and exits 3: every refusal below is found before any model loads.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_generator_inputs import _png_header

from itk.runtime.protocol import parse_event

LONG_NAME = "a" * 300  # a file name over the 255 bytes any Linux or macOS file system allows


def _wav(path: Path, seconds: float) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.fromarray(np.full((96, 96, 3), 120, np.uint8)).save(tmp_path / "face.png")
    _wav(tmp_path / "speech.wav", 3.0)
    return tmp_path


def _limit_memory() -> None:
    # A refusal that regresses into an endless plan (motion_frame == frame_num once looped forever) must fail
    # the test, not take the machine's memory with it.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def itk_dry_run(folder: Path, *, image: Path | str | None = None, audio: Path | str | None = None,
                output: Path | str | None = None, sets: tuple[str, ...] = (),
                job_file: bool = False) -> subprocess.CompletedProcess[str]:
    """`itk run --dry-run` with --image/--audio, or with `job_file` a job file naming them (click itself
    refuses a folder given to --image or --audio; a job file's paths reach itk's own checks)."""
    image, audio = str(image or folder / "face.png"), str(audio or folder / "speech.wav")
    if job_file:
        (folder / "itk-job.json").write_text(json.dumps({"prompt": "p", "cond_video": image,
                                                         "cond_audio": {"person1": audio}}))
        inputs = ["--input-json", str(folder / "itk-job.json")]
    else:
        inputs = ["--image", image, "--audio", audio]
    args = ["run", "--dry-run", *inputs, "--output", str(output or folder / "out" / "talk.mp4"),
            "--weights-dir", str(folder / "weights")]
    for item in sets:
        args += ["--set", item]
    return subprocess.run([sys.executable, "-m", "itk", *args], capture_output=True, text=True, cwd=folder,
                          timeout=60, preexec_fn=_limit_memory)


def generator(folder: Path, *, image: Path | str | None = None, audio: Path | str | None = None,
              save_file: Path | str | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    job = {"prompt": "a person talking", "cond_video": str(image or folder / "face.png"),
           "cond_audio": {"person1": str(audio or folder / "speech.wav")}}
    (folder / "job.json").write_text(json.dumps(job))
    nowhere = folder / "nowhere"
    argv = [sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(nowhere), "--wav2vec_dir", str(nowhere),
            "--infinitetalk_dir", str(nowhere / "infinitetalk.safetensors"), "--input_json", str(folder / "job.json"),
            "--save_file", str(save_file or folder / "out" / "talk"), "--mode", "streaming", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def as_flags(sets: tuple[str, ...]) -> tuple[str, ...]:
    """`--set` items as the generator's flags: ("frame_num=9",) -> ("--frame_num", "9")."""
    return tuple(arg for item in sets for arg in (f"--{item.partition('=')[0]}", item.partition("=")[2]))


def itk_refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, `error: ...` holding every word, then its `fix:` line; no traceback, no --debug hint."""
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "--debug" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    error = next(line for line in lines if line.startswith("error: "))
    assert any(line.startswith("fix: ") for line in lines), proc.stderr
    for word in words:
        assert word in error, error
    return error.removeprefix("error: ")


def generator_refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2 with exactly one plain stderr line, `error: ... (fix: ...)`, holding every word."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    plain = [line for line in proc.stderr.splitlines() if parse_event(line) is None]
    assert len(plain) == 1 and plain[0].startswith("error: ") and "(fix: " in plain[0], proc.stderr
    for word in words:
        assert word in plain[0], plain[0]
    return plain[0].removeprefix("error: ").split(" (fix: ")[0]


def test_the_files_here_pass_both_sides_so_each_refusal_below_is_its_own(folder):
    assert itk_dry_run(folder).returncode == 0
    assert generator(folder).returncode == 3  # reached the (absent) weights


# --- settings that cannot make a video --------------------------------------------------------------------------

@pytest.mark.parametrize(("sets", "words"), [
    (("frame_num=5", "motion_frame=5"), ("--motion_frame 5", "less than frame_num 5")),
    (("frame_num=9", "motion_frame=12"), ("--motion_frame 12", "less than frame_num 9")),
    (("frame_num=6",), ("--frame_num 6", "4n+1")),
    (("max_frame_num=1",), ("--max_frame_num 1", "frame_num 81", "one clip")),
    (("max_frame_num=80",), ("--max_frame_num 80", "frame_num 81")),
])
def test_a_clip_setting_that_cannot_make_a_video_is_one_line_on_both_sides(folder, sets, words):
    itk_line = itk_refused(itk_dry_run(folder, sets=sets), *words)
    assert generator_refused(generator(folder, flags=as_flags(sets)), *words) == itk_line


def test_a_cap_of_exactly_one_clip_is_allowed_and_planned_as_one_clip(folder):
    plan = subprocess.run([sys.executable, "-m", "itk", "run", "--dry-run", "--json", "--image",
                           str(folder / "face.png"), "--audio", str(_wav(folder / "long.wav", 8.0)), "--output",
                           str(folder / "out" / "talk.mp4"), "--set", "max_frame_num=81"],
                          capture_output=True, text=True, cwd=folder, timeout=60)
    assert plan.returncode == 0, plan.stderr
    facts = json.loads(plan.stdout)
    assert (facts["clips"], facts["video_s"]) == (1, 81 / 25)
    assert any("stops at max_frame_num 81 frames (3.2 s)" in w for w in facts["warnings"]), facts["warnings"]


# --- images too large: one pixel limit, from the header, for both -----------------------------------------------

@pytest.mark.parametrize("side", [12_000, 100_000])  # 144 Mpx: PIL only warns; 10 Gpx: PIL raises
def test_an_image_header_over_the_pixel_limit_is_refused_by_both_with_the_same_line(folder, side):
    _png_header(folder / "huge.png", side, side)
    itk_line = itk_refused(itk_dry_run(folder, image=folder / "huge.png"), "huge.png", str(Image.MAX_IMAGE_PIXELS))
    assert generator_refused(generator(folder, image=folder / "huge.png")) == itk_line


def test_a_real_12000_pixel_square_image_that_decodes_is_refused_by_itk_as_by_the_generator(folder):
    Image.new("1", (12_000, 12_000)).save(folder / "big.png")  # decodable: 18 MB at one bit per pixel
    itk_line = itk_refused(itk_dry_run(folder, image=folder / "big.png"), "big.png", "more pixels than the limit")
    assert generator_refused(generator(folder, image=folder / "big.png")) == itk_line


def test_the_pixel_limit_is_one_function_both_sides_import():
    from itk import inputs
    from itk.runtime import request

    assert inputs.image_size is request.image_size
    assert request.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's own default, fixed here


# --- names over 255 bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["image", "audio"])
def test_an_input_name_over_255_bytes_is_refused_naming_the_limit(folder, what):
    path = folder / f"{LONG_NAME}.{'png' if what == 'image' else 'wav'}"
    itk_refused(itk_dry_run(folder, **{what: path}), "304 bytes", "at most 255 bytes")
    generator_refused(generator(folder, **{what: path}), "304 bytes", "at most 255 bytes")


def test_an_output_name_over_what_its_temporary_files_need_is_refused_by_the_generator(folder):
    # talk.mp4 also names `.talk.mp4.XXXXXXXX.partial.mp4` and `talk.mp4.itk-resume`: the longest must fit
    generator_refused(generator(folder, save_file=folder / LONG_NAME), "--save_file", "304 bytes")
    generator_refused(generator(folder, save_file=folder / ("b" * 240)), "--save_file", "244 bytes", "233")
    generator_refused(generator(folder, save_file=folder / LONG_NAME / "talk"), "--save_file", "255 bytes")
    assert generator(folder, save_file=folder / ("c" * 229)).returncode == 3  # 233 bytes with .mp4: fits


def test_the_longest_output_name_allowed_leaves_room_for_every_file_derived_from_it(tmp_path):
    from itk.runtime.atomic import atomic_write
    from itk.runtime.protocol import resume_folder
    from itk.runtime.request import OUTPUT_NAME_MAX
    from itk.runtime.video import PARTIAL_SUFFIX

    output = tmp_path / ("d" * (OUTPUT_NAME_MAX - 4) + ".mp4")
    # the encoder's temporary name is the longest: `.NAME.XXXXXXXX` + PARTIAL_SUFFIX beside the output
    atomic_write(output, lambda tmp: tmp.write_text("y"), suffix=PARTIAL_SUFFIX)
    resume_folder(output).mkdir()
    (output.parent / f"{output.stem}.run").mkdir()  # itk's run folder
    assert output.read_text() == "y"


# --- an input that is not a regular file says what it is --------------------------------------------------------

@pytest.mark.parametrize(("make", "words"), [
    (lambda d: Path("/dev/zero"), ("/dev/zero", "is a character device")),
    (lambda d: d / "portraits", ("portraits", "is a folder")),
])
def test_an_image_that_is_not_a_file_is_named_for_what_it_is(folder, make, words):
    (folder / "portraits").mkdir()
    image = make(folder)
    itk_line = itk_refused(itk_dry_run(folder, image=image, job_file=True), *words)
    assert "does not exist" not in itk_line
    assert "does not exist" not in generator_refused(generator(folder, image=image), *words)


def test_a_folder_given_as_the_audio_is_named_a_folder(folder):
    (folder / "takes").mkdir()
    itk_refused(itk_dry_run(folder, audio=folder / "takes", job_file=True), "takes", "is a folder")
    generator_refused(generator(folder, audio=folder / "takes"), "takes", "is a folder")


# --- a job file nested 200k deep ------------------------------------------------------------------------------

def test_a_job_file_nested_200k_deep_is_refused_by_the_generator_as_unreadable_json(folder):
    nowhere = folder / "nowhere"
    (folder / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    proc = subprocess.run([sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(nowhere),
                           "--wav2vec_dir", str(nowhere), "--infinitetalk_dir", str(nowhere / "x.safetensors"),
                           "--input_json", str(folder / "deep.json"), "--save_file", str(folder / "talk")],
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    generator_refused(proc, "deep.json", "nested too deeply")


# --- the plan and the video agree at the smallest caps allowed (generator on tiny weights) ----------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from itk.runtime.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.mark.parametrize(("seconds", "cap"), [(2.0, 9), (2.0, 13), (0.3, 9)])
def test_the_planned_length_is_the_length_of_the_video_the_generator_writes(folder, tiny, seconds, cap):
    from test_generate import _video_facts

    audio = _wav(folder / "talk.wav", seconds)
    sets = ("frame_num=9", "motion_frame=5", f"max_frame_num={cap}", "mode=streaming")
    plan = subprocess.run([sys.executable, "-m", "itk", "run", "--dry-run", "--json", "--image",
                           str(folder / "face.png"), "--audio", str(audio), "--output", str(folder / "talk.mp4"),
                           *(arg for item in sets for arg in ("--set", item))],
                          capture_output=True, text=True, cwd=folder, timeout=60)
    assert plan.returncode == 0, plan.stderr
    job = {"prompt": "p", "cond_video": str(folder / "face.png"), "cond_audio": {"person1": str(audio)}}
    (folder / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "itk.runtime.generate", "--ckpt_dir", str(tiny.ckpt_dir),
                           "--wav2vec_dir", str(tiny.wav2vec_dir), "--infinitetalk_dir", str(tiny.infinitetalk),
                           "--input_json", str(folder / "job.json"), "--save_file", str(folder / "talk"),
                           "--sample_steps", "1", *as_flags(sets)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = _video_facts(folder / "talk.mp4")[1]
    assert json.loads(plan.stdout)["video_s"] == frames / 25 == min(cap, int(seconds * 25)) / 25


# --- with the patch to runtime/protocol.py, itk/run.py, itk/spec.py and itk/cli.py ------------------------------

def test_itk_run_refuses_a_job_file_nested_200k_deep_with_the_generators_line(folder):
    (folder / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    proc = subprocess.run([sys.executable, "-m", "itk", "run", "--dry-run", "--input-json", str(folder / "deep.json")],
                          capture_output=True, text=True, cwd=folder, timeout=60)
    itk_refused(proc, "deep.json", "nested too deeply")


def test_itk_run_refuses_an_output_name_its_temporary_files_would_not_fit(folder):
    itk_refused(itk_dry_run(folder, output=folder / f"{LONG_NAME}.mp4"), "--output", "304 bytes", "233")
    itk_refused(itk_dry_run(folder, output=folder / LONG_NAME / "talk.mp4"), "--output", "255 bytes")


def test_restart_runs_the_generator_without_resume_so_it_deletes_the_state(folder):
    state = folder / "out" / "talk.mp4.itk-resume"
    state.mkdir(parents=True)
    (state / "state.json").write_text('{"clips_done": 1, "clips": 3')  # damaged: a resume would be refused
    args = ["run", "--dry-run", "--json", "--image", str(folder / "face.png"), "--audio", str(folder / "speech.wav"),
            "--output", str(folder / "out" / "talk.mp4")]
    for extra, resumes in (([], True), (["--restart"], False)):
        proc = subprocess.run([sys.executable, "-m", "itk", *args, *extra], capture_output=True, text=True,
                              cwd=folder, timeout=60)
        plan = json.loads(proc.stdout)
        assert ("--resume" in plan["argv"]) is resumes and (plan["resume"] is not None) is resumes
    assert state.is_dir()  # a dry run deletes nothing
