"""How much of the conditioning latent y depends on the reference frame (issue 28, item 2).

runtime/pipeline.py's `_y` encodes [reference, 80 zero frames] with the Wan2.1 VAE; for a video reference
(dubbing) the reference differs per clip, so y is encoded again every clip. The encoder is causal in time,
so a frame can depend on frame 0 only through its temporal receptive field. This script
- computes that receptive field from the encoder's modules (`receptive_field`): every causal conv of time
  kernel k reaches k - 1 frames further back at its own rate, and a temporal downsampler (time kernel 3,
  stride 2, fed the last frame of the chunk before) turns a reach of R output frames into 2R + 2 input frames;
- measures it (`reference_dependence`): the full-size VAE (VAEConfig()) with random weights (seeded,
  official NCDHW layout, float32, CPU) encodes [a, zeros] and [b, zeros] for two random first frames a, b;
  per latent frame: the max |difference| and that relative to the latent frame's max |value|;
- evaluates the scheme "encode only the first j chunks (1 + 4(j - 1) frames: the causal encoder gives exactly
  the first j latent frames, checked bit for bit), take latent frames j.. from a one-time encode of a fixed
  frame (b)": its max |error| over the whole y per j, absolute and relative to max |y| (the goldens' measure:
  tests/golden.py's rel_err, tests/test_vae.py's TOL = 1e-4; shared/goldens/README.md: "the VAE may need
  about 1e-4"), and the smallest j within it;
- evaluates an exact scheme (`encode_reusing`): the encoder cut at its temporal downsamplers into one segment
  per time rate; a segment's output for a chunk whose frames all lie past the last frame that depends on
  frame 0 at that depth (`last_dependent_frames`) is the same for every reference, so it is kept from the
  one-time encode of b and the chunk starts at the next segment. Checked bit for bit against the official
  encode of a; its FLOPs (torch's FlopCounterMode, on the meta device at 640x640) and kept bytes;
- repeats the measurement with a second seed and with the weights' standard deviation halved and doubled, to
  show which part is structure and which part is these random weights. The trained weights are not on this
  machine (`--weights FILE` measures them where they are).

CPU:  python bench/bench_cond_encode.py --out bench/results/cond-encode-cpu.json   (64x64: about 2 minutes
on 2 cores; the spatial size changes the magnitudes, not the receptive field)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from itk.runtime.atomic import atomic_write_text
from itk.runtime.configs import VAEConfig
from itk.runtime.models.vae import (
    CausalConv3d,
    ChunkMemory,
    Encoder,
    Resample,
    WanVAE,
    encode_chunks,
    load_vae,
)

TOLERANCE = 1e-4  # tests/test_vae.py TOL: max |ours - ref| / max |ref| (tests/golden.py rel_err)
FRAMES = 81  # the official clip: the reference frame, then 80 zero frames
TEMPORAL_STRIDE = 4  # input frames per latent frame after the first (= per encode chunk after the first)
FULL_SIZE = 640  # the 480p bucket's 640x640, for the FLOP count and the kept bytes
# (name, seed offset, gain): gain multiplies bench_vae.py's weight std (sqrt(2 / fan_in) / 2).
VARIANTS = (("base", 0, 1.0), ("second_seed", 1, 1.0), ("half_std", 0, 0.5), ("double_std", 0, 2.0))


def causal_convs(layers: list[nn.Module]) -> list[CausalConv3d]:
    """The causal convs inside `layers`, in the order forward runs them."""
    return [m for layer in layers for m in layer.modules() if isinstance(m, CausalConv3d)]


def receptive_field(encoder: Encoder) -> int:
    """How many input frames before frame 4n latent frame n can see: walking the encoder's causal convs
    from the head back to the input, a stride-1 conv of time kernel k adds k - 1 frames at its rate, and a
    temporal downsampler (output frame m reads input frames 2m - 2 .. 2m) maps a reach of R to 2R + k - 1."""
    reach = 0
    for conv in reversed(causal_convs([encoder])):  # a residual block's 1x1x1 shortcut (in parallel) adds 0
        reach = conv.stride[0] * reach + conv.kernel_size[0] - 1
    return reach


def encoder_segments(encoder: Encoder) -> list[list[nn.Module]]:
    """The encoder's layers in forward order, cut before each temporal downsampler: one time rate each."""
    segments: list[list[nn.Module]] = [[]]
    for layer in (encoder.conv1, *encoder.downsamples, *encoder.middle, encoder.head):
        if isinstance(layer, Resample) and layer.mode == "down3d":
            segments.append([])
        segments[-1].append(layer)
    return segments


