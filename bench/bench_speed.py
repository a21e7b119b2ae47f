"""Where the time goes at 480p (issue 17): one full-size DiT block per op, the attention kernels, one clip
outside the DiT, and a model of the RTX 4090 built from those numbers.

Sections, each written to --out as soon as it is measured (a failure later loses nothing):
- peaks: 8192^3 bf16 and FP8 row-wise matmul rates, device-to-device copy bandwidth (the ceilings).
- attention: [1, L, 40, 128] bf16 at 480p (L = 33,600) and 720p (L = 75,600): SDPA default, cuDNN, flash,
  and every optional kernel that imports (SageAttention, flash-attn, FA3's flash_attn_interface); median
  ms, TFLOP/s and output cosine vs SDPA.
- block: one full-size block (FP8 weights, tensor-core FP8 matmuls as the runtime uses them, bf16
  activations) eager, split by CUDA events into FP8 linears, self / cross / audio attention, norms, RoPE,
  and the rest (modulation, gating, residuals, casts); then the whole block per attention kernel with its
  output cosine vs SDPA, also of the block's update (output - input), kept only if that is >= 0.999;
  and the block under torch.compile.
- clip: the full-size VAE (random weights) encoding 81 frames 640x640 and decoding 21 latent frames in
  float32 and bf16 (time, peak memory, bf16 error vs float32), colour correction of 81 frames on the CPU
  (scikit-image) vs the GPU (match_colors_torch), CLIP on one reference frame.
- rtx4090_model: each measured op scaled by the RTX 4090's published peaks, giving a step time for the
  rtx4090-24g preset next to the guide's ~70 s and for the 4-step rtx4090-24g-fast, whether FP8 fast
  accumulation changes anything on Ada, and what the model leaves out.

Run on the device:  python bench/bench_speed.py --out $OUT/speed-h200.json   (about 5 minutes on an H200)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from itk.runtime.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))

SHAPES = {"480p": (21, 40, 40), "720p": (21, 60, 60)}  # latent frames x token rows x token columns
HEADS, HEAD_DIM, DIM = 40, 128, 5120
BLOCKS = 40
FP8_DIT_GB = 19.5  # the official FP8 DiT file: what a budget-0 pass streams over PCIe
# RTX 4090 (AD102) published peaks: dense tensor throughput with FP32 accumulation, GDDR6X bandwidth, and
# what a PCIe 4.0 x16 link moves in practice from pinned memory. FP32 accumulation because every matmul here
# accumulates in FP32 (see FAST_ACCUM_ON_ADA); on GeForce Ada that is half the FP16-accumulate rate (FP8 660.6,
# FP16 330.3 dense TFLOPS), which nothing here uses.
RTX4090 = {"bf16_tflops": 165.2, "fp8_tflops": 330.3, "int8_tops": 660.6, "fp32_tflops": 82.6,
           "memory_gbps": 1008.0, "pcie_gbps": 25.0}
RTX4090_PEAKS_SOURCE = (
    "NVIDIA Ada GPU architecture whitepaper (images.nvidia.com/aem-dam/Solutions/geforce/ada/"
    "nvidia-ada-gpu-architecture.pdf), GeForce RTX 4090 column: peak FP8 tensor 330.3 dense TFLOPS with FP32 "
    "accumulate (660.6 with FP16 accumulate), BF16 165.2 (FP32 accumulate only); NVIDIA forum thread 294400 "
    "('Fp8/fp16 accumulation on ada RTX 4090'): FP32 accumulation is half rate on GeForce, and cublasLtMatmul's "
    "FP8 path refuses CUBLAS_COMPUTE_16F (status 15, not supported)")
FAST_ACCUM_ON_ADA = (
    "It applies, but not to the tensor-core rate. On Ada, torch._scaled_mm with row-wise scales (the runtime's "
    "FP8 linears) does not reach cuBLASLt, whose row-wise scaling needs cuBLAS 12.9 and compute capability 9.0+ "
    "(pytorch aten/src/ATen/native/cuda/ScaledBlas.cpp); it runs torch's CUTLASS kernel "
    "f8f8bf16_rowwise_impl_sm89 (RowwiseScaledMM.cu), where use_fast_accum picks OpMultiplyAddFastAccum instead "
    "of OpMultiplyAdd. Both issue mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32, an FP32 accumulator "
    "(cutlass include/cutlass/arch/mma_sm89.h); OpMultiplyAdd only adds CUTLASS's staged accumulation (each "
    "main-loop iteration into freshly cleared accumulators, then added to the running ones: is_sm89_staged_policy_v), "
    "which fast accumulation drops. cuBLASLt's CUBLASLT_MATMUL_DESC_FAST_ACCUM likewise only stops the periodic "
    "promotion of intermediate results to higher precision (cuBLAS docs). So the 4090's FP8 peak is the "
    "FP32-accumulate 330.3 TFLOPS with or without it, and what dropping the staged accumulation saves on Ada is "
    "not measured.")
GUIDE_4090_STEP_S = 70.0
ADA_PRESETS = ("rtx4090-24g", "rtx4090-24g-fast")  # the model's step times: the guide's preset, the 4-step one
SAGE_OVER_FA2_ON_4090 = 2.0  # SageAttention 1's published speed-up over FlashAttention-2 on a 4090


def median_ms(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median of `repeats` CUDA-event timings of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def peaks() -> dict:
    from itk.runtime.quant import FP8, quantize_activations

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bf16 = 2 * n**3 / median_ms(lambda: a @ b) / 1e9
    aq, sa = quantize_activations(a)
    bq, sb = quantize_activations(b)
    fp8 = 2 * n**3 / median_ms(lambda: torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.t(),
                                                         out_dtype=torch.bfloat16)) / 1e9
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy = 2 * x.numel() / median_ms(lambda: y.copy_(x)) / 1e6
    assert aq.dtype == FP8
    return {"bf16_tflops": round(bf16, 1), "fp8_rowwise_tflops": round(fp8, 1), "copy_gbps": round(copy, 1)}


def attention_kernels() -> dict:
    """name -> fn(q, k, v) over [B, L, N, d]: SDPA backends plus each optional kernel that imports."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend=None):
        def run(q, k, v):
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            with ctx:
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        return run

    kernels = {"sdpa_default": sdpa(), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
               "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    with contextlib.suppress(Exception):
        from sageattention import sageattn
        kernels["sage"] = lambda q, k, v: sageattn(q, k - k.mean(1, keepdim=True), v, tensor_layout="NHD",
                                                   smooth_k=False)
    with contextlib.suppress(Exception):
        from flash_attn import flash_attn_func
        kernels["flash_attn"] = flash_attn_func
    with contextlib.suppress(Exception):
        from flash_attn.cute import flash_attn_func as fa4

        def fa4_out(q, k, v):
            out = fa4(q, k, v)
            return out[0] if isinstance(out, tuple) else out
        kernels["fa4"] = fa4_out
    with contextlib.suppress(Exception):
        kernels["cudnn_fp8_smoothed"] = cudnn_fp8_attention()
    with contextlib.suppress(Exception):
        from flash_attn_interface import flash_attn_func as fa3

        def fa3_out(q, k, v):
            out = fa3(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        kernels["fa3"] = fa3_out
    return kernels


def cudnn_fp8_attention():
    """cuDNN's FP8 flash attention through nvidia-cudnn-frontend (pip wheel, no build), as a candidate for Hopper:
    Q, K, V quantised per tensor to e4m3 after SageAttention-style smoothing (K and V minus their mean over the
    tokens: exact for K, whose mean shifts every score of a query alike; V's mean is added back after), P
    quantised by cuDNN with scale 448, and O in e4m3 (Hopper's FP8 attention writes no bf16 output). One graph
    per shape, built at first use."""
    import cudnn

    e4m3, fp32, top = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT, 448.0
    handle = cudnn.create_handle()
    graphs: dict = {}

    def build(shape: tuple[int, ...]):
        b, seq, heads, d = shape
        dims, strides = (b, heads, seq, d), (seq * heads * d, d, heads * d, 1)  # [B, L, N, d] memory, BHSD view
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        q, k, v = (g.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        scales = [g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
                  for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        o, _, amax_s, amax_o = g.sdpa_fp8(q=q, k=k, v=v, descale_q=scales[0], descale_k=scales[1],
                                          descale_v=scales[2], descale_s=scales[3], scale_s=scales[4],
                                          scale_o=scales[5], attn_scale=d**-0.5, use_causal_mask=False,
                                          generate_stats=False)
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        workspace = torch.empty(max(1, g.get_workspace_size()), device="cuda", dtype=torch.uint8)
        return g, (q, k, v, o, amax_s, amax_o), scales, workspace

    def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = x.abs().amax().float().clamp_min(1e-12)
        return (x.float() * (top / amax)).to(torch.float8_e4m3fn), (amax / top).view(1, 1, 1, 1)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape not in graphs:
            graphs[q.shape] = build(tuple(q.shape))
        g, (tq, tk, tv, to, tas, tao), (dq, dk, dv, ds, ss, so), workspace = graphs[q.shape]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        v_mean = v.float().mean(dim=1, keepdim=True)
        (q8, sq), (k8, sk), (v8, sv) = quantise(q), quantise(k - k.mean(dim=1, keepdim=True)), quantise(v - v_mean)
        out = torch.empty(q.shape, device="cuda", dtype=torch.float8_e4m3fn)
        one = torch.ones(1, 1, 1, 1, device="cuda")
        g.execute({tq: q8, tk: k8, tv: v8, dq: sq, dk: sk, dv: sv, ds: one / top, ss: one * top, so: 1 / sv, to: out,
                   tas: torch.empty_like(one), tao: torch.empty_like(one)}, workspace, handle=handle)
        return (out.float() * sv + v_mean).to(q.dtype)

    return run


def attention_section(result: dict, save) -> None:
    out = result.setdefault("attention", {})
    for res, (t, h, w) in SHAPES.items():
        seq = t * h * w
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        ref = attention_kernels()["sdpa_default"](q, k, v)
        flops = 4 * seq * seq * HEADS * HEAD_DIM
        for name, fn in attention_kernels().items():
            try:
                ms = median_ms(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), repeats=5 if res == "720p" else 10)
                out[f"{res}.{name}"] = {"L": seq, "ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1),
                                        "cosine_vs_sdpa": round(cosine(fn(q, k, v), ref), 6)}
            except Exception as exc:  # noqa: BLE001 - a kernel that refuses this GPU: record it, go on
                out[f"{res}.{name}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            save()
        q = k = v = ref = None
        torch.cuda.empty_cache()


class OpTimer:
    """CUDA events around the leaves of one block forward, summed per label (no host sync inside)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.context = ["block"]

    @contextlib.contextmanager
    def span(self, label: str):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.spans.append((label, start, end))

    def totals(self) -> dict[str, float]:
        torch.cuda.synchronize()
        sums: dict[str, float] = defaultdict(float)
        for label, start, end in self.spans:
            sums[label] += start.elapsed_time(end)
        return dict(sums)


def instrument(block, timer: OpTimer):
    """Time every FP8 linear, norm, attention call and RoPE of `block`; returns an undo function."""
    import itk.runtime.models.dit as dit
    from itk.runtime.quant import FP8Linear

    undo = []
    for module in block.modules():
        if isinstance(module, FP8Linear | dit.LayerNorm | dit.RMSNorm):
            label = "fp8_linears" if isinstance(module, FP8Linear) else "norms"
            original = module.forward

            def timed(*a, _f=original, _l=label, **kw):
                with timer.span(_l):
                    return _f(*a, **kw)
            module.forward = timed
            undo.append(lambda m=module: m.__dict__.pop("forward"))
    for name in ("self_attn", "cross_attn", "audio_cross_attn"):
        sub = getattr(block, name)
        # Hooks return None: a forward hook's return value would replace the module's output.
        pre = sub.register_forward_pre_hook(lambda m, a, _n=name: timer.context.append(_n) and None)
        post = sub.register_forward_hook(lambda m, a, o: timer.context.pop() and None)
        undo += [pre.remove, post.remove]
    for fname, label in (("attention", None), ("rope_apply", "rope")):
        original = getattr(dit, fname)

        def wrapped(*a, _f=original, _l=label, **kw):
            with timer.span(_l or f"attention.{timer.context[-1]}"):
                return _f(*a, **kw)
        setattr(dit, fname, wrapped)
        undo.append(lambda _n=fname, _f=original: setattr(dit, _n, _f))
    return lambda: [u() for u in undo]


# Kernel name fragments -> what the kernel does, first match wins (cuDNN / flash attention, cuBLASLt / CUTLASS
# matmuls (Hopper's are "nvjet_*"), Inductor's fused element-wise kernels "triton_*").
# Inductor's kernels first: their names list the ops they fused, "attention" among them (the RoPE kernel that
# feeds the attention), which are element-wise work, not attention.
KERNEL_KINDS = (("fused_elementwise_triton", ("triton_",)),
                ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "f8f8")),
                ("copy", ("memcpy", "memset", "copy")))


def kernel_profile(fn, repeats: int = 5) -> dict:
    """GPU time per kind of kernel in `fn` (torch.profiler, `repeats` calls after a warm-up): where a
    compiled block's time goes, which CUDA events around eager ops cannot tell once the ops are fused."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kinds: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1000 / repeats
        if ms <= 0 or event.key.startswith("ProfilerStep"):
            continue
        name = event.key.lower()
        kind = next((k for k, frags in KERNEL_KINDS if any(f in name for f in frags)), "other")
        kinds[kind] += ms
        kernels[event.key[:120]] += ms
    total = sum(kinds.values())
    return {"total_gpu_ms": round(total, 2),
            "ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:20]}}


def block_section(result: dict, save, compile_block: bool) -> dict:
    from bench_dit_step import inputs, random_dit

    from itk.runtime.attention import SDPA, Attention
    from itk.runtime.configs import DiTConfig
    from itk.runtime.models.dit import rope_angles
    from itk.runtime.quant import FP8Kernel

    def block_on(attention: Attention) -> torch.nn.Module:
        """The one FP8 block (the same random weights every time), its attentions on `attention`."""
        return random_dit(DiTConfig(num_layers=1), FP8Kernel(), "cuda", attention=attention).blocks[0]

    out = result.setdefault("block", {})
    model = random_dit(DiTConfig(num_layers=1), FP8Kernel(), "cuda", attention=SDPA)
    with torch.no_grad():
        tokens, grid, _, e0, ctx, audio = model.embed(*inputs(DiTConfig(), "cuda"))
        rope = rope_angles(grid, model.rope, tokens.device)
        block = model.blocks[0]
        args = (tokens, e0, ctx, audio, grid, rope)
        ref = block(*args)
        out["eager_sdpa_ms"] = round(median_ms(lambda: block(*args)), 2)
        timer = OpTimer()
        undo = instrument(block, timer)
        block(*args)
        timer.spans.clear()
        with timer.span("block_total"):
            block(*args)
        undo()
        parts = timer.totals()
        total = parts.pop("block_total")
        parts["other (modulation, gating, residuals, casts)"] = total - sum(parts.values())
        out["ops_ms_eager_sdpa"] = {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
        out["ops_share_eager_sdpa"] = {k: round(v / total, 3) for k, v in out["ops_ms_eager_sdpa"].items()}
        save()
        for choice in ("fa4", "flash", "sage"):
            attention = Attention.resolve(choice, "cuda")
            if attention.name != choice:
                out[f"eager_{choice}"] = "not installed here"
                continue
            try:
                chosen = block_on(attention)
                ours = chosen(*args)
                update = cosine(ours - tokens, ref - tokens)  # the residual stream alone would hide errors
                out[f"eager_{choice}"] = {"ms": round(median_ms(lambda chosen=chosen: chosen(*args)), 2),
                                          "cosine_vs_sdpa": round(cosine(ours, ref), 6),
                                          "update_cosine_vs_sdpa": round(update, 6), "kept": update >= 0.999}
            except Exception as exc:  # noqa: BLE001
                out[f"eager_{choice}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            save()
        if compile_block:
            for choice in ("sdpa", "fa4"):
                attention = Attention.resolve(choice, "cuda")
                if attention.name != choice:
                    continue
                label = "" if choice == "sdpa" else f"_{choice}"
                try:
                    torch._dynamo.reset()
                    compiled = torch.compile(block if choice == "sdpa" else block_on(attention))
                    t0 = time.perf_counter()
                    compiled(*args)
                    torch.cuda.synchronize()
                    out[f"compile{label}_s"] = round(time.perf_counter() - t0, 1)
                    ours = compiled(*args)
                    out[f"compiled_{choice}_ms"] = round(median_ms(lambda compiled=compiled: compiled(*args)), 2)
                    out[f"compiled{label}_cosine_vs_eager"] = round(cosine(ours, ref), 6)
                    out[f"compiled{label}_update_cosine_vs_eager"] = round(cosine(ours - tokens, ref - tokens), 6)
                    out[f"compiled{label}_kernels"] = kernel_profile(lambda compiled=compiled: compiled(*args))
                except Exception as exc:  # noqa: BLE001
                    out[f"compiled{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                save()
    return out


def clip_section(result: dict, save) -> None:
    from itk.runtime.color import match_colors
    from itk.runtime.configs import CLIPConfig, VAEConfig
    from itk.runtime.models.clip import CLIPVision
    from itk.runtime.models.vae import WanVAE

    out = result.setdefault("clip", {})
    g = torch.Generator(device="cuda").manual_seed(3)
    video = torch.rand(3, 81, 640, 640, device="cuda", generator=g) * 2 - 1
    torch.manual_seed(0)
    vae32 = WanVAE(VAEConfig()).cuda().eval().requires_grad_(False)
    for module in vae32.modules():  # default init explodes through 30 residual blocks: keep activations O(1)
        if isinstance(module, torch.nn.Conv3d | torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=(2.0 / module.weight[0].numel()) ** 0.5 * 0.5)
    latents = {}
    for dtype in (torch.float32, torch.bfloat16):
        vae = vae32 if dtype == torch.float32 else WanVAE(VAEConfig()).cuda().eval().requires_grad_(False)
        if dtype != torch.float32:
            vae.load_state_dict(vae32.state_dict())
            vae = vae.to(dtype)
        key = str(dtype).split(".")[-1]
        for op, run in (("encode_81f", lambda vae=vae: vae.encode(video)),
                        ("decode_21lat", lambda vae=vae: vae.decode(latents["float32"]))):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(run, repeats=2, warmup=1)
            value = run()
            entry = {"s": round(ms / 1000, 3), "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
            if op == "encode_81f":
                latents[key] = value
            else:
                latents[f"{key}.video"] = value
            if key == "bfloat16":
                ref = latents["float32" if op == "encode_81f" else "float32.video"]
                entry["rel_err_vs_float32"] = ((value - ref).abs().max() / ref.abs().max()).item()
                entry["cosine_vs_float32"] = round(cosine(value, ref), 6)
            out[f"vae_{op}_{key}"] = entry
            save()
        vae = None
        torch.cuda.empty_cache()
    clip = video[None].clamp(-1, 1)
    reference = clip[:, :, :1]
    t0 = time.perf_counter()
    on_cpu = match_colors(clip.cpu(), reference.cpu(), 1.0)
    out["color_correction_cpu_skimage_s"] = round(time.perf_counter() - t0, 2)
    ms = median_ms(lambda: match_colors(clip, reference, 1.0), repeats=3, warmup=1)
    on_gpu = match_colors(clip, reference, 1.0)
    out["color_correction_gpu_s"] = round(ms / 1000, 3)
    out["color_correction_gpu_vs_cpu_max_abs"] = (on_gpu.cpu() - on_cpu).abs().max().item()
    save()
    cfg = CLIPConfig()
    with torch.device("cuda"):
        encoder = CLIPVision(cfg)
    encoder.init_non_persistent("cuda")
    encoder = encoder.to(torch.float16).eval()
    out["clip_one_frame_fp16_s"] = round(median_ms(lambda: encoder.encode(reference), repeats=5) / 1000, 4)
    save()


def ada_block_kernels(fusion: dict, result: dict, name: str) -> tuple[dict, float | None, str]:
    """A bench_fusion.py result's 'current' block as the 4090 model takes it: GPU ms by kernel kind, the H200's
    FP8 matmul ms with fast accumulation where the file also has the block without it (else None), and where
    each part came from. The FP8 matmuls are the 'without_fast_accum' variant's where there is one: exact
    accumulation, as peaks() measured the FP8 rate they are scaled by (FAST_ACCUM_ON_ADA says why Hopper's gain
    is not carried over). A block run with another attention than SDPA (FA4: Hopper and Blackwell only) takes
    its attention from --out's own compiled SDPA block, the H200 time the model turns into Ada's kernels."""
    variants = fusion["variants"]
    kernels = dict(variants["current"]["kernels"]["ms"])
    parts = [f"compiled block kernels of {name} ('current')"]
    fast_matmul = None
    if "without_fast_accum" in variants:
        fast_matmul = kernels["matmul"]
        kernels["matmul"] = variants["without_fast_accum"]["kernels"]["ms"]["matmul"]
        parts.append("its FP8 matmuls from the 'without_fast_accum' variant (exact accumulation, as the FP8 peak "
                     "they are scaled by was measured)")
    attention = fusion.get("attention", "sdpa")
    if attention != "sdpa":
        sdpa = result["block"].get("compiled_kernels", {}).get("ms", {}).get("attention")
        if sdpa is None:
            raise SystemExit(f"{name} ran {attention} attention and --out has no compiled SDPA block to take "
                             "the attention from: run bench_speed.py --only block first")
        kernels["attention"] = sdpa
        parts.append(f"its attention ({attention}, not on Ada) replaced by the compiled SDPA (cuDNN) block's "
                     f"{sdpa} ms of this file's block section")
    return kernels, fast_matmul, "; ".join(parts)


def rtx4090_model(result: dict, kernels: dict | None = None, source: str = "compiled block kernels",
                  fast_accum_matmul_ms: float | None = None) -> dict:
    """Scale each measured H200 op by the 4090/H200 ratio of the unit that bounds it (`kernels`: a compiled
    block's GPU ms by kind, default this run's), for the step of each preset in ADA_PRESETS.
    `fast_accum_matmul_ms`: the H200's FP8 matmul ms with fast accumulation when kernels' are without it, to say
    what carrying that gain over to Ada would change."""
    from itk.presets import get_preset

    p = result["peaks"]
    kernels = kernels or result["block"].get("compiled_kernels", {}).get("ms")
    if kernels:  # the compiled block as the runtime runs it, by kernel kind
        linear_h200, attn_h200 = kernels.get("matmul", 0.0), kernels.get("attention", 0.0)
        rest_h200 = sum(v for k, v in kernels.items() if k not in ("matmul", "attention"))
    else:  # the eager block's CUDA-event split
        blk = result["block"]["ops_ms_eager_sdpa"]
        linear_h200 = blk.get("fp8_linears", 0.0)
        attn_h200 = sum(v for k, v in blk.items() if k.startswith("attention."))
        rest_h200 = sum(v for k, v in blk.items() if k == "norms" or k == "rope" or k.startswith("other"))
    fp8_ratio = p["fp8_rowwise_tflops"] / RTX4090["fp8_tflops"]
    linear = linear_h200 * fp8_ratio
    attn_bf16 = attn_h200 * p["bf16_tflops"] / RTX4090["bf16_tflops"]
    attentions = {"bf16_attention": attn_bf16, "sage_attention": attn_bf16 / SAGE_OVER_FA2_ON_4090}
    rest = rest_h200 * p["copy_gbps"] / RTX4090["memory_gbps"]
    stream_s = FP8_DIT_GB / RTX4090["pcie_gbps"]

    def compute_pass_s(linear_ms: float, attn_ms: float) -> float:
        return BLOCKS * (linear_ms + attn_ms + rest) / 1000

    def step(passes: int, compute_pass: float) -> dict:
        return {"passes_per_step": passes,
                "step_s_streaming_overlapped": round(passes * max(compute_pass, stream_s), 1),
                "step_s_streaming_serial": round(passes * (compute_pass + stream_s), 1)}

    base, fast = (get_preset(name) for name in ADA_PRESETS)
    model = {"source": source if kernels else "eager block ops",
             "per_block_ms": {"fp8_linears": round(linear, 1), "attention_bf16_fa2_class": round(attn_bf16, 1),
                              "attention_8bit_sage": round(attentions["sage_attention"], 1),
                              "memory_bound_rest": round(rest, 1)}}
    for name, attn in attentions.items():  # the rtx4090-24g preset's step
        compute_pass = compute_pass_s(linear, attn)
        model[name] = {"compute_per_pass_s": round(compute_pass, 2), "stream_per_pass_s": round(stream_s, 2),
                       **step(base.passes, compute_pass)}
    model["fast_preset"] = {
        "preset": fast.name, "steps": fast.steps,
        "note": f"the same passes as {base.name}, {fast.passes} per step instead of {base.passes} (text guidance 1 "
                "drops the text pass); its LoRA is merged into the FP8 weights, so a pass costs the same "
                "(bench/results/lora-h200.json)",
        **{name: step(fast.passes, compute_pass_s(linear, attn)) for name, attn in attentions.items()}}
    model["guide_official_step_s"] = GUIDE_4090_STEP_S
    model["rtx4090_peaks"] = {**RTX4090, "source": RTX4090_PEAKS_SOURCE}
    fast_accum = FAST_ACCUM_ON_ADA
    if fast_accum_matmul_ms is not None:
        carried = fast_accum_matmul_ms * fp8_ratio
        carried_step = step(base.passes, compute_pass_s(carried, attentions["sage_attention"]))
        fast_accum += (f" The model takes the H200's FP8 matmuls without it ({linear_h200} ms per block; Hopper's "
                       f"gain is its skipped promotion, a different cost). Carried over ({fast_accum_matmul_ms} "
                       f"ms with it), the linears would be {carried:.1f} ms per block instead of {linear:.1f}, and "
                       f"a {base.name} step {carried_step['step_s_streaming_overlapped']} s with SageAttention "
                       f"instead of {model['sage_attention']['step_s_streaming_overlapped']}.")
    model["fast_accum_on_ada"] = fast_accum
    model["leaves_out"] = (
        "the 4090's sustained clocks under its 450 W limit (peaks assume boost; the H200's own ops were measured "
        "at its 700 W cap, ~1575 of 1980 MHz, so its efficiency against peak is understated), kernel efficiency on "
        "Ada (the H200's measured efficiency is carried over unchanged), the smaller L2 and SM count, launch overhead, "
        "host RAM too small to pin 19.5 GB (a pageable ring is slower), torch.compile fusion differences, the "
        "embedding and head outside the blocks (<1%), and everything outside the DiT (VAE, CLIP, colour, T5). "
        "SageAttention's factor is the published 4090 speed-up, not measured here; what fast accumulation saves "
        "on Ada is not measured either (fast_accum_on_ada). The FP8 and BF16 peaks are the FP32-accumulate ones "
        "(rtx4090_peaks).")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/speed-h200.json")
    parser.add_argument("--only", default="", help="comma-separated sections: peaks,attention,block,clip")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd block")
    parser.add_argument("--rtx4090-from", metavar="FUSION_JSON",
                        help="only rebuild rtx4090_model in --out from its peaks and the 'current' block of a "
                             "bench_fusion.py result (no GPU needed)")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.rtx4090_from:
        result = json.loads(out.read_text())
        fusion = json.loads(Path(opts.rtx4090_from).read_text())
        kernels, fast_matmul, source = ada_block_kernels(fusion, result, opts.rtx4090_from)
        result["rtx4090_model"] = rtx4090_model(result, kernels, source, fast_matmul)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["rtx4090_model"], indent=2))
        return
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "shape_480p": "1 x 33600 tokens x 40 heads x 128, 769 context tokens, 640x640 81 frames"}

    def save() -> None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")

    sections = opts.only.split(",") if opts.only else ["peaks", "attention", "block", "clip"]
    for section in sections:
        t0 = time.perf_counter()
        try:
            if section == "peaks":
                result["peaks"] = peaks()
            elif section == "attention":
                attention_section(result, save)
            elif section == "block":
                block_section(result, save, not opts.no_compile)
            elif section == "clip":
                clip_section(result, save)
        except Exception as exc:  # noqa: BLE001 - keep the other sections
            result[f"{section}_error"] = f"{type(exc).__name__}: {exc}"[:500]
        result.setdefault("section_s", {})[section] = round(time.perf_counter() - t0, 1)
        save()
        torch.cuda.empty_cache()
    with contextlib.suppress(KeyError):
        result["rtx4090_model"] = rtx4090_model(result)
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
