"""The resume state of a run in progress: a folder beside the output, `<name>.mp4.itk-resume/`.

After each clip it holds the frames written so far (one lossless segment per clip) and the loop's carry
(the next clip's index, the motion latent, the colour reference, the random stream's state), committed by
rewriting `state.json` last. Every file is written atomically and a carry is deleted only after the state
that replaced it is in place, so a SIGKILL at any moment leaves the previous consistent state.

A resumed run replays the saved segments into a fresh encoder and continues the loop from the carry: the
same frames reach the encoder in the same order, so its mp4 equals an uninterrupted run's. The state also
keeps a fingerprint of everything that decides the frames (settings, inputs, weights); a run that differs
refuses to resume, naming what changed. The folder is removed when the mp4 is complete.

Nothing in the folder is trusted: state.json may name only the files this code writes (so a resume never
reads or deletes anything outside the folder), and each segment and carry must have the SHA-256 recorded when
it was saved. A damaged state is refused before any model loads, naming the file and how to start over
(`itk run ... --restart`, or the folder to delete); starting over removes the folder with `remove_state`.
Torch-free at import: the toolkit may call `remove_state` and `restart_fix`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itk.runtime.atomic import atomic_write, atomic_write_text
from itk.runtime.protocol import FPS, RESUME_STATE, BadInput, resume_folder
from itk.runtime.verify import file_digest

if TYPE_CHECKING:
    from itk.runtime.configs import ModelConfig
    from itk.runtime.pipeline import Carry
    from itk.runtime.request import Request

VERSION = 2  # 2: the SHA-256 of every segment and carry, checked before resuming
RESUME_SUFFIX = resume_folder(Path("x")).name.removeprefix("x")  # ".itk-resume"
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
    """The state folder of one output. `done` clips are saved; `carry` is what the next clip needs; `hashes`
    holds the SHA-256 of every file the state names (the segments and the carry), checked before a resume."""

    folder: Path
    facts: dict[str, str]
    clips: int = 0
    done: int = 0
    frames: int = 0
    carry_file: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def prepare(cls, output: Path, facts: dict[str, str], resume: bool) -> ResumeState:
        """The state to continue (resume and a matching folder) or a fresh one (an old folder is removed with
        `remove_state`). Raises BadInput when the folder belongs to a different job, settings or weights, or
        when it is damaged (`load`); both name how to start over."""
        folder = resume_folder(output)
        if resume and (folder / RESUME_STATE).is_file() and not folder.is_symlink():
            state = cls.load(folder)
            changed = changes(state.facts, facts)
            if changed:
                raise BadInput(f"cannot resume {output}: changed since the interrupted run: {', '.join(changed)}",
                               f"restore what changed, or {restart_fix(folder)}")
            state.verify()
            return state
        remove_state(folder)
        return cls(folder, facts)

    @classmethod
    def load(cls, folder: Path) -> ResumeState:
        """The state `folder/state.json` records, every field checked: the names it gives are the ones this
        code writes (so nothing outside the folder is ever read or deleted). BadInput names what is wrong."""
        path = folder / RESUME_STATE
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise damaged(folder, RESUME_STATE, f"is unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
        if not isinstance(saved, dict) or saved.get("version") != VERSION:
            version = saved.get("version") if isinstance(saved, dict) else None
            raise damaged(folder, RESUME_STATE, f"is not a version-{VERSION} resume state (version {version!r})")
        fields = {"clips": saved.get("clips"), "clips_done": saved.get("clips_done"), "frames": saved.get("frames")}
        wrong = [k for k, v in fields.items() if type(v) is not int or v < 1]
        if wrong:
            raise damaged(folder, RESUME_STATE, f"has no valid {wrong[0]} (a whole number of at least 1)")
        clips, done, frames = fields["clips"], fields["clips_done"], fields["frames"]
        if done >= clips:
            raise damaged(folder, RESUME_STATE, f"says {done} of {clips} clips are done (a finished run keeps none)")
        carry = saved.get("carry")
        if carry != _carry_name(done):
            raise damaged(folder, RESUME_STATE, f"names the carry {carry!r}, not {_carry_name(done)} in the folder")
        fingerprint, hashes = saved.get("fingerprint"), saved.get("hashes")
        expected = {*(_segment_name(clip) for clip in range(done)), carry}
        if not (isinstance(fingerprint, dict) and all(isinstance(v, str) for v in fingerprint.values())):
            raise damaged(folder, RESUME_STATE, "has no valid fingerprint")
        if not (isinstance(hashes, dict) and set(hashes) == expected and all(isinstance(v, str) for v in
                                                                             hashes.values())):
            raise damaged(folder, RESUME_STATE, f"does not list the hashes of the {done} saved clips and the carry")
        return cls(folder, fingerprint, clips=clips, done=done, frames=frames, carry_file=carry, hashes=hashes)

    def verify(self) -> None:
        """Every file the state names is a plain file in the folder with the hash recorded when it was saved:
        a swapped, edited, truncated or missing segment or carry is refused (BadInput naming it) instead of
        resuming into a silently wrong video."""
        for name, digest in sorted(self.hashes.items()):
            path = self.folder / name
            if path.is_symlink() or not path.is_file():
                raise damaged(self.folder, name, "is missing" if not path.exists() else "is not a plain file")
            if file_digest(path, "sha256") != digest:
                raise damaged(self.folder, name, "changed since it was saved (its SHA-256 differs)")

    @property
    def video_s(self) -> float:
        return round(self.frames / FPS, 2)

    def check_plan(self, clips: int) -> None:
        """A resumed run must plan as many clips as the interrupted one (the fingerprint makes it so)."""
        if self.done and clips != self.clips:
            raise BadInput(f"cannot resume {self.folder}: the run now has {clips} clips, the saved one {self.clips}",
                           restart_fix(self.folder))
        self.clips = clips

    def carry(self) -> Carry | None:
        """The saved carry (tensors on the CPU), or None for a fresh start."""
        if not self.done or self.carry_file is None:
            return None
        from safetensors.torch import load_file

        from itk.runtime.pipeline import Carry

        tensors = load_file(str(self.folder / self.carry_file))
        missing = [k for k in CARRY_TENSORS if k not in tensors]
        if missing:
            raise damaged(self.folder, self.carry_file, f"lacks the tensor {missing[0]}")
        return Carry(clip=self.done, frames=self.frames, **{k: tensors[k] for k in CARRY_TENSORS})

    def replay(self) -> Iterator[np.ndarray]:
        """The saved clips' frames, one clip at a time, for the new encoder."""
        for clip in range(self.done):
            yield read_segment(self.folder / _segment_name(clip))

    def save(self, clip: int, frames: np.ndarray, carry: Carry) -> None:
        """Commit clip `clip`: its frames, then the carry, then the state naming both with their hashes (the
        commit point)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        segment = _segment_name(clip)
        write_segment(self.folder / segment, frames)
        name = _carry_name(carry.clip)
        tensors = {k: getattr(carry, k).detach().cpu().contiguous() for k in CARRY_TENSORS}
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp)), suffix=".safetensors")
        self.hashes.pop(self.carry_file, None)
        self.hashes.update({part: file_digest(self.folder / part, "sha256") for part in (segment, name)})
        self.done, self.frames, self.carry_file = carry.clip, carry.frames, name
        atomic_write_text(self.folder / RESUME_STATE, json.dumps(self._record(), indent=1) + "\n")
        for stale in self.folder.glob(CARRY_GLOB):  # the previous carry, and one a kill left before its unlink
            if stale.name != name:
                stale.unlink(missing_ok=True)

    def _record(self) -> dict[str, Any]:
        return {"version": VERSION, "clips": self.clips, "clips_done": self.done, "frames": self.frames,
                "video_s": self.video_s, "carry": self.carry_file, "hashes": self.hashes,
                "fingerprint": self.facts}

    def remove(self) -> None:
        remove_state(self.folder)


CARRY_GLOB = "carry-*.safetensors"


def _carry_name(clip: int) -> str:
    return CARRY_GLOB.replace("*", f"{clip:05d}")


def restart_fix(folder: Path) -> str:
    """How to start over from a state that cannot be resumed: one fix line for both front doors."""
    return (f"start over with `itk run ... --restart` (the generator: the same command without --resume), "
            f"or delete {folder}")


def damaged(folder: Path, name: str, why: str) -> BadInput:
    """The refusal of a damaged state: which file, what is wrong with it, and how to start over."""
    output = folder.with_name(folder.name.removesuffix(RESUME_SUFFIX))
    return BadInput(f"cannot resume {output}: {folder / name} {why}", restart_fix(folder))


def remove_state(folder: Path) -> None:
    """Delete a state folder, whatever it holds, without ever touching anything outside it: a link standing
    in its place is unlinked (its target kept), and links inside are removed, not followed (shutil.rmtree on
    a platform where it avoids symlink attacks, as Linux and macOS are). A file under the folder's name is
    refused: it is not ours to delete."""
    if folder.is_symlink():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    elif folder.exists():
        raise BadInput(f"{folder} is not a folder, but itk keeps the run's resume state under that name",
                       "move that file away, or choose another output name")


def settings_facts(request: Request, model_config: ModelConfig) -> dict[str, Any]:
    """The request's settings that decide the frames (all but the output's name), plus the model sizes."""
    values = {f.name: getattr(request.sampling, f.name) for f in dataclasses.fields(request.sampling)}
    values.update(size=request.size, quant=request.quant, t5_cpu=request.t5_cpu,
                  persistent_params=request.persistent_params, variant=request.variant,
                  prompt=request.job.prompt, model_config=repr(model_config))
    return values
