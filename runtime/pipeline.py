"""The streaming long-video loop of InfiniteTalk (the official `generate` loop; the pipeline_A golden records it).

A talk of any length is generated as overlapping clips of `frame_num` frames. Each later clip is anchored on
the last `motion_frame` decoded (and colour-corrected) frames of the one before, so the clips join without a
cut; the audio embedding is windowed per clip, and the run ends at the audio's end or `max_frame_num`.

The models are passed in (DiT, VAE, a CLIP feature function) so the loop runs the same on tiny test
weights and on the real 14B model, and the random draws come from an injectable noise source so a test
can replay the official run's recorded draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from itk.runtime.buckets import choose_bucket, fit_frame
from itk.runtime.color import match_colors
from itk.runtime.models.audio import audio_windows
from itk.runtime.protocol import FPS, Events, is_video
from itk.runtime.sampler import Sampler, euler_step, shifted_timesteps
from itk.runtime.sampling import ClipPlan, Sampling

if TYPE_CHECKING:
    from itk.runtime.parallel import Parallel


class Noise(Protocol):
    """Where the run's random draws come from, in the official order; `state`/`restore` let a resumed run
    continue the stream exactly where the interrupted one stood."""

    def randn(self, shape: Sequence[int], device: torch.device) -> torch.Tensor: ...

    def randn_like(self, like: torch.Tensor) -> torch.Tensor: ...

    def state(self) -> torch.Tensor: ...

    def restore(self, state: torch.Tensor) -> None: ...


class SeededNoise:
    """torch's generator seeded like `torch.manual_seed(seed)`: on CPU it reproduces the official draws."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def randn(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=device, dtype=torch.float32)

    def randn_like(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())


def preprocess_reference(image, target: tuple[int, int]) -> torch.Tensor:
    """A PIL image -> [1, 3, 1, th, tw] in [-1, 1], framed into the bucket by `buckets.fit_frame`."""
    pixels = torch.from_numpy(fit_frame(np.asarray(image.convert("RGB")), target))
    return (pixels.permute(2, 0, 1)[None, :, None] / 255 - 0.5) * 2


class ReferenceSource:
    """The reference frame per clip: the image itself, or the source video's frame at the clip's start."""

    def __init__(self, path, table: dict[str, list[int]]) -> None:
        from PIL import Image

        from itk.runtime.video import VideoFrames

        self.video = VideoFrames(path) if is_video(path) else None
        first = Image.fromarray(self.video[0]) if self.video is not None else Image.open(path)
        first.load()
        self.size = (first.height, first.width)
        self.target = choose_bucket(first.height, first.width, table)
        self._first = preprocess_reference(first, self.target)

    def frames_for(self, starts: Sequence[int]) -> list[torch.Tensor]:
        """One preprocessed frame per clip start (the same tensor for every clip of an image)."""
        from PIL import Image

        if self.video is None:
            return [self._first] * len(starts)
        return [self._first] + [
            preprocess_reference(Image.fromarray(self.video[s]), self.target) for s in starts[1:]
        ]


def mirror_pad(embedding: torch.Tensor, count: int) -> torch.Tensor:
    """The official end padding: append the last `count` frames in reverse order."""
    return torch.cat([embedding, torch.flip(embedding[-count:], dims=[0])]) if count else embedding


