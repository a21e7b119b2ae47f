"""The InfiniteTalk DiT variant a job needs (single or multi speaker), and a preset's weights in that variant.

A preset names the single-speaker files (its components and its --quant_dir / --infinitetalk_dir). Two
speakers take the multi-speaker DiT of the same precision instead, everything else unchanged: the manifest
pairs them (same role and precision, `variant` single / multi), so no preset needs a two-speaker twin.
`itk fetch --variant multi` and `itk run` with two speakers both go through `swap_components`. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from itk.runtime.manifest import Manifest, WeightFile, load_manifest


def variant_for(speakers: int) -> str:
    """The DiT variant a job with this many speakers needs."""
    return "multi" if speakers > 1 else "single"


def counterpart(f: WeightFile, variant: str, manifest: Manifest | None = None) -> WeightFile:
    """`f` itself when it is not a variant file or already `variant`; else the manifest's file of the same role
    and precision in `variant`."""
    if not f.variant or f.variant == variant:
        return f
    m = manifest or load_manifest()
    matches = [g for g in m.select(f.role, f.precision or None, variant) if g.variant == variant]
    if len(matches) != 1:
        raise ValueError(f"manifest: expected one {variant} {f.role} file like {f.path}, found {len(matches)}")
    return matches[0]


def swap_components(components: tuple[str, ...] | list[str], variant: str,
                    manifest: Manifest | None = None) -> tuple[str, ...]:
    """The components with each variant-specific one replaced by the component holding its `variant` files."""
    m = manifest or load_manifest()
    owner = {(f.repo.key, f.path): name for name, comp in m.components.items() for f in comp.files}
    out: list[str] = []
    for name in components:
        variant_files = [f for f in m.component(name).files if f.variant]
        if variant_files:
            other = counterpart(variant_files[0], variant, m)
            name = owner[(other.repo.key, other.path)]
        if name not in out:
            out.append(name)
    return tuple(out)


def swap_paths(flags: dict[str, Path], components: tuple[str, ...] | list[str], weights_dir: Path, variant: str,
               manifest: Manifest | None = None) -> dict[str, Path]:
    """A preset's generator path flags with each variant file (of `components`) replaced by its `variant`."""
    m = manifest or load_manifest()
    swapped = {f.local_path(weights_dir): counterpart(f, variant, m).local_path(weights_dir)
               for f in m.files_for(components) if f.variant}
    return {flag: swapped.get(path, path) for flag, path in flags.items()}


def variant_files(components: tuple[str, ...] | list[str], variant: str,
                  manifest: Manifest | None = None) -> list[WeightFile]:
    """The files of `components` that only the `variant` DiT uses (what a missing-variant error names)."""
    m = manifest or load_manifest()
    return [f for f in m.files_for(components) if f.variant == variant]
