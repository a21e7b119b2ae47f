"""Where the weights live (--weights-dir, else $ITK_WEIGHTS, else ./weights), and whether an output can be
written where it is asked for. Torch-free: the toolkit and the generator use the same rules."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

WEIGHTS_ENV = "ITK_WEIGHTS"
# Tests give the free-space figure here (a byte count) instead of filling a disk; read only by free_bytes.
FREE_BYTES_ENV = "ITK_TEST_FREE_BYTES"


def weights_dir(option: str | Path | None = None) -> Path:
    if option:
        return Path(option).expanduser()
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    return Path("weights")


def existing_parent(path: Path) -> Path:
    """The nearest existing path at or above `path` (absolute): where free space is measured before the weights
    folder is made, and where writing is tried before an output's folder is made."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(path: Path, flag: str, example: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output the finished video could not be written to, before anything runs: an existing folder
    under the name, a folder that cannot be created (a file in its path), a folder nothing can be written in
    (permissions, a read-only mount), or one of the run's own `inputs` (the output would replace it). Writing
    is tried, not predicted from mode bits: root may write into a 0500 folder but not onto a read-only mount.
    Raises BadInput naming `flag`; `example` is the kind of value that works, shown in the fixes."""
    from itk.runtime.protocol import BadInput

    other = f"choose another {flag}, e.g. {flag} {example}"
    if path.is_dir():
        raise BadInput(f"{flag} {path} is an existing folder", f"name a file in it: {flag} {path / example.name}")
    target = os.path.realpath(path)
    for source in inputs:
        if os.path.realpath(source) == target:
            raise BadInput(f"{flag} {path} is the input {source}: the video would replace it", other)
    existing = existing_parent(path.parent)
    if not existing.is_dir():
        raise BadInput(f"cannot create the folder {path.parent} for {flag}: {existing} is a file, not a folder",
                       other)
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".itk-write-test-")
    except OSError as exc:
        raise BadInput(f"cannot write in {existing} for {flag} ({exc.strerror or type(exc).__name__})", other) \
            from None
    os.close(fd)
    os.unlink(probe)


def free_bytes(path: Path) -> int:
    """Free disk space where `path` is (or would be). The one place that reads it."""
    import shutil

    if os.environ.get(FREE_BYTES_ENV):
        return int(os.environ[FREE_BYTES_ENV])
    return shutil.disk_usage(existing_parent(path)).free
