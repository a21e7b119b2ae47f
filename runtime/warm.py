"""The models a warm worker keeps between jobs, each under the key that says what it was loaded from and how.

A job asks for a model by role (audio, text, image, vae, dit) and key (its files with their sizes and
modification times, its sizes, dtype, device, and for the DiT everything that shapes the placed and compiled
runner: the memory plan, LoRAs, attention, FP8 kernel options). The same key gets the same object back, so a
second job skips loading, pinning and compiling; another key replaces the held model (freed first, so two never
share the memory). What stays is the memory plan's choice: with the DiT resident on the GPU (the 80 GB
presets) every model stays; with the DiT streamed (the 24 GB presets) the DiT runner and the VAE stay and the
encoders are loaded in turn and freed after use, as a one-shot run does. A one-shot run (`keep=False`) frees
every model once used.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENCODERS = ("audio", "text", "image")


def file_key(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Files as a key: path, size and modification time (a file replaced on disk is loaded again)."""
    key = []
    for path in paths:
        try:
            stat = path.stat()
            key.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            key.append((str(path), -1, -1))
    return tuple(key)


@dataclass
class WarmModels:
    """keep: hold models between jobs (a warm worker); False frees each once used (a one-shot run)."""

    keep: bool = True
    held: dict[str, tuple[Hashable, Any]] = field(default_factory=dict)

    def get(self, role: str, key: Hashable, load: Callable[[], Any]) -> Any:
        """The model held for `role` under `key`, or a new one from `load()` (a model held under another key is
        freed first)."""
        found = self.held.get(role)
        if found is not None and found[0] == key:
            return found[1]
        self.drop(role)
        return load()

    def done(self, role: str, key: Hashable, model: Any, *, streamed_dit: bool) -> bool:
        """A job is done with `model`: held for the next job when the memory plan allows (see the module's
        docstring). False: not held; the caller drops its own reference and releases the memory."""
        if self.keep and not (streamed_dit and role in ENCODERS):
            self.held[role] = (key, model)
            return True
        self.held.pop(role, None)
        return False

    def drop(self, role: str) -> None:
        if self.held.pop(role, None) is not None:
            release()


def release() -> None:
    """Return freed model memory now (callers `del` their last reference first): to the GPU, and to the
    OS, since glibc keeps freed heap memory (a model loaded and dropped stays in the process's RSS, which
    is what the kernel's OOM killer counts) until asked to trim."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim(0); nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
