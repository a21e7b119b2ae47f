"""Two speakers end to end: the generator on tiny multi-speaker weights in the official layout (a real mp4 whose
length follows the both-speakers rule and whose sound is the mix), the masks reaching the two-speaker DiT
passes only, and every bad input as one line with its fix, in the generator and in `itk run`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from run_media import fake_env, itk, write_image, write_wav

from itk.runtime.generate import main
from itk.runtime.protocol import EVENT_PREFIX, FPS, SAMPLE_RATE, parse_event


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from itk.runtime.tiny import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("multi-weights"), multi=True)


def tone(path, seconds: float, hz: float):
    import soundfile

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * hz * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32),
                    SAMPLE_RATE)
    return path


@pytest.fixture
def job(tmp_path):
    """Two people side by side (a landscape picture: each half spans whole tokens of the tiny bucket), speaker
    1 talks 0.6 s, speaker 2 0.4 s."""
    write_image(tmp_path / "two.png", (96, 64))
    data = {"prompt": "two people talking", "cond_video": str(tmp_path / "two.png"), "audio_type": "add",
            "cond_audio": {"person1": str(tone(tmp_path / "a.wav", 0.6, 180)),
                           "person2": str(tone(tmp_path / "b.wav", 0.4, 260))}}
    return tmp_path, data


def generate(capsys, weights, folder, data, *extra: str, dit=None) -> tuple[int, list[str], list[dict]]:
    (folder / "job.json").write_text(json.dumps(data))
    argv = ["--ckpt_dir", str(weights.ckpt_dir), "--wav2vec_dir", str(weights.wav2vec_dir),
            "--infinitetalk_dir", str(dit or weights.multi_infinitetalk), "--input_json", str(folder / "job.json"),
            "--save_file", str(folder / "out" / "talk"), "--sample_steps", "2", "--frame_num", "9",
            "--motion_frame", "5", "--mode", "streaming", *extra]
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    return code, [line for line in err if not line.startswith(EVENT_PREFIX)], [parse_event(e) for e in err
                                                                                if e.startswith(EVENT_PREFIX)]


def mp4_facts(path) -> tuple[int, np.ndarray]:
    import av

    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        sound = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])
    return frames, sound


def loud(sound: np.ndarray, rate: int, start: float, end: float) -> float:
    return float(np.abs(sound[int(start * rate):int(end * rate)]).mean())


def test_two_speakers_taking_turns_make_a_video_as_long_as_both_with_both_voices_in_turn(capsys, weights, job):
    folder, data = job
    code, lines, events = generate(capsys, weights, folder, data)
    assert code == 0, lines
    frames, sound = mp4_facts(folder / "out" / "talk.mp4")
    assert frames == int(1.0 * FPS)  # add: 0.6 s + 0.4 s, not speaker 1's 0.6 s
    rate = len(sound) / (frames / FPS)
    assert loud(sound, rate, 0.05, 0.55) > 0.02 and loud(sound, rate, 0.65, 0.95) > 0.02  # the mix: both turns
    layout = next(e for e in events if e.get("stage") == "speakers")
    assert (layout["audio_type"], layout["masks"], layout["frames"]) == ("add", "official split", 25)


def test_two_speakers_together_with_boxes_last_as_long_as_the_longer_track_and_say_it_was_padded(
        capsys, weights, job):
    folder, data = job
    data.update(audio_type="para", bbox={"person1": [0, 0, 64, 48], "person2": [0, 48, 64, 96]})
    code, lines, events = generate(capsys, weights, folder, data, "--quant", "fp8", "--quant_dir",
                                   str(weights.multi_fp8_dit), "--num_persistent_param_in_dit", "0")
    assert code == 0, lines
    frames, sound = mp4_facts(folder / "out" / "talk.mp4")
    assert frames == int(0.6 * FPS)
    layout = next(e for e in events if e.get("stage") == "speakers")
    assert layout["masks"] == "bbox" and "padded with 0.20 s of silence" in layout["notes"][0]


class Recorder:
    """A DiT that records which speakers and masks each pass gets (the pipeline's routing is under test)."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def __call__(self, x, t, context, clip_fea, y, audio, **speakers):
        self.calls.append((audio.shape[0], speakers.get("speaker_masks")))
        return torch.zeros_like(x)


class FlatVAE:
    def encode(self, video):
        return torch.zeros(16, (video.shape[1] - 1) // 4 + 1, video.shape[2] // 8, video.shape[3] // 8)

    def decode(self, latent):
        return torch.zeros(3, (latent.shape[1] - 1) * 4 + 1, latent.shape[2] * 8, latent.shape[3] * 8)


@pytest.mark.parametrize("boxes", [None, [[0, 0, 64, 40], [0, 56, 64, 96]]])
def test_the_masks_reach_the_passes_with_both_speakers_and_the_zero_speaker_pass_gets_none(boxes):
    from itk.runtime.pipeline import SeededNoise, StreamingPipeline
    from itk.runtime.sampling import Sampling, plan_clips
    from itk.runtime.speakers import speaker_masks

    masks = speaker_masks((64, 96), (32, 48), boxes)
    dit, sampling = Recorder(), Sampling(frame_num=9, motion_frame=5, streaming=True, steps=1)
    pipeline = StreamingPipeline(dit=dit, vae=FlatVAE(), sampling=sampling, noise=SeededNoise(0), speaker_masks=masks)
    plan = plan_clips(9, sampling)
    list(pipeline.clips(references=[torch.zeros(1, 3, 1, 32, 48)], clip_features=[torch.zeros(1, 257, 24)],
                        context=torch.zeros(16, 32), context_null=torch.zeros(16, 32), audio=torch.randn(2, 9, 3, 16),
                        plan=plan))
    assert [(n, m is masks) for n, m in dit.calls] == [(2, True), (2, True), (1, False)]  # cond, drop_text, uncond


def test_boxes_and_the_official_split_give_different_masks_rows_first():
    from itk.runtime.speakers import speaker_masks

    split = speaker_masks((64, 96), (32, 48))
    # rows 0..32 (the top half) for speaker 1: rows first, as the official bbox is read
    top = speaker_masks((64, 96), (32, 48), [[0, 0, 32, 96], [32, 0, 64, 96]])
    assert not torch.equal(split, top)
    assert top[0].view(2, 3)[0].all() and not top[0].view(2, 3)[1].any()


@pytest.mark.parametrize(("change", "words"), [
    (lambda d, w: d.update(bbox={"person1": [0, 0, 64, 48], "person2": [0, 48, 200, 96]}),
     ("bbox: speaker 2's box", "reaches outside the 96x64 image")),
    (lambda d, w: d.update(bbox={"person1": [0, 0, 64, 48]}), ("bbox: gives person1", "a box each")),
    (lambda d, w: d["cond_audio"].update(person1="None", person2="None"), ("both speakers are",)),
    (lambda d, w: d.update(audio_type="both"), ('two speakers need "audio_type"',)),
])
def test_a_bad_two_speaker_job_is_one_line_and_exit_2(capsys, weights, job, change, words):
    folder, data = job
    change(data, weights)
    code, lines, events = generate(capsys, weights, folder, data)
    assert code == 2 and len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines[0]
    assert events[-1]["event"] == "error"


def test_two_speakers_on_the_single_speaker_dit_are_refused_naming_the_multi_file(capsys, weights, job):
    folder, data = job
    code, lines, _ = generate(capsys, weights, folder, data, dit=weights.infinitetalk)
    assert code == 2 and len(lines) == 1, lines
    assert all(w in lines[0] for w in ("multi-speaker", "--variant multi", "multi/infinitetalk.safetensors"))


def test_teacache_hands_both_speakers_masks_to_the_dit():
    from itk.runtime.teacache import TeaCache, TeaCachedDiT

    seen = []

    def model(*args, speaker_masks=None, run_blocks=None):
        seen.append(speaker_masks)
        return args[0]

    masks = torch.ones(3, 6)
    cache = TeaCache("infinitetalk-480", thresh=0.2, steps=4, cycle=3)
    cached = TeaCachedDiT(model, lambda tokens, *rest: tokens, cache)
    cached(torch.zeros(1), None, None, None, None, None, speaker_masks=masks)
    cached(torch.zeros(1), None, None, None, None, None)
    assert seen[0] is masks and seen[1] is None


# --- itk run ---------------------------------------------------------------------------------------------------
@pytest.fixture
def inputs(tmp_path):
    return (write_image(tmp_path / "two.png", (192, 128)), write_wav(tmp_path / "a.wav", 4.0),
            write_wav(tmp_path / "b.wav", 3.0))


def test_dry_run_shows_the_speaker_layout_and_takes_the_multi_speaker_weights(tmp_path, inputs):
    image, a, b = inputs
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(a), "--audio2", str(b),
               "--bbox1", "0,0,128,90", "--bbox2", "0,80,128,192", "--weights-dir", "/models",
               "--preset", "rtx4090-24g", "--output", "out/talk.mp4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "speakers: person1 a.wav (4.0 s) + person2 b.wav (3.0 s), add: taking turns" in proc.stderr
    assert "video 7.0 s = both tracks one after the other (add)" in proc.stderr
    assert "the two person boxes overlap" in proc.stderr
    assert "/models/InfiniteTalk/quant_models/infinitetalk_multi_fp8.safetensors" in proc.stdout
    assert "itk fetch --preset rtx4090-24g --variant multi" in proc.stderr
    job = json.loads((tmp_path / "out/talk.run/job.json").read_text())
    assert job["audio_type"] == "add" and job["bbox"]["person2"] == [0, 80, 128, 192]


def test_dry_run_json_without_boxes_names_the_official_split_and_the_para_length_rule(tmp_path, inputs):
    image, a, b = inputs
    proc = itk("run", "--dry-run", "--json", "--image", str(image), "--audio", str(a), "--audio2", str(b),
               "--audio-mode", "para", "--weights-dir", "/models", "--preset", "rtx4090-24g", cwd=tmp_path)
    plan = json.loads(proc.stdout)
    assert plan["variant"] == "multi" and plan["video_s"] == 4.0
    assert "official split" in plan["speakers"][1] and "the longer track (para" in plan["speakers"][1]


@pytest.mark.parametrize(("args", "words"), [
    (("--bbox1", "0,0,128,90", "--bbox2", "0,80,300,192"), "bbox: speaker 2's box [0.0, 80.0, 300.0, 192.0]"),
    (("--bbox1", "0,0,128,90"), "give both --bbox1 and --bbox2"),
    (("--bbox1", "0,0,128", "--bbox2", "0,80,128,192"), "--bbox1 0,0,128: expected four numbers"),
    (("--audio-mode", "loud"), "Invalid value for '--audio-mode'"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_bad_second_speaker_option_is_one_line_and_exit_2(tmp_path, inputs, args, words, as_json):
    image, a, b = inputs
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(a), "--audio2", str(b), *args,
               *(["--json"] if as_json else []), "--weights-dir", "/models", "--preset", "rtx4090-24g", cwd=tmp_path)
    assert proc.returncode == 2
    text = json.loads(proc.stdout)["error"] if as_json else proc.stderr
    assert words in text and "Traceback" not in proc.stderr


def test_a_mode_without_a_second_speaker_is_refused(tmp_path, inputs):
    image, a, _ = inputs
    proc = itk("run", "--dry-run", "--image", str(image), "--audio", str(a), "--audio-mode", "para", cwd=tmp_path)
    assert proc.returncode == 2 and "--audio-mode is for two speakers, and there is no --audio2" in proc.stderr


def test_two_speakers_with_only_the_single_speaker_weights_say_fetch_the_multi_variant(tmp_path, inputs, weights):
    image, a, b = inputs
    from itk.selftest import record_tiny_verdicts

    single = tmp_path / "w"
    shutil.copytree(weights.ckpt_dir.parent, single)
    for name in ("InfiniteTalk/multi", "InfiniteTalk/quant_models/infinitetalk_multi_fp8.safetensors"):
        path = single / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    record_tiny_verdicts(single)
    proc = itk("run", "--image", str(image), "--audio", str(a), "--audio2", str(b), "--weights-dir", str(single),
               "--preset", "rtx4090-24g", env=fake_env("ok"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert ("two speakers need the multi-speaker InfiniteTalk DiT: "
            "InfiniteTalk/quant_models/infinitetalk_multi_fp8.safetensors is missing") in proc.stderr
    assert f"fix: itk fetch --preset rtx4090-24g --variant multi --weights-dir {single}" in proc.stderr


def test_fetch_variant_multi_takes_the_multi_speaker_dit_instead_of_the_single_one():
    from itk.fetch import select_files

    files, source = select_files("rtx4090-24g", (), False, offline=True, variant="multi")
    paths = {f.path for f in files}
    assert "quant_models/infinitetalk_multi_fp8.safetensors" in paths
    assert "quant_models/infinitetalk_single_fp8.safetensors" not in paths
    assert "quant_models/t5_fp8.safetensors" in paths and "multi-speaker DiT" in source


def test_a_silent_second_speaker_in_add_mode_doubles_the_planned_length_as_the_generator_does(tmp_path):
    from itk.inputs import validate
    from itk.runtime.protocol import Job
    from itk.runtime.sampling import Sampling

    face, speech = write_image(tmp_path / "two.png", (192, 128)), write_wav(tmp_path / "a.wav", 2.0)
    job = Job("two people", face, {"person1": speech, "person2": None}, audio_type="add")
    streaming = Sampling.from_flags({"mode": "streaming", "frame_num": 81})
    facts = validate(job, streaming)
    assert facts.frames == 2 * 2 * FPS  # speaker 2's silent turn lasts as long as speaker 1's track
    para = validate(Job("two people", face, {"person1": speech, "person2": None}, audio_type="para"), streaming)
    assert para.frames == 2 * FPS
