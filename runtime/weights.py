"""Every weight file the generator opens, found through the manifest (runtime/manifest.toml), checked up front.

The manifest is the one place weight files are named: a request asks for roles (DiT, T5, CLIP, VAE, the
tokenizer, wav2vec2) at a precision (unquantised or fp8) and a variant (single or multi speaker), and the
files come from the manifest under the folders the flags give. A missing file fails here in a second,
naming the file and `itk fetch`, not after minutes of loading. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itk.runtime.manifest import Manifest, WeightFile, load_manifest

FETCH = "run `itk fetch` (or check --ckpt_dir, --wav2vec_dir, --infinitetalk_dir, --quant_dir)"


class MissingWeights(Exception):
    """Exit 3: a weight file is absent; the message names it and how to get it."""


@dataclass(frozen=True)
class QuantFile:
    """An FP8 file and its quantisation map."""

    path: Path
    map: Path


@dataclass(frozen=True)
class WeightPaths:
    """The files of one request. dit: the Wan shards + the InfiniteTalk adapter, or one FP8 file + map."""

    config: Path
    dit: tuple[Path, ...] | QuantFile
    t5: Path | QuantFile
    clip: Path
    vae: Path
    tokenizer: Path  # the umT5 tokenizer folder
    wav2vec: Path  # the chinese-wav2vec2-base folder
    wav2vec_weights: Path

    def files(self) -> list[Path]:
        """Every file, in the order they are checked (the config first: it says the folder is right)."""
        def parts(item: Path | tuple[Path, ...] | QuantFile) -> list[Path]:
            if isinstance(item, QuantFile):
                return [item.path, item.map]
            return list(item) if isinstance(item, tuple) else [item]

        return [self.config, *parts(self.t5), self.clip, self.vae, *parts(self.dit)]


def official_map_path(quant_file: Path) -> Path:
    """The official convention for a quantised file's map: the same name with `.json` for `.safetensors`
    (NAME.safetensors -> NAME.json). Used for a --quant_dir file
    that is not one of the manifest's."""
    return quant_file.with_suffix(".json")


def _one(manifest: Manifest, role: str, precision: str | None = None, variant: str | None = None) -> WeightFile:
    files = manifest.select(role, precision, variant)
    if len(files) != 1:
        raise ValueError(f"manifest: expected one {role} file ({precision or 'unquantised'}, {variant}), "
                         f"found {len(files)}")
    return files[0]


def _under(folder: Path, files: list[WeightFile]) -> list[Path]:
    return [folder / f.path for f in files]


def _quant_file(path: Path, manifest: Manifest, role: str, precision: str, variant: str | None) -> QuantFile:
    """`path` with its map: the manifest's map when `path` bears a manifest name, else the official rule."""
    for f in manifest.select(role, precision, variant):
        if f.map is not None and Path(f.path).name == path.name:
            return QuantFile(path, path.parent / Path(f.map.path).name)
    return QuantFile(path, official_map_path(path))


def tokenizer_folder(ckpt_dir: Path, manifest: Manifest | None = None) -> Path:
    """The umT5 tokenizer folder under the Wan folder (the folder of the manifest's tokenizer files)."""
    files = (manifest or load_manifest()).select("tokenizer")
    folders = {Path(f.path).parent for f in files}
    if len(folders) != 1:
        raise ValueError(f"manifest: the tokenizer files must share one folder, found {sorted(map(str, folders))}")
    return ckpt_dir / folders.pop()


def wav2vec_weights(manifest: Manifest | None = None) -> WeightFile:
    """The manifest's chinese-wav2vec2-base weights entry (its path is relative to the wav2vec2 folder)."""
    return _one(manifest or load_manifest(), "wav2vec")


def resolve(
    ckpt_dir: Path,
    wav2vec_dir: Path,
    infinitetalk: Path | None = None,
    quant: str | None = None,
    quant_file: Path | None = None,
    variant: str = "single",
    manifest: Manifest | None = None,
) -> WeightPaths:
    """The files of a request, from the manifest; raises MissingWeights for the first absent one.

    Unquantised: the Wan DiT shards under `ckpt_dir` + the InfiniteTalk adapter file `infinitetalk`, and the
    unquantised T5. With `quant` (fp8): the quantised DiT `quant_file` with its map, and the quantised T5
    with its map beside it (as the official repo's folder holds them).
    """
    m = manifest or load_manifest()
    if quant:
        if quant_file is None:
            raise ValueError("a quantised request needs its quantised DiT file")
        dit: tuple[Path, ...] | QuantFile = _quant_file(quant_file, m, "dit", quant, variant)
        t5_entry = _one(m, "t5", quant)
        assert t5_entry.map is not None
        t5: Path | QuantFile = QuantFile(quant_file.parent / Path(t5_entry.path).name,
                                         quant_file.parent / Path(t5_entry.map.path).name)
    else:
        if infinitetalk is None:
            raise ValueError("an unquantised request needs the InfiniteTalk adapter file")
        dit = (*_under(ckpt_dir, base_dit(m)), infinitetalk)
        t5 = ckpt_dir / _one(m, "t5").path
    paths = WeightPaths(
        config=ckpt_dir / _one(m, "config").path,
        dit=dit,
        t5=t5,
        clip=ckpt_dir / _one(m, "clip").path,
        vae=ckpt_dir / _one(m, "vae").path,
        tokenizer=tokenizer_folder(ckpt_dir, m),
        wav2vec=wav2vec_dir,
        wav2vec_weights=wav2vec_dir / wav2vec_weights(m).path,
    )
    tokenizer_files = _under(ckpt_dir, m.select("tokenizer"))
    wav2vec_files = [*_under(wav2vec_dir, m.select("wav2vec-config")), paths.wav2vec_weights]
    for path in [*paths.files(), *tokenizer_files, *wav2vec_files]:
        if not path.is_file():
            raise MissingWeights(f"{path}: missing weights file; {FETCH}")
    return paths


def base_dit(manifest: Manifest | None = None) -> list[WeightFile]:
    """The Wan DiT shards, in order: the unquantised DiT files both variants share (the adapter goes on top)."""
    return [f for f in (manifest or load_manifest()).select("dit") if not f.variant]
