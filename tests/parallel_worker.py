"""One rank of a tests/test_parallel.py run: the streaming pipeline (or one two-speaker DiT call) on tiny
random weights, under torchrun or as a plain single process; rank 0 saves the float32 result.

`python tests/parallel_worker.py OUT TEXT AUDIO [TEXT AUDIO ...]` saves, per pair of guidance scales,
{"video": the frames of a two-clip talk, "speakers": one two-speaker DiT prediction}.
"""

from __future__ import annotations

import sys

import torch

from itk.runtime import parallel
from itk.runtime.configs import config_from_dict
from itk.runtime.layout import choose_layout
from itk.runtime.models.dit import InfiniteTalkDiT
from itk.runtime.models.vae import WanVAE
from itk.runtime.options import Launch
from itk.runtime.pipeline import SeededNoise, StreamingPipeline
from itk.runtime.sampling import ClipPlan, Sampling, passes_per_step
from itk.runtime.tiny import tiny_sizes

# 3 latent frames of 3 x 3 tokens: L = 27 splits 14 + 13 over two sequence-parallel ranks, an uneven split
# whose boundary falls inside frame 1 (its tokens 9..17), for the one-speaker video and the two-speaker call
FRAMES = 9
SIDE = 48
GRID = ((FRAMES - 1) // 4 + 1, SIDE // 16, SIDE // 16)  # latent frames x token rows x token columns


def models(group: parallel.Parallel | None = None) -> tuple[InfiniteTalkDiT, WanVAE]:
    """The tiny DiT (on this rank's share of `group`) and VAE, the same random weights on every call."""
    cfg = config_from_dict(tiny_sizes())
    torch.manual_seed(0)
    return InfiniteTalkDiT(cfg.dit, parallel=group).eval(), WanVAE(cfg.vae).eval()


def inputs(dit: InfiniteTalkDiT, audio_frames: int, speakers: int = 1) -> dict[str, torch.Tensor]:
    c = dit.cfg
    gen = torch.Generator().manual_seed(1)
    return {
        "reference": torch.rand(1, 3, 1, SIDE, SIDE, generator=gen) * 2 - 1,
        "clip": torch.randn(1, c.image_tokens, c.clip_dim, generator=gen),
        "context": torch.randn(7, c.text_dim, generator=gen),
        "context_null": torch.randn(5, c.text_dim, generator=gen),
        "audio": torch.randn(speakers, audio_frames, c.audio_blocks, c.audio_channels, generator=gen),
    }


@torch.no_grad()
def video(dit: InfiniteTalkDiT, vae: WanVAE, group: parallel.Parallel | None, text: float, audio: float):
    sampling = Sampling(frame_num=FRAMES, motion_frame=5, streaming=True, steps=3, shift=5.0, text_scale=text,
                        audio_scale=audio)
    x = inputs(dit, 16)
    plan = ClipPlan(FRAMES, (0, FRAMES - 5), 0, 13)  # two clips: the second anchored on the first
    pipe = StreamingPipeline(dit=dit, vae=vae, sampling=sampling, noise=SeededNoise(3), parallel=group)
    clips = pipe.clips(references=[x["reference"]] * 2, clip_features=[x["clip"]] * 2, context=x["context"],
                       context_null=x["context_null"], audio=x["audio"][0], plan=plan)
    return torch.cat([out.frames for out in clips], dim=1).float()


@torch.no_grad()
def speakers(dit: InfiniteTalkDiT) -> torch.Tensor:
    """One two-speaker call: the reference-target map and the L-RoPE positions across the split."""
    from itk.runtime.models.audio import audio_windows

    x = inputs(dit, FRAMES, speakers=2)
    c = dit.cfg
    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(16, 3, SIDE // 8, SIDE // 8, generator=gen)
    y = torch.randn(1, c.in_dim - 16, 3, SIDE // 8, SIDE // 8, generator=gen)
    frame_tokens = GRID[1] * GRID[2]
    masks = torch.zeros(3, frame_tokens)
    masks[0, : frame_tokens // 2], masks[1, frame_tokens // 2:], masks[2, -1] = 1, 1, 1
    windows = torch.stack([audio_windows(a, 0, FRAMES) for a in x["audio"]])
    return dit(latent, torch.tensor([900.0]), x["context"], x["clip"], y, windows, speaker_masks=masks)


def main(out: str, scales: list[tuple[float, float]]) -> None:
    """One result per (text, audio) scale pair, each in the layout its passes choose, in one process group."""
    launch = Launch.from_env()
    heads = config_from_dict(tiny_sizes()).dit.num_heads
    results = []
    group = None
    for text, audio in scales:
        layout = choose_layout(launch.world_size, len(passes_per_step(text, audio)), heads)
        group = parallel.start(launch, layout) if group is None else parallel.arrange(launch, layout)
        dit, vae = models(group)
        results.append({"video": video(dit, vae, group, text, audio), "speakers": speakers(dit)})
    if parallel.writes(group):
        torch.save(results, out)
    parallel.stop(group, wait=True)


if __name__ == "__main__":
    values = [float(v) for v in sys.argv[2:]]
    main(sys.argv[1], list(zip(values[::2], values[1::2], strict=True)))
