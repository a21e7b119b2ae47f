"""Each fact the toolkit and the generator both need has one definition, and both sides are seen using it:
change the definition (here, with monkeypatch) and both answers change together; feed one side's output to the
other and it is understood."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from run_media import write_image, write_wav, write_weights

from itk.presets import get_preset
from itk.runtime import sampling
from itk.runtime.protocol import BadInput, UserError


def test_passes_per_step_are_one_rule_for_the_presets_plans_and_the_sampler(monkeypatch):
    from itk.runtime.sampler import Sampler

    preset = get_preset("rtx4090-24g")
    assert preset.passes == len(Sampler(preset.sampling).passes()) == 3
    monkeypatch.setattr(sampling, "passes_per_step", lambda text, audio: ("cond",))
    assert preset.passes == 1 and Sampler(preset.sampling).passes() == ("cond",)


def test_the_default_steps_are_one_value_for_the_toolkit_and_the_generators_request(monkeypatch, tmp_path):
    from itk.runtime.protocol import build_parser
    from itk.runtime.request import Request

    monkeypatch.setattr(sampling, "DEFAULT_STEPS", 7)
    preset = replace(get_preset("rtx4090-24g"), generator={})  # no sample_steps of its own
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"prompt": "p", "cond_video": str(write_image(tmp_path / "f.png")),
                               "cond_audio": {"person1": str(write_wav(tmp_path / "s.wav", 1.0))}}))
    flags = vars(build_parser().parse_args(["--ckpt_dir", "w", "--wav2vec_dir", "w", "--infinitetalk_dir", "x",
                                            "--input_json", str(job), "--save_file", str(tmp_path / "o")]))
    assert preset.steps == Request.from_flags(flags).sampling.steps == 7


def test_the_toolkits_attention_heads_come_from_the_runtimes_model_config_including_model_config(tmp_path):
    from itk.launch import model_heads
    from itk.runtime.configs import load_model_config

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = tmp_path / "small.json"
    config.write_text(json.dumps({"dit": {"dim": 160, "num_heads": 10}}))
    assert model_heads(ckpt, config) == load_model_config(folder=ckpt, file=config).dit.num_heads == 10
    assert model_heads(ckpt) == load_model_config(folder=ckpt).dit.num_heads == 40


def test_an_output_that_is_an_input_is_refused_by_the_same_rule_on_both_sides(tmp_path):
    from itk.run import plan_run
    from itk.runtime.protocol import build_parser
    from itk.runtime.request import Request
    from itk.spec import RunSpec

    face, speech = write_image(tmp_path / "face.png"), write_wav(tmp_path / "s.wav", 1.0)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really")  # the rule looks at the path only
    with pytest.raises(UserError, match="is the input .*clip.mp4: the video would replace it"):
        plan_run(replace(RunSpec.from_options(image=str(face), audio=str(speech), output=tmp_path / "x.mp4"),
                         job=replace(RunSpec.from_options(image=str(face), audio=str(speech)).job,
                                     cond_video=video), output=video))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"prompt": "p", "cond_video": str(video), "cond_audio": {"person1": str(speech)}}))
    flags = vars(build_parser().parse_args(["--ckpt_dir", "w", "--wav2vec_dir", "w", "--infinitetalk_dir", "x",
                                            "--input_json", str(job), "--save_file", str(tmp_path / "clip")]))
    with pytest.raises(BadInput, match="is the input .*clip.mp4: the video would replace it"):
        Request.from_flags(flags)


def test_the_gpu_split_itk_run_chooses_is_the_one_every_rank_is_handed(tmp_path):
    from itk.run import plan_run
    from itk.runtime.layout import choose_layout, parse_layout
    from itk.spec import RunSpec

    write_weights(tmp_path / "w")
    spec = RunSpec.from_options(image=str(write_image(tmp_path / "f.png")), audio=str(write_wav(tmp_path / "s.wav",
                                3.0)), output=tmp_path / "o.mp4", weights_dir=tmp_path / "w")
    plan = plan_run(replace(spec, gpus=4))
    handed = plan.flags[plan.flags.index("--gpu_layout") + 1]
    assert parse_layout(handed) == plan.layout == choose_layout(4, plan.passes, 40)


def test_the_rank_failure_line_the_generator_prints_is_the_one_the_toolkit_reads():
    from itk.runtime.protocol import failed_rank, rank_failure_line

    line = rank_failure_line(3, 4, RuntimeError("CUDA error: an illegal memory access"))
    assert failed_rank(f"noise\n{line}\nmore noise\n") == ("rank 3 failed first: RuntimeError: CUDA error: an "
                                                           "illegal memory access")
    source = (Path(__file__).parents[1] / "itk" / "supervisor.py").read_text()
    assert "failed: " not in source and "import re\n" not in source  # no second parser in the supervisor


def test_a_video_is_told_from_an_image_by_one_rule_on_every_path(monkeypatch, tmp_path):
    """The generator's job and reference, the page's job and preview and eval's reference all ask
    protocol.is_video: an extension added there (and given in upper case) is a video on every path."""
    import numpy as np

    from itk.evaluate import EvalRequest, evaluate
    from itk.runtime import protocol
    from itk.runtime.pipeline import ReferenceSource
    from itk.runtime.video import write_mp4
    from itk.ui import Page
    from itk.ui_jobs import stage_uploads

    monkeypatch.setattr(protocol, "VIDEO_EXTENSIONS", protocol.VIDEO_EXTENSIONS | {".clip"})
    frames = np.random.default_rng(0).integers(0, 255, (25, 48, 64, 3), dtype=np.uint8)
    sound = (0.2 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    talk = write_mp4(frames, sound, 16000, tmp_path / "talk.mp4")
    source = write_mp4(frames, None, 16000, tmp_path / "source.mp4").rename(tmp_path / "source.CLIP")

    assert protocol.Job("p", source, {"person1": None}).is_video
    assert ReferenceSource(source, {"0.75": [48, 64]}).video is not None
    staged = stage_uploads(tmp_path / "page", str(source), [str(write_wav(tmp_path / "s.wav", 1.0))])
    assert staged.is_video and staged.face.name == "video.clip"
    assert Page(tmp_path, tmp_path, None, 1.0).face_preview(str(source))[2] == {"visible": True}
    assert evaluate(EvalRequest(video=talk, reference=source, boxes=((10, 10, 40, 50),))).outside is not None


def test_a_picture_is_framed_into_its_bucket_by_one_function_for_the_generator_and_the_dub(monkeypatch):
    """The generator's reference and the dub's (and eval's) source frames are both `buckets.fit_frame`, framed
    by `buckets.cover_crop`: crop at the top-left corner there and both follow."""
    import numpy as np
    import torch
    from PIL import Image

    from itk.runtime import buckets, dub
    from itk.runtime.pipeline import preprocess_reference

    centred = buckets.cover_crop
    monkeypatch.setattr(buckets, "cover_crop", lambda h, w, target: (*centred(h, w, target)[:2], 0, 0))
    frame = np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8)
    h, w = centred(90, 150, (48, 64))[:2]
    corner = np.array(Image.fromarray(frame).resize((w, h), resample=Image.BILINEAR))[:48, :64]
    assert np.array_equal(dub.fit_frame(frame, (48, 64)), corner)
    reference = preprocess_reference(Image.fromarray(frame), (48, 64))[0, :, 0].permute(1, 2, 0)
    assert torch.equal(reference, (torch.from_numpy(corner) / 255 - 0.5) * 2)
