"""Packages: every dependency itk declares is installed at an accepted version, and no installed package in
that set requires a version of another that is not there (what `pip check` reports, limited to our stack).
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from itk.checks.base import Context, Result, Status

DIST = "itk"


def _requirements(dist: str) -> list[Requirement]:
    reqs = []
    for text in metadata.requires(dist) or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            reqs.append(req)
    return reqs


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def find_problems(root: str = DIST) -> tuple[list[str], list[str], int]:
    """(missing or wrong versions of root's own deps, conflicts inside the dependency closure, packages seen)."""
    own = []
    for req in _requirements(root):
        version = _installed(req.name)
        if version is None:
            own.append(f"{req.name} is missing (needs {req.specifier or 'any version'})")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            own.append(f"{req.name} {version} is installed, itk needs {req.specifier}")
    conflicts, seen, queue = [], set(), [canonicalize_name(root)]
    while queue:
        name = queue.pop()
        if name in seen or _installed(name) is None:
            continue
        seen.add(name)
        for req in _requirements(name):
            version = _installed(req.name)
            if version is None:
                continue
            queue.append(canonicalize_name(req.name))
            if req.specifier and not req.specifier.contains(version, prereleases=True) and name != root:
                conflicts.append(f"{name} requires {req.name}{req.specifier}, but {version} is installed")
    return own, conflicts, len(seen)


def check(ctx: Context | None = None) -> Result:
    if _installed(DIST) is None:
        return Result("packages", Status.FAIL, "itk is not installed as a package", fix="run `make setup`")
    own, conflicts, seen = find_problems()
    if own or conflicts:
        return Result(
            "packages", Status.FAIL, f"{len(own) + len(conflicts)} dependency problem(s)", own + conflicts,
            fix="run `make setup` again (or `pip install -e .`) to install the accepted versions",
        )
    return Result("packages", Status.OK, f"{seen} packages in itk's dependency tree, no conflicts")
