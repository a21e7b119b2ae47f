"""The manifest: which repo files each component needs, and what each file is (data in manifest.toml).

fetch, the doctor's weights check and the generator's loader (runtime/weights.py) all read it; nothing else
names weight files. Torch-free: `itk` commands import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from itk.runtime.toml import read_toml

MANIFEST = Path(__file__).with_name("manifest.toml")
QUANTIZED = frozenset({"fp8"})  # precisions that need a quantisation map


@dataclass(frozen=True)
class Repo:
    key: str
    id: str
    revision: str
    local_dir: str
    whole: bool = True  # `itk fetch --all` downloads every file of it (the guide's repos); False: listed files only


@dataclass(frozen=True)
class WeightFile:
    repo: Repo
    path: str
    size: int
    revision: str
    why: str = ""
    role: str = ""  # what the file is to the generator (manifest.toml's header lists the roles)
    precision: str = ""  # fp32 | bf16 | fp8, where a role has a choice
    variant: str = ""  # single | multi; "" = used by both
    map: WeightFile | None = None  # an FP8 file's quantisation map

    def local_path(self, weights_dir: Path) -> Path:
        return weights_dir / self.repo.local_dir / self.path

    @property
    def label(self) -> str:
        return f"{self.repo.local_dir}/{self.path}"


@dataclass(frozen=True)
class Component:
    name: str
    about: str
    files: tuple[WeightFile, ...]
    requires: tuple[str, ...] = ()  # components fetched and checked with this one (their files come first)


@dataclass(frozen=True)
class Manifest:
    repos: dict[str, Repo]
    components: dict[str, Component]

    @property
    def whole_repos(self) -> list[Repo]:
        """The repos `itk fetch --all` downloads whole, as the guide does (not the LoRA collections)."""
        return [r for r in self.repos.values() if r.whole]

    def component(self, name: str) -> Component:
        if name not in self.components:
            known = ", ".join(self.components)
            raise KeyError(f"unknown component {name!r} (known: {known})")
        return self.components[name]

    def with_required(self, component_names: list[str] | tuple[str, ...]) -> list[str]:
        """The named components and those they require (a component's requirements before it), each once."""
        out: list[str] = []

        def add(name: str) -> None:
            if name not in out:
                for required in self.component(name).requires:
                    add(required)
                out.append(name)

        for name in component_names:
            add(name)
        return out

    def files_for(self, component_names: list[str] | tuple[str, ...]) -> list[WeightFile]:
        """Files of the named components and those they require (an FP8 file's map right after it), each once."""
        seen: dict[tuple[str, str], WeightFile] = {}
        for name in self.with_required(component_names):
            for f in self.component(name).files:
                for g in (f, f.map) if f.map else (f,):
                    seen.setdefault((g.repo.key, g.path), g)
        return list(seen.values())

    def select(self, role: str, precision: str | None = None, variant: str | None = None) -> list[WeightFile]:
        """The files of `role`, in manifest order, each once. precision: that one only, or None for the
        unquantised ones (every precision but fp8); variant: files of that variant plus those used by both."""
        seen: dict[tuple[str, str], WeightFile] = {}
        for comp in self.components.values():
            for f in comp.files:
                if f.role != role or (variant is not None and f.variant not in ("", variant)):
                    continue
                if (f.precision == precision) if precision else f.precision not in QUANTIZED:
                    seen.setdefault((f.repo.key, f.path), f)
        return list(seen.values())


@cache
def load_manifest(path: Path = MANIFEST) -> Manifest:
    data = read_toml(path)
    repos = {key: Repo(key=key, **value) for key, value in data["repos"].items()}
    components = {}
    for name, comp in data["components"].items():
        repo = repos[comp["repo"]]
        files = tuple(_weight_file(repo, f) for f in comp["files"])
        components[name] = Component(name=name, about=comp["about"], files=files,
                                     requires=tuple(comp.get("requires", ())))
    return Manifest(repos=repos, components=components)


def _weight_file(repo: Repo, data: dict) -> WeightFile:
    qmap = data.get("map")
    precision = data.get("precision", "")
    if (qmap is None) == (precision in QUANTIZED):
        raise ValueError(f"manifest: {data['path']}: a map goes with precision fp8, and only with it")
    return WeightFile(
        repo=repo,
        path=data["path"],
        size=int(data["size"]),
        revision=data.get("revision", repo.revision),
        why=data.get("why", ""),
        role=data.get("role", ""),
        precision=precision,
        variant=data.get("variant", ""),
        map=_weight_file(repo, {**qmap, "role": "map"}) if qmap else None,
    )


def missing_bytes(files: list[WeightFile], weights_dir: Path) -> int:
    """Bytes still to download for `files`: a partly present file counts only its missing part."""
    total = 0
    for f in files:
        path = f.local_path(weights_dir)
        present = path.stat().st_size if path.is_file() else 0
        total += max(0, f.size - present)
    return total
