"""umT5-XXL text encoder on transformers' `UMT5Stack`, loading the official bf16 file as is.

Why transformers' class: the official encoder (wan/modules/t5.py) and `UMT5Stack` compute the same thing,
checked term by term and against the t5_A golden (bit-identical in float32 with eager attention):
- no 1/sqrt(d) scaling of the attention logits (UMT5Attention.scaling is 1.0);
- a relative-position embedding in EVERY layer (umT5, unlike T5, does not share layer 0's), bidirectional,
  32 buckets, max distance 128, the same bucket formula;
- gated-GELU FFN with the tanh GELU: `wo(gelu_tanh(wi_0(x)) * wi_1(x))` = official `fc2(fc1(x) * gate(x))`;
- RMS norm without mean or bias, eps 1e-6, variance in fp32, cast to the weight dtype before the
  multiply; a final RMS norm after the blocks;
- padding keys masked with the dtype's minimum in place of the position bias.
Only the keys differ, so `T5_KEY_MAP` renames them; `UMT5Stack` is the encoder alone (its own embedding,
no tied `shared` copy). Eager attention is used: it is the official arithmetic exactly (softmax of
logits + bias), and T5 runs once per video, so a fused kernel would buy nothing.

The tokenizer is the umt5-xxl folder shipped with Wan (`google/umt5-xxl`), its tokenizer.json loaded
verbatim (see `load_tokenizer` for why not AutoTokenizer), with the official text cleaning; a prompt's
encoding is cut to its real tokens (EOS included), as the DiT expects its context.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from itk.runtime.configs import T5Config
from itk.runtime.loading import WeightsError, dequantized_state, load_strict, read_state_dict
from itk.runtime.models.keymap import Rule, remap

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_SUBFOLDER = Path("google") / "umt5-xxl"

# Official key -> UMT5Stack key. The official FFN's `gate` (through GELU) is transformers' `wi_0`,
# its `fc1` (linear branch) is `wi_1`, its `fc2` is `wo`.
T5_KEY_MAP: tuple[Rule, ...] = (
    Rule(r"token_embedding\.weight", ("embed_tokens.weight",)),
    Rule(r"blocks\.(\d+)\.norm1\.weight", (r"block.\1.layer.0.layer_norm.weight",)),
    Rule(r"blocks\.(\d+)\.attn\.([qkvo])\.weight", (r"block.\1.layer.0.SelfAttention.\2.weight",)),
    Rule(
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        (r"block.\1.layer.0.SelfAttention.relative_attention_bias.weight",),
    ),
    Rule(r"blocks\.(\d+)\.norm2\.weight", (r"block.\1.layer.1.layer_norm.weight",)),
    Rule(r"blocks\.(\d+)\.ffn\.gate\.0\.weight", (r"block.\1.layer.1.DenseReluDense.wi_0.weight",)),
    Rule(r"blocks\.(\d+)\.ffn\.fc1\.weight", (r"block.\1.layer.1.DenseReluDense.wi_1.weight",)),
    Rule(r"blocks\.(\d+)\.ffn\.fc2\.weight", (r"block.\1.layer.1.DenseReluDense.wo.weight",)),
    Rule(r"norm\.weight", ("final_layer_norm.weight",)),
)

_BLOCK_KEYS = (
    "norm1.weight",
    "attn.q.weight",
    "attn.k.weight",
    "attn.v.weight",
    "attn.o.weight",
    "norm2.weight",
    "ffn.gate.0.weight",
    "ffn.fc1.weight",
    "ffn.fc2.weight",
    "pos_embedding.embedding.weight",
)

_HINT = "expected the official umT5-XXL encoder file; fetch it again with `itk fetch`"


def official_t5_keys(cfg: T5Config) -> list[str]:
    """Every key of the official encoder state dict for `cfg` (2 + 24 x 10 = 242 at the official sizes)."""
    blocks = [f"blocks.{i}.{name}" for i in range(cfg.num_layers) for name in _BLOCK_KEYS]
    return ["token_embedding.weight", *blocks, "norm.weight"]


def _umt5_stack(cfg: T5Config) -> nn.Module:
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Stack

    if cfg.shared_pos:
        raise ValueError("T5Config.shared_pos=True is plain T5; the umT5 encoder has per-layer positions")
    if cfg.dim_attn % cfg.num_heads:
        raise ValueError(f"T5Config.dim_attn {cfg.dim_attn} is not a multiple of num_heads {cfg.num_heads}")
    config = UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        is_decoder=False,
        is_encoder_decoder=False,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    stack = UMT5Stack(config)
    if stack.embed_tokens is None:  # transformers 4.x leaves the stack's embedding to its caller
        stack.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
    return stack


class T5Encoder(nn.Module):
    """The umT5 encoder; `model` is transformers' UMT5Stack holding the official weights."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.model = _umt5_stack(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, dim] for every position, padding included."""
        device = self.model.embed_tokens.weight.device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return out.last_hidden_state

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """One [len_i, dim] tensor per prompt: its real tokens only (len_i = sum of its mask row)."""
        hidden = self.forward(ids, mask)
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [row[:n] for row, n in zip(hidden, lengths, strict=True)]


