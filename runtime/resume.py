"""The resume state of a run in progress: a folder beside the output, `<name>.mp4.itk-resume/`.

After each clip it holds the frames written so far (one lossless segment per clip) and the loop's carry
(the next clip's index, the motion latent, the colour reference, the random stream's state), committed by
rewriting `state.json` last. Every file is written atomically and a carry is deleted only after the state
that replaced it is in place, so a SIGKILL at any moment leaves the previous consistent state.

A resumed run replays the saved segments into a fresh encoder and continues the loop from the carry: the
same frames reach the encoder in the same order, so its mp4 equals an uninterrupted run's. The state also
keeps a fingerprint of everything that decides the frames (settings, inputs, weights); a run that differs
refuses to resume, naming what changed. The folder is removed when the mp4 is complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itk.runtime.atomic import atomic_write, atomic_write_text
from itk.runtime.pipeline import Carry
from itk.runtime.protocol import FPS, RESUME_STATE, BadInput, resume_folder

if TYPE_CHECKING:
    from itk.runtime.configs import ModelConfig
    from itk.runtime.request import Request

VERSION = 1
CARRY_TENSORS = ("motion", "color_ref", "noise")


def file_facts(path: Path) -> str:
    """A file's identity for the fingerprint: path, size and modification time (no hashing: weights are GBs)."""
    try:
        st = path.stat()
    except OSError:
        return f"{path} (missing)"
    return f"{path} {st.st_size} bytes, mtime_ns {st.st_mtime_ns}"


def fingerprint(settings: Mapping[str, Any], inputs: Mapping[str, Path], weights: list[Path]) -> dict[str, str]:
    """Name -> value of everything that decides the frames; `changes` compares two of these."""
    facts = {f"setting {k}": json.dumps(v, sort_keys=True, default=str) for k, v in settings.items()}
    facts.update({f"input {k}": file_facts(p) for k, p in inputs.items()})
    facts.update({f"weights {p.name}": file_facts(p) for p in weights})
    return facts


def changes(before: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The names whose values differ (or that one side lacks), in a stable order."""
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def _segment_name(clip: int) -> str:
    return f"clip-{clip:05d}.mkv"


def write_segment(path: Path, frames: np.ndarray) -> None:
    """[N, H, W, 3] uint8 frames, losslessly (FFV1: exact RGB, intra-only, about a third of the raw size)."""
    import av

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="matroska") as container:
            stream = container.add_stream("ffv1", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)

    atomic_write(path, encode, suffix=".mkv")


def read_segment(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@dataclass
class ResumeState:
    """The state folder of one output. `done` clips are saved; `carry` is what the next clip needs."""

    folder: Path
    facts: dict[str, str]
    clips: int = 0
    done: int = 0
    frames: int = 0
    carry_file: str | None = None

    @classmethod
    def prepare(cls, output: Path, facts: dict[str, str], resume: bool) -> ResumeState:
        """The state to continue (resume and a matching folder) or a fresh one (an old folder is removed).
        Raises BadInput when the folder belongs to a different job, settings or weights."""
        folder = resume_folder(output)
        if resume and (folder / RESUME_STATE).is_file():
            try:
                saved = json.loads((folder / RESUME_STATE).read_text(encoding="utf-8"))
                state = cls(folder, saved["fingerprint"], clips=saved["clips"], done=saved["clips_done"],
                            frames=saved["frames"], carry_file=saved["carry"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BadInput(f"cannot resume {output}: {folder / RESUME_STATE} is unreadable ({exc})",
                               "run without --resume to start over") from None
            changed = changes(state.facts, facts)
            if changed:
                raise BadInput(f"cannot resume {output}: changed since the interrupted run: {', '.join(changed)}",
                               "restore what changed, or run without --resume to start over")
            return state
        if folder.exists():
            shutil.rmtree(folder)
        return cls(folder, facts)

    @property
    def video_s(self) -> float:
        return round(self.frames / FPS, 2)

    def check_plan(self, clips: int) -> None:
        """A resumed run must plan as many clips as the interrupted one (the fingerprint makes it so)."""
        if self.done and clips != self.clips:
            raise BadInput(f"cannot resume {self.folder}: the run now has {clips} clips, the saved one {self.clips}",
                           "run without --resume to start over")
        self.clips = clips

    def carry(self) -> Carry | None:
        """The saved carry (tensors on the CPU), or None for a fresh start."""
        if not self.done or self.carry_file is None:
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / self.carry_file))
        return Carry(clip=self.done, frames=self.frames, **{k: tensors[k] for k in CARRY_TENSORS})

    def replay(self) -> Iterator[np.ndarray]:
        """The saved clips' frames, one clip at a time, for the new encoder."""
        for clip in range(self.done):
            yield read_segment(self.folder / _segment_name(clip))

    def save(self, clip: int, frames: np.ndarray, carry: Carry) -> None:
        """Commit clip `clip`: its frames, then the carry, then the state naming both (the commit point)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        write_segment(self.folder / _segment_name(clip), frames)
        name = f"carry-{carry.clip:05d}.safetensors"
        tensors = {k: getattr(carry, k).detach().cpu().contiguous() for k in CARRY_TENSORS}
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp)), suffix=".safetensors")
        old = self.carry_file
        self.done, self.frames, self.carry_file = carry.clip, carry.frames, name
        atomic_write_text(self.folder / RESUME_STATE, json.dumps(self._record(), indent=1) + "\n")
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)

    def _record(self) -> dict[str, Any]:
        return {"version": VERSION, "clips": self.clips, "clips_done": self.done, "frames": self.frames,
                "video_s": self.video_s, "carry": self.carry_file, "fingerprint": self.facts}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def settings_facts(request: Request, model_config: ModelConfig) -> dict[str, Any]:
    """The request's settings that decide the frames (all but the output's name), plus the model sizes."""
    values = {f.name: getattr(request.sampling, f.name) for f in dataclasses.fields(request.sampling)}
    values.update(size=request.size, quant=request.quant, t5_cpu=request.t5_cpu,
                  persistent_params=request.persistent_params, variant=request.variant,
                  prompt=request.job.prompt, model_config=repr(model_config))
    return values