def last_dependent_frames(segments: list[list[nn.Module]]) -> list[int]:
    """Per segment, the last output frame (at its time rate) that depends on input frame 0: a stride-1
    causal conv of time kernel k moves it k - 1 frames on; a stride-2 one (output m reads inputs 2m - 2 .. 2m)
    maps d to (d + 2) // 2."""
    d, last = 0, []
    for segment in segments:
        for conv in causal_convs(segment):
            d = (d + conv.kernel_size[0] - 1) // conv.stride[0]
        last.append(d)
    return last


def first_reusable_chunks(segments: list[list[nn.Module]]) -> list[int]:
    """Per segment, the first encode chunk whose outputs there are all past `last_dependent_frames` (chunk
    c >= 1 gives the frames (c - 1) * p + 1 .. c * p, p = 4 / 2^(downsamples so far))."""
    first = []
    for s, d in enumerate(last_dependent_frames(segments)):
        per_chunk = TEMPORAL_STRIDE // 2**s
        first.append(next(c for c in range(1, d + 2) if (c - 1) * per_chunk + 1 > d))
    return first


def _run_layer(layer: nn.Module, x: torch.Tensor, memory: ChunkMemory) -> torch.Tensor:
    """One encoder layer on one chunk, as Encoder.forward runs it."""
    if isinstance(layer, CausalConv3d):
        return memory.conv(layer, x)
    if isinstance(layer, nn.Sequential):  # the head: RMSNorm, SiLU (inside the conv's buffer), conv
        norm, _, conv = layer
        return memory.conv(conv, x, norm)
    return layer(x, memory)


