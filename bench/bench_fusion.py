"""The compiled block's element-wise work (issue 17, part 2): Inductor options and same-math rewrites, measured.

One full-size FP8 block at 480p (L = 33,600) under torch.compile, once per variant: Inductor options over
the runtime's (runtime/offload.py COMPILE_OPTIONS) and/or an op put back as the second round wrote it.
For each: median block ms, the kernel profile (element-wise Triton kernels vs attention vs matmuls, the top
kernels), the cosine of the block's update (output - input) against the eager FP8 block with SDPA, and of its
output and update against the same weights in bf16 (eager, SDPA: the issue's fidelity bar, >= 0.999). The
current block's generated code (Inductor's output module) is copied next to the JSON so the slow kernels can
be read off line.

Run on the device:  python bench/bench_fusion.py --out $OUT/fusion-h200.json [--attention sdpa] [--only a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from bench_speed import cosine, kernel_profile, median_ms  # noqa: E402
from kernel_request import refuse_fallback, require_attention  # noqa: E402

from itk.runtime.atomic import atomic_write_text  # noqa: E402


def _stacked_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope_apply before the third round: the two rotated halves stacked (materialised in float32)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3)


def _dividing_quantizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activations before the third round: a division per element."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def _swap(owner: object, name: str, value: object) -> Callable[[], None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    return lambda: setattr(owner, name, old)


def transposed_tokens(block: nn.Module, state: dict) -> Callable[[], None]:
    """The residual stream as embed gave it before: a transposed view of the patch embedding's output."""
    tokens = state["tokens"]
    state["tokens"] = tokens.transpose(1, 2).contiguous().transpose(1, 2)
    return lambda: state.__setitem__("tokens", tokens)


def rope_stack(block: nn.Module, state: dict) -> Callable[[], None]:
    import itk.runtime.models.dit as dit

    return _swap(dit, "rope_apply", _stacked_rope)


def quant_div(block: nn.Module, state: dict) -> Callable[[], None]:
    import itk.runtime.quant as quant

    return _swap(quant, "quantize_activations", _dividing_quantizer)


def gelu_apart(block: nn.Module, state: dict) -> Callable[[], None]:
    """The FFN as before: GELU as its own op, the second matmul quantising its output."""
    ffn = block.ffn
    return _swap(ffn, "forward", lambda x: ffn[2](ffn[1](ffn[0](x))))


def separate_quant(block: nn.Module, state: dict) -> Callable[[], None]:
    """q, k and v each quantising the block's normalised input for itself."""
    import itk.runtime.models.dit as dit

    return _swap(dit, "shared_input", lambda x, layers: [layer(x) for layer in layers])


def fa4_all_keys(block: nn.Module, state: dict) -> Callable[[], None]:
    """FlashAttention-4 on the cross-attentions too (text 512, image 257, audio 32 keys), not only the video's."""
    import itk.runtime.attention as attention

    return _swap(attention, "LONG_KEYS", 0)


def exact_accum(block: nn.Module, state: dict) -> Callable[[], None]:
    """FP8 matmuls accumulating with the periodic float32 promotion (no use_fast_accum), as before the fourth round."""
    from itk.runtime.quant import FP8Linear

    kernel = next(m.kernel for m in block.modules() if isinstance(m, FP8Linear))
    return _swap(kernel, "fast_accum", False)


def tanh_gelu(block: nn.Module, state: dict) -> Callable[[], None]:
    """The FFN's folded quantiser with F.gelu's tanh (libdevice) instead of the sigmoid form."""
    import itk.runtime.quant as quant

    return _swap(quant, "gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))


def welford_ln(block: nn.Module, state: dict) -> Callable[[], None]:
    """The block's LayerNorms as F.layer_norm inside the compiled graph too (Inductor's Welford reduction)."""
    import itk.runtime.models.dit as dit

    def forward(self, x):
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)

    return _swap(dit.LayerNorm, "forward", forward)


PATCHES: dict[str, Callable[[nn.Module, dict], Callable[[], None]]] = {
    "transposed_tokens": transposed_tokens, "rope_stack": rope_stack, "quant_div": quant_div,
    "gelu_apart": gelu_apart, "separate_quant": separate_quant, "fa4_all_keys": fa4_all_keys,
    "exact_accum": exact_accum, "tanh_gelu": tanh_gelu, "welford_ln": welford_ln}
