"""Tiny random weights in the exact official file layout, for `itk selftest` and the end-to-end tests.

Every file a real run opens is written in its official format under the manifest's name and folder
(runtime/manifest.toml): the Wan folder (config, the VAE/CLIP/T5 `.pth` state dicts, the
umT5 tokenizer folder, the DiT shards with their index), chinese-wav2vec2-base (config, preprocessor
config, the weights of a Wav2Vec2ForPreTraining), InfiniteTalk's single-speaker adapter and its FP8 set
(with `multi`, the two-speaker adapter and FP8 DiT too). So
`root` works as an itk `--weights-dir`. Only the sizes are tiny, and `itk_model_config.json` says so. The
DiT, CLIP and T5 key sets are written from the official key lists here, not from our model classes, so a
strict load of these files also checks our classes.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from itk.runtime.configs import MODEL_CONFIG_FILE, config_from_dict
from itk.runtime.manifest import Manifest, WeightFile, load_manifest
from itk.runtime.protocol import SAMPLE_RATE, SIZES
from itk.runtime.weights import base_dit, tokenizer_folder, wav2vec_weights


def tiny_sizes() -> dict[str, Any]:
    """The tiny sizes (those of the pipeline_A golden), as the itk_model_config.json of the tiny folder says
    them; the bucket table replaces infinitetalk-480's for this folder. A fresh dict on every call."""
    return {
        "dit": {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "text_dim": 32, "text_len": 16,
                "clip_dim": 24, "audio_blocks": 3, "audio_channels": 16, "audio_intermediate_dim": 16,
                "audio_output_dim": 32, "audio_context_tokens": 4},
        "vae": {"dim": 4},
        "t5": {"vocab_size": 64, "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 4, "num_layers": 2,
               "text_len": 16},
        "clip": {"width": 24, "heads": 4, "layers": 3},
        "buckets": {SIZES[0]: {"1.00": [32, 32], "0.67": [32, 48], "1.50": [48, 32]}},
    }


