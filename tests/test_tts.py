"""Text to speech (runtime/tts.py): a tiny Kokoro written here in the official layout (hexgrad/Kokoro-82M's
config.json keys, kokoro-v1_0.pth as five `module.`-prefixed state dicts, voices/NAME.pt of [510, 1, 256])
and a tiny spaCy pipeline in spacy/en_core_web_sm's layout, loaded by the real loader with the network shut,
speaking a sentence through the real G2P (misaki + espeak-ng) into a wav of the length its phonemes give.

The tiny Kokoro keeps the sizes its code fixes (hidden 512, style 128: the decoder's channels are constants)
and shrinks the rest; its duration head is set so that every phoneme lasts DURATION_FRAMES frames of 600
samples (25 ms), so the length of the speech is exact: (phonemes + 2) x DURATION_FRAMES x 600 samples.
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from itk.runtime import tts
from itk.runtime.protocol import EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS, BadInput, UserError
from itk.runtime.speech_script import parse_script
from itk.runtime.tts import (
    CONFIG_FILE,
    INSTALL_FIX,
    SAMPLE_RATE,
    TtsFolders,
    chunk_phonemes,
    list_voices,
    load_g2p_pipeline,
    load_model,
    load_tts,
    model_file,
    problem,
    write_wav,
)

needs_kokoro = pytest.mark.skipif(importlib.util.find_spec("kokoro") is None,
                                  reason=f"kokoro is not installed (the TTS extra: {INSTALL_FIX})")

SAMPLES_PER_FRAME = 600  # Kokoro's decoder: 2 x upsample rates 10 x 6 x istft hop 5
DURATION_FRAMES = 2
TINY_VOICES = ("af_heart", "am_adam", "bf_emma")
TINY_CONFIG = {
    "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                 "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                 "upsample_initial_channel": 512},
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
    "n_layer": 1, "n_mels": 80, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
               "max_position_embeddings": 512, "num_hidden_layers": 1, "dropout": 0.1},
}
SENTENCE = "The quick brown fox jumps over the lazy dog."
CURRENCY = "Zorblat paid $5, didn't he?"
TAGGED = ((SENTENCE, "DT JJ JJ NN VBZ IN DT JJ NN ."), (CURRENCY, "NNP VBD $ CD , VBD RB PRP ."))


def write_tiny_tts(root: Path) -> TtsFolders:
    """A tiny Kokoro (root/Kokoro-82M) and G2P pipeline (root/en_core_web_sm) in the official layouts."""
    import torch
    from kokoro import KModel
    from misaki import en

    folders = TtsFolders(kokoro=root / "Kokoro-82M", g2p=root / "en_core_web_sm")
    (folders.kokoro / "voices").mkdir(parents=True)
    symbols = sorted(en.US_VOCAB | en.GB_VOCAB | en.PUNCTS | set(" ()T"))
    vocab = {s: i + 1 for i, s in enumerate(symbols)}  # 0 is the start/end token
    (folders.kokoro / CONFIG_FILE).write_text(json.dumps({**TINY_CONFIG, "n_token": len(vocab) + 1,
                                                          "vocab": vocab}), encoding="utf-8")
    empty = root / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning))  # weight_norm, LSTM dropout: Kokoro's code
        model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(folders.kokoro / CONFIG_FILE), model=str(empty))
    empty.unlink()
    head = model.predictor.duration_proj.linear_layer  # its sigmoids summed over max_dur are the frames
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(math.log((DURATION_FRAMES + 0.2) / (50 - DURATION_FRAMES - 0.2)))
    parts = {name: {f"module.{key}": value for key, value in module.state_dict().items()}
             for name, module in model.named_children()}
    torch.save(parts, folders.kokoro / model_file())
    for name in TINY_VOICES:
        torch.save(torch.randn(510, 1, 256) * 0.1, folders.kokoro / "voices" / f"{name}.pt")
    write_tiny_g2p(folders.g2p)
    return folders


def write_tiny_g2p(folder: Path) -> None:
    """An English spaCy pipeline as `spacy package` lays it out: a tok2vec, a tagger listening to it (trained
    on TAGGED, so the G2P gets real tags for those words) and an attribute_ruler whose files are then removed
    (the G2P loads tok2vec and tagger only, and only those two are fetched)."""
    import shutil

    import spacy
    from spacy.training import Example

    nlp = spacy.blank("en")
    nlp.add_pipe("tok2vec", config={"model": {
        "@architectures": "spacy.Tok2Vec.v2",
        "embed": {"@architectures": "spacy.MultiHashEmbed.v2", "width": 16, "attrs": ["NORM", "SHAPE"],
                  "rows": [256, 64], "include_static_vectors": False},
        "encode": {"@architectures": "spacy.MaxoutWindowEncoder.v2", "width": 16, "window_size": 1,
                   "maxout_pieces": 2, "depth": 1}}})
    nlp.add_pipe("tagger", config={"model": {"@architectures": "spacy.Tagger.v2", "tok2vec": {
        "@architectures": "spacy.Tok2VecListener.v1", "width": 16, "upstream": "tok2vec"}}})
    nlp.add_pipe("attribute_ruler")
    examples = [Example.from_dict(nlp.make_doc(text), {"tags": tags.split()}) for text, tags in TAGGED]
    optimizer = nlp.initialize(lambda: examples)
    for _ in range(30):
        nlp.update(examples, sgd=optimizer)
    nlp.to_disk(folder)
    shutil.rmtree(folder / "attribute_ruler")


@pytest.fixture
def tiny_files(tmp_path) -> TtsFolders:
    """Empty files under the names the checks look for (one voice), for the checks that read no file."""
    folders = TtsFolders(kokoro=tmp_path / "Kokoro-82M", g2p=tmp_path / "en_core_web_sm")
    for path in (CONFIG_FILE, model_file(), "voices/af_heart.pt"):
        (folders.kokoro / path).parent.mkdir(parents=True, exist_ok=True)
        (folders.kokoro / path).write_bytes(b"")
    folders.g2p.mkdir()
    for path in ("config.cfg", "meta.json"):
        (folders.g2p / path).write_bytes(b"")
    return folders


@pytest.fixture
def offline(monkeypatch):
    """No hub, no network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network use: connect{args[1:]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("tts")
    yield write_tiny_tts(root)
    shutil.rmtree(root)  # 230 MB of weights: not kept with pytest's last temporary folders


@pytest.fixture(scope="module")
def kokoro(tiny):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"network use: connect{a[1:]}"))
        yield load_tts(tiny)