NO_AUTOTUNE = {"max_autotune_pointwise": False}
# name -> (compile options over the runtime's COMPILE_OPTIONS, patches). "before" is the block as the second
# round left it; each "without_*" puts one of the third round's changes back: what that change bought.
VARIANTS: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "before": (NO_AUTOTUNE, ("transposed_tokens", "rope_stack", "quant_div", "gelu_apart", "separate_quant",
                            "exact_accum")),
    "current": ({}, ()),
    "without_contiguous_tokens": ({}, ("transposed_tokens",)),
    "without_fused_rope": ({}, ("rope_stack",)),
    "without_reciprocal_quant": ({}, ("quant_div",)),
    "without_gelu_in_quantiser": ({}, ("gelu_apart",)),
    "without_shared_qkv_quant": ({}, ("separate_quant",)),
    "without_autotune_pointwise": (NO_AUTOTUNE, ()),
    "current_coordinate_descent": ({"coordinate_descent_tuning": True}, ()),
    "current_fa4_all_keys": ({}, ("fa4_all_keys",)),  # with --attention fa4
    # Inductor compiles each reduction persistent (row in registers) and looped, keeps the faster at run time
    "current_multi_kernel": ({"triton.multi_kernel": 1}, ()),
    "without_fast_accum": ({}, ("exact_accum",)),
    "without_sigmoid_gelu": ({}, ("tanh_gelu",)),
    "without_twopass_ln": ({}, ("welford_ln",)),
    "without_both_fifth": ({}, ("tanh_gelu", "welford_ln")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/fusion-h200.json")
    parser.add_argument("--attention", default="sdpa", help="the runtime's attention choice for every variant")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    opts = parser.parse_args()
    require_attention(opts.attention)  # an explicit kernel that cannot run is refused, never measured as SDPA
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    code_dir = Path("/tmp/itk-fusion-inductor")
    shutil.rmtree(code_dir, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(code_dir)  # a fresh cache: every variant compiles, code is findable

    from bench_dit_step import inputs, random_dit, to_fp8

    from itk.runtime.attention import Attention
    from itk.runtime.configs import DiTConfig
    from itk.runtime.models.dit import rope_angles
    from itk.runtime.offload import COMPILE_OPTIONS
    from itk.runtime.quant import FP8Kernel

    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {},
                    "note": "block ms includes the attention, whose time drifts by a few % between variants on "
                            "one GPU; compare kernels.ms.fused_elementwise_triton for the element-wise work"}

    def save() -> None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")

    model = random_dit(DiTConfig(num_layers=1), None, "cuda")  # bf16 on SDPA first: the fidelity reference
    names = opts.only.split(",") if opts.only else list(VARIANTS)
    with torch.no_grad():
        tokens, grid, _, e0, ctx, audio = model.embed(*inputs(DiTConfig(), "cuda"))
        rope = rope_angles(grid, model.rope, tokens.device)
        rest = (e0, ctx, audio, grid, rope)
        ref_bf16 = model.blocks[0](tokens, *rest)
        block = to_fp8(model, FP8Kernel()).blocks[0]  # the same weights quantised as the official FP8 files are
        ref = block(tokens, *rest)
        result["eager_fp8_vs_bf16_sdpa"] = {"cosine": round(cosine(ref, ref_bf16), 6),
                                            "update_cosine": round(cosine(ref - tokens, ref_bf16 - tokens), 6)}
        attention = Attention.resolve(opts.attention, "cuda")
        refuse_fallback(opts.attention, attention.name)
        result["attention"] = attention.name
        # the same weights again (same seed), their attentions on the chosen kernel
        block = to_fp8(random_dit(DiTConfig(num_layers=1), None, "cuda", attention=attention), FP8Kernel()).blocks[0]
        for name in names:
            switches, patches = VARIANTS[name]
            entry = result["variants"][name] = {"switches": {k: str(v) for k, v in switches.items()},
                                                "patches": list(patches)}
            undo = []
            try:
                state = {"tokens": tokens}
                undo += [PATCHES[p](block, state) for p in patches]
                args = (state["tokens"], *rest)
                torch._dynamo.reset()
                compiled = torch.compile(block, options={**COMPILE_OPTIONS, **switches})
                t0 = time.perf_counter()
                ours = compiled(*args)
                torch.cuda.synchronize()
                entry["compile_s"] = round(time.perf_counter() - t0, 1)
                entry["ms"] = round(median_ms(lambda compiled=compiled, args=args: compiled(*args)), 2)
                entry["update_cosine_vs_eager_sdpa"] = round(cosine(ours - tokens, ref - tokens), 6)
                entry["vs_bf16_sdpa"] = {"cosine": round(cosine(ours, ref_bf16), 6),
                                         "update_cosine": round(cosine(ours - tokens, ref_bf16 - tokens), 6)}
                entry["kernels"] = kernel_profile(lambda compiled=compiled, args=args: compiled(*args))
                if name == "current":
                    codes = sorted(code_dir.rglob("*.py"), key=lambda p: p.stat().st_size)
                    calls = [p for p in codes if "def call(" in p.read_text(errors="replace")]
                    if calls:
                        shutil.copy(calls[-1], out.with_name(out.stem + "-current-code.py"))
            except Exception as exc:  # noqa: BLE001 - keep the other variants
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            finally:
                for fn in reversed(undo):
                    fn()
            print(name, {k: entry.get(k) for k in ("ms", "update_cosine_vs_eager_sdpa", "error")}, flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