CLIP_TEXT = MappingProxyType({"dim": 16, "heads": 2, "layers": 1, "vocab": 40, "max_len": 16, "embed_dim": 16})
WAV2VEC = MappingProxyType({
    "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
    "conv_dim": (16,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_bias": False, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "feat_extract_norm": "group", "do_stable_layer_norm": False, "num_codevectors_per_group": 8,
    "num_codevector_groups": 2, "codevector_dim": 8, "proj_codevector_dim": 8,
})
CORPUS_WORDS = ("A The . , a the person woman man is talking speaks to camera smiles looks at viewer slowly clearly in "
                "bright room light face hair eyes mouth says hello good morning today we talk about things "
                "overexposed static blurred details subtitles style works paintings images gray worst quality "
                "low JPEG compression residue ugly incomplete extra fingers poorly drawn hands faces deformed "
                "disfigured misshapen limbs fused still picture messy background three legs many people "
                "walking backwards").split()


@dataclass(frozen=True, kw_only=True)
class TinyLayout:
    ckpt_dir: Path
    wav2vec_dir: Path
    infinitetalk: Path
    fp8_dit: Path  # the manifest's single-speaker FP8 DiT (its map and the FP8 T5 + map beside it)
    multi_infinitetalk: Path | None = None  # with multi: the two-speaker adapter and FP8 DiT (own random weights)
    multi_fp8_dit: Path | None = None


def _dit_shapes(d: dict) -> dict[str, tuple[int, ...]]:
    """The official DiT keys (the checkpoint's names) for the given sizes: base first, then the adapter."""
    D, F, C = d["dim"], d["ffn_dim"], d["clip_dim"]
    s: dict[str, tuple[int, ...]] = {}

    def lin(name: str, out: int, inp: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (out, inp), (out,)

    s["patch_embedding.weight"], s["patch_embedding.bias"] = (D, 36, 1, 2, 2), (D,)
    lin("text_embedding.0", D, d["text_dim"])
    lin("text_embedding.2", D, D)
    lin("time_embedding.0", D, 256)
    lin("time_embedding.2", D, D)
    lin("time_projection.1", 6 * D, D)
    for n in range(d["num_layers"]):
        b = f"blocks.{n}"
        s[f"{b}.modulation"] = (1, 6, D)
        for p in "qkvo":
            lin(f"{b}.self_attn.{p}", D, D)
        s[f"{b}.self_attn.norm_q.weight"] = s[f"{b}.self_attn.norm_k.weight"] = (D,)
        s[f"{b}.norm3.weight"] = s[f"{b}.norm3.bias"] = (D,)
        for p in ("q", "k", "v", "o", "k_img", "v_img"):
            lin(f"{b}.cross_attn.{p}", D, D)
        for p in ("norm_q", "norm_k", "norm_k_img"):
            s[f"{b}.cross_attn.{p}.weight"] = (D,)
        lin(f"{b}.ffn.0", F, D)
        lin(f"{b}.ffn.2", D, F)
    s["head.modulation"] = (1, 2, D)
    lin("head.head", 16 * 4, D)
    s["img_emb.proj.0.weight"] = s["img_emb.proj.0.bias"] = (C,)
    lin("img_emb.proj.1", C, C)
    lin("img_emb.proj.3", D, C)
    s["img_emb.proj.4.weight"] = s["img_emb.proj.4.bias"] = (D,)
    return s


def _adapter_shapes(d: dict) -> dict[str, tuple[int, ...]]:
    D, inter, out = d["dim"], d["audio_intermediate_dim"], d["audio_output_dim"]
    per_frame = d["audio_blocks"] * d["audio_channels"]
    s: dict[str, tuple[int, ...]] = {}

    def lin(name: str, o: int, i: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i), (o,)

    lin("audio_proj.proj1", inter, 5 * per_frame)
    lin("audio_proj.proj1_vf", inter, 8 * per_frame)
    lin("audio_proj.proj2", inter, inter)
    lin("audio_proj.proj3", d["audio_context_tokens"] * out, inter)
    s["audio_proj.norm.weight"] = s["audio_proj.norm.bias"] = (out,)
    for n in range(d["num_layers"]):
        b = f"blocks.{n}"
        lin(f"{b}.audio_cross_attn.q_linear", D, D)
        lin(f"{b}.audio_cross_attn.kv_linear", 2 * D, out)
        lin(f"{b}.audio_cross_attn.proj", D, D)
        s[f"{b}.norm_x.weight"] = s[f"{b}.norm_x.bias"] = (D,)
    return s


def _t5_shapes(t: dict) -> dict[str, tuple[int, ...]]:
    s = {"token_embedding.weight": (t["vocab_size"], t["dim"]), "norm.weight": (t["dim"],)}
    for n in range(t["num_layers"]):
        b = f"blocks.{n}"
        s[f"{b}.norm1.weight"] = s[f"{b}.norm2.weight"] = (t["dim"],)
        for p in "qkv":
            s[f"{b}.attn.{p}.weight"] = (t["dim_attn"], t["dim"])
        s[f"{b}.attn.o.weight"] = (t["dim"], t["dim_attn"])
        s[f"{b}.ffn.gate.0.weight"] = s[f"{b}.ffn.fc1.weight"] = (t["dim_ffn"], t["dim"])
        s[f"{b}.ffn.fc2.weight"] = (t["dim"], t["dim_ffn"])
        s[f"{b}.pos_embedding.embedding.weight"] = (32, t["num_heads"])
    return s


def _clip_shapes(c: dict, text: dict) -> dict[str, tuple[int, ...]]:
    """The whole XLM-RoBERTa CLIP as the official .pth holds it: visual, textual and log_scale."""
    w, tokens, m = c["width"], (224 // 14) ** 2 + 1, c["width"] * 4
    s: dict[str, tuple[int, ...]] = {
        "log_scale": (), "visual.patch_embedding.weight": (w, 3, 14, 14), "visual.cls_embedding": (1, 1, w),
        "visual.pos_embedding": (1, tokens, w), "visual.head": (w, text["embed_dim"]),
    }
    for norm in ("visual.pre_norm", "visual.post_norm"):
        s[f"{norm}.weight"] = s[f"{norm}.bias"] = (w,)
    for n in range(c["layers"]):
        b = f"visual.transformer.{n}"
        for name, shape in (("attn.to_qkv", (3 * w, w)), ("attn.proj", (w, w)), ("mlp.0", (m, w)),
                            ("mlp.2", (w, m))):
            s[f"{b}.{name}.weight"], s[f"{b}.{name}.bias"] = shape, (shape[0],)
        for norm in ("norm1", "norm2"):
            s[f"{b}.{norm}.weight"] = s[f"{b}.{norm}.bias"] = (w,)
    d = text["dim"]
    s.update({"textual.token_embedding.weight": (text["vocab"], d), "textual.type_embedding.weight": (1, d),
              "textual.pos_embedding.weight": (text["max_len"], d), "textual.norm.weight": (d,),
              "textual.norm.bias": (d,), "textual.head.0.weight": (d, d),
              "textual.head.2.weight": (text["embed_dim"], d)})
    for n in range(text["layers"]):
        b = f"textual.blocks.{n}"
        for name, shape in (("attn.q", (d, d)), ("attn.k", (d, d)), ("attn.v", (d, d)), ("attn.o", (d, d)),
                            ("ffn.0", (4 * d, d)), ("ffn.2", (d, 4 * d))):
            s[f"{b}.{name}.weight"], s[f"{b}.{name}.bias"] = shape, (shape[0],)
        for norm in ("norm1", "norm2"):
            s[f"{b}.{norm}.weight"] = s[f"{b}.{norm}.bias"] = (d,)
    return s


def _random(shapes: dict[str, tuple[int, ...]], gen: torch.Generator, dtype=torch.float32) -> dict:
    """Seeded small normals; norm gains near 1 so activations keep a sane scale through the layers."""
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.1
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "gamma")):
            t += 1.0
        out[key] = t.to(dtype).contiguous()
    return out


def _vae_state(cfg, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The VAE's keys come from our WanVAE, whose attribute names are the official keys."""
    from itk.runtime.models.vae import WanVAE

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
    return _random(shapes, gen)


def _sentencepiece(folder: Path, model_file: str, seed: int, ids: dict[str, int], eos: str) -> int:
    """Train a tiny unigram sentencepiece model on made-up sentences; write it and its tokenizer.json."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(CORPUS_WORDS) for _ in range(10)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=tiny_sizes()["t5"]["vocab_size"],
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, **ids,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / model_file).write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=ids["unk_id"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, ids["eos_id"])])
    tok.save(str(folder / "tokenizer.json"))
    return sp.get_piece_size()


def _tokenizer(folder: Path, seed: int) -> int:
    """The umT5 tokenizer folder (spiece.model, tokenizer.json, both configs); returns its vocab size."""
    size = _sentencepiece(folder, "spiece.model", seed, {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1},
                          "</s>")
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return size


def _xlm_tokenizer(folder: Path, seed: int) -> None:
    """The xlm-roberta-large folder the official CLIP loader opens (never used for inference)."""
    _sentencepiece(folder, "sentencepiece.bpe.model", seed, {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3},
                   "</s>")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _wav2vec(folder: Path, seed: int, weights: WeightFile) -> None:
    """transformers writes the config, the preprocessor config and the weights under their own names; the
    weights are then moved to the manifest's name (the same one today)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining
    from transformers.utils import SAFE_WEIGHTS_NAME
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = Wav2Vec2ForPreTraining(Wav2Vec2Config(**WAV2VEC))
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / SAFE_WEIGHTS_NAME).replace(folder / weights.path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(str(folder))


def _shards(state: dict[str, torch.Tensor], ckpt: Path, manifest: Manifest) -> None:
    """The state split over the manifest's shard files, plus the (unread) index the real repo carries."""
    from safetensors.torch import save_file

    names = [f.path for f in base_dit(manifest)]
    keys = list(state)
    weight_map, total = {}, 0
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::len(names)]}
        save_file(part, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (ckpt / _only(manifest, "dit-index").path).write_text(json.dumps(index, indent=2))


def _fp8_files(dit: dict[str, torch.Tensor], t5: dict[str, torch.Tensor], root: Path, manifest: Manifest) -> Path:
    """The README's FP8 set: the whole DiT and the T5 with every Linear in quanto's FP8 layout."""
    from itk.runtime.quant import write_quantized

    dit_file, t5_file = _only(manifest, "dit", "fp8", "single"), _only(manifest, "t5", "fp8")
    assert dit_file.map is not None and t5_file.map is not None
    path = dit_file.local_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    linears = [k.removesuffix(".weight") for k, v in dit.items() if k.endswith(".weight") and v.dim() == 2]
    write_quantized(dit, linears, path, dit_file.map.local_path(root))
    t5_linears = [k.removesuffix(".weight") for k in t5 if ".attn." in k or ".ffn." in k]
    write_quantized(t5, t5_linears, t5_file.local_path(root), t5_file.map.local_path(root))
    return path


def _only(manifest: Manifest, role: str, precision: str | None = None, variant: str | None = None) -> WeightFile:
    """The manifest's one file of `role` that tiny weights stand in for (variant single where it matters)."""
    files = [f for f in manifest.select(role, precision, variant) if variant is None or f.variant == variant]
    assert len(files) == 1, (role, precision, variant, files)
    return files[0]


def _multi_files(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], root: Path,
                 manifest: Manifest) -> tuple[Path, Path]:
    """The two-speaker variant in the official layout: its unquantised adapter and its whole FP8 DiT (the
    FP8 T5 is the one both variants share)."""
    from safetensors.torch import save_file

    from itk.runtime.quant import write_quantized

    adapter_file, dit_file = _only(manifest, "dit", None, "multi"), _only(manifest, "dit", "fp8", "multi")
    assert dit_file.map is not None
    infinitetalk, fp8 = adapter_file.local_path(root), dit_file.local_path(root)
    infinitetalk.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(infinitetalk), metadata={"format": "pt"})
    dit = {**base, **adapter}
    linears = [k.removesuffix(".weight") for k, v in dit.items() if k.endswith(".weight") and v.dim() == 2]
    write_quantized(dit, linears, fp8, dit_file.map.local_path(root))
    return infinitetalk, fp8


