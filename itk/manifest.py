"""The manifest: which repo files each component needs (data in manifest.toml).

fetch, the doctor's weights check and the generator's loader all read it; nothing else names shard files.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from itk.toml import read_toml

MANIFEST = Path(__file__).with_name("manifest.toml")


@dataclass(frozen=True)
class Repo:
    key: str
    id: str
    revision: str
    local_dir: str


@dataclass(frozen=True)
class WeightFile:
    repo: Repo
    path: str
    size: int
    revision: str
    why: str = ""

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


@dataclass(frozen=True)
class Manifest:
    repos: dict[str, Repo]
    components: dict[str, Component]

    def component(self, name: str) -> Component:
        if name not in self.components:
            known = ", ".join(self.components)
            raise KeyError(f"unknown component {name!r} (known: {known})")
        return self.components[name]

    def files_for(self, component_names: list[str] | tuple[str, ...]) -> list[WeightFile]:
        """Files of the named components, in manifest order, each once."""
        seen: dict[tuple[str, str], WeightFile] = {}
        for name in component_names:
            for f in self.component(name).files:
                seen.setdefault((f.repo.key, f.path), f)
        return list(seen.values())


@cache
def load_manifest(path: Path = MANIFEST) -> Manifest:
    data = read_toml(path)
    repos = {key: Repo(key=key, **value) for key, value in data["repos"].items()}
    components = {}
    for name, comp in data["components"].items():
        repo = repos[comp["repo"]]
        files = tuple(
            WeightFile(
                repo=repo,
                path=f["path"],
                size=int(f["size"]),
                revision=f.get("revision", repo.revision),
                why=f.get("why", ""),
            )
            for f in comp["files"]
        )
        components[name] = Component(name=name, about=comp["about"], files=files)
    return Manifest(repos=repos, components=components)


def missing_bytes(files: list[WeightFile], weights_dir: Path) -> int:
    """Bytes still to download for `files`: a partly present file counts only its missing part."""
    total = 0
    for f in files:
        path = f.local_path(weights_dir)
        present = path.stat().st_size if path.is_file() else 0
        total += max(0, f.size - present)
    return total
