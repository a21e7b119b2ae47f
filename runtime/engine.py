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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from itk.runtime.buckets import bucket_table
from itk.runtime.clip_writer import ClipWriter
from itk.runtime.configs import ModelConfig, load_model_config
from itk.runtime.options import RuntimeOptions
from itk.runtime.parallel import Parallel, writes
from itk.runtime.pipeline import SeededNoise, StreamingPipeline
from itk.runtime.protocol import BadInput, Events, resume_folder
from itk.runtime.request import Media, Request, read_media
from itk.runtime.resume import ResumeState, fingerprint, settings_facts
from itk.runtime.sampler import local_passes
from itk.runtime.sampling import ClipPlan, plan_clips
from itk.runtime.video import stale_partials
from itk.runtime.warm import WarmModels, file_key, release
from itk.runtime.weights import QuantFile, WeightPaths, resolve

if TYPE_CHECKING:
    from itk.runtime.dub import Dubber

log = logging.getLogger(__name__)
# The official default negative prompt (wan/configs/wan_multitalk_14B.py): CFG's "null text".
NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where each model runs and in which dtype: bf16 DiT/T5 and fp16 CLIP on a GPU, float32 on the CPU
    (which has no fast half-precision kernels). The VAE always runs in float32, as officially."""

    device: torch.device
    dit_dtype: torch.dtype  # the DiT's compute (and the T5's, on the GPU)
    clip_dtype: torch.dtype
    t5_device: torch.device
    t5_dtype: torch.dtype

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def choose(cls, t5_cpu: bool) -> Placement:
        gpu = torch.cuda.is_available()
        device = torch.device("cuda" if gpu else "cpu")
        dit_dtype, clip_dtype = (torch.bfloat16, torch.float16) if gpu else (torch.float32, torch.float32)
        return cls(device=device, dit_dtype=dit_dtype, clip_dtype=clip_dtype,
                   t5_device=torch.device("cpu") if t5_cpu else device,
                   t5_dtype=torch.float32 if t5_cpu else dit_dtype)


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


def run(request: Request, events: Events, options: RuntimeOptions, *, resume: bool = False,
        parallel: Parallel | None = None, models: WarmModels | None = None) -> Path:
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
    engine = Engine(request=request, cfg=cfg, files=files, place=Placement.choose(request.t5_cpu), options=options,
                    models=models or WarmModels(keep=False),
                    events=events, parallel=parallel)
    return engine.generate(media, state)


def run_fingerprint(request: Request, cfg: ModelConfig, files: WeightPaths) -> dict[str, str]:
    """What a resumed run must share with the interrupted one: settings, the job's files, the weights."""
    inputs = {"cond_video": request.job.cond_video, **request.job.audio_files()}
    weights = [*files.files(), files.wav2vec_weights, *(path for path, _ in request.loras)]
    settings = {**settings_facts(request, cfg), "loras": [(str(p), s) for p, s in request.loras],
                "lora_alpha": request.lora_alpha}
    if request.job.speakers > 1:  # how the two tracks are laid out and where each speaker is decide the frames
        settings.update(audio_type=request.job.audio_type, bbox=request.job.bbox)
    if request.dub_region != "full":  # the saved clips are composited onto the source inside this region
        settings.update(dub_region=request.dub_region, bbox=request.job.bbox)
    return fingerprint(settings, inputs, weights)


