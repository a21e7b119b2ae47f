"""Our speech features against the official InfiniteTalk audio path (golden audio_A: tiny wav2vec2)."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from itk.runtime.models.audio import AudioEncoder, AudioError, frame_count, load_speech, loudness_normalize

from golden import GOLDENS, load_golden, rel_err, weights_of

TOL = 1e-5
WAV = GOLDENS / "audio_sweep_2s.wav"


def encoder_folder(path, do_normalize: bool):
    meta, tensors = load_golden("audio_A")
    path.mkdir()
    (path / "config.json").write_text(json.dumps(meta["wav2vec2_config"]))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": do_normalize, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000,
    }))
    save_file(weights_of(meta, tensors), str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def golden():
    return load_golden("audio_A")[1]


def test_speech_loads_at_16_khz_and_is_normalised_to_minus_23_lufs(golden):
    samples = load_speech(WAV)
    assert rel_err(torch.from_numpy(samples), golden["input.waveform"]) < TOL
    normalised = loudness_normalize(samples)
    normalised = torch.from_numpy(np.asarray(normalised, dtype=np.float32))
    assert rel_err(normalised, golden["output.loudness_normalized"]) < TOL
    assert frame_count(samples) == 50


@pytest.mark.parametrize("do_normalize", [True, False])
def test_the_per_frame_embedding_matches_with_and_without_do_normalize(tmp_path, golden, do_normalize):
    encoder = AudioEncoder.from_folder(encoder_folder(tmp_path / "w2v", do_normalize))
    samples = golden["output.loudness_normalized"].numpy()
    variant = f"do_normalize_{str(do_normalize).lower()}"
    assert rel_err(encoder.input_values(samples), golden[f"intermediate.input_values.{variant}"]) < TOL
    embedding = encoder.embed(samples)
    assert embedding.shape == (50, 3, 32)
    assert rel_err(embedding, golden[f"output.audio_embedding.{variant}"]) < TOL


def test_every_hidden_state_matches(tmp_path, golden):
    encoder = AudioEncoder.from_folder(encoder_folder(tmp_path / "w2v", True))
    embedding = encoder.embed(golden["output.loudness_normalized"].numpy())
    for layer in range(3):
        assert rel_err(embedding[:, layer], golden[f"intermediate.hidden_states.{layer + 1}"]) < TOL


def test_a_folder_without_model_safetensors_says_to_fetch_it(tmp_path):
    folder = encoder_folder(tmp_path / "w2v", True)
    (folder / "model.safetensors").unlink()
    with pytest.raises(AudioError, match=r"model\.safetensors: missing \(it comes from the hub's refs/pr/1"):
        AudioEncoder.from_folder(folder)


def test_a_text_file_given_as_audio_is_a_one_line_error(tmp_path):
    fake = tmp_path / "speech.wav"
    fake.write_text("this is not audio\n")
    with pytest.raises(AudioError, match=r"speech\.wav: not a readable audio file"):
        load_speech(fake)


def test_silence_is_left_unchanged_by_the_loudness_step(tmp_path):
    path = tmp_path / "silence.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    samples = load_speech(path)
    assert np.array_equal(loudness_normalize(samples), samples)
