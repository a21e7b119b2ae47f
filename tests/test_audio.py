"""Our speech features against the official InfiniteTalk audio path.

Golden audio_A: a tiny wav2vec2 with random weights under the official checkpoint names, run through
generate_infinitetalk.py's audio functions on a 2 s sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from itk.runtime.loading import WeightsError
from itk.runtime.models.audio import (
    AudioEncoder,
    AudioError,
    audio_windows,
    checkpoint_to_model_keys,
    frame_count,
    load_speech,
    loudness_normalize,
)

from golden import GOLDENS, load_golden, rel_err, weights_of

TOL = 1e-5
SWEEP = GOLDENS / "audio_sweep_2s.wav"
VARIANTS = {True: "do_normalize_true", False: "do_normalize_false"}


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, torch.Tensor]]:
    return load_golden("audio_A")


def write_folder(path: Path, meta: dict, weights: dict[str, torch.Tensor], do_normalize: bool) -> Path:
    """A chinese-wav2vec2-base-shaped folder holding the golden's tiny model."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(meta["wav2vec2_config"]))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": do_normalize, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000,
    }))
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def encoders(golden, tmp_path_factory) -> dict[bool, AudioEncoder]:
    meta, tensors = golden
    root = tmp_path_factory.mktemp("w2v")
    return {
        flag: AudioEncoder.from_folder(write_folder(root / name, meta, weights_of(meta, tensors), flag))
        for flag, name in VARIANTS.items()
    }


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def test_speech_loads_as_16_khz_mono_float32_like_the_official_librosa_call(golden):
    samples = load_speech(SWEEP)
    assert samples.dtype == np.float32
    assert np.array_equal(samples, golden[1]["input.waveform"].numpy())


def test_speech_at_another_rate_is_resampled_to_16_khz(tmp_path):
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    assert len(load_speech(write_wav(tmp_path / "tone8k.wav", tone, rate=8000))) == 16000


def test_loudness_is_normalised_to_minus_23_lufs_as_in_the_official_run(golden):
    import pyloudnorm

    meta, tensors = golden
    normalized = loudness_normalize(tensors["input.waveform"].numpy(), 16000, -23.0)
    reference = tensors["output.loudness_normalized"]
    assert rel_err(torch.from_numpy(normalized), reference) < TOL
    loudness = pyloudnorm.Meter(16000).integrated_loudness(normalized)
    assert loudness == pytest.approx(meta["loudness"]["target"], abs=1e-4)


def test_the_default_loudness_target_is_minus_23_lufs_on_the_path_the_generator_uses(golden, tmp_path):
    # No target passed anywhere: the default itself must be the official -23 LUFS (BS.1770 integrated).
    import pyloudnorm

    from itk.runtime.request import read_speech

    meta, tensors = golden
    assert meta["loudness"]["target"] == -23.0
    meter = pyloudnorm.Meter(16000)
    waveform = tensors["input.waveform"].numpy()
    assert meter.integrated_loudness(loudness_normalize(waveform)) == pytest.approx(-23.0, abs=1e-3)
    speech = read_speech(write_wav(tmp_path / "speech.wav", 0.05 * waveform / np.abs(waveform).max()))
    assert meter.integrated_loudness(speech) == pytest.approx(-23.0, abs=1e-3)


def test_silent_audio_is_left_unchanged_by_the_loudness_step(tmp_path):
    silence = load_speech(write_wav(tmp_path / "silence.wav", np.zeros(16000)))
    assert np.array_equal(loudness_normalize(silence), silence)


def test_audio_too_short_to_measure_is_left_unchanged_by_the_loudness_step():
    blip = (0.5 * np.sin(np.arange(3200) / 5)).astype(np.float32)  # 0.2 s, under one 400 ms gating block
    assert np.array_equal(loudness_normalize(blip), blip)


def test_a_text_file_given_as_audio_is_a_one_line_error_naming_it(tmp_path):
    fake = tmp_path / "speech.wav"
    fake.write_text("this is not audio\n")
    with pytest.raises(AudioError) as err:
        load_speech(fake)
    assert str(fake) in str(err.value) and "not a readable audio file" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_audio_file_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(AudioError, match=r"nothing\.wav: audio file not found$"):
        load_speech(tmp_path / "nothing.wav")


# (rate, channels, file format, sample type): what people hand in, at rates librosa resamples and not.
RECORDINGS = {
    "44.1 kHz stereo float wav": (44100, 2, "WAV", "FLOAT"),
    "16 kHz mono 24-bit wav": (16000, 1, "WAV", "PCM_24"),
    "22.05 kHz mono flac": (22050, 1, "FLAC", "PCM_16"),
    "8 kHz mono int16 wav": (8000, 1, "WAV", "PCM_16"),
}


def write_recording(path: Path, rate: int, channels: int, container: str, subtype: str) -> Path:
    import soundfile

    t = np.arange(int(1.37 * rate)) / rate  # a length no rate divides evenly: librosa's length fix matters
    rng = np.random.default_rng(rate)
    voice = 0.3 * np.sin(2 * np.pi * 190 * t) * (1 + np.sin(2 * np.pi * 4 * t)) / 2
    tracks = [voice + 0.05 * rng.standard_normal(len(t)) for _ in range(channels)]
    soundfile.write(str(path), np.stack(tracks, axis=1), rate, subtype=subtype, format=container)
    return path


