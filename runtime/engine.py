"""The engine: loads what a Request needs, in the order that keeps memory low, runs the pipeline, writes the mp4.

Each clip's new frames go to the H.264 encoder as soon as they are decoded and colour-corrected, and into
the resume state beside the output: host memory stays flat in the video's length and a killed run can
continue from its last finished clip (`run(..., resume=True)`).

Order (each encoder freed before the next loads): the speech embedding (wav2vec2, on the CPU), the prompt
(T5), the reference frames (CLIP), then the VAE and the DiT for the streaming loop. The device and dtype
policy is `Placement`; the environment policy is `RuntimeOptions`, read once by the caller. The DiT is
placed, streamed and compiled by one `DiTRunner` the engine owns.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itk.runtime.buckets import bucket_table
from itk.runtime.configs import ModelConfig, load_model_config
from itk.runtime.options import RuntimeOptions
from itk.runtime.parallel import Parallel, writes
from itk.runtime.pipeline import ClipOutput, ClipPlan, SeededNoise, Settings, StreamingPipeline, plan_clips
from itk.runtime.protocol import BadInput, Events, resume_folder
from itk.runtime.request import Media, Request, read_media
from itk.runtime.resume import ResumeState, fingerprint, settings_facts
from itk.runtime.sampler import Guidance, Sampler
from itk.runtime.video import stale_partials, to_uint8_frames, write_mp4_stream
from itk.runtime.weights import QuantFile, WeightPaths, resolve

log = logging.getLogger(__name__)
# The official default negative prompt (wan/configs/wan_multitalk_14B.py): CFG's "null text".
NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


@dataclass(frozen=True)
class Placement:
    """Where each model runs and in which dtype: bf16 DiT/T5 and fp16 CLIP on a GPU, float32 on the CPU
    (which has no fast half-precision kernels). The VAE always runs in float32, as officially."""

    device: torch.device
    low: torch.dtype  # DiT and T5 compute
    half: torch.dtype  # CLIP
    t5_device: torch.device
    t5_dtype: torch.dtype

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def choose(cls, t5_cpu: bool) -> Placement:
        gpu = torch.cuda.is_available()
        device = torch.device("cuda" if gpu else "cpu")
        low, half = (torch.bfloat16, torch.float16) if gpu else (torch.float32, torch.float32)
        t5_device = torch.device("cpu") if t5_cpu else device
        return cls(device, low, half, t5_device, torch.float32 if t5_cpu else low)


def model_config(request: Request) -> ModelConfig:
    """The model sizes: the official ones, or a tiny config beside the weights / named by --model_config."""
    try:
        return load_model_config(folder=request.ckpt_dir, file=request.model_config)
    except (OSError, ValueError) as exc:
        raise BadInput(f"model config: {exc}", "give a valid itk_model_config.json or leave out --model_config") \
            from exc


def weight_paths(request: Request) -> WeightPaths:
    """Every file the request opens, through the manifest; MissingWeights for the first absent one."""
    return resolve(request.ckpt_dir, request.wav2vec_dir, request.infinitetalk, request.quant,
                   request.quant_file, request.variant)


def settings_of(request: Request) -> Settings:
    s = request.sampling
    return Settings(
        frame_num=s.frame_num, motion_frame=s.motion_frame, streaming=s.streaming, max_frame_num=s.max_frame_num,
        steps=s.steps, shift=s.shift,
        guidance=Guidance(s.text_scale, s.audio_scale, s.use_apg, s.apg_momentum, s.apg_norm_threshold),
        color_correction_strength=s.color_correction_strength,
    )


def run(request: Request, events: Events, options: RuntimeOptions, resume: bool = False,
        parallel: Parallel | None = None) -> Path:
    """Generate the request's video; returns the mp4 written (atomically) at request.output.

    resume: continue from the state folder an interrupted run of the same request left beside the output
    (see runtime/resume.py); without it an old state folder is replaced. parallel: this rank's place in a
    multi-GPU run (runtime/parallel.py); only rank 0 touches the output and the state folder.
    """
    cfg = model_config(request)
    events.stage("read_inputs")
    media = read_media(request, bucket_table(request.size, cfg.buckets))
    files = weight_paths(request)
    facts = run_fingerprint(request, cfg, files)
    if writes(parallel):
        state = ResumeState.prepare(request.output, facts, resume)
        for stale in stale_partials(request.output):  # a killed writer's temporary mp4 (SIGKILL skips clean-up)
            stale.unlink(missing_ok=True)
    else:  # read the saved state (rank 0 cannot save a clip before this rank joins its first step); never remove it
        state = (ResumeState.prepare(request.output, facts, True) if resume
                 else ResumeState(resume_folder(request.output), facts))
    if state.done:
        events.stage("resume", from_clip=state.done + 1, clips=state.clips, clips_done=state.done,
                     video_s=state.video_s)
    engine = Engine(request, cfg, files, Placement.choose(request.t5_cpu), options, events, parallel)
    return engine.generate(media, state)


def run_fingerprint(request: Request, cfg: ModelConfig, files: WeightPaths) -> dict[str, str]:
    """What a resumed run must share with the interrupted one: settings, the job's files, the weights."""
    inputs = {"cond_video": request.job.cond_video, **request.job.audio_files()}
    weights = [*files.files(), files.wav2vec_weights, *(path for path, _ in request.loras)]
    settings = {**settings_facts(request, cfg), "loras": [(str(p), s) for p, s in request.loras],
                "lora_alpha": request.lora_alpha}
    if request.job.speakers > 1:  # how the two tracks are laid out and where each speaker is decide the frames
        settings.update(audio_type=request.job.audio_type, bbox=request.job.bbox)
    return fingerprint(settings, inputs, weights)


