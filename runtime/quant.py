"""FP8 weights: the arithmetic of the official quantised files (their reader is in runtime/loading.py).

Format (optimum-quanto 0.2.6, as the official FP8 files store it): for every Linear `P` named in the companion JSON map,
`P.weight._data` (float8_e4m3fn [out, in]), `P.weight._scale` ([out, 1], per output row), `P.bias`, and the
scalars `P.input_scale` / `P.output_scale` (1.0 with `"activations": "none"`). Every other tensor is stored
plain under its usual name. quanto loads these with strict=False and silently leaves a missing weight
uninitialised; we check coverage key by key and name what is missing.

`FP8Linear` keeps the weight in FP8 (half the memory of bf16, which is what lets a 24 GB card and a 32 GB
host hold the 14B model) and follows gpt-fast's shape: two buffers and a short forward. Two compute paths:
- GPUs with FP8 tensor cores (compute capability >= 8.9) and bf16 activations: a real FP8 matmul,
  `torch._scaled_mm` with the per-row weight scales and the activations quantised per token (row-wise
  absmax / 448). The activation quantisation is one `torch.compile`d function: Inductor fuses the row
  absmax, the division and the cast into a single Triton kernel (one read of x, one fp8 write). Eager it is
  four passes over x, which on the H100 made FP8 linears slower than bf16 (measured: 40.6 vs 32.9 ms per
  block). torch.compile rather than a hand-written Triton kernel: same fusion, no code
  of ours to keep correct per GPU, and Triton ships with torch. torchao's float8 inference would serve too
  but is one more dependency for ~20 lines.
- Elsewhere (CPU, pre-Ada GPUs, float32 activations, odd shapes): the weight is dequantised per layer to
  the activation dtype (data * scale) right before `F.linear`, quanto's weight-only arithmetic.
Which path runs is decided by one `FP8Kernel` per run, given to every FP8Linear: `FP8Kernel(matmul=False)`
(ITK_FP8_MATMUL=0, read by runtime/options.py) forces the second path everywhere (for comparisons, or if a
driver misbehaves), and the kernel remembers what this torch/GPU refused at run time.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from itk.runtime.atomic import atomic_write, atomic_write_text

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
GELU_DIP = 0.1701  # just above |min of the tanh GELU| (0.17004, at x = -0.7518)
SQRT_8_OVER_PI = 1.5957691216057308  # 2 * sqrt(2 / pi)
WEIGHTS_QTYPE = "qfloat8_e4m3fn"
# The quanto names of one quantised Linear `P`, and where each goes in FP8Linear.
QUANTO_KEYS = MappingProxyType({"weight._data": "weight", "weight._scale": "scale"})
QUANTO_SCALARS = ("input_scale", "output_scale")
Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger(__name__)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]): per-token absmax scaling.

    x is multiplied by 448 / absmax (one division per row) rather than divided by the scale (one per
    element): the compiled quantisation kernels were bound by instructions, not memory, and the two agree
    to the last bit of float32 before the FP8 rounding."""
    return _to_fp8(x.float(), x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU, 0.5 x (1 + tanh u) with u = sqrt(2/pi) (x + 0.044715 x^3), written x * sigmoid(2u)
    (the same function: 0.5 (1 + tanh u) = sigmoid(2u)). A compiled kernel then spends one exp per element
    where libdevice's tanh took a long polynomial: the FFN's quantiser kernel was bound by that tanh."""
    return x * torch.sigmoid(SQRT_8_OVER_PI * (x + 0.044715 * x * x * x))


def quantize_gelu(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (tanh form) of the pre-activation h [M, K], quantised like quantize_activations, with each row's
    absmax bounded from the row's maximum of h instead of a pass computing GELU for it: the tanh GELU rises
    monotonically above -0.7518 and its values below that never leave (-GELU_DIP, 0], so
    max |gelu(h)| <= max(gelu(max h), GELU_DIP), equal to it whenever gelu(max h) >= GELU_DIP (a row whose
    maximum is above 0.27: every FFN row of a trained model). A row below that gets a scale a little larger
    than its absmax, which loses a little precision and clips nothing. The compiled kernel computes GELU
    once per element instead of twice (that kernel was bound by instructions)."""
    top = gelu_tanh(h.amax(dim=1, keepdim=True).float()).clamp_min(GELU_DIP)
    return _to_fp8(gelu_tanh(h.float()), top)


def _to_fp8(values: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 values [M, K] with a per-row bound amax [M, 1] -> (FP8 data, float32 scale amax / 448)."""
    return (values * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / FP8_MAX


@functools.cache
def _fused_quantize() -> Quantizer:
    """quantize_activations compiled once (dynamic in the token count, so no recompile per shape)."""
    return torch.compile(quantize_activations, dynamic=True, fullgraph=True)


@functools.cache
def has_fp8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
    quantize: Quantizer | None = None, bias_in_matmul: bool = True, fast_accum: bool = False,
) -> torch.Tensor:
    """x [..., K] bf16 @ (weight [N, K] fp8 * scale [N, 1])^T + bias, as one FP8 tensor-core matmul
    (x quantised by `quantize`, default quantize_activations)."""
    xq, xs = (quantize or quantize_activations)(x.reshape(-1, x.shape[-1]))
    return scaled_matmul(xq, xs, x, weight, scale, bias, bias_in_matmul=bias_in_matmul, fast_accum=fast_accum)


def scaled_matmul(
    xq: torch.Tensor, xs: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None, *, bias_in_matmul: bool = True, fast_accum: bool = False,
) -> torch.Tensor:
    """The FP8 matmul of x already quantised (xq [M, K] fp8, xs [M, 1]); x [..., K] gives shape and dtype.
    fast_accum: Hopper's FP8 tensor cores accumulate at reduced precision without the periodic promotion
    to float32 (FP8Kernel.fast_accum says when that is taken)."""
    scale_b = scale.float().reshape(1, -1)
    bias = None if bias is None else bias.to(x.dtype)
    mm = functools.partial(torch._scaled_mm, scale_a=xs, scale_b=scale_b, out_dtype=x.dtype, use_fast_accum=fast_accum)
    if bias is not None and not bias_in_matmul:
        out = mm(xq, weight.t()) + bias
    else:
        out = mm(xq, weight.t(), bias=bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def shared_input(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """x through several Linears that all read it (the self-attention's q, k and v). FP8 layers fused in a
    compiled graph quantise x once between them: left apart, Inductor computed the same scales and wrote
    the same FP8 copy of x once per layer."""
    if layers and all(isinstance(layer, FP8Linear) and layer.kernel.fuses(layer, x) for layer in layers):
        xq, xs = quantize_activations(x.reshape(-1, x.shape[-1]))
        return [layer.kernel.run_quantized(layer, xq, xs, x) for layer in layers]
    return [layer(x) for layer in layers]


class FP8Kernel:
    """The FP8 compute policy of one run and what this machine refused while running.

    `matmul`: use FP8 tensor-core matmuls where the GPU has them (else weights are dequantised per layer).
    `fast_accum`: let those matmuls accumulate at the tensor cores' own precision (use_fast_accum; see
    RuntimeOptions.fp8_fast_accum for what it gains and costs).
    Learned at run time, each logged once and never retried: `matmul_error` (why the FP8 matmul was turned
    off: a run that cannot use it still runs, dequantised), `bias_in_matmul` (some torch versions take no
    bias with row-wise scales), `fused_quantize` (False once compiling the activation quantiser failed).
    One object is shared by every FP8Linear of a run, including copies made for streaming.
    """

    def __init__(self, matmul: bool = True, fast_accum: bool = True):
        self.matmul = matmul
        self.fast_accum = fast_accum
        self.matmul_error = ""
        self.bias_in_matmul = True
        self.fused_quantize = True

    def __deepcopy__(self, memo: dict) -> FP8Kernel:
        return self  # run-wide state: a copied layer (a streaming slot) must share it, not fork it

    @property
    def matmul_active(self) -> bool:
        """FP8 matmuls asked for and not refused so far."""
        return self.matmul and not self.matmul_error

    def uses_matmul(self, layer: FP8Linear, x: torch.Tensor) -> bool:
        return (self.matmul_active and x.dtype == torch.bfloat16 and has_fp8_matmul(x.device)
                and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)

    def fuses(self, layer: FP8Linear, x: torch.Tensor) -> bool:
        """Whether `layer` may take its input in a form fused into the activation quantisation (GELU's
        pre-activation, FP8Linear.after_gelu; or x quantised once for several layers, shared_input): an FP8
        matmul inside a compiled graph, where the quantiser fuses, with no LoRA side path (that needs the
        plain input)."""
        return torch.compiler.is_compiling() and layer.lora_down is None and self.uses_matmul(layer, x)

    def run(self, layer: FP8Linear, x: torch.Tensor, quantize: Quantizer | None = None) -> torch.Tensor:
        """`layer`'s FP8 matmul on x with this run's settings (x quantised by `quantize`, default
        quantize_activations); no fallback."""
        return fp8_matmul(x, layer.weight, layer.scale, layer.bias, quantize=quantize,
                          bias_in_matmul=self.bias_in_matmul, fast_accum=self.fast_accum)

    def run_quantized(self, layer: FP8Linear, xq: torch.Tensor, xs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s FP8 matmul on x already quantised (xq, xs), with this run's settings."""
        return scaled_matmul(xq, xs, x, layer.weight, layer.scale, layer.bias, bias_in_matmul=self.bias_in_matmul,
                             fast_accum=self.fast_accum)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled quantiser; if compiling fails here (no working Triton, say), eager from then on, logged."""
        if self.fused_quantize:
            try:
                return _fused_quantize()(x)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager version computes the same
                self.fused_quantize = False
                log.warning("compiling the FP8 activation quantiser failed (%s); quantising eagerly", exc)
        return quantize_activations(x)

    def matmul_or_none(self, layer: FP8Linear, x: torch.Tensor) -> torch.Tensor | None:
        """The FP8 tensor-core result, or None once this torch/GPU has refused it (then logged)."""
        try:
            return self.run(layer, x, self.quantize)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            if self.bias_in_matmul and layer.bias is not None:
                self.bias_in_matmul = False
                return self.matmul_or_none(layer, x)
            self.matmul_error = f"{type(exc).__name__}: {exc}"
            log.warning("FP8 matmul unavailable here (%s); using dequantised weights", self.matmul_error)
            return None

    def forward(self, layer: FP8Linear, x: torch.Tensor) -> torch.Tensor:
        if self.uses_matmul(layer, x):
            if torch.compiler.is_compiling():  # inside a compiled block: no fallbacks, the block fuses the quantiser
                return self.run(layer, x)
            out = self.matmul_or_none(layer, x)
            if out is not None:
                return out
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, layer.dequantized(x.dtype), bias)


class FP8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with one scale per output row, computed by `kernel`.

    `lora_down` [r, in] / `lora_up` [out, r] (None unless a LoRA is applied as a side path, runtime/lora.py):
    the layer adds x @ down^T @ up^T in the activation dtype, leaving the FP8 weight untouched.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: FP8Kernel,
                 scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("scale", torch.empty(out_features, 1, dtype=scale_dtype))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("lora_down", None)
        self.register_buffer("lora_up", None)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)

    def after_gelu(self, h: torch.Tensor) -> torch.Tensor:
        """This layer applied to GELU(h), GELU folded into the activation quantisation (see quantize_gelu);
        only where the kernel `fuses`."""
        return self.kernel.run(self, h, quantize_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernel.forward(self, x)
        if self.lora_down is not None:
            out = out + F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return out


def quantize_rowwise(
    weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """quanto's absmax scheme: scale_r = max|W_r| / 448, data = W / scale_r rounded to float8_e4m3fn."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12).to(scale_dtype)
    data = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return data, scale


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def write_quantized(
    state: dict[str, torch.Tensor], quantize: Iterable[str], path: str | Path, map_path: str | Path,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write `state` in the official quanto layout (file + JSON map), quantising the Linears named.

    The tests, the selftest and the benchmarks use this to make files of the real format.
    """
    out: dict[str, torch.Tensor] = dict(state)
    qmap = {}
    for name in quantize:
        data, scale = quantize_rowwise(out.pop(f"{name}.weight"), scale_dtype)
        out[f"{name}.weight._data"], out[f"{name}.weight._scale"] = data, scale
        for scalar in QUANTO_SCALARS:
            out[f"{name}.{scalar}"] = torch.ones((), dtype=scale_dtype)
        qmap[name] = {"weights": WEIGHTS_QTYPE, "activations": "none"}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, str(tmp)))
    atomic_write_text(map_path, json.dumps(qmap, indent=1))


def swap_linears(model: nn.Module, names: Iterable[str], kernel: FP8Kernel) -> None:
    """Replace each named nn.Linear by an FP8Linear of the same shape (on the same device, usually meta).

    The caller checks the names first (the loader names the file when one is not a Linear of the model).
    """
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        with torch.device(linear.weight.device):
            layer = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        setattr(parent, child, layer)