@pytest.mark.parametrize("name", RECORDINGS)
def test_speech_loads_sample_for_sample_as_librosa_loads_it(tmp_path, name):
    import librosa

    rate, channels, container, subtype = RECORDINGS[name]
    path = write_recording(tmp_path / f"speech.{container.lower()}", rate, channels, container, subtype)
    expected, _ = librosa.load(str(path), sr=16000, mono=True)
    samples = load_speech(path)
    assert samples.dtype == expected.dtype == np.float32
    assert samples.shape == expected.shape and np.array_equal(samples, expected)


def test_loading_a_wav_imports_neither_librosa_nor_numba(tmp_path):
    path = write_recording(tmp_path / "speech.wav", 44100, 2, "WAV", "PCM_16")
    code = ("import sys; from itk.runtime.models.audio import load_speech; load_speech(sys.argv[1]); "
            "print(sorted(m for m in ('librosa', 'numba', 'audioread') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_an_audio_file_without_samples_is_a_one_line_error_naming_it(tmp_path):
    import soundfile

    for rate in (16000, 44100):
        path = tmp_path / f"empty{rate}.wav"
        soundfile.write(str(path), np.zeros((0, 2)), rate, subtype="PCM_16")
        with pytest.raises(AudioError, match=rf"empty{rate}\.wav: the audio file holds no samples; give a speech"):
            load_speech(path)


def test_the_frame_count_is_the_floored_number_of_25_fps_frames():
    assert frame_count(32000) == 50
    assert frame_count(31999) == 49
    assert frame_count(640) == 1
    assert frame_count(639) == 0


@pytest.mark.parametrize("do_normalize", [True, False])
def test_input_values_follow_the_folders_do_normalize(golden, encoders, do_normalize):
    samples = golden[1]["output.loudness_normalized"].numpy()
    ours = encoders[do_normalize].input_values(samples)
    reference = golden[1][f"intermediate.input_values.{VARIANTS[do_normalize]}"]
    assert ours.dtype == torch.float32
    assert rel_err(ours, reference) < TOL
    if do_normalize:
        assert abs(ours.mean().item()) < 1e-4
    else:
        assert torch.equal(ours, torch.from_numpy(samples))


def test_cnn_features_and_their_25_fps_interpolation_match(golden, encoders):
    tensors = golden[1]
    with torch.no_grad():
        conv = encoders[True].conv_features(tensors["intermediate.input_values.do_normalize_true"])
    assert conv.shape == (99, 16)
    assert rel_err(conv, tensors["intermediate.conv_features"]) < TOL
    video = AudioEncoder.to_video_rate(tensors["intermediate.conv_features"], 50)
    assert rel_err(video, tensors["intermediate.conv_features_25fps"]) < TOL
    assert torch.equal(video[0], tensors["intermediate.conv_features"][0])  # align_corners: ends stay ends
    assert torch.equal(video[-1], tensors["intermediate.conv_features"][-1])


def test_every_hidden_state_matches_including_the_unused_encoder_input(golden, encoders):
    tensors = golden[1]
    states = encoders[True].hidden_states(tensors["intermediate.input_values.do_normalize_true"], 50)
    assert len(states) == 4
    for index, state in enumerate(states):
        assert rel_err(state, tensors[f"intermediate.hidden_states.{index}"]) < TOL, index


@pytest.mark.parametrize("do_normalize", [True, False])
def test_the_per_video_frame_embedding_matches(golden, encoders, do_normalize):
    tensors = golden[1]
    embedding = encoders[do_normalize].embed(tensors["output.loudness_normalized"].numpy())
    assert embedding.shape == (50, 3, 32) and embedding.dtype == torch.float32
    assert rel_err(embedding, tensors[f"output.audio_embedding.{VARIANTS[do_normalize]}"]) < TOL


def test_the_whole_path_from_the_wav_file_matches_the_official_embedding(golden, encoders):
    embedding = encoders[True].embed(loudness_normalize(load_speech(SWEEP)))
    assert rel_err(embedding, golden[1]["output.audio_embedding.do_normalize_true"]) < TOL


def test_speech_shorter_than_one_video_frame_is_refused(encoders):
    with pytest.raises(AudioError, match="shorter than one video frame"):
        encoders[True].embed(np.zeros(600, dtype=np.float32))


def test_the_key_map_turns_the_official_names_into_wav2vec2models(golden):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    meta, tensors = golden
    official = weights_of(meta, tensors)
    mapped = checkpoint_to_model_keys(official)
    with torch.device("meta"):
        model = Wav2Vec2Model(Wav2Vec2Config(**meta["wav2vec2_config"]))
    assert set(mapped) == set(model.state_dict())
    prefix = "encoder.pos_conv_embed.conv."
    assert mapped[prefix + "parametrizations.weight.original0"] is official["wav2vec2." + prefix + "weight_g"]
    assert mapped[prefix + "parametrizations.weight.original1"] is official["wav2vec2." + prefix + "weight_v"]
    assert checkpoint_to_model_keys(mapped).keys() == mapped.keys()  # already-mapped names pass through


def test_a_checkpoint_with_the_pretraining_heads_loads_and_they_are_ignored(golden, tmp_path):
    meta, tensors = golden
    weights = weights_of(meta, tensors) | {
        "quantizer.codevectors": torch.zeros(1, 640, 8),
        "quantizer.weight_proj.weight": torch.zeros(640, 16),
        "quantizer.weight_proj.bias": torch.zeros(640),
        "project_q.weight": torch.zeros(4, 8),
        "project_q.bias": torch.zeros(4),
        "project_hid.weight": torch.zeros(4, 32),
        "project_hid.bias": torch.zeros(4),
    }
    encoder = AudioEncoder.from_folder(write_folder(tmp_path / "w2v", meta, weights, True))
    embedding = encoder.embed(tensors["output.loudness_normalized"].numpy())
    assert rel_err(embedding, tensors["output.audio_embedding.do_normalize_true"]) < TOL


def test_a_checkpoint_missing_a_weight_is_an_error_naming_the_key(golden, tmp_path):
    meta, tensors = golden
    weights = weights_of(meta, tensors)
    del weights["wav2vec2.encoder.layers.1.attention.q_proj.weight"]
    folder = write_folder(tmp_path / "w2v", meta, weights, True)
    with pytest.raises(WeightsError, match=r"safetensors: missing key encoder\.layers\.1\.attention\.q_proj"):
        AudioEncoder.from_folder(folder)


def test_a_folder_without_model_safetensors_says_to_run_itk_fetch(golden, tmp_path):
    meta, tensors = golden
    folder = write_folder(tmp_path / "w2v", meta, weights_of(meta, tensors), True)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError) as err:
        AudioEncoder.from_folder(folder)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message
    assert "run `itk fetch`" in message and "refs/pr/1" in message
    assert "\n" not in message