def expected_samples(kokoro, text: str, *, voice: str = "af_heart", frames: int = DURATION_FRAMES) -> int:
    """What the tiny model's fixed durations give: each model call's known phonemes plus start and end."""
    known = [sum(p in kokoro.model.vocab for p in chunk) for chunk in kokoro.phonemes(text, voice=voice)]
    return sum((n + 2) * frames * SAMPLES_PER_FRAME for n in known)


@needs_kokoro
def test_a_sentence_becomes_speech_of_the_length_its_phonemes_give(kokoro, offline):
    samples = kokoro.synthesize(SENTENCE, voice="af_heart")
    assert samples.dtype == np.float32 and samples.ndim == 1 and np.isfinite(samples).all()
    assert len(samples) == expected_samples(kokoro, SENTENCE)
    assert 1 < len(samples) / SAMPLE_RATE < 6  # about 37 phonemes of 50 ms: a plausible sentence


@needs_kokoro
def test_the_g2p_speaks_punctuation_numbers_and_unknown_words(kokoro, offline):
    (phonemes,) = kokoro.phonemes(CURRENCY, voice="af_heart")
    assert "," in phonemes and "?" in phonemes  # pauses the model hears
    assert "fˈIv" in phonemes and "dˈɑləɹz" in phonemes  # the number and its currency read out
    assert phonemes.startswith("z")  # a word in no dictionary, spoken by espeak-ng


