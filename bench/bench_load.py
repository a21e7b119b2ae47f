"""Load time and host memory of the 4090 preset (FP8 DiT streamed with budget 0) from a cold page cache.

Writes synthetic files of the official layout and size for every component:
`quant_models/infinitetalk_single_fp8.safetensors` + `.json` (all 612 DiT Linears FP8, the rest bf16,
~19 GB), `quant_models/t5_fp8.safetensors` + `t5_map_fp8.json` (168 Linears FP8, ~6.7 GB), the full CLIP
`.pth` (visual tower fp16 plus a `textual.*` filler up to the official 4.77 GB), `Wan2.1_VAE.pth` (fp32)
and a chinese-wav2vec2-base folder. Then, per host-memory mode, it syncs, drops the page cache
(`echo 3 > /proc/sys/vm/drop_caches`, root) and starts a fresh Python process that loads everything the
way the runtime does and reports: seconds from process start to "ready for the first step" (every model
loaded, the DiT's streamer set up), the first small DiT forward, and peak host memory sampled every 20 ms:
process RSS, its anonymous part (pages of the memory-mapped file count in RSS but are reclaimable), and
the rise of the system's used memory (which counts pinned memory and excludes the page cache). The
encoders are loaded in the memory-disciplined order (T5, CLIP, wav2vec2 loaded and freed, VAE kept, then
the DiT), as the pipeline runs them.

Run on the device (root):  python bench/bench_load.py [--dir /tmp/itk-load] [--out bench/results/load-h100.json]
When the disk has too little room, the DiT is written with fewer blocks and the JSON says so
(`dit_layers_written`); load time is then scaled per block in `ready_s_scaled_to_40_blocks`.
Each measurement is written as soon as it is taken, so a failure later loses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

FP8_BYTES_TYPES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}
CHUNK = 64 * 2**20


def _filler(dtype: str) -> bytes:
    """64 MB of valid, finite random values of `dtype` (random bytes would include fp8 NaNs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(CHUNK // FP8_BYTES_TYPES[dtype], generator=g) * 0.05
    torch_dtype = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
                   "F32": torch.float32}[dtype]
    return x.to(torch_dtype).view(torch.uint8).numpy().tobytes()


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], ones: set[str]) -> int:
    """Stream a safetensors file of the given (dtype, shape) per key without holding it in memory.

    Keys in `ones` hold 1.0 (quanto's input/output scales must be exactly 1)."""
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        n = FP8_BYTES_TYPES[dtype]
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fillers = {d: _filler(d) for d in {d for d, _ in tensors.values()}}
    one = {"BF16": b"\x80\x3f", "F32": b"\x00\x00\x80\x3f", "F16": b"\x00\x3c"}
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, (dtype, _) in tensors.items():
            start, end = header[key]["data_offsets"]
            size = end - start
            if key in ones:
                f.write(one[dtype] * (size // len(one[dtype])))
                continue
            filler = fillers[dtype]
            while size > 0:
                step = min(size, len(filler))
                f.write(memoryview(filler)[:step])
                size -= step
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def quanto_layout(shapes: dict[str, list[int]], linears: list[str]) -> tuple[dict, set[str], dict]:
    """(tensors, ones, map) of the official quanto file for a model with these float shapes."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    ones: set[str] = set()
    for key, shape in shapes.items():
        tensors[key] = ("BF16", shape)
    for name in linears:
        out_features, in_features = tensors.pop(f"{name}.weight")[1]
        tensors[f"{name}.weight._data"] = ("F8_E4M3", [out_features, in_features])
        tensors[f"{name}.weight._scale"] = ("BF16", [out_features, 1])
        for scalar in ("input_scale", "output_scale"):
            tensors[f"{name}.{scalar}"] = ("BF16", [])
            ones.add(f"{name}.{scalar}")
    qmap = {name: {"weights": "qfloat8_e4m3fn", "activations": "none"} for name in linears}
    return tensors, ones, qmap


def write_dit(folder: Path, layers: int) -> int:
    import torch

    from itk.runtime.configs import DiTConfig
    from itk.runtime.models.dit import InfiniteTalkDiT
    from itk.runtime.quant import linear_names

    with torch.device("meta"):
        model = InfiniteTalkDiT(DiTConfig(num_layers=layers))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    tensors, ones, qmap = quanto_layout(shapes, linear_names(model))
    (folder / "infinitetalk_single_fp8.json").write_text(json.dumps(qmap))
    return write_safetensors(folder / "infinitetalk_single_fp8.safetensors", tensors, ones)


def t5_shapes(cfg) -> dict[str, list[int]]:
    """The official umT5-XXL encoder's keys and shapes (24 blocks, 4096 wide, relative position buckets)."""
    from itk.runtime.models.t5 import official_t5_keys

    d, a, f = cfg.dim, cfg.dim_attn, cfg.dim_ffn
    by_suffix = {
        "norm1.weight": [d], "norm2.weight": [d], "attn.q.weight": [a, d], "attn.k.weight": [a, d],
        "attn.v.weight": [a, d], "attn.o.weight": [d, a], "ffn.gate.0.weight": [f, d], "ffn.fc1.weight": [f, d],
        "ffn.fc2.weight": [d, f], "pos_embedding.embedding.weight": [cfg.num_buckets, cfg.num_heads],
    }
    shapes = {}
    for key in official_t5_keys(cfg):
        if key == "token_embedding.weight":
            shapes[key] = [cfg.vocab_size, d]
        elif key == "norm.weight":
            shapes[key] = [d]
        else:
            shapes[key] = by_suffix[key.split(".", 2)[2]]
    return shapes


def write_t5(folder: Path, cfg=None) -> int:
    from itk.runtime.configs import T5Config

    shapes = t5_shapes(cfg or T5Config())
    linears = [k[: -len(".weight")] for k in shapes if ".attn." in k or ".ffn." in k]
    tensors, ones, qmap = quanto_layout(shapes, linears)
    (folder / "t5_map_fp8.json").write_text(json.dumps(qmap))
    return write_safetensors(folder / "t5_fp8.safetensors", tensors, ones)


def write_clip(path: Path, c=None, total_bytes: int = 4_770_000_000) -> int:
    """The visual tower's official keys in fp16, plus one `textual.*` filler (ignored by our loader)."""
    import torch

    from itk.runtime.configs import CLIPConfig

    c = c or CLIPConfig()
    w, grid = c.width, c.image_size // c.patch_size
    per_block = {"norm1.weight": [w], "norm1.bias": [w], "attn.to_qkv.weight": [3 * w, w], "attn.to_qkv.bias": [3 * w],
                 "attn.proj.weight": [w, w], "attn.proj.bias": [w], "norm2.weight": [w], "norm2.bias": [w],
                 "mlp.0.weight": [c.mlp_ratio * w, w], "mlp.0.bias": [c.mlp_ratio * w],
                 "mlp.2.weight": [w, c.mlp_ratio * w], "mlp.2.bias": [w]}
    shapes = {"visual.patch_embedding.weight": [w, 3, c.patch_size, c.patch_size], "visual.cls_embedding": [1, 1, w],
              "visual.pos_embedding": [1, grid * grid + 1, w], "visual.pre_norm.weight": [w],
              "visual.pre_norm.bias": [w], "visual.post_norm.weight": [w], "visual.post_norm.bias": [w],
              "visual.head": [w, 1024]}
    for i in range(c.layers):
        shapes.update({f"visual.transformer.{i}.{k}": s for k, s in per_block.items()})
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    used = sum(t.numel() * 2 for t in state.values())
    state["textual.filler"] = torch.zeros(max(0, (total_bytes - used) // 2), dtype=torch.float16)
    torch.save(state, path)
    return path.stat().st_size


def write_vae(path: Path) -> int:
    import torch

    from itk.runtime.configs import VAEConfig
    from itk.runtime.models.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    g = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}, path)
    return path.stat().st_size


def write_wav2vec2(folder: Path) -> int:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder.mkdir(exist_ok=True)
    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor().save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------
# The measured child process: everything the 4090 preset loads before its first denoising step.


def child(folder: Path, layers: int, pin: str) -> None:
    import threading

    import psutil

    me = psutil.Process()
    started = me.create_time()
    used_before = psutil.virtual_memory().used
    peak = {"rss": 0, "anon": 0, "system_used": 0}

    def sample() -> None:
        while True:
            info = me.memory_info()
            peak["rss"] = max(peak["rss"], info.rss)
            peak["anon"] = max(peak["anon"], info.rss - info.shared)
            peak["system_used"] = max(peak["system_used"], psutil.virtual_memory().used - used_before)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.time() - started, 3)
        print(f"CHILD-MARK {name} {marks[name]}", file=sys.stderr, flush=True)

    import torch

    from itk.runtime.attention import Attention
    from itk.runtime.configs import CLIPConfig, DiTConfig, T5Config, VAEConfig
    from itk.runtime.models.dit import load_dit_fp8
    from itk.runtime.offload import DiTRunner
    from itk.runtime.quant import FP8Kernel

    mark("imported_torch")
    # The memory-disciplined order: the encoders are loaded, used and freed before the DiT comes in.
    errors, kept = {}, []
    for name, load, keep in (("t5", _load_t5, False), ("clip", _load_clip, False), ("wav2vec2", _load_audio, False),
                             ("vae", _load_vae, True)):
        try:
            model = load(folder, T5Config, CLIPConfig, VAEConfig)
            torch.cuda.synchronize()
            mark(f"{name}_ready")
            if keep:
                kept.append(model)
            del model
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - a component that fails is reported, the others still count
            errors[name] = f"{type(exc).__name__}: {exc}"
    cfg = DiTConfig(num_layers=layers)
    quant = folder / "quant_models"
    dit, mapped = load_dit_fp8(quant / "infinitetalk_single_fp8.safetensors", quant / "infinitetalk_single_fp8.json",
                               cfg, dtype=torch.bfloat16, device="cpu", kernel=FP8Kernel(),
                               attention=Attention.resolve("auto", "cuda"))  # the generator's (ITK_ATTENTION unset)
    runner = DiTRunner(dit, device=torch.device("cuda"), budget=0, mapped=mapped,
                       pin={"auto": None, "pinned": True, "mmap": False}[pin])
    torch.cuda.synchronize()
    mark("dit_ready")
    mark("ready_for_first_step")
    ready_peak = dict(peak)
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        t_lat, h, w = 2, 16, 16
        r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        with torch.no_grad():
            runner(r(16, t_lat, h, w), torch.tensor([900.0], device="cuda"), r(20, cfg.text_dim),
                r(1, cfg.image_tokens, cfg.clip_dim), r(1, 20, t_lat, h, w),
                r(1, 1 + 4 * (t_lat - 1), cfg.audio_window, cfg.audio_blocks, cfg.audio_channels))
        torch.cuda.synchronize()
        mark("first_small_forward_done")
    except Exception as exc:  # noqa: BLE001
        errors["first_forward"] = f"{type(exc).__name__}: {exc}"
    result = {
        "host_memory_mode": runner.mode, "marks_s": marks, "errors": errors,
        "peak_rss_gb_until_ready": round(ready_peak["rss"] / 1e9, 2),
        "peak_anon_rss_gb_until_ready": round(ready_peak["anon"] / 1e9, 2),
        "peak_rss_gb": round(peak["rss"] / 1e9, 2), "peak_anon_rss_gb": round(peak["anon"] / 1e9, 2),
        "peak_system_used_increase_gb": round(peak["system_used"] / 1e9, 2),
        "peak_system_used_increase_gb_until_ready": round(ready_peak["system_used"] / 1e9, 2),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
    }
    print("CHILD-RESULT " + json.dumps(result), flush=True)


def _load_t5(folder: Path, T5Config, *_):  # noqa: N803 - config classes passed in
    import torch

    from itk.runtime.models.t5 import load_t5_fp8

    q = folder / "quant_models"
    return load_t5_fp8(q / "t5_fp8.safetensors", q / "t5_map_fp8.json", T5Config(), dtype=torch.bfloat16,
                       device="cuda")


def _load_clip(folder: Path, _t5, CLIPConfig, _vae):  # noqa: N803
    import torch

    from itk.runtime.models.clip import load_clip

    return load_clip(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", CLIPConfig(),
                     dtype=torch.float16, device="cuda")


def _load_vae(folder: Path, _t5, _clip, VAEConfig):  # noqa: N803
    import torch

    from itk.runtime.models.vae import load_vae

    return load_vae(folder / "Wan2.1_VAE.pth", VAEConfig(), dtype=torch.bfloat16, device="cuda")


def _load_audio(folder: Path, *_):
    from itk.runtime.models.audio import AudioEncoder

    return AudioEncoder.from_folder(folder / "chinese-wav2vec2-base", device="cpu")


# ---------------------------------------------------------------------------------------------------------


def drop_caches() -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError as exc:
        return f"not dropped ({exc})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/itk-load")
    parser.add_argument("--out", default="bench/results/load-h100.json")
    parser.add_argument("--modes", default="auto,mmap")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "LAYERS", "PIN"))
    opts = parser.parse_args()
    if opts.child:
        child(Path(opts.child[0]), int(opts.child[1]), opts.child[2])
        return

    import torch

    folder = Path(opts.dir)
    (folder / "quant_models").mkdir(parents=True, exist_ok=True)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dir": str(folder),
                    "preset": "rtx4090-24g: --quant fp8 --num_persistent_param_in_dit 0",
                    "targets": {"ready_s": "<= 60", "peak_rss_gb": "<= 24"}, "files": {}, "runs": []}

    def save() -> None:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    free = shutil.disk_usage(folder).free
    # Full size needs ~19.1 GB (DiT) + 6.7 + 4.8 + 0.5 + 0.4 GB; keep 4 GB spare.
    layers = 40 if free > 36e9 else max(1, int(40 * (free - 16e9) / 19.1e9))
    result["dit_layers_written"] = layers
    result["disk_free_gb_before"] = round(free / 1e9, 1)
    writers = (("dit_fp8", lambda: write_dit(folder / "quant_models", layers)),
               ("t5_fp8", lambda: write_t5(folder / "quant_models")),
               ("clip", lambda: write_clip(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")),
               ("vae", lambda: write_vae(folder / "Wan2.1_VAE.pth")),
               ("wav2vec2", lambda: write_wav2vec2(folder / "chinese-wav2vec2-base")))
    for name, write in writers:
        start = time.time()
        try:
            result["files"][name] = {"bytes": write(), "write_s": round(time.time() - start, 1)}
        except Exception as exc:  # noqa: BLE001 - keep the other files and measurements
            result["files"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-800:]}
        save()
        print(name, result["files"][name], flush=True)

    for pin in opts.modes.split(","):
        run: dict = {"pin": pin, "page_cache": drop_caches()}
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), str(layers), pin],
                                  capture_output=True, text=True, timeout=400)
            run["wall_s"] = round(time.time() - start, 2)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD-RESULT ")]
            if lines:
                run.update(json.loads(lines[-1][len("CHILD-RESULT "):]))
                marks = run["marks_s"]
                if "dit_ready" in marks and layers != 40:
                    before = marks.get("vae_ready", marks.get("imported_torch", 0))
                    run["ready_s_scaled_to_40_blocks"] = round(
                        marks["ready_for_first_step"] + (marks["dit_ready"] - before) * (40 / layers - 1), 2)
            else:
                run["error"] = f"exit {proc.returncode}: {proc.stderr[-1500:]}"
        except Exception as exc:  # noqa: BLE001
            run["error"] = f"{type(exc).__name__}: {exc}"
        result["runs"].append(run)
        save()
        print(json.dumps(run), flush=True)
    if not os.environ.get("ITK_BENCH_KEEP"):
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
