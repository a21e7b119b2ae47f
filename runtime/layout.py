"""How N GPUs split one video's work: guidance groups x sequence-parallel degree (torch-free, so `itk run`
checks a `--gpus N` before launching anything).

A step runs 1-3 DiT passes (cond / drop_text / uncond, or cond / drop_audio) that share nothing until
the guidance combines them. Running them on different GPUs ("guidance parallel") costs one gather of the
predictions per step and no communication inside the model, and every GPU does exactly one pass; sequence
parallel (Ulysses: each GPU holds a share of the visual tokens, an all-to-all swaps tokens for heads around
every self-attention) costs four all-to-alls per block and needs the heads to divide by its degree. So
the passes get their own groups whenever they divide N evenly, and what is left of N goes to sequence
parallel: 2 passes on 4 GPUs = 2 groups x 2, 3 passes on 2 GPUs = 1 group x 2 (3 passes cannot share 2
GPUs evenly: one GPU would do two passes while the other waits), 1 pass = all sequence parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LISTED = 16  # the valid GPU counts a refusal lists go up to this


class LayoutError(ValueError):
    """A GPU count this model cannot split; the message lists the counts that work."""


@dataclass(frozen=True)
class Layout:
    """groups: guidance groups (each runs `passes / groups` of a step's passes); sp: the sequence-parallel
    degree inside a group. Rank r is in group r // sp at sequence position r % sp."""

    groups: int
    sp: int

    @property
    def world(self) -> int:
        return self.groups * self.sp

    @property
    def flag(self) -> str:
        """The generator's --gpu_layout value (`parse_layout` reads it back)."""
        return f"{self.groups}x{self.sp}"

    def describe(self, passes: int) -> str:
        per = "pass" if passes // self.groups == 1 else "passes"
        return (f"{self.world} GPU{'s' if self.world > 1 else ''}: {self.groups} guidance group"
                f"{'s' if self.groups > 1 else ''} ({passes // self.groups} {per} each)"
                f" x sequence parallel {self.sp}")


def guidance_groups(gpus: int, passes: int) -> int:
    """The passes get a group each when they divide the GPU count evenly, else all GPUs share every pass."""
    return passes if passes > 1 and gpus % passes == 0 else 1


def valid_gpu_counts(passes: int, heads: int, up_to: int = MAX_LISTED) -> list[int]:
    return [n for n in range(1, up_to + 1) if heads % (n // guidance_groups(n, passes)) == 0]


def choose_layout(gpus: int, passes: int, heads: int) -> Layout:
    """The layout of `gpus` GPUs for a step of `passes` DiT passes on a model of `heads` attention heads.
    Sequence parallel splits the visual tokens evenly, whatever the clip's latent frames (a GPU may hold
    part of a frame), so only the heads limit its degree."""
    if gpus < 1:
        raise LayoutError(f"--gpus {gpus}: give 1 or more")
    groups = guidance_groups(gpus, passes)
    sp = gpus // groups
    if heads % sp:
        valid = ", ".join(map(str, valid_gpu_counts(passes, heads)))
        raise LayoutError(f"--gpus {gpus}: the model's {heads} attention heads do not divide by the "
                          f"sequence-parallel degree {sp} ({passes} guidance pass{'es' if passes > 1 else ''} "
                          f"per step); valid GPU counts: {valid}")
    return Layout(groups, sp)


def check_layout(layout: Layout, passes: int, heads: int) -> Layout:
    """`layout` (given, e.g. read back from --gpu_layout) if it can split a step of `passes` DiT passes on a model
    of `heads` attention heads: one group runs every pass or each group one pass, and the sequence-parallel
    degree divides the heads. LayoutError otherwise."""
    if layout.groups not in (1, passes):
        raise LayoutError(f"--gpu_layout {layout.flag}: {layout.groups} guidance groups cannot share {passes} guidance "
                          f"pass{'es' if passes > 1 else ''} per step (1 group{f' or {passes}' if passes > 1 else ''})")
    if heads % layout.sp:
        raise LayoutError(f"--gpu_layout {layout.flag}: the model's {heads} attention heads do not divide by the "
                          f"sequence-parallel degree {layout.sp}")
    return layout


def parse_layout(text: str) -> Layout:
    """`GROUPSxSP` (the generator's --gpu_layout, written by `Layout.flag`) -> the Layout. LayoutError if malformed."""
    groups, sep, sp = text.strip().lower().partition("x")
    if not sep or not groups.isdigit() or not sp.isdigit() or int(groups) < 1 or int(sp) < 1:
        raise LayoutError(f"--gpu_layout {text}: expected GROUPSxSP, e.g. 2x1")
    return Layout(int(groups), int(sp))