def release() -> None:
    """Return freed model memory now (callers `del` their last reference first): to the GPU, and to the
    OS, since glibc keeps freed heap memory (a model loaded and dropped stays in the process's RSS, which
    is what the kernel's OOM killer counts) until asked to trim."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim(0); nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Engine:
    """One run's models, loaded one after another and freed as soon as their output is computed."""

    request: Request
    cfg: ModelConfig
    files: WeightPaths
    place: Placement
    options: RuntimeOptions
    events: Events
    parallel: Parallel | None = None

    @torch.no_grad()
    def generate(self, media: Media, state: ResumeState) -> Path:
        """Write the talk to request.output clip by clip, saving `state` after each; returns the mp4."""
        settings = settings_of(self.request)
        if self.parallel is not None:
            settings = self.parallel.settings(settings)
        embedding = self.embed_speech(media)
        plan = plan_clips(embedding.shape[-3], settings)  # frames: [F, ...] or, two speakers, [2, F, ...]
        state.check_plan(len(plan.starts))
        context, context_null = self.encode_prompt()
        references = media.reference.frames_for(plan.starts)
        clip_features = self.encode_references(references)
        pipeline = self.pipeline(settings, plan, media.speaker_masks)
        clips = pipeline.clips(references, clip_features, context, context_null, embedding, plan, state.carry())
        if not writes(self.parallel):  # the other ranks compute the same clips with rank 0; only it writes
            for _ in clips:
                pass
            return self.request.output
        path = write_mp4_stream(self.request.output, self._frames(clips, state), plan.length, media.speech,
                                media.sample_rate)
        state.remove()
        return path

    def _frames(self, clips: Iterator[ClipOutput], state: ResumeState) -> Iterator[np.ndarray]:
        """uint8 frames for the encoder: the saved clips first, then each new clip as it finishes (saved
        to the state before it is handed on, so a kill after the hand-off loses nothing)."""
        yield from state.replay()
        for out in clips:
            frames = to_uint8_frames(out.frames)
            if out.carry is None:
                self.events.stage("write_video", path=str(self.request.output))
            else:
                state.save(out.index, frames, out.carry)
            yield frames

    def embed_speech(self, media: Media) -> torch.Tensor:
        """[F, layers, hidden] for one speaker; [2, F, layers, hidden] for two, F from both (`speaker_layout`)."""
        from itk.runtime.models.audio import AudioEncoder

        self.events.stage("audio_embedding")
        # On the GPU when there is one (the official script runs wav2vec2 on the CPU: minutes of speech then
        # take a minute there), in true float32: cuDNN's TF32 convolutions would round the features at 1e-3.
        encoder = AudioEncoder.from_folder(self.files.wav2vec, device=self.place.device)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            if media.speakers is None:
                embedding = encoder.embed(media.speech).float().cpu()
            else:
                frames = self.speaker_layout(media)
                embedding = encoder.embed_speakers([media.speakers.first, media.speakers.second]).float().cpu()
                embedding = embedding[:, :frames]
        del encoder
        release()
        if embedding.shape[-3] < 1:
            raise BadInput(f"cond_audio.person1 {self.request.speech}: shorter than one video frame (40 ms)",
                           "give a longer speech recording")
        return embedding

    def speaker_layout(self, media: Media) -> int:
        """Say how two speakers are laid out (log + a `speakers` stage event, with the notes: padding, overlap);
        returns the video's frames by the both-speakers rule (runtime/models/audio.py two_speaker_frames)."""
        from itk.runtime.models.audio import two_speaker_frames

        job = self.request.job
        assert media.track_samples is not None and job.audio_type is not None
        frames = two_speaker_frames(*media.track_samples, job.audio_type)
        masks = "bbox" if job.bbox else "official split"
        for note in media.notes:
            log.warning("two speakers: %s", note)
        log.info("two speakers, audio_type %s, masks from the %s, %d frames", job.audio_type, masks, frames)
        self.events.stage("speakers", speakers=2, audio_type=job.audio_type, masks=masks, frames=frames,
                          notes=list(media.notes))
        return frames

    def encode_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        from itk.runtime.models.t5 import load_t5, load_t5_fp8, load_tokenizer

        self.events.stage("text_encoding")
        p = self.place
        tokenize = load_tokenizer(self.files.tokenizer, self.cfg.t5.text_len)
        t5_file = self.files.t5
        if isinstance(t5_file, QuantFile):
            t5 = load_t5_fp8(t5_file.path, t5_file.map, self.cfg.t5, p.t5_dtype, p.t5_device)
        else:
            t5 = load_t5(t5_file, self.cfg.t5, p.t5_dtype, p.t5_device)
        ids, mask = tokenize([self.request.job.prompt, NEGATIVE_PROMPT])
        context, context_null = (c.to(p.device) for c in t5.encode(ids.to(p.t5_device), mask.to(p.t5_device)))
        del t5
        release()
        return context, context_null

    def encode_references(self, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """CLIP features per clip; an image's one reference is encoded once."""
        from itk.runtime.models.clip import load_clip

        self.events.stage("image_encoding")
        p = self.place
        clip = load_clip(self.files.clip, self.cfg.clip, p.half, p.device)
        features: dict[int, torch.Tensor] = {}
        for ref in references:
            if id(ref) not in features:
                features[id(ref)] = clip.encode(ref.to(p.device, p.half)).float()
        del clip
        release()
        return [features[id(r)] for r in references]

    def load_dit(self):
        """The DiT behind its runner. Low-VRAM mode (persistent_params N): loaded into host memory, N
        parameters on the GPU and the other blocks streamed in per forward."""
        from itk.runtime.attention import configure_attention
        from itk.runtime.offload import DiTRunner, host_mode

        p, budget = self.place, self.request.persistent_params
        configure_attention(self.options.attention)
        load_device = torch.device("cpu") if budget is not None else p.device
        mapped = None
        if isinstance(self.files.dit, QuantFile):
            from itk.runtime.models.dit import load_dit_fp8
            from itk.runtime.quant import FP8Kernel

            dit, mapped = load_dit_fp8(self.files.dit.path, self.files.dit.map, self.cfg.dit, p.low, load_device,
                                       FP8Kernel(self.options.fp8_matmul, self.options.fp8_fast_accum))
        else:
            from itk.runtime.models.dit import load_dit

            dit = load_dit(list(self.files.dit), self.cfg.dit, p.low, load_device)
        mode = host_mode(dit, p.device, budget, self.options.pin)
        if self.request.loras and mode == "mmap":
            self.apply_loras(dit, "side")  # before placing: the side factors travel with each block
        # Compiling fuses the float32 norm/modulation/RoPE steps and the FP8 activation quantiser: 1.3-1.6x
        # per step on the H100 (bench/results/dit-step-h100*.json); ITK_COMPILE=0 runs eagerly.
        runner = DiTRunner(dit, p.device, budget, compile=p.gpu and self.options.compile, mapped=mapped,
                           pin=self.options.pin, compile_threads=self.options.compile_threads)
        if self.request.loras and mode != "mmap":
            self.apply_loras(dit, "merge")  # in place, into the pinned or GPU-resident blocks
        return runner

    def apply_loras(self, dit, method: str) -> None:
        """The request's LoRA files into the DiT (runtime/lora.py), computed on the GPU. FP8 layers are
        merged ("merge", once the DiT is placed) unless the streamed blocks stay in the memory-mapped file
        (too little RAM to pin them): there a merge would copy the file into process memory, so the layers
        take the low-rank side path ("side", before placing) instead."""
        from itk.runtime.lora import apply_loras

        p = self.place
        applied = apply_loras(dit, self.request.loras, self.request.lora_alpha, method, p.low, device=p.device)
        for path, modules in applied.files:
            log.info("LoRA %s: %d modules applied (FP8 layers: %d merged, %d side path)", path.name, modules,
                     applied.merged_fp8, applied.side)

    def pipeline(self, settings: Settings, plan: ClipPlan,
                 speaker_masks: torch.Tensor | None = None) -> StreamingPipeline:
        """The VAE and the DiT loaded, behind the streaming loop (speaker_masks: two speakers' [3, N_h*N_w])."""
        from itk.runtime.models.vae import load_vae

        self.events.stage("load_models")
        p = self.place
        vae = load_vae(self.files.vae, self.cfg.vae, torch.float32, p.device)
        runner = self.load_dit()
        runner.dit.parallel = self.parallel
        dit = runner
        if self.request.sampling.use_teacache:
            from itk.runtime.teacache import TeaCache, TeaCachedDiT

            passes = len(Sampler(settings.guidance).passes())
            cache = TeaCache(self.request.size, self.request.sampling.teacache_thresh, settings.steps, cycle=passes)
            dit = TeaCachedDiT(runner.dit, runner.streamer, cache)
        pipeline = StreamingPipeline(dit, vae, settings, SeededNoise(self.request.sampling.seed, p.device),
                                     self.events, p.device, p.low, speaker_masks=speaker_masks)
        self.events.stage("generate", clips=len(plan.starts), frames=plan.length)
        return pipeline