def first_frame_mask(latent_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """[1, 4, T_lat, h, w]: 1 on latent frame 0 (the known reference), 0 elsewhere."""
    mask = torch.zeros(1, 4, latent_frames, lat_h, lat_w)
    mask[:, :, 0] = 1
    return mask


class DiT(Protocol):
    """A denoiser; a two-speaker run also passes `speaker_masks=` (a one-speaker run never does)."""

    def __call__(self, x, t, context, clip_fea, y, audio, **speakers) -> torch.Tensor: ...


class VAE(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


# Called with (clip index, step index, pass name, latent, timestep, prediction) after each DiT call.
CallHook = Callable[[int, int, str, torch.Tensor, torch.Tensor, torch.Tensor], None]
# Called with (clip index, finished clip [1, 3, F, H, W]); returns the clip the next one is anchored on.
ClipHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class Carry:
    """Everything the loop carries from one clip to the next: with it a run continues at `clip` exactly as if
    it had never stopped (the resume state saves it after each clip)."""

    clip: int  # index of the next clip
    frames: int  # video frames emitted so far
    motion: torch.Tensor  # [16, T_motion, h, w]: the latent of the frames the next clip is anchored on
    color_ref: torch.Tensor  # [1, 3, 1, H, W]: the frame every clip's colours are matched to
    noise: torch.Tensor  # the random stream's state


@dataclass
class ClipOutput:
    """One finished clip: its new frames [3, N, H, W] in [-1, 1] (cut at the video's length) and, unless it
    was the last clip, what the next one needs."""

    index: int
    frames: torch.Tensor
    carry: Carry | None


@dataclass(kw_only=True)
class StreamingPipeline:
    """Generates the frames of one talk, clip by clip (`clips`). parallel: on several GPUs, this rank's place
    (its Sampler runs this rank's share of each step's passes); None on one."""

    dit: DiT
    vae: VAE
    sampling: Sampling
    noise: Noise
    parallel: Parallel | None = None
    events: Events | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    on_dit_call: CallHook | None = None
    # Tests anchor each clip on the official previous clip: with random tiny weights the clip-to-clip
    # feedback amplifies float32 rounding about tenfold per clip, which would hide real differences.
    on_clip: ClipHook | None = None
    # Two speakers: [3, N_h*N_w] (runtime/speakers.py), computed once per run from the reference; the passes
    # that carry both speakers' audio (cond, drop_text) get them, the single zero speaker's passes do not.
    speaker_masks: torch.Tensor | None = None

    def clips(
        self,
        *,
        references: Sequence[torch.Tensor],
        clip_features: Sequence[torch.Tensor],
        context: torch.Tensor,
        context_null: torch.Tensor,
        audio: torch.Tensor,
        plan: ClipPlan,
        start: Carry | None = None,
    ) -> Iterator[ClipOutput]:
        """Each clip of `plan` as it finishes (from `start.clip` when resuming); references/clip_features hold
        one entry per clip (see ReferenceSource). Only one clip's frames are alive at a time. audio:
        [F, layers, hidden] for one speaker, [2, F, layers, hidden] for two (speaker 1 first)."""
        s, frames = self.sampling, plan.frames
        timesteps = [t.to(self.device) for t in shifted_timesteps(s.steps, s.shift)]
        if start is None:
            color_ref, written = references[0], 0
            motion = self.vae.encode(references[0].to(self.device)[0].float())
        else:
            color_ref, written, motion = start.color_ref, start.frames, start.motion.to(self.device)
            self.noise.restore(start.noise)
        y_for: tuple[int, torch.Tensor] | None = None  # the last reference's y: an image's one is reused
        first = 0 if start is None else start.clip
        for k in range(first, len(plan.starts)):
            last = k == len(plan.starts) - 1
            if self.events:
                self.events.emit("clip", clip=k + 1, clips=len(plan.starts), clips_done=k,
                                 video_s=round(written / FPS, 2))
            ref = references[k].to(self.device)
            noise = self.noise.randn((16, (frames - 1) // 4 + 1, ref.shape[-2] // 8, ref.shape[-1] // 8), self.device)
            if y_for is None or y_for[0] != id(references[k]):
                y_for = (id(references[k]), self._y(ref, frames))
            tracks = audio if audio.dim() == 4 else audio[None]
            window = torch.stack([audio_windows(mirror_pad(track, plan.pad) if last else track, plan.starts[k], frames)
                                  for track in tracks]).to(self.device, self.dtype)
            latent = self._denoise(k, noise=noise, motion=motion, y=y_for[1], window=window,
                                   clip_fea=clip_features[k], context=context, context_null=context_null,
                                   timesteps=timesteps)
            # Colour correction where the frames are: on a GPU it takes milliseconds, scikit-image on the CPU
            # took 11 s per 480p clip (bench/results/speed-h200.json); only the new frames go to the host.
            video = match_colors(self.vae.decode(latent)[None].float(), color_ref, s.color_correction_strength)
            new = (video if k == 0 else video[:, :, s.motion_frame:])[0, :, : plan.length - written].cpu()
            written += new.shape[1]
            anchor = self.on_clip(k, video) if self.on_clip else video
            carry = None
            if not last:
                motion = self.vae.encode(anchor[:, :, -s.motion_frame:].to(self.device)[0].float())
                carry = Carry(clip=k + 1, frames=written, motion=motion, color_ref=color_ref, noise=self.noise.state())
            yield ClipOutput(k, new, carry)

    def _y(self, ref: torch.Tensor, frames: int) -> torch.Tensor:
        """[1, 20, T_lat, h, w]: the first-frame mask and the latent of (reference + grey frames)."""
        padded = torch.cat([ref, torch.zeros(1, 3, frames - 1, *ref.shape[-2:], device=ref.device)], dim=2)
        latent = self.vae.encode(padded[0].float())[None]
        mask = first_frame_mask(latent.shape[2], latent.shape[3], latent.shape[4]).to(latent)
        return torch.cat([mask, latent], dim=1).to(self.dtype)

    def _denoise(self, k: int, *, noise: torch.Tensor, motion: torch.Tensor, y: torch.Tensor, window: torch.Tensor,
                 clip_fea: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor,
                 timesteps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Clip `k`'s latent: `noise` denoised over `timesteps`, its first latent frames held at `motion`."""
        s = self.sampling
        sampler = Sampler(s, self.parallel)
        args = {
            "cond": (context, window),
            "drop_text": (context_null, window),
            "uncond": (context_null, torch.zeros_like(window)[-1:]),
            "drop_audio": (context, torch.zeros_like(window)[-1:]),
        }
        clip_fea, y = clip_fea.to(self.device, self.dtype), y.to(self.device, self.dtype)
        latent, n = noise, motion.shape[1]
        if k > 0:
            # The official code re-noises the motion latents here and after every step, then overwrites
            # them at once; the draws are kept only so the random stream stays in step with it.
            self.noise.randn_like(motion)
        for i in range(s.steps):
            latent[:, :n] = motion
            t = timesteps[i]
            preds = {}
            for name in sampler.passes():
                ctx, audio = args[name]
                speakers = {"speaker_masks": self.speaker_masks} if audio.shape[0] > 1 else {}
                preds[name] = self.dit(latent, t, ctx, clip_fea, y, audio, **speakers).float()
                if self.on_dit_call:
                    self.on_dit_call(k, i, name, latent, t, preds[name])
            latent = euler_step(latent, sampler.velocity(preds), t, timesteps[i + 1])
            if k > 0:
                self.noise.randn_like(motion)
            latent[:, :n] = motion
            if self.events:
                self.events.emit("step", clip=k + 1, step=i + 1, steps=s.steps)
        return latent
