"""`python -m itk.runtime.generate`: the guide's `generate_infinitetalk.py` command line, on our runtime.

The official flags that matter keep their names and meanings, so a command from the guide works with only
the program name changed; official flags we do not implement are refused by name ("not supported yet")
instead of being silently ignored. Exit codes (DESIGN.md, generator protocol): 0 done, 2 bad input (one
line on stderr), 3 missing weights, 130 interrupted; progress goes to stderr as `ITK-EVENT {json}` lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from itk.runtime.events import Events

EXIT_OK, EXIT_BAD_INPUT, EXIT_MISSING_WEIGHTS, EXIT_INTERRUPTED = 0, 2, 3, 130
SIZES = ("infinitetalk-480", "infinitetalk-720")
DEFAULT_SHIFT = {"infinitetalk-480": 7.0, "infinitetalk-720": 11.0}
# The official default negative prompt (wan/configs/wan_multitalk_14B.py): CFG's "null text".
NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
DIT_SHARDS = [f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
WAV2VEC_FILES = ("config.json", "preprocessor_config.json")
WAV2VEC_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# Official flags we accept but do not implement yet: refused by name when given a non-default value.
UNSUPPORTED: dict[str, Any] = {
    "dit_path": None, "lora_dir": None, "lora_scale": None, "dit_fsdp": False, "t5_fsdp": False,
    "ulysses_size": 1, "ring_size": 1, "use_teacache": False, "teacache_thresh": None, "scene_seg": False,
}


class BadInput(Exception):
    """Exit 2: the user's input (flags, JSON, image, audio) cannot be used; the message says which and why."""


