"""`itk run` before launching: the exact generator command (--dry-run), input validation and the weights
check, as a person meets them (real `itk` subprocesses, real image/wav/mp4 files)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from run_media import fake_env, itk, write_image, write_wav, write_weights

from itk.inputs import validate
from itk.presets import get_preset, load_presets
from itk.run import setting_warnings
from itk.runtime.layout import choose_layout
from itk.runtime.manifest import load_manifest
from itk.runtime.protocol import Job, UserError, read_job
from itk.runtime.sampling import Sampling, plan_clips


@pytest.fixture()
def media(tmp_path):
    return write_image(tmp_path / "face.png"), write_wav(tmp_path / "speech.wav", 6.0)


def dry_run(*args: str, cwd: Path) -> dict:
    proc = itk("run", "--dry-run", "--json", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_dry_run_prints_the_guide_command_line_for_the_4090_preset(tmp_path, media):
    image, audio = media
    plan = dry_run("--image", str(image), "--audio", str(audio), "--output", "out/talk.mp4",
                   "--preset", "rtx4090-24g", "--weights-dir", "/models", cwd=tmp_path)
    argv = plan["argv"]
    assert argv[:3] == [sys.executable, "-m", "itk.runtime.generate"]
    assert argv[3:] == [
        "--ckpt_dir", "/models/Wan2.1-I2V-14B-480P",
        "--wav2vec_dir", "/models/chinese-wav2vec2-base",
        "--quant_dir", "/models/InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors",
        "--quant", "fp8", "--num_persistent_param_in_dit", "0", "--motion_frame", "9",
        "--size", "infinitetalk-480", "--sample_steps", "40", "--mode", "streaming",
        "--input_json", str(tmp_path / "out/talk.run/job.json"), "--save_file", str(tmp_path / "out/talk"),
    ]
    assert shlex.split(plan["command"]) == argv
    job = json.loads((tmp_path / "out/talk.run/job.json").read_text())
    assert job == {"prompt": "A person is talking.", "cond_video": str(image), "cond_audio": {"person1": str(audio)}}
    assert plan["clips"] == 2 and plan["video_s"] == 6.0  # 150 frames: 81, then 72 more
    needed = load_manifest().files_for(get_preset("rtx4090-24g").components)
    assert plan["missing_weights"] == [f"{f.label} (missing)" for f in needed]  # nothing fetched in /models


def test_set_overrides_the_preset_and_adds_flags_in_the_official_spelling(tmp_path, media):
    image, audio = media
    plan = dry_run("--image", str(image), "--audio", str(audio), "--preset", "gpu80g-480p",
                   "--set", "sample_steps=8", "--set", "use_apg=true", "--set", "size=infinitetalk-720",
                   cwd=tmp_path)
    argv = plan["argv"]
    assert "--infinitetalk_dir" in argv and "--quant" not in argv
    assert argv[argv.index("--sample_steps") + 1] == "8" and argv[argv.index("--size") + 1] == "infinitetalk-720"
    assert "--use_apg" in argv and "true" not in argv


def test_a_setting_the_generator_refuses_is_refused_up_front_with_the_generators_reason(tmp_path, media):
    from itk.runtime.protocol import FLAG

    image, audio = media
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--set", "scene_seg=true",
               cwd=tmp_path)
    assert proc.returncode == 2 and FLAG["scene_seg"].refused in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(load_presets()))
def test_every_preset_turns_into_its_path_flags_and_settings_in_order(tmp_path, media, name):
    image, audio = media
    preset = get_preset(name)
    argv = dry_run("--image", str(image), "--audio", str(audio), "--preset", name, "--weights-dir", "/m",
                   cwd=tmp_path)["argv"]
    argv = argv[argv.index("itk.runtime.generate") + 1:]  # after python -m (or torchrun's -m for several GPUs)
    expected = [x for flag, path in preset.path_flags(Path("/m")).items() for x in (f"--{flag}", str(path))]
    loras = preset.lora_files(Path("/m"))
    expected += ["--lora_dir", *(str(path) for path, _ in loras)] if loras else []
    expected += [x for key, value in preset.generator.items() for x in (f"--{key}", str(value))]
    expected += ["--lora_scale", *(str(scale) for _, scale in loras)] if loras else []
    # several GPUs: the split chosen once by `itk run`, handed to every rank
    layout = ["--gpu_layout", choose_layout(preset.gpus, preset.passes, 40).flag] if preset.gpus > 1 else []
    tail = 4 + len(layout)
    assert argv[:-tail] == expected and argv[-tail::2] == ["--input_json", "--save_file", *layout[:1]]
    assert argv[len(argv) - len(layout):] == layout


def test_fp8_on_a_preset_without_quantised_weights_is_refused(tmp_path, media):
    image, audio = media
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--preset", "gpu80g-480p",
               "--set", "quant=fp8", cwd=tmp_path)
    wanted = "--preset gpu80g-720p or --preset gpu80g-fp8-480p or --preset rtx4090-24g"
    assert proc.returncode == 2 and wanted in proc.stderr


def test_the_plain_output_of_dry_run_is_the_command_alone_on_stdout(tmp_path, media):
    image, audio = media
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[1:3] == ["-m", "itk.runtime.generate"]
    assert "itk fetch --preset rtx4090-24g" in proc.stderr
    assert "2 clip(s) x 40 steps" in proc.stderr
    assert "70 s" not in proc.stderr  # the guide's step time for the official code is never our estimate


def test_an_official_job_file_is_read_with_paths_relative_to_the_current_folder(tmp_path, media):
    write_image(tmp_path / "ref.png")
    write_wav(tmp_path / "a.wav", 4.0)
    (tmp_path / "job.json").write_text(json.dumps(
        {"prompt": "A woman speaks.", "cond_video": "ref.png", "cond_audio": {"person1": "a.wav"}}))
    plan = dry_run("--input-json", "job.json", cwd=tmp_path)
    assert plan["job"] == {"prompt": "A woman speaks.", "cond_video": str(tmp_path / "ref.png"),
                           "cond_audio": {"person1": str(tmp_path / "a.wav")}}


def test_a_video_input_is_decoded_and_two_speakers_taking_turns_add_up(tmp_path, monkeypatch):
    import av
    import numpy as np

    clip = tmp_path / "ref.mp4"
    with av.open(str(clip), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for packet in [*s.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")),
                       *s.encode()]:
            c.mux(packet)
    monkeypatch.chdir(tmp_path)
    write_wav(tmp_path / "a.wav", 4.0)
    write_wav(tmp_path / "b.wav", 5.0)
    (tmp_path / "job.json").write_text(json.dumps({"prompt": "p", "cond_video": "ref.mp4", "audio_type": "add",
                                                   "cond_audio": {"person1": "a.wav", "person2": "b.wav"}}))
    facts = validate(read_job(tmp_path / "job.json"), Sampling.from_flags({"mode": "streaming"}))
    assert (facts.kind, facts.width, facts.height, facts.frames) == ("video", 64, 48, 225)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.png", "does not exist"),
    (lambda d: (d / "fake.png").write_text("not an image") and d / "fake.png", "not a readable image"),
])
def test_a_bad_image_is_one_line_naming_the_file_and_exit_2(tmp_path, make, message):
    audio = write_wav(tmp_path / "speech.wav", 5.0)
    image = make(tmp_path)
    proc = itk("run", "--image", str(image), "--audio", str(audio), cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and str(image) in proc.stderr
    assert "Traceback" not in proc.stderr and "fix:" in proc.stderr


def test_audio_shorter_than_one_clip_is_one_short_clip_and_the_run_says_so(tmp_path, media):
    image, _ = media
    short = write_wav(tmp_path / "short.wav", 3.0)
    plan = dry_run("--image", str(image), "--audio", str(short), cwd=tmp_path)
    assert plan["clips"] == 1 and plan["video_s"] == 3.0
    assert "3.00 s, shorter than one clip of 81 frames (3.24 s)" in plan["warnings"][0]
    assert "apad=whole_dur=4" in plan["warnings"][0]


def test_audio_of_exactly_one_clip_is_still_the_short_case_and_one_frame_more_is_not(tmp_path, media):
    """The boundary itself: audio of frame_num frames or fewer is refused by the official pipeline."""
    image, _ = media
    settings = Sampling.from_flags({"frame_num": 25, "mode": "streaming"})  # 25 frames = 1.00 s, exact in floats
    at_limit = validate(Job("p", image, {"person1": write_wav(tmp_path / "a.wav", 1.0)}), settings)
    assert at_limit.frames == 25 and at_limit.clips == 1
    assert "1.00 s, shorter than one clip of 25 frames" in at_limit.warnings[0]
    above = validate(Job("p", image, {"person1": write_wav(tmp_path / "b.wav", 1.04)}), settings)
    assert above.frames == 26 and above.clips == 2 and above.warnings == []


def test_audio_shorter_than_one_frame_is_refused(tmp_path, media):
    image, _ = media
    blip = write_wav(tmp_path / "blip.wav", 0.02)
    proc = itk("run", "--image", str(image), "--audio", str(blip), cwd=tmp_path)
    assert proc.returncode == 2 and "20 ms, shorter than one video frame" in proc.stderr


def test_a_text_file_given_as_audio_is_refused(tmp_path, media):
    image, _ = media
    (tmp_path / "notes.wav").write_text("hello")
    proc = itk("run", "--image", str(image), "--audio", str(tmp_path / "notes.wav"), cwd=tmp_path)
    assert proc.returncode == 2 and "not a readable audio file" in proc.stderr


def test_missing_weights_stop_before_launch_with_the_exact_fetch_command(tmp_path, media):
    image, audio = media
    weights = tmp_path / "w"
    paths = write_weights(weights)
    paths[-2].unlink()  # quant_models/t5_fp8.safetensors
    proc = itk("run", "--image", str(image), "--audio", str(audio), "--weights-dir", str(weights),
               env=fake_env("ok"), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "1 weight file(s) not usable: InfiniteTalk/quant_models/t5_fp8.safetensors (missing)" in proc.stderr
    assert f"itk fetch --preset rtx4090-24g --weights-dir {weights}" in proc.stderr  # fix, after the GPU line


def test_a_truncated_safetensors_file_counts_as_missing(tmp_path, media):
    image, audio = media
    weights = tmp_path / "w"
    dit = write_weights(weights)[-4]
    dit.write_bytes(dit.read_bytes()[:-3])
    proc = itk("run", "--image", str(image), "--audio", str(audio), "--weights-dir", str(weights), cwd=tmp_path)
    assert proc.returncode == 3 and "infinitetalk_single_fp8.safetensors (bad header: truncated" in proc.stderr


def test_bad_set_keys_and_values_are_usage_errors(tmp_path, media):
    image, audio = media
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--set", "ckpt_dir=/x", cwd=tmp_path)
    assert proc.returncode == 2 and "not a generator setting" in proc.stderr and "known: " in proc.stderr
    assert "ckpt_dir" not in proc.stderr.split("known: ")[1]  # path flags come from presets and --weights-dir
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(audio), "--set", "sample_steps=many",
               cwd=tmp_path)
    assert proc.returncode == 2 and "not a valid int" in proc.stderr


def test_the_plans_clip_count_is_the_generators_own_clip_schedule(tmp_path):
    """`itk run`'s plan counts clips with the runtime's plan_clips itself, not with a copy of its rule."""
    image = write_image(tmp_path / "face.png")
    streaming = Sampling.from_flags({"mode": "streaming"})
    for seconds in (2.4, 3.28, 12.0, 50.0):
        facts = validate(Job("p", image, {"person1": write_wav(tmp_path / f"{seconds}.wav", seconds)}), streaming)
        schedule = plan_clips(int(seconds * 25), streaming)
        assert (facts.clips, facts.frames) == (len(schedule.starts), schedule.length)
    assert plan_clips(82, streaming).clips == 2  # the official loop always runs two clips in streaming mode
    assert plan_clips(81 + 72 * 3, streaming).clips == 4
    assert plan_clips(5000, streaming).clips == 1 + 13  # capped at max_frame_num 1000
    assert plan_clips(5000, Sampling.from_flags({"mode": "clip"})).clips == 1


def test_long_audio_warns_about_the_frame_cap(tmp_path):
    image = write_image(tmp_path / "face.png")
    audio = write_wav(tmp_path / "long.wav", 45.0)
    job = Job("p", image, {"person1": audio})
    facts = validate(job, Sampling.from_flags({"mode": "streaming"}))
    assert facts.frames == 1000 and "--set max_frame_num=1125" in facts.warnings[0]
    with pytest.raises(UserError):
        validate(Job("p", image, {"person1": tmp_path / "nope.wav"}), Sampling())


def test_a_24_gb_card_without_weight_streaming_is_warned_before_it_runs_out():
    assert "num_persistent_param_in_dit=0" in setting_warnings({"quant": "fp8"}, 24.0)[0]
    assert setting_warnings({"num_persistent_param_in_dit": 0}, 24.0) == []
    assert setting_warnings({}, 80.0) == [] and setting_warnings({}, None) == []


def test_itk_presets_lists_every_preset_and_gives_this_gpu_less_machine_the_fallback():
    proc = itk("presets", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert [p["name"] for p in listing["presets"]] == [
        "gpu80g-fp8-480p", "gpu80g-fp8-480p-fast", "gpu80g-fp8-480p-fusionx", "gpu80g-fp8-480p-x2",
        "gpu80g-fp8-480p-x4", "gpu80g-fp8-480p-x8", "gpu80g-480p", "gpu80g-720p",
        "rtx4090-24g", "rtx4090-24g-fast", "rtx4090-24g-fusionx"]
    assert listing["chosen"] == "rtx4090-24g" and "no NVIDIA GPU" in listing["reason"]
    assert all(p["unmet"] == ["no NVIDIA GPU"] for p in listing["presets"])
    text = itk("presets").stdout
    assert "tested on RTX 4090 24 GB / 64 GB RAM" in text and "derived, not yet tested" in text
    assert "this machine gets: rtx4090-24g (fallback)" in text
    assert "4 steps x 2 passes" in text and "40 steps x 3 passes" in text and "trades: FusionX increases" in text
