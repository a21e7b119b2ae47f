"""umT5 encoder and tokenizer: the t5_A golden, strict keys in official names, a tokenizer built here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from itk.runtime.configs import T5Config
from itk.runtime.loading import WeightsError
from itk.runtime.models.keymap import remap
from itk.runtime.models.t5 import (
    T5_KEY_MAP,
    T5Encoder,
    clean_prompt,
    load_t5,
    load_tokenizer,
    official_t5_keys,
)

from golden import load_golden, rel_err, weights_of

TINY = T5Config(vocab_size=96, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=24)
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return load_golden("t5_A")


@pytest.fixture(scope="module")
def t5_file(golden, tmp_path_factory) -> Path:
    """The golden's weights as an official-style .pth (a plain state dict under the official keys)."""
    path = tmp_path_factory.mktemp("t5") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(weights_of(*golden), path)
    return path


def _save_without(golden, path: Path, drop: str, rename_to: str | None = None) -> Path:
    state = weights_of(*golden)
    tensor = state.pop(drop)
    if rename_to:
        state[rename_to] = tensor
    torch.save(state, path)
    return path


def test_t5_A_outputs_match_the_official_encoder_trimmed_per_prompt(golden, t5_file):
    _, tensors = golden
    encoder = load_t5(t5_file, TINY, dtype=torch.float32, device="cpu")
    outs = encoder.encode(tensors["input.ids"], tensors["input.mask"])
    assert [tuple(o.shape) for o in outs] == [(13, 32), (6, 32)]
    for i, out in enumerate(outs):
        assert rel_err(out, tensors[f"output.context.{i}"]) < TOL
    full = encoder(tensors["input.ids"], tensors["input.mask"])
    assert rel_err(full, tensors["intermediate.hidden_full"]) < TOL


def test_the_key_map_takes_all_242_official_keys_of_the_full_size_encoder_to_transformers_keys():
    cfg = T5Config()
    d, a, f = cfg.dim, cfg.dim_attn, cfg.dim_ffn
    shapes = {
        "token_embedding.weight": (cfg.vocab_size, d),
        "norm.weight": (d,),
        "norm1.weight": (d,),
        "norm2.weight": (d,),
        "attn.q.weight": (a, d),
        "attn.k.weight": (a, d),
        "attn.v.weight": (a, d),
        "attn.o.weight": (d, a),
        "ffn.gate.0.weight": (f, d),
        "ffn.fc1.weight": (f, d),
        "ffn.fc2.weight": (d, f),
        "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
    }
    keys = official_t5_keys(cfg)
    state = {k: torch.empty(shapes[k.split(".", 2)[-1] if k.startswith("blocks.") else k], device="meta")
             for k in keys}
    with torch.device("meta"):
        encoder = T5Encoder(cfg)
    mapped = remap(state, T5_KEY_MAP, expected=keys, module=encoder.model, source="full-size", hint="hint")
    assert len(keys) == 2 + 24 * 10  # every block owns its relative-position table
    assert set(mapped) == set(encoder.model.state_dict())


def test_a_missing_key_is_named_with_the_file_in_the_error(golden, tmp_path):
    path = _save_without(golden, tmp_path / "t5.pth", "blocks.1.ffn.fc1.weight")
    with pytest.raises(WeightsError, match=r"t5\.pth: missing key blocks\.1\.ffn\.fc1\.weight"):
        load_t5(path, TINY, dtype=torch.float32, device="cpu")


def test_a_renamed_key_is_named_in_official_spelling_in_the_error(golden, tmp_path):
    path = _save_without(golden, tmp_path / "t5.pth", "norm.weight", rename_to="final_norm.weight")
    with pytest.raises(WeightsError) as err:
        load_t5(path, TINY, dtype=torch.float32, device="cpu")
    message = str(err.value)
    assert str(path) in message
    assert "missing key norm.weight" in message and "unexpected key final_norm.weight" in message


def test_a_checkpoint_of_other_sizes_is_refused_with_the_file_named(t5_file):
    wider = T5Config(vocab_size=96, dim=48, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=2)
    with pytest.raises(WeightsError, match=r"\.pth: .* has shape"):
        load_t5(t5_file, wider, dtype=torch.float32, device="cpu")


# --- tokenizer: a real sentencepiece unigram model trained here, in the google/umt5-xxl layout ---
# Like umt5-xxl: <pad> 0, </s> 1, <s> 2, <unk> 3, byte fallback, sentinel <extra_id_N> tokens after the
# vocabulary, a tokenizer.json whose post-processor appends </s>, a tokenizer_config naming T5Tokenizer.