def t5_from_state(
    state: dict[str, torch.Tensor], source: str, cfg: T5Config, *, dtype: torch.dtype, device: torch.device | str
) -> T5Encoder:
    """The encoder from an official-key state dict, built on meta and filled once in `dtype` on `device`."""
    with torch.device("meta"):
        encoder = T5Encoder(cfg)
    mapped = remap(state, T5_KEY_MAP, expected=official_t5_keys(cfg), module=encoder.model, source=source,
                   hint=_HINT)
    load_strict(encoder.model, mapped, source, dtype=dtype, device=device)
    return encoder.eval().requires_grad_(False)


def load_t5(path: str | Path, cfg: T5Config, *, dtype: torch.dtype, device: torch.device | str) -> T5Encoder:
    """The encoder from the official bf16 `.pth`."""
    return t5_from_state(read_state_dict(path), str(path), cfg, dtype=dtype, device=device)


def load_t5_fp8(
    path: str | Path, map_path: str | Path, cfg: T5Config, *, dtype: torch.dtype, device: torch.device | str
) -> T5Encoder:
    """The encoder from the official FP8 T5 file + its map, dequantised to `dtype`.

    The T5 runs once per job, so its weights are dequantised at load rather than kept in FP8.
    """
    state = dequantized_state(Path(path), Path(map_path), dtype=dtype, device=device)
    return t5_from_state(state, str(path), cfg, dtype=dtype, device=device)


def clean_prompt(text: str) -> str:
    """The official cleaning: ftfy repairs, HTML entities undone twice, whitespace runs collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


class Tokenizer:
    """Cleaned prompts -> (ids, mask) [B, text_len] int64: EOS appended, truncated/padded to text_len."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_len: int):
        self.tokenizer = tokenizer
        self.text_len = text_len

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"].long(), batch["attention_mask"].long()


def load_tokenizer(folder: str | Path, text_len: int) -> Tokenizer:
    """The umt5-xxl tokenizer of a Wan folder (its `google/umt5-xxl`), or of that subfolder itself.

    Its `tokenizer.json` is loaded verbatim with PreTrainedTokenizerFast, which is what the official
    `AutoTokenizer` call resolved to (T5TokenizerFast) on the transformers 4.x it was written for.
    transformers 5's AutoTokenizer instead rebuilds a T5 tokenizer from the vocabulary alone, with
    unk id 2 and no byte fallback: umt5 keeps `<s>` at 2 and `<unk>` at 3, so characters outside the
    vocabulary would turn into `<s>` instead of the official pieces (tests/test_t5.py shows it).
    """
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    path = folder / TOKENIZER_SUBFOLDER if (folder / TOKENIZER_SUBFOLDER).is_dir() else folder
    if not (path / "tokenizer.json").is_file():
        where = folder / TOKENIZER_SUBFOLDER
        raise WeightsError(f"{where}: no umt5-xxl tokenizer.json here; fetch the Wan2.1 folder: `itk fetch`")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot load the tokenizer ({exc}); fetch it again: `itk fetch`") from exc
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise WeightsError(f"{path}: the tokenizer names no pad or eos token; fetch it again: `itk fetch`")
    return Tokenizer(tokenizer, text_len)
