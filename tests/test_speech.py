"""`itk run --text`: the speech is made by Kokoro (tiny weights in the official layout, loaded offline), written
as a real wav beside the video and fed to the generator like recorded speech; a rerun reuses it; options that
do not go together are one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from run_media import itk, write_image

from itk import selftest
from itk.runtime.tiny import write_tiny_weights

pytest.importorskip("kokoro", reason="speech from text needs the tts extra: pip install 'itk[tts]'")
TINY_RUN = ("--preset", selftest.PRESET, "--set", "sample_steps=2", "--set", "frame_num=9", "--set", "motion_frame=5")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from test_tts import write_tiny_tts

    folder = tmp_path_factory.mktemp("tts") / "weights"
    write_tiny_weights(folder)
    selftest.record_tiny_verdicts(folder)
    write_tiny_tts(folder)
    return folder


def test_itk_run_with_text_makes_a_video_with_the_spoken_words_as_its_sound(tmp_path, weights):
    face = write_image(tmp_path / "face.png")
    out = tmp_path / "talk.mp4"
    proc = itk("run", "--image", str(face), "--text", "Hello there, welcome.", "--weights-dir", str(weights),
               "--output", str(out), *TINY_RUN, "--json", env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    speech = tmp_path / "talk.speech.wav"
    assert speech.is_file() and json.loads(proc.stdout)["ok"]
    with av.open(str(speech)) as wav:
        spoken_s = wav.duration / 1e6
    with av.open(str(out)) as video:
        assert video.streams.audio and video.streams.video
        assert video.duration / 1e6 == pytest.approx(spoken_s, abs=0.1)
    before = speech.stat().st_mtime_ns
    again = itk("run", "--image", str(face), "--text", "Hello there, welcome.", "--weights-dir", str(weights),
                "--output", str(tmp_path / "talk.mp4"), *TINY_RUN, "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and speech.stat().st_mtime_ns == before  # the same words: the wav is reused


@pytest.mark.parametrize(("args", "words"), [
    (("--voice", "af_heart"), "--voice is for speech from text, and there is no --text"),
    (("--text", "Hi.", "--audio", "x.wav"), "give --audio or --text, not both"),
    (("--text", "Hi.", "--text-file", "s.txt"), "give --text or --text-file, not both"),
    (("--text", "(s1) Hi. (s3) Who?"), "unknown speaker tag (s3)"),
    (("--text", "Hi.", "--speed", "9"), "speech speed 9 is outside 0.5-2"),
])
def test_speech_options_that_do_not_go_together_are_one_line_with_exit_2(tmp_path, args, words):
    face = write_image(tmp_path / "face.png")
    proc = itk("run", "--dry-run", "--image", str(face), *args, cwd=tmp_path)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr


def test_text_without_kokoros_files_names_the_fetch_command(tmp_path):
    face = write_image(tmp_path / "face.png")
    proc = itk("run", "--dry-run", "--image", str(face), "--text", "Hello.", "--weights-dir", str(tmp_path / "w"))
    assert proc.returncode == 3 and "itk fetch --component tts" in proc.stderr


@pytest.mark.parametrize("broken", ["missing picture", "unreadable picture", "output in a file's place",
                                    "clip length"])
def test_a_bad_picture_output_or_clip_setting_is_refused_before_any_speech_is_made(tmp_path, weights, broken):
    face = write_image(tmp_path / "face.png")
    out = tmp_path / "out" / "talk.mp4"
    extra: tuple[str, ...] = ()
    if broken == "missing picture":
        face = tmp_path / "nobody.png"
    elif broken == "unreadable picture":
        face.write_bytes(b"not a picture")
    elif broken == "clip length":
        extra = ("--set", "frame_num=80")
    else:
        (tmp_path / "out").write_text("a file where the output's folder goes")
    proc = itk("run", "--dry-run", "--image", str(face), "--text", "Hello.", "--weights-dir", str(weights),
               "--output", str(out), *extra, env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    named = {"output in a file's place": str(out.parent), "clip length": "frame_num 80"}
    assert named.get(broken, str(face)) in proc.stderr
    assert not list(tmp_path.rglob("*.speech*"))


def test_a_batch_line_with_text_is_spoken_and_each_video_gets_its_eval_beside_it(tmp_path, weights):
    face = write_image(tmp_path / "face.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "p", "cond_video": str(face), "text": "Hello there, welcome.",
                                "output": "spoken.mp4", "preset": selftest.PRESET, "seed": 3,
                                "settings": {"sample_steps": 2, "frame_num": 9, "motion_frame": 5}}) + "\n")
    proc = itk("batch", str(jobs), "--out", str(tmp_path / "out"), "--weights-dir", str(weights), "--eval", "--json",
               env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "spoken.speech.wav").is_file()
    report = json.loads((tmp_path / "out" / "spoken.eval.json").read_text())
    assert report["clips"][0]["index"] == 1 and "delta_e_vs_first" in report["clips"][0]