@dataclass(kw_only=True)
class Engine:
    """One run's models, loaded one after another and freed as soon as their output is computed."""

    request: Request
    cfg: ModelConfig
    files: WeightPaths
    place: Placement
    options: RuntimeOptions
    events: Events
    models: WarmModels
    parallel: Parallel | None = None

    @property
    def streamed(self) -> bool:
        """The DiT streams from host memory (a low-VRAM plan): a warm worker keeps no encoder on the GPU."""
        return self.request.persistent_params is not None

    @property
    def dit_key(self) -> tuple[Any, ...]:
        """Everything that decides the placed, compiled DiT runner: a warm worker reuses it while this matches."""
        files = [self.files.dit.path, self.files.dit.map] if isinstance(self.files.dit, QuantFile) else self.files.dit
        r = self.request
        return ("dit", file_key(files), file_key([f for f, _ in r.loras]), tuple(s for _, s in r.loras), r.lora_alpha,
                self.cfg.dit, str(self.place.dit_dtype), str(self.place.device), r.persistent_params, self.options,
                self.parallel is None)

    @torch.no_grad()
    def generate(self, media: Media, state: ResumeState) -> Path:
        """Write the talk to request.output clip by clip, saving `state` after each; returns the mp4."""
        embedding = self.embed_speech(media)
        plan = plan_clips(embedding.shape[-3], self.request.sampling)  # frames: [F, ...] or, two speakers, [2, F, ...]
        state.check_plan(len(plan.starts))
        context, context_null = self.encode_prompt()
        references = media.reference.frames_for(plan.starts)
        clip_features = self.encode_references(references)
        pipeline = self.pipeline(plan, media.speaker_masks)
        clips = pipeline.clips(references=references, clip_features=clip_features, context=context,
                               context_null=context_null, audio=embedding, plan=plan, start=state.carry())
        if not writes(self.parallel):  # the other ranks compute the same clips with rank 0; only it writes
            for _ in clips:
                pass
            return self.request.output
        # Each finished clip is written (uint8, dub, resume segment, mp4) on the writer's thread while the next
        # one samples: between two clips the GPU waits only for the decode and the motion frames' encode.
        with ClipWriter(output=self.request.output, count=plan.length, audio=media.speech,
                        sample_rate=media.sample_rate, state=state, dubber=self.dubber(media, plan)) as writer:
            for out in clips:
                if out.carry is None:
                    self.events.stage("write_video", path=str(self.request.output))
                writer.put(out)
            path = writer.finish()
        state.remove()
        return path

    def dubber(self, media: Media, plan: ClipPlan) -> Dubber | None:
        """For `--dub_region face|bbox`, what composites each clip onto the source video's own frames."""
        if self.request.dub_region == "full":
            return None
        from itk.runtime.dub import Dubber

        job = self.request.job
        self.events.stage("dub_region", region=self.request.dub_region)
        boxes = [job.bbox[key] for key in ("person1", "person2") if job.bbox and key in job.bbox]
        return Dubber.open(job.cond_video, target=media.reference.target, length=plan.length,
                           mode=self.request.dub_region, boxes=boxes, speakers=job.speakers)

    def embed_speech(self, media: Media) -> torch.Tensor:
        """[F, layers, hidden] for one speaker; [2, F, layers, hidden] for two, F from both (`speaker_layout`)."""
        from itk.runtime.models.audio import AudioEncoder

        self.events.stage("audio_embedding")
        # On the GPU when there is one (the official script runs wav2vec2 on the CPU: minutes of speech then
        # take a minute there), in true float32: cuDNN's TF32 convolutions would round the features at 1e-3.
        key = ("audio", file_key([self.files.wav2vec_weights]), str(self.place.device))
        encoder = self.models.get("audio", key,
                                  lambda: AudioEncoder.from_folder(self.files.wav2vec, device=self.place.device))
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            if media.speakers is None:
                embedding = encoder.embed(media.speech).float().cpu()
            else:
                frames = self.speaker_layout(media)
                embedding = encoder.embed_speakers([media.speakers.first, media.speakers.second]).float().cpu()
                embedding = embedding[:, :frames]
        kept = self.models.done("audio", key, encoder, streamed_dit=self.streamed)
        del encoder
        if not kept:
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
        quantised = isinstance(t5_file, QuantFile)
        key = ("text", file_key([t5_file.path, t5_file.map] if quantised else [t5_file]), self.cfg.t5,
               str(p.t5_dtype), str(p.t5_device))

        def load() -> Any:
            if quantised:
                return load_t5_fp8(t5_file.path, t5_file.map, self.cfg.t5, dtype=p.t5_dtype, device=p.t5_device)
            return load_t5(t5_file, self.cfg.t5, dtype=p.t5_dtype, device=p.t5_device)

        t5 = self.models.get("text", key, load)
        ids, mask = tokenize([self.request.job.prompt, NEGATIVE_PROMPT])
        context, context_null = (c.to(p.device) for c in t5.encode(ids.to(p.t5_device), mask.to(p.t5_device)))
        kept = self.models.done("text", key, t5, streamed_dit=self.streamed)
        del t5
        if not kept:
            release()
        return context, context_null

    def encode_references(self, references: list[torch.Tensor]) -> list[torch.Tensor]:
        """CLIP features per clip; an image's one reference is encoded once."""
        from itk.runtime.models.clip import load_clip

        self.events.stage("image_encoding")
        p = self.place
        key = ("image", file_key([self.files.clip]), self.cfg.clip, str(p.clip_dtype), str(p.device))
        clip = self.models.get("image", key, lambda: load_clip(self.files.clip, self.cfg.clip, dtype=p.clip_dtype,
                                                                device=p.device))
        features: dict[int, torch.Tensor] = {}
        for ref in references:
            if id(ref) not in features:
                features[id(ref)] = clip.encode(ref.to(p.device, p.clip_dtype)).float()
        kept = self.models.done("image", key, clip, streamed_dit=self.streamed)
        del clip
        if not kept:
            release()
        return [features[id(r)] for r in references]

    def load_dit(self):
        """The DiT behind its runner, its attentions on the kernel of RuntimeOptions.attention and, on several
        GPUs, on this rank's share. Low-VRAM mode (persistent_params N): loaded into host memory, N parameters
        on the GPU and the other blocks streamed in per forward."""
        from itk.runtime.attention import Attention
        from itk.runtime.offload import DiTRunner, host_mode

        p, budget = self.place, self.request.persistent_params
        built_with = {"attention": Attention.resolve(self.options.attention, p.device), "parallel": self.parallel}
        load_device = torch.device("cpu") if budget is not None else p.device
        mapped = None
        if isinstance(self.files.dit, QuantFile):
            from itk.runtime.models.dit import load_dit_fp8
            from itk.runtime.quant import FP8Kernel

            kernel = FP8Kernel(self.options.fp8_matmul, self.options.fp8_fast_accum)
            dit, mapped = load_dit_fp8(self.files.dit.path, self.files.dit.map, self.cfg.dit, dtype=p.dit_dtype,
                                       device=load_device, kernel=kernel, **built_with)
        else:
            from itk.runtime.models.dit import load_dit

            dit = load_dit(list(self.files.dit), self.cfg.dit, dtype=p.dit_dtype, device=load_device, **built_with)
        mode = host_mode(dit, p.device, budget, self.options.pin)
        if self.request.loras and mode == "mmap":
            self.apply_loras(dit, "side")  # before placing: the side factors travel with each block
        # Compiling fuses the float32 norm/modulation/RoPE steps and the FP8 activation quantiser: 1.3-1.6x
        # per step on the H100 (bench/results/dit-step-h100*.json); ITK_COMPILE=0 runs eagerly. The runner is
        # told the host mode chosen above (free RAM is read once), so the LoRA method always matches it.
        pin = {"pinned": True, "mmap": False}.get(mode, self.options.pin)
        runner = DiTRunner(dit, device=p.device, budget=budget, compile=p.gpu and self.options.compile,
                           mapped=mapped, pin=pin, compile_threads=self.options.compile_threads)
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
        applied = apply_loras(dit, self.request.loras, alpha_mode=self.request.lora_alpha, fp8_method=method,
                              dtype=p.dit_dtype, device=p.device)
        for path, modules in applied.files:
            log.info("LoRA %s: %d modules applied (FP8 layers: %d merged, %d side path)", path.name, modules,
                     applied.merged_fp8, applied.side)

    def pipeline(self, plan: ClipPlan, speaker_masks: torch.Tensor | None = None) -> StreamingPipeline:
        """The VAE and the DiT loaded, behind the streaming loop (speaker_masks: two speakers' [3, N_h*N_w])."""
        from itk.runtime.models.vae import load_vae

        self.events.stage("load_models")
        p, sampling = self.place, self.request.sampling
        vae_key = ("vae", file_key([self.files.vae]), self.cfg.vae, str(p.device))
        vae = self.models.get("vae", vae_key, lambda: load_vae(self.files.vae, self.cfg.vae, dtype=torch.float32,
                                                               device=p.device))
        self.models.done("vae", vae_key, vae, streamed_dit=self.streamed)
        runner = self.models.get("dit", self.dit_key, self.load_dit)
        self.models.done("dit", self.dit_key, runner, streamed_dit=self.streamed)
        dit = runner
        if sampling.use_teacache:
            from itk.runtime.teacache import TeaCache, TeaCachedDiT

            # one slot per pass this process runs (under guidance parallel: its group's one)
            cache = TeaCache(self.request.size, thresh=sampling.teacache_thresh, steps=sampling.steps,
                             cycle=len(local_passes(sampling, self.parallel)))
            dit = TeaCachedDiT(runner.dit, runner.streamer, cache)
        pipeline = StreamingPipeline(dit=dit, vae=vae, sampling=sampling, noise=SeededNoise(sampling.seed, p.device),
                                     parallel=self.parallel, events=self.events, device=p.device, dtype=p.dit_dtype,
                                     speaker_masks=speaker_masks)
        self.events.stage("generate", clips=len(plan.starts), frames=plan.length,
                          attention=runner.dit.attention.name)  # the kernel that runs
        return pipeline