@torch.no_grad()
def encode_reusing(vae: WanVAE, video: torch.Tensor, kept: dict[int, torch.Tensor] | None = None,
                   keep: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """WanVAE.encode (official layout) run segment by segment, each segment with its own chunk memory.
    kept: per chunk, the output of its deepest reusable segment (from a keep=True run on another reference
    frame followed by the same zero frames): that chunk starts after it. Returns (latent, what keep=True
    kept)."""
    assert not vae.fast, "the official layout: ChunkMemory() below"
    segments = encoder_segments(vae.encoder)
    first = first_reusable_chunks(segments)
    memories = [ChunkMemory() for _ in segments]
    x = video.unsqueeze(0).to(vae.conv1.weight)
    chunks = encode_chunks(x)
    outs, kept_now = [], {}
    for c, chunk in enumerate(chunks):
        deepest = max((s for s, f in enumerate(first) if c >= f), default=-1)
        h, start = (kept[c], deepest + 1) if kept is not None and deepest >= 0 else (chunk, 0)
        for s in range(start, len(segments)):
            memories[s].next_chunk()
            for layer in segments[s]:
                h = _run_layer(layer, h, memories[s])
            if keep and s == deepest:
                kept_now[c] = h.clone()
        outs.append(h)
    mu = vae.conv1(torch.cat(outs, dim=2))[:, : vae.cfg.z_dim]
    mean, std = vae._stats(mu)
    return ((mu - mean) * (1.0 / std))[0].float().contiguous(), kept_now


def reuse_cost(cfg: VAEConfig, size: int = FULL_SIZE, frames: int = FRAMES) -> dict:
    """FLOPs of the official encode and of `encode_reusing` with kept outputs, and the kept bytes (float32),
    counted on the meta device (shapes only) at size x size."""
    with torch.device("meta"):
        vae = WanVAE(cfg).eval()
    video = torch.zeros(3, frames, size, size, device="meta")
    with FlopCounterMode(display=False) as full:
        vae.encode(video)
    _, kept = encode_reusing(vae, video, keep=True)
    with FlopCounterMode(display=False) as reused:
        encode_reusing(vae, video, kept)
    return {"size": size, "official_tflops": round(full.get_total_flops() / 1e12, 1),
            "reusing_tflops": round(reused.get_total_flops() / 1e12, 1),
            "reusing_fraction": round(reused.get_total_flops() / full.get_total_flops(), 3),
            "kept_gb_float32": round(sum(t.numel() for t in kept.values()) * 4 / 1e9, 3)}


def random_vae(cfg: VAEConfig, seed: int, gain: float = 1.0) -> WanVAE:
    """WanVAE in the official layout with seeded random weights: conv weights ~ N(0, (gain * sqrt(2 / fan_in)
    / 2)^2) (bench_vae.py's init at gain 1: O(1) activations through the residual chain), biases
    ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default), norm gains 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = WanVAE(cfg)
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, nn.Conv3d | nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data.normal_(0.0, gain * (2.0 / fan_in) ** 0.5 * 0.5, generator=g)
            if module.bias is not None:
                module.bias.data.uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=g)
        elif hasattr(module, "gamma"):
            module.gamma.data.fill_(1.0)
    return model.use_fast_layout(False).eval().requires_grad_(False)


def conditioning_video(first: torch.Tensor, frames: int) -> torch.Tensor:
    """[3, frames, H, W]: `first` [3, H, W] then zero frames, as runtime/pipeline.py `_y` builds it."""
    return torch.cat([first[:, None], first.new_zeros(3, frames - 1, *first.shape[1:])], dim=1)


def reference_dependence(vae: WanVAE, size: int, seed: int, frames: int = FRAMES) -> dict:
    """Encode [a, zeros] and [b, zeros] (a, b ~ U(-1, 1), seeded); the per-latent-frame differences, the
    truncation scheme's error per j (latent frames 0..j-1 from a, the rest from b), a bit-for-bit check that
    encoding only the first j chunks gives the full encode's first j latent frames, and the exact scheme
    (`encode_reusing` of a with b's kept outputs) against the official encode of a."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.rand(3, size, size, generator=g) * 2 - 1 for _ in range(2))
    t0 = time.perf_counter()
    ya = vae.encode(conditioning_video(a, frames))
    encode_s = time.perf_counter() - t0
    yb, kept = encode_reusing(vae, conditioning_video(b, frames), keep=True)
    t0 = time.perf_counter()
    ya_reused, _ = encode_reusing(vae, conditioning_video(a, frames), kept)
    reused_s = time.perf_counter() - t0
    latents = ya.shape[1]
    diff = (ya - yb).abs().amax(dim=(0, 2, 3))  # [T_lat]
    scale = ya.abs().amax(dim=(0, 2, 3))
    y_max = ya.abs().max().item()
    # Latent frames j.. taken from b: the error is the largest difference among them (0 at j = latents).
    tail = [diff[j:].max().item() if j < latents else 0.0 for j in range(latents + 1)]
    within = [j for j in range(latents + 1) if tail[j] / y_max <= TOLERANCE]
    j_check = max(1, latents // 2)
    prefix = vae.encode(conditioning_video(a, 1 + TEMPORAL_STRIDE * (j_check - 1)))
    return {
        "encode_s": round(encode_s, 2),
        "latent_shape": list(ya.shape),
        "y_max_abs": y_max,
        "per_latent_max_abs": [d.item() for d in diff],
        "per_latent_rel": [(d / s).item() for d, s in zip(diff, scale, strict=True)],
        "per_latent_scale": [s.item() for s in scale],
        "identical_latents": [t for t in range(latents) if diff[t].item() == 0.0],
        "truncation_error_by_j": {j: {"max_abs": tail[j], "rel": tail[j] / y_max,
                                      "frames_encoded": 0 if j == 0 else 1 + TEMPORAL_STRIDE * (j - 1)}
                                  for j in range(latents + 1)},
        "smallest_j_within_tolerance": min(within),
        "prefix_encode_equals_full_encode": {"j": j_check, "bit_equal": torch.equal(prefix, ya[:, :j_check])},
        "exact_reuse": {"bit_equal_to_official": torch.equal(ya_reused, ya),
                        "max_abs_vs_official": (ya_reused - ya).abs().max().item(),
                        "encode_s": round(reused_s, 2), "official_encode_s": round(encode_s, 2)},
    }


def models(cfg: VAEConfig, opts: argparse.Namespace) -> Iterator[tuple[str, int, WanVAE, str]]:
    """(name, its frames' seed, VAE, what its weights are) per measurement: the chosen random variants, or
    only the given weights file (official layout). The frames' seed is the weights' seed + 100."""
    if opts.weights:
        yield "weights_file", opts.seed + 100, load_vae(opts.weights, cfg, fast=False), str(opts.weights)
        return
    for name, offset, gain in VARIANTS:
        if name in opts.variants.split(","):
            seed = opts.seed + offset
            yield name, seed + 100, random_vae(cfg, seed, gain), f"random, seed {seed}, std x{gain}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/cond-encode-cpu.json")
    parser.add_argument("--size", type=int, default=64, help="video height = width (a multiple of 8)")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed; the frames' seed is seed + 100")
    parser.add_argument("--frames", type=int, default=FRAMES, help="1 + 4k frames (81: the official clip)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="comma-separated, from " + ",".join(v[0] for v in VARIANTS))
    parser.add_argument("--weights", type=Path,
                        help="a Wan2.1_VAE.pth: measure these (trained) weights instead of the random variants")
    opts = parser.parse_args()
    cfg = VAEConfig()
    with torch.device("meta"):
        encoder = Encoder(cfg)
    reach, segments = receptive_field(encoder), encoder_segments(encoder)
    latents = 1 + (opts.frames - 1) // TEMPORAL_STRIDE
    result: dict = {
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
        "layout": "official (NCDHW, load_vae fast=False)", "vae_config": dataclasses.asdict(cfg),
        "size": opts.size, "frames": opts.frames, "latent_frames": latents, "seed": opts.seed,
        "receptive_field_frames": reach,
        "receptive_field_latents": reach // TEMPORAL_STRIDE,
        "receptive_field_meaning": f"latent frame n depends on input frames max(0, 4n - {reach}) .. 4n, i.e. on "
                                   f"latent positions n - {reach // TEMPORAL_STRIDE} .. n",
        "latents_structurally_independent_of_frame_0": [n for n in range(latents) if TEMPORAL_STRIDE * n > reach],
        "segments": [{"rate": f"1/{2**s}", "time_kernel_3_convs": sum(c.kernel_size[0] == 3 for c in causal_convs(seg)),
                      "last_frame_depending_on_frame_0": d, "first_reusable_chunk": f}
                     for s, (seg, d, f) in enumerate(zip(segments, last_dependent_frames(segments),
                                                         first_reusable_chunks(segments), strict=True))],
        "exact_reuse_cost": reuse_cost(cfg, frames=opts.frames),
        "tolerance": {"rel": TOLERANCE, "measure": "max |y_scheme - y| / max |y| (tests/golden.py rel_err)",
                      "source": "tests/test_vae.py TOL; shared/goldens/README.md Tolerances"},
        "variants": {},
    }
    out = Path(opts.out)
    t0 = time.perf_counter()
    for name, seed, vae, weights in models(cfg, opts):
        entry = {"weights": weights}
        entry.update(reference_dependence(vae, opts.size, seed, opts.frames))
        result["variants"][name] = entry
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(f"{name}: smallest j within {TOLERANCE:g}: {entry['smallest_j_within_tolerance']} of {latents}; "
              f"exact reuse bit-equal: {entry['exact_reuse']['bit_equal_to_official']}", file=sys.stderr)
    runs = result["variants"]
    result["verdict"] = {
        "exactly_reusable_latents": result["latents_structurally_independent_of_frame_0"],
        "smallest_j_within_tolerance": {name: v["smallest_j_within_tolerance"] for name, v in runs.items()},
        "encode_frames_saved_fraction": {
            name: round(1 - v["truncation_error_by_j"][v["smallest_j_within_tolerance"]]["frames_encoded"]
                        / opts.frames, 3) for name, v in runs.items()},
        "exact_reuse_bit_equal": all(v["exact_reuse"]["bit_equal_to_official"] for v in runs.values()),
        "exact_reuse_flops_fraction": result["exact_reuse_cost"]["reusing_fraction"],
        "trained_weights": str(opts.weights) if opts.weights else "not measured: the Wan2.1 VAE weights are not "
                           "on this machine (--weights FILE measures them)",
    }
    result["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
