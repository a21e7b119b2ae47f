"""The toolkit-generator contract (itk.runtime.protocol): job file, events, flag table, values, argv."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from itk.runtime.protocol import (
    EVENT_PREFIX,
    FLAG,
    FLAGS,
    STAGES,
    BadInput,
    Events,
    Job,
    build_parser,
    check_values,
    format_event,
    is_video,
    parse_event,
    parse_setting,
    read_job,
    stage_words,
    to_argv,
    write_job,
)


def _job(folder: Path, **data) -> Path:
    body = {"prompt": "hi", "cond_video": "face.png", "cond_audio": {"person1": "speech.wav"}, **data}
    path = folder / "job.json"
    path.write_text(json.dumps(body))
    return path


# --- the job file ---

def test_relative_paths_are_found_in_the_current_folder_first(tmp_path, monkeypatch):
    jobs, here = tmp_path / "jobs", tmp_path / "here"
    for folder in (jobs, here):
        folder.mkdir()
        (folder / "face.png").write_bytes(b"x")
        (folder / "speech.wav").write_bytes(b"x")
    monkeypatch.chdir(here)
    job = read_job(_job(jobs))
    assert job.cond_video == here / "face.png" and job.cond_audio["person1"] == here / "speech.wav"


def test_relative_paths_missing_here_are_found_beside_the_job_file(tmp_path, monkeypatch):
    jobs, here = tmp_path / "jobs", tmp_path / "here"
    jobs.mkdir()
    here.mkdir()
    (jobs / "face.png").write_bytes(b"x")
    monkeypatch.chdir(here)
    job = read_job(_job(jobs))
    assert job.cond_video == jobs / "face.png"
    assert job.cond_audio["person1"] == here / "speech.wav"  # found nowhere: the error will name this one


def test_the_path_rule_is_stated_in_the_generators_help():
    text = " ".join(build_parser().format_help().split())
    assert "current folder first" in text and "job file's folder" in text


def test_a_second_speaker_and_a_silent_one_are_read_as_the_official_format_writes_them(tmp_path):
    job = read_job(_job(tmp_path, cond_audio={"person1": "a.wav", "person2": "None"}, audio_type="add"))
    assert job.speakers == 2 and job.cond_audio["person2"] is None
    assert list(job.audio_files()) == ["person1"]


@pytest.mark.parametrize("data, words", [
    ({"cond_audio": {"person2": "a.wav"}}, "person1"),
    ({"cond_audio": {"person1": "a.wav", "person3": "b.wav"}}, "person3"),
    ({"cond_audio": {"person1": "a.wav", "person2": "b.wav"}}, "audio_type"),
    ({"prompt": 3}, "prompt"),
    ({"bbox": {"person1": [1, 2, 3]}}, "bbox"),
])
def test_a_malformed_job_is_bad_input_naming_the_field(tmp_path, data, words):
    with pytest.raises(BadInput, match=words):
        read_job(_job(tmp_path, **data))


def test_a_job_file_that_is_missing_or_not_json_is_bad_input_naming_it(tmp_path):
    with pytest.raises(BadInput, match="gone.json"):
        read_job(tmp_path / "gone.json")
    (tmp_path / "job.json").write_text("{nope")
    with pytest.raises(BadInput, match="not valid JSON"):
        read_job(tmp_path / "job.json")


def test_a_written_job_reads_back_the_same(tmp_path):
    job = Job("hi", tmp_path / "face.png", {"person1": tmp_path / "a.wav", "person2": None}, "para",
              extra={"note": 1})
    assert read_job(write_job(job, tmp_path / "job.json")) == job


def test_videos_are_recognised_by_extension_in_any_case():
    assert is_video("a/clip.MP4") and is_video("x.webm") and not is_video("face.png")
    assert Job("hi", Path("clip.MOV"), {"person1": None}).is_video


# --- events ---

def test_events_round_trip_with_elapsed_seconds():
    stream = io.StringIO()
    events = Events(stream)
    events.stage("text_encoding")
    events.emit("step", clip=1, clips=2, step=3, steps=4)
    first, second = (parse_event(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "stage" and first["stage"] == "text_encoding" and first["elapsed_s"] >= 0
    assert (second["clip"], second["clips"], second["step"], second["steps"]) == (1, 2, 3, 4)
    assert parse_event(format_event("done", path="x.mp4")) == {"event": "done", "path": "x.mp4"}


def test_a_line_merely_containing_the_prefix_is_not_an_event():
    line = format_event("done", path="x.mp4")
    assert parse_event("log: " + line) is None
    assert parse_event(EVENT_PREFIX + "{broken") is None
    assert parse_event(EVENT_PREFIX + '{"event": "bogus"}') is None
    assert parse_event("ordinary log line") is None
    with pytest.raises(ValueError):
        format_event("bogus")


def test_every_stage_the_generator_announces_has_words_and_an_unnamed_one_is_refused_where_it_is_announced():
    source = "\n".join(path.read_text() for path in (Path(__file__).parents[1] / "runtime").rglob("*.py"))
    announced = set(re.findall(r"\.stage\(\"(\w+)\"", source))
    assert announced and announced <= set(STAGES)
    assert stage_words("audio_embedding") == "reading the speech" and stage_words("ready") == "ready"
    with pytest.raises(ValueError, match="add its words"):
        Events(io.StringIO()).stage("decode_latents")


def test_a_disabled_event_writer_writes_nothing_but_still_returns_the_record():
    stream = io.StringIO()
    assert Events(stream, enabled=False).emit("done", path="x")["path"] == "x"
    assert stream.getvalue() == ""


# --- the flag table ---

def test_the_parser_has_every_flag_of_the_table_with_its_default():
    defaults = vars(build_parser().parse_args(["--ckpt_dir", "c", "--wav2vec_dir", "w"]))
    assert set(defaults) == set(FLAG)
    for f in FLAGS:
        if f.name not in ("ckpt_dir", "wav2vec_dir"):
            assert defaults[f.name] == f.default, f.name


def test_the_parser_refuses_an_unknown_flag_and_a_bad_choice_as_bad_input():
    with pytest.raises(BadInput, match="--no_such_flag"):
        build_parser().parse_args(["--ckpt_dir", "c", "--wav2vec_dir", "w", "--no_such_flag"])
    with pytest.raises(BadInput, match="size"):
        build_parser().parse_args(["--ckpt_dir", "c", "--wav2vec_dir", "w", "--size", "huge"])


@pytest.mark.parametrize("values, words", [
    ({"scene_seg": True}, "--scene_seg"),
    ({"dit_path": "x.pth"}, "--dit_path"),
    ({"audio_mode": "tts"}, "tts"),
    ({"quant": "int8"}, "int8"),
    ({"color_correction_strength": 1.5}, "at most 1"),
    ({"frame_num": 3}, "at least 5"),
    ({"sample_shift": 0.0}, "greater than 0"),
    ({"sample_text_guide_scale": float("nan")}, "finite"),
])
def test_check_values_refuses_unsupported_flags_and_out_of_range_values(values, words):
    with pytest.raises(BadInput, match=words):
        check_values(values)


def test_check_values_accepts_defaults_and_values_in_range():
    check_values({f.name: f.default for f in FLAGS})
    check_values({"color_correction_strength": 0.0, "frame_num": 5, "quant": "fp8", "base_seed": -1})


def test_parse_setting_types_and_checks_a_set_value():
    assert parse_setting("sample_steps", "8") == 8
    assert parse_setting("--use-apg", "yes") is True
    with pytest.raises(BadInput, match="not a generator setting"):
        parse_setting("ckpt_dir", "x")
    with pytest.raises(BadInput, match="not a valid int"):
        parse_setting("sample_steps", "many")
    with pytest.raises(BadInput, match="one of"):
        parse_setting("mode", "forever")
    with pytest.raises(BadInput, match="at least 1"):
        parse_setting("sample_steps", "0")
    with pytest.raises(BadInput, match="not supported yet"):
        parse_setting("scene_seg", "true")


def test_to_argv_is_read_back_by_the_parser_to_the_same_values():
    values = {"ckpt_dir": "c", "wav2vec_dir": "w", "sample_steps": 8, "use_apg": True, "t5_cpu": False,
              "mode": "streaming", "sample_shift": None}
    argv = to_argv(values)
    assert "--t5_cpu" not in argv and "--sample_shift" not in argv and argv.count("--use_apg") == 1
    parsed = vars(build_parser().parse_args(argv))
    assert {k: parsed[k] for k in ("ckpt_dir", "sample_steps", "use_apg", "mode")} == \
        {"ckpt_dir": "c", "sample_steps": 8, "use_apg": True, "mode": "streaming"}


def test_importing_the_protocol_does_not_import_torch():
    code = "import sys, itk.runtime.protocol; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