CORPUS = [
    "a woman is talking to the camera in a bright room",
    "a man speaks slowly, with calm gestures & a smile",
    "schön: bright tones, overexposed, static, blurred details, subtitles",
    "the quick brown fox jumps over the lazy dog",
]
EXTRA_IDS = 3


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="unigram", vocab_size=320,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    eos = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    tokenizer.post_processor = eos
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    specials = ["<pad>", "</s>", "<s>", "<unk>", *reversed(sentinels)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    folder = tmp_path_factory.mktemp("Wan2.1-I2V-14B-480P")
    target = folder / "google" / "umt5-xxl"
    target.mkdir(parents=True)
    tokenizer.save(str(target / "tokenizer.json"))
    (target / "spiece.model").write_bytes(model.getvalue())
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    specials_map = {**names, "additional_special_tokens": sentinels}
    (target / "special_tokens_map.json").write_text(json.dumps(specials_map))
    config = {**specials_map, "extra_ids": EXTRA_IDS, "legacy": True, "tokenizer_class": "T5Tokenizer"}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _pieces(folder: Path, text: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "google/umt5-xxl/spiece.model")).encode(text)


def test_prompts_are_cleaned_like_the_official_tokenizer():
    assert clean_prompt("  a  man\tspeaks \n slowly ") == "a man speaks slowly"
    assert clean_prompt("calm gestures &amp;amp; a smile") == "calm gestures & a smile"
    assert clean_prompt("schÃ¶n") == "schön"


def test_the_tokenizer_adds_eos_pads_to_text_len_and_masks_the_padding(wan_folder):
    tokenize = load_tokenizer(wan_folder, text_len=40)
    ids, mask = tokenize(["  a man speaks,\n with &amp;amp; a  smile ", "schÃ¶n"])
    first = _pieces(wan_folder, "a man speaks, with & a smile") + [1]
    second = _pieces(wan_folder, "schön") + [1]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (2, 40)
    assert ids[0].tolist() == first + [0] * (40 - len(first))
    assert ids[1].tolist() == second + [0] * (40 - len(second))
    assert mask.sum(dim=1).tolist() == [len(first), len(second)]
    assert mask[0].tolist() == [1] * len(first) + [0] * (40 - len(first))


def test_a_long_prompt_is_truncated_to_text_len_and_still_ends_with_eos(wan_folder):
    tokenize = load_tokenizer(wan_folder / "google" / "umt5-xxl", text_len=8)
    ids, mask = tokenize([CORPUS[0]])
    assert ids[0].tolist() == _pieces(wan_folder, CORPUS[0])[:7] + [1]
    assert mask.tolist() == [[1] * 8]


def test_characters_outside_the_vocabulary_become_byte_pieces_as_in_sentencepiece(wan_folder):
    tokenize = load_tokenizer(wan_folder, text_len=32)
    ids, mask = tokenize(["a smile \U0001F600 über"])
    expected = _pieces(wan_folder, "a smile \U0001F600 über") + [1]
    assert 2 not in expected and 3 not in expected  # byte fallback: neither <s> nor <unk>
    assert ids[0, : len(expected)].tolist() == expected


def test_transformers_5_autotokenizer_would_turn_those_characters_into_bos(wan_folder):
    """Why load_tokenizer does not call AutoTokenizer: this test fails once transformers stops rebuilding."""
    import transformers
    from transformers import AutoTokenizer

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x AutoTokenizer loads tokenizer.json verbatim")
    auto = AutoTokenizer.from_pretrained(str(wan_folder / "google" / "umt5-xxl"), local_files_only=True)
    assert 2 in auto("a smile \U0001F600").input_ids


def test_a_folder_without_the_tokenizer_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(WeightsError, match=r"google/umt5-xxl: no umt5-xxl tokenizer.json here"):
        load_tokenizer(tmp_path, text_len=24)


def test_a_prompt_encodes_the_same_alone_as_beside_a_longer_one(golden, t5_file):
    _, tensors = golden
    encoder = load_t5(t5_file, TINY, dtype=torch.float32, device="cpu")
    alone = encoder.encode(tensors["input.ids"][1:], tensors["input.mask"][1:])[0]
    batched = encoder.encode(tensors["input.ids"], tensors["input.mask"])[1]
    assert alone.shape == batched.shape == (6, 32)
    assert torch.allclose(alone, batched, rtol=0, atol=1e-6)


def test_pipeline_A_prompt_and_negative_prompt_contexts_come_out_as_recorded():
    from golden import GOLDENS

    _, tensors = load_golden("pipeline_A")
    cfg = T5Config(vocab_size=96, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=16)
    encoder = load_t5(GOLDENS / "pipeline_A.t5.safetensors", cfg, dtype=torch.float32, device="cpu")
    ids = torch.zeros(2, cfg.text_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, name in enumerate(("input.t5_ids_prompt", "input.t5_ids_negative")):
        ids[row, : tensors[name].numel()] = tensors[name]
        mask[row, : tensors[name].numel()] = 1
    prompt, negative = encoder.encode(ids, mask)
    assert rel_err(prompt, tensors["intermediate.context"]) < TOL
    assert rel_err(negative, tensors["intermediate.context_null"]) < TOL