class MissingWeights(Exception):
    """Exit 3: a weights file is absent; the message names it and how to get it."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m itk.runtime.generate", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="infinitetalk-14B", choices=["infinitetalk-14B"])
    p.add_argument("--size", default="infinitetalk-480", choices=SIZES)
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--max_frame_num", type=int, default=1000)
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--infinitetalk_dir", help="the file single/infinitetalk.safetensors (without --quant)")
    p.add_argument("--wav2vec_dir", required=True)
    p.add_argument("--model_config", help="itk_model_config.json (default: the one in --ckpt_dir, if any)")
    p.add_argument("--input_json", default="examples.json")
    p.add_argument("--save_file", help="output stem; .mp4 is appended")
    p.add_argument("--base_seed", type=int, default=42)
    p.add_argument("--motion_frame", type=int, default=9)
    p.add_argument("--mode", choices=["clip", "streaming"], default="clip")
    p.add_argument("--sample_steps", type=int)
    p.add_argument("--sample_shift", type=float)
    p.add_argument("--sample_text_guide_scale", type=float, default=5.0)
    p.add_argument("--sample_audio_guide_scale", type=float, default=4.0)
    p.add_argument("--color_correction_strength", type=float, default=1.0)
    p.add_argument("--num_persistent_param_in_dit", type=int)
    p.add_argument("--use_apg", action="store_true")
    p.add_argument("--apg_momentum", type=float, default=-0.75)
    p.add_argument("--apg_norm_threshold", type=float, default=55.0)
    p.add_argument("--offload_model", help="accepted; encoders are always freed after use")
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument("--audio_save_dir", help="accepted; no scratch files are written")
    p.add_argument("--audio_mode", default="localfile", choices=["localfile", "tts"])
    p.add_argument("--quant", choices=["fp8", "int8"])
    p.add_argument("--quant_dir", help="the file quant_models/infinitetalk_single_fp8.safetensors")
    for name in ("dit_path", "teacache_thresh"):
        p.add_argument(f"--{name}")
    p.add_argument("--lora_dir", nargs="+")
    p.add_argument("--lora_scale", nargs="+", type=float)
    p.add_argument("--ulysses_size", type=int, default=1)
    p.add_argument("--ring_size", type=int, default=1)
    for flag in ("dit_fsdp", "t5_fsdp", "use_teacache", "scene_seg"):
        p.add_argument(f"--{flag}", action="store_true")
    return p


@dataclass
class Job:
    prompt: str
    cond_video: Path
    audio: Path


def _existing(value: str, json_dir: Path, what: str) -> Path:
    path = Path(value).expanduser()
    for candidate in (path, json_dir / path):
        if candidate.is_file():
            return candidate
    raise BadInput(f"{what} {value}: file not found (paths are relative to the current folder)")


def read_job(path: Path) -> Job:
    """The official input JSON: prompt, cond_video (image or video) and cond_audio.person1."""
    if not path.is_file():
        raise BadInput(f"--input_json {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"--input_json {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BadInput(f"--input_json {path}: must be a JSON object with prompt, cond_video, cond_audio")
    audio = data.get("cond_audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("person1"), str):
        raise BadInput(f"--input_json {path}: needs \"cond_audio\": {{\"person1\": \"speech.wav\"}}")
    if len(audio) > 1:
        raise BadInput(f"--input_json {path}: two speakers (person2) are not supported yet")
    if not isinstance(data.get("cond_video"), str):
        raise BadInput(f"--input_json {path}: needs \"cond_video\": an image or video path")
    return Job(
        prompt=str(data.get("prompt", "")),
        cond_video=_existing(data["cond_video"], path.parent, "cond_video"),
        audio=_existing(audio["person1"], path.parent, "cond_audio.person1"),
    )


def check_flags(args: argparse.Namespace) -> None:
    for name, default in UNSUPPORTED.items():
        if getattr(args, name) != default:
            raise BadInput(f"--{name} is not supported yet by itk's generator; leave it out")
    if args.quant and not args.quant_dir:
        raise BadInput(f"--quant {args.quant} needs --quant_dir (the quantised DiT file)")
    if args.quant == "int8":
        raise BadInput("--quant int8 is not supported yet (its T5 file does not exist upstream); use --quant fp8")
    if not args.quant and not args.infinitetalk_dir:
        raise BadInput("--infinitetalk_dir is required without --quant (single/infinitetalk.safetensors)")
    if args.audio_mode != "localfile":
        raise BadInput("--audio_mode tts is not supported yet; give a speech file in cond_audio")
    if args.frame_num < 5 or (args.frame_num - 1) % 4:
        raise BadInput(f"--frame_num {args.frame_num}: must be 4n+1 (e.g. 81)")
    if not 1 <= args.motion_frame < args.frame_num:
        raise BadInput(f"--motion_frame {args.motion_frame}: must be between 1 and frame_num - 1")
    if not 0.0 <= args.color_correction_strength <= 1.0:
        raise BadInput("--color_correction_strength must be between 0 and 1")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise BadInput("--sample_steps must be at least 1")


def weight_paths(args: argparse.Namespace) -> dict[str, Any]:
    """Every file the run opens, checked up front so a missing one fails in a second, not after loading.

    Without --quant: the seven DiT shards + infinitetalk.safetensors and the bf16 T5 .pth. With --quant fp8:
    the quantised DiT (--quant_dir) and its map, and t5_fp8.safetensors + t5_map_fp8.json beside it.
    """
    ckpt, wav2vec = Path(args.ckpt_dir), Path(args.wav2vec_dir)
    files: dict[str, Any] = {"tokenizer": ckpt / T5_TOKENIZER, "clip": ckpt / CLIP_FILE, "vae": ckpt / VAE_FILE,
                             "wav2vec": wav2vec}
    if args.quant:
        dit = Path(args.quant_dir)
        files["dit"], files["t5"] = [dit], dit.parent / f"t5_{args.quant}.safetensors"
        files["t5_map"] = dit.parent / f"t5_map_{args.quant}.json"
        maps = [Path(str(dit).replace("safetensors", "json")), files["t5_map"]]
    else:
        files["dit"] = [ckpt / s for s in DIT_SHARDS] + [Path(args.infinitetalk_dir)]
        files["t5"], maps = ckpt / T5_FILE, []
    needed = [ckpt / "config.json", files["t5"], files["clip"], files["vae"], *files["dit"], *maps]
    needed += [wav2vec / f for f in WAV2VEC_FILES]
    for path in needed:
        if not path.is_file():
            raise MissingWeights(f"{path}: missing weights file (run `itk fetch` or check --ckpt_dir/--wav2vec_dir)")
    if not files["tokenizer"].is_dir():
        raise MissingWeights(f"{files['tokenizer']}: missing tokenizer folder (run `itk fetch`)")
    if not any((wav2vec / f).is_file() for f in WAV2VEC_WEIGHTS):
        raise MissingWeights(f"{wav2vec / WAV2VEC_WEIGHTS[0]}: missing wav2vec2 weights (run `itk fetch`)")
    return files


def read_speech(path: Path) -> tuple[Any, int]:
    """16 kHz mono speech, loudness-normalised to -23 LUFS; silence is refused (nothing to lip-sync)."""
    from itk.runtime.models.audio import load_speech, loudness_normalize

    try:
        samples = load_speech(path)
    except Exception as exc:  # the loader's one-line message names the file
        raise BadInput(f"cond_audio.person1 {path}: cannot read audio ({str(exc).splitlines()[0]})") from exc
    if len(samples) == 0 or float(abs(samples).max()) < 1e-4:
        raise BadInput(f"cond_audio.person1 {path}: the audio is silent; give a speech recording")
    if len(samples) < 0.4 * 16000:
        # BS.1770 gates in 400 ms blocks: shorter speech cannot be measured, so it is left as it is,
        # like the official rule for unmeasurable (silent) tracks.
        return samples, 16000
    return loudness_normalize(samples, 16000), 16000


def default_stem(args: argparse.Namespace, prompt: str) -> str:
    text = prompt.replace(" ", "_").replace("/", "_")[:50]
    return f"{args.task}_{args.size}_{args.ulysses_size}_{args.ring_size}_{text}_{time.strftime('%Y%m%d_%H%M%S')}"


def _release() -> None:
    """Return freed model memory now (callers `del` their last reference first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, events: Events) -> Path:
    check_flags(args)
    job = read_job(Path(args.input_json))
    output = Path(f"{args.save_file or default_stem(args, job.prompt)}.mp4")
    from itk.runtime.buckets import bucket_table
    from itk.runtime.configs import load_model_config
    from itk.runtime.pipeline import ReferenceSource, Settings
    from itk.runtime.sampler import Guidance

    if args.model_config and not Path(args.model_config).is_file():
        raise BadInput(f"--model_config {args.model_config}: file not found")
    try:
        cfg = load_model_config(folder=args.ckpt_dir, file=args.model_config)
    except (OSError, ValueError) as exc:
        raise BadInput(f"model config: {exc}") from exc
    events.stage("read_inputs")
    try:
        source = ReferenceSource(job.cond_video, bucket_table(args.size, cfg.buckets))
    except Exception as exc:  # PIL / PyAV errors: an unreadable or non-image file
        raise BadInput(f"cond_video {job.cond_video}: cannot read as image or video ({exc})") from exc
    samples, sr = read_speech(job.audio)
    files = weight_paths(args)
    settings = Settings(
        frame_num=args.frame_num, motion_frame=args.motion_frame, streaming=args.mode == "streaming",
        max_frame_num=args.max_frame_num if args.mode == "streaming" else args.frame_num,
        steps=args.sample_steps or 40, shift=args.sample_shift or DEFAULT_SHIFT[args.size],
        guidance=Guidance(args.sample_text_guide_scale, args.sample_audio_guide_scale, args.use_apg,
                          args.apg_momentum, args.apg_norm_threshold),
        color_correction_strength=args.color_correction_strength,
    )
    frames = generate_frames(args, job, source, samples, files, cfg, settings, events)
    events.stage("write_video", path=str(output))
    from itk.runtime.video import to_uint8_frames, write_mp4

    return write_mp4(to_uint8_frames(frames), samples, sr, output)