@needs_kokoro
def test_speed_shortens_the_speech(kokoro, offline):
    fast = kokoro.synthesize(SENTENCE, voice="af_heart", speed=2.0)
    assert len(fast) == expected_samples(kokoro, SENTENCE, frames=DURATION_FRAMES // 2)


@needs_kokoro
def test_lines_are_spoken_one_after_another(kokoro, offline):
    two_lines = kokoro.synthesize("Hello there.\n\nGood morning.", voice="af_heart")
    assert len(two_lines) == expected_samples(kokoro, "Hello there.") + expected_samples(kokoro, "Good morning.")


@needs_kokoro
def test_a_british_voice_uses_the_british_g2p(kokoro, offline):
    samples = kokoro.synthesize("Tomato.", voice="bf_emma")
    assert len(samples) == expected_samples(kokoro, "Tomato.", voice="bf_emma")
    assert kokoro.phonemes("Tomato.", voice="bf_emma") != kokoro.phonemes("Tomato.", voice="af_heart")


@needs_kokoro
def test_a_voice_file_path_works_too(kokoro, tiny, offline):
    import torch

    path = tiny.kokoro / "voices" / "am_adam.pt"
    torch.manual_seed(0)  # Kokoro's harmonic source adds noise
    by_path = kokoro.synthesize("Hi.", voice=str(path))
    torch.manual_seed(0)
    np.testing.assert_array_equal(by_path, kokoro.synthesize("Hi.", voice="am_adam"))


@needs_kokoro
@pytest.mark.parametrize("voice, message", [
    ("af_nobody", "voice 'af_nobody' not found (voices in"),
    ("../secret", "voice '../secret' is not a Kokoro voice name"),
    ("jf_alpha.pt", "voice 'jf_alpha.pt' not found"),
])
def test_an_unknown_voice_is_bad_input_naming_the_voices_there(kokoro, voice, message):
    with pytest.raises(BadInput) as err:
        kokoro.synthesize("Hi.", voice=voice)
    assert err.value.message.startswith(message) and err.value.exit_code == EXIT_BAD_INPUT
    assert "af_heart" in err.value.message + err.value.fix


@needs_kokoro
def test_a_voice_of_another_language_is_refused(kokoro, tiny, tmp_path):
    import shutil

    other = shutil.copy(tiny.kokoro / "voices" / "af_heart.pt", tmp_path / "jf_alpha.pt")
    with pytest.raises(BadInput, match="not English"):
        kokoro.synthesize("Hi.", voice=str(other))


@needs_kokoro
def test_a_voice_file_of_the_wrong_shape_is_refused(kokoro, tmp_path):
    import torch

    torch.save(torch.zeros(10, 256), tmp_path / "af_small.pt")
    with pytest.raises(UserError, match=r"holds \[10, 256\], not a Kokoro voice \[510, 1, 256\]"):
        kokoro.synthesize("Hi.", voice=str(tmp_path / "af_small.pt"))


@needs_kokoro
@pytest.mark.parametrize("text", ["", "   \n  ", "..."])
def test_text_without_words_is_bad_input(kokoro, text):
    with pytest.raises(BadInput, match="no speakable words"):
        kokoro.synthesize(text, voice="af_heart")


@needs_kokoro
@pytest.mark.parametrize("speed", [0.1, 3.0])
def test_a_speed_out_of_range_is_bad_input(kokoro, speed):
    with pytest.raises(BadInput, match="outside 0.5-2"):
        kokoro.synthesize("Hi.", voice="af_heart", speed=speed)


@needs_kokoro
def test_a_two_speaker_script_makes_two_tracks_each_silent_while_the_other_talks(kokoro, offline):
    script = parse_script("(s1) Hello there.\n(s2) Hi!")
    one, two = kokoro.speak_script(script, voices={1: "af_heart", 2: "am_adam"})
    first = expected_samples(kokoro, "Hello there.")
    assert len(one) == len(two) == first + expected_samples(kokoro, "Hi!")
    assert np.abs(one[:first]).max() > 0 and not one[first:].any()
    assert not two[:first].any() and np.abs(two[first:]).max() > 0


@needs_kokoro
def test_a_turn_without_speech_names_its_line(kokoro):
    with pytest.raises(BadInput, match=r"^line 2: no speakable words"):
        kokoro.speak_script(parse_script("(s1) Hello.\n(s2) ..."), voices={1: "af_heart", 2: "am_adam"})


@needs_kokoro
def test_the_speech_is_written_as_a_wav_the_audio_loader_reads(kokoro, tmp_path):
    import soundfile

    from itk.runtime.models.audio import load_speech

    path = write_wav(tmp_path / "talk.speech.wav", kokoro.synthesize("Hello there.", voice="af_heart"))
    assert [p.name for p in tmp_path.iterdir()] == ["talk.speech.wav"]  # no temporary file left
    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert abs(len(load_speech(path)) - info.frames * 16000 / SAMPLE_RATE) <= 1


@needs_kokoro
def test_weights_that_lack_part_of_the_model_are_refused(tiny, tmp_path):
    import shutil

    import torch

    folder = tmp_path / "Kokoro-82M"
    folder.mkdir()
    shutil.copy(tiny.kokoro / CONFIG_FILE, folder / CONFIG_FILE)
    parts = torch.load(tiny.kokoro / model_file(), weights_only=True)
    del parts["bert_encoder"], parts["decoder"]  # kokoro's own loader would leave them random without a word
    torch.save(parts, folder / model_file())
    with pytest.raises(UserError, match=r"lacks \d+ weights of the model .* \(first: bert_encoder.bias\)") as err:
        load_model(folder)
    assert err.value.fix == "itk fetch --component tts"


@needs_kokoro
def test_a_config_that_does_not_fit_the_weights_is_refused(tiny, tmp_path):
    folder = tmp_path / "Kokoro-82M"
    folder.mkdir()
    config = json.loads((tiny.kokoro / CONFIG_FILE).read_text(encoding="utf-8"))
    config["plbert"]["hidden_size"] = 32
    (folder / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    (folder / model_file()).symlink_to(tiny.kokoro / model_file())
    with pytest.raises(UserError, match=r"kokoro-v1_0.pth does not load with .*config.json: "):
        load_model(folder)


@needs_kokoro
def test_a_g2p_pipeline_for_another_spacy_is_refused_with_the_version_it_needs(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny.g2p, tmp_path / "en_core_web_sm")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    (folder / "meta.json").write_text(json.dumps({**meta, "spacy_version": ">=2.3.0,<2.4.0"}), encoding="utf-8")
    with pytest.raises(UserError, match=r"needs spaCy >=2.3.0,<2.4.0; spaCy 3\.") as err:
        load_g2p_pipeline(folder)
    assert err.value.fix == "pip install 'spacy>=2.3.0,<2.4.0'"


def test_missing_weights_say_which_file_and_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setattr(tts, "missing_packages", lambda: [])
    folders = TtsFolders(kokoro=tmp_path / "Kokoro-82M", g2p=tmp_path / "en_core_web_sm")
    found = problem(folders)
    assert found is not None and found.exit_code == EXIT_MISSING_WEIGHTS
    assert found.message == f"text-to-speech weights missing: {folders.kokoro / CONFIG_FILE} and 3 more"
    assert found.fix == "itk fetch --component tts"
    with pytest.raises(UserError) as err:
        load_tts(folders)
    assert err.value.message == found.message


def test_missing_packages_say_how_to_install_them(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kokoro" else real(name, *a))
    found = problem(TtsFolders(kokoro=tmp_path, g2p=tmp_path))
    assert found is not None and found.message.startswith("text-to-speech needs kokoro")
    assert found.fix == "pip install 'itk[tts]'"


def test_a_folder_without_voices_is_a_problem_too(monkeypatch, tiny_files):
    monkeypatch.setattr(tts, "missing_packages", lambda: [])
    assert problem(tiny_files) is None
    (tiny_files.kokoro / "voices" / "af_heart.pt").unlink()
    found = problem(tiny_files)
    assert found is not None and found.message.startswith("no Kokoro voice in ")
    assert found.exit_code == EXIT_MISSING_WEIGHTS


def test_voices_are_listed_from_the_folder(tmp_path):
    assert list_voices(tmp_path) == []
    (tmp_path / "voices").mkdir()
    for name in ("am_adam.pt", "af_heart.pt", "notes.txt"):
        (tmp_path / "voices" / name).write_bytes(b"")
    assert list_voices(tmp_path) == ["af_heart", "am_adam"]


def test_long_text_is_cut_after_the_last_sentence_that_fits():
    tokens = [("ab", True), ("cd.", True), ("ef", True), ("gh,", True), ("ij", False)]
    assert chunk_phonemes(tokens, limit=12) == ["ab cd.", "ef gh, ij"]
    assert chunk_phonemes(tokens, limit=8) == ["ab cd.", "ef gh,", "ij"]
    assert chunk_phonemes([("abcdefgh", True), ("ij", False)], limit=5) == ["abcde", "ij"]
    assert chunk_phonemes([("", True), ("", False)]) == []
    assert chunk_phonemes([("ab", True), ("", True), ("cd.", True), ("ef", False)], limit=9) == ["ab  cd.", "ef"]


def test_every_chunk_fits_the_model():
    tokens = [("wˈɜɹd", True)] * 300 + [(".", True)] + [("ɑ", False)] * 600
    chunks = chunk_phonemes(tokens)
    assert all(len(c) <= 510 for c in chunks)
    assert "".join(chunks).replace(" ", "") == "".join(p for p, _ in tokens).replace(" ", "")


def test_importing_tts_imports_neither_torch_nor_kokoro():
    code = ("import sys, itk.runtime.tts; "
            "sys.exit(sorted(m for m in ('torch', 'kokoro', 'misaki', 'spacy') if m in sys.modules) or 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