def test_audio_windows_are_five_wide_and_clamped_at_both_ends():
    embedding = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 2, 3)
    windows = audio_windows(embedding, start=0, frames=6)
    assert windows.shape == (6, 5, 2, 3)
    rows = windows[:, :, 0, 0].long().tolist()
    assert rows[0] == [0, 0, 0, 1, 2]
    assert rows[1] == [0, 0, 1, 2, 3]
    assert rows[3] == [1, 2, 3, 4, 5]
    assert rows[5] == [3, 4, 5, 5, 5]
    assert audio_windows(embedding, start=4, frames=2).equal(windows[4:])


def test_audio_windows_match_the_official_streaming_run():
    _, tensors = load_golden("pipeline_A")
    embedding = tensors["input.audio_embedding"]  # 27 frames; clips of 9 frames start every 4 frames
    for clip in range(5):  # clip 5 runs on the mirror-padded embedding, the pipeline's business
        recorded = tensors[f"intermediate.clip_{clip}.step_0.audio"]
        assert torch.equal(audio_windows(embedding, 4 * clip, 9)[None], recorded), clip


# --- long speech in chunks: a Ctrl-C waits for one chunk, not the whole track (issue 31, item 15) --------------

def _chunked(encoder: AudioEncoder, frames: int) -> AudioEncoder:
    return AudioEncoder(encoder.model, encoder.extractor, encoder.cfg, cnn_chunk_frames=frames)


@pytest.mark.parametrize("frames", [7, 10, 33])  # 99 CNN frames in uneven chunks, the group norm over all of them
def test_cnn_features_computed_a_chunk_at_a_time_match_the_official_whole_track(golden, encoders, frames):
    tensors = golden[1]
    encoder = _chunked(encoders[True], frames)
    with torch.no_grad():
        conv = encoder.conv_features(tensors["intermediate.input_values.do_normalize_true"])
    assert conv.shape == (99, 16)
    assert rel_err(conv, tensors["intermediate.conv_features"]) < TOL
    embedding = encoder.embed(tensors["output.loudness_normalized"].numpy())
    assert rel_err(embedding, tensors["output.audio_embedding.do_normalize_true"]) < TOL


def test_no_single_cnn_call_of_a_60_s_track_sees_more_than_one_chunk(encoders):
    from itk.runtime.models.audio import CNN_CHUNK_FRAMES

    encoder = encoders[True]
    seen: list[int] = []
    hooks = [layer.conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
             for layer in encoder.model.feature_extractor.conv_layers]
    try:
        t = np.arange(60 * 16000) / 16000
        encoder.embed((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32))
    finally:
        for hook in hooks:
            hook.remove()
    hop, window = 320, 400  # chinese-wav2vec2-base's CNN (the golden's too): one frame per 20 ms, 25 ms wide
    assert max(seen) <= (CNN_CHUNK_FRAMES - 1) * hop + window  # about 5 s of the 60
    assert len(seen) > 7 * 60 * 50 // CNN_CHUNK_FRAMES