def generate_frames(args, job, source, samples, files, cfg, settings, events):
    """Encoders first (each freed after use), then VAE + DiT for the streaming loop."""
    import torch

    from itk.runtime.models import audio as audio_mod
    from itk.runtime.models.clip import load_clip
    from itk.runtime.models.dit import load_dit
    from itk.runtime.models.t5 import load_t5, load_t5_fp8, load_tokenizer
    from itk.runtime.models.vae import load_vae
    from itk.runtime.offload import enable_streaming
    from itk.runtime.pipeline import SeededNoise, StreamingPipeline, plan_clips
    from itk.runtime.quant import load_dit_fp8

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    low, half = (torch.bfloat16, torch.float16) if gpu else (torch.float32, torch.float32)

    events.stage("audio_embedding")
    encoder = audio_mod.AudioEncoder.from_folder(files["wav2vec"], device="cpu")
    with torch.no_grad():
        embedding = encoder.embed(samples).float().cpu()
    del encoder
    _release()
    if embedding.shape[0] < 1:
        raise BadInput(f"cond_audio.person1 {job.audio}: shorter than one video frame (40 ms)")
    plan = plan_clips(embedding.shape[0], settings)

    events.stage("text_encoding")
    t5_device = torch.device("cpu") if args.t5_cpu else device
    tokenize = load_tokenizer(files["tokenizer"], cfg.t5.text_len)
    t5_dtype = low if not args.t5_cpu else torch.float32
    if args.quant:
        t5 = load_t5_fp8(files["t5"], files["t5_map"], cfg.t5, t5_dtype, t5_device)
    else:
        t5 = load_t5(files["t5"], cfg.t5, t5_dtype, t5_device)
    with torch.no_grad():
        ids, mask = tokenize([job.prompt, NEGATIVE_PROMPT])
        context, context_null = (c.to(device) for c in t5.encode(ids.to(t5_device), mask.to(t5_device)))
    del t5
    _release()

    events.stage("image_encoding")
    references = source.frames_for(plan.starts)
    clip = load_clip(files["clip"], cfg.clip, half, device)
    features: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for ref in references:
            if id(ref) not in features:
                features[id(ref)] = clip.encode(ref.to(device, half)).float()
    clip_features = [features[id(r)] for r in references]
    del clip
    _release()

    events.stage("load_models")
    vae = load_vae(files["vae"], cfg.vae, torch.float32, device)
    # Low-VRAM mode (--num_persistent_param_in_dit N): the DiT is loaded into host memory and only N
    # parameters stay on the device; the other blocks are streamed in per forward (runtime/offload.py).
    streaming = args.num_persistent_param_in_dit is not None
    dit_device = torch.device("cpu") if streaming else device
    if args.quant:
        dit = load_dit_fp8(files["dit"][0], None, cfg.dit, low, dit_device)
    else:
        dit = load_dit(files["dit"], cfg.dit, low, dit_device)
    if streaming:
        enable_streaming(dit, args.num_persistent_param_in_dit, device)
    if gpu and os.environ.get("ITK_COMPILE", "1") != "0":
        # Fuses the float32 norm/modulation/RoPE steps and the FP8 activation quantiser: 1.3-1.6x per step
        # on the H100 (bench/results/dit-step-h100*.json); ITK_COMPILE=0 runs eagerly.
        dit.compile_blocks()
    pipeline = StreamingPipeline(dit, vae, settings, SeededNoise(_seed(args.base_seed), device), events,
                                 device, low)
    events.stage("generate", clips=len(plan.starts), frames=plan.length)
    with torch.no_grad():
        return pipeline.run(references, clip_features, context, context_null, embedding, plan)


def _seed(seed: int) -> int:
    import random

    return seed if seed >= 0 else random.randint(0, 99999999)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so temp files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _stop)
    events = Events()
    started = time.monotonic()
    try:
        args = build_parser().parse_args(argv)
        output = run(args, events)
    except BadInput as exc:
        return _fail(events, EXIT_BAD_INPUT, str(exc))
    except MissingWeights as exc:
        return _fail(events, EXIT_MISSING_WEIGHTS, str(exc))
    except KeyboardInterrupt:
        return _fail(events, EXIT_INTERRUPTED, "interrupted; no video was written")
    events.emit("done", path=str(output), seconds=round(time.monotonic() - started, 2))
    print(output)
    return EXIT_OK


def _fail(events: Events, code: int, message: str) -> int:
    events.emit("error", message=message, exit_code=code)
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