def write_tiny_weights(root: str | Path, seed: int = 0, multi: bool = False) -> TinyLayout:
    """Write the three weight folders under `root` (the manifest's local_dirs) and return their paths.
    multi: also InfiniteTalk's two-speaker files (drawn after everything else: the rest stays the same)."""
    from safetensors.torch import save_file

    root, manifest = Path(root), load_manifest()
    ckpt, wav2vec = (root / manifest.repos[key].local_dir for key in ("wan", "wav2vec2"))
    infinitetalk = _only(manifest, "dit", None, "single").local_path(root)
    for folder in (ckpt, wav2vec, infinitetalk.parent):
        folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tiny = tiny_sizes()
    tiny["t5"]["vocab_size"] = max(tiny["t5"]["vocab_size"], _tokenizer(tokenizer_folder(ckpt, manifest), seed))
    _xlm_tokenizer(ckpt / Path(manifest.select("clip-tokenizer")[0].path).parent, seed)
    (ckpt / MODEL_CONFIG_FILE).write_text(json.dumps(tiny, indent=2))
    cfg = config_from_dict(tiny)
    d = tiny["dit"]
    (ckpt / _only(manifest, "config").path).write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v", "text_len": d["text_len"],
        "in_dim": 36, "dim": d["dim"], "ffn_dim": d["ffn_dim"], "freq_dim": 256, "out_dim": 16,
        "num_heads": d["num_heads"], "num_layers": d["num_layers"], "eps": 1e-06}, indent=2))
    base, adapter = _random(_dit_shapes(d), gen), _random(_adapter_shapes(d), gen)
    _shards(base, ckpt, manifest)
    save_file(adapter, str(infinitetalk), metadata={"format": "pt"})
    t5 = _random(_t5_shapes(tiny["t5"]), gen, torch.bfloat16)
    torch.save(t5, ckpt / _only(manifest, "t5").path)
    fp8_dit = _fp8_files({**base, **adapter}, t5, root, manifest)
    torch.save(_random(_clip_shapes(tiny["clip"], CLIP_TEXT), gen), ckpt / _only(manifest, "clip").path)
    torch.save(_vae_state(cfg.vae, gen), ckpt / _only(manifest, "vae").path)
    _wav2vec(wav2vec, seed, wav2vec_weights(manifest))
    if not multi:
        return TinyLayout(ckpt_dir=ckpt, wav2vec_dir=wav2vec, infinitetalk=infinitetalk, fp8_dit=fp8_dit)
    multi_files = _multi_files(base, _random(_adapter_shapes(d), gen), root, manifest)
    multi_infinitetalk, multi_fp8_dit = multi_files
    return TinyLayout(ckpt_dir=ckpt, wav2vec_dir=wav2vec, infinitetalk=infinitetalk, fp8_dit=fp8_dit,
                      multi_infinitetalk=multi_infinitetalk, multi_fp8_dit=multi_fp8_dit)
