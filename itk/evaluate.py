"""`itk eval VIDEO`: quality numbers a person can check, per clip and over the whole talk.

The generator makes a long talk as clips: the first `ClipLayout.first` frames (81), then `ClipLayout.step` new
frames each (72: 81 minus the 9 motion frames the next clip is anchored on). Per clip:
- colour drift: a clip's colour signature is the mean CIE Lab colour of each cell of a GRID x GRID grid over
  its frames (each frame box-averaged to GRID x GRID, then sRGB -> Lab, D65); `delta_e_vs_first` is the mean
  over cells of CIEDE2000 between the clip's signature and the first clip's, `delta_e_vs_reference` the same
  against the reference (an image: fitted as the generator fits it; a video: its frames over the same span).
  The trend is the least-squares slope of those numbers against the clips' middle times, in ΔE per minute.
- seams: a frame's change is the mean absolute difference (0-255, all pixels and channels) to the frame
  before it; `seam_ratio` is the change into a clip's first new frame over the median change between frames
  of one clip (floored at MEDIAN_FLOOR), and a join whose ratio exceeds SEAM_FLAG is flagged.
- outside-the-speaker drift (a video reference, i.e. a dub): mean absolute difference to the source's fitted
  frames over the pixels outside the speaker region (mask exactly 0, `itk.runtime.dub`), against the floor:
  the same number for the source's own frames encoded as itk writes them (libx264 crf FLOOR_CRF) and decoded,
  over its first FLOOR_FRAMES frames. `drift` is how far the first exceeds the floor.
- lip-sync: SyncNet's Sync-C / Sync-D / offset (`itk.runtime.models.syncnet`) over the whole video and per
  clip when its weights are present; otherwise a note says it was not measured and how to fetch them.

Videos are read with PyAV at 25 fps. Bad input is a one-line UserError with exit 2. Nothing here prints;
torch is imported only to measure lip-sync.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itk.runtime.protocol import EXIT_BAD_INPUT, FLAG, FPS, SAMPLE_RATE, UserError, is_video

if TYPE_CHECKING:
    from itk.runtime.dub import DubRegion, FaceTracker
    from itk.runtime.models.syncnet import SyncScore

GRID = 8  # colour signature cells per side: coarse enough that a head's sway barely moves a cell's colour
SEAM_FLAG = 3.0  # a join changing more than this many times the median change between frames is a seam
MEDIAN_FLOOR = 0.5  # grey levels: the median change never counts as less (a still video: codec noise)
FLOOR_FRAMES = 50  # source frames encoded to measure the codec's own floor
FLOOR_CRF = 23  # itk's writer's default (runtime.video.write_mp4)
LENGTH_TOLERANCE_S = 0.25  # audio and video may differ by this much (AAC padding, the last frame)
SYNCNET_COMPONENT = "syncnet"
FETCH_SYNCNET = "itk fetch --component syncnet"


def _bad(message: str, fix: str) -> UserError:
    return UserError(message, fix, EXIT_BAD_INPUT)


@dataclass(frozen=True)
class ClipLayout:
    """How the generator laid out the clips: `first` frames, then `step` new frames per clip."""

    first: int = int(FLAG["frame_num"].default)
    step: int = int(FLAG["frame_num"].default) - int(FLAG["motion_frame"].default)

    def __post_init__(self) -> None:
        if self.first < 1 or self.step < 1:
            raise _bad(f"clip layout {self.first} then {self.step} frames: both must be at least 1",
                       "give the frames of the first clip and the new frames of each later clip (defaults 81, 72)")

    def clip_of(self, frame: int) -> int:
        """0-based clip index of output frame `frame`."""
        return 0 if frame < self.first else 1 + (frame - self.first) // self.step

    def spans(self, total: int) -> list[tuple[int, int]]:
        """[start, end) of each clip of a `total`-frame video."""
        spans, start = [(0, min(self.first, total))], self.first
        while start < total:
            spans.append((start, min(start + self.step, total)))
            start += self.step
        return spans


@dataclass(frozen=True)
class EvalRequest:
    """What `itk eval` measures. syncnet: the weights file when fetched (`syncnet_weights`), else None."""

    video: Path
    reference: Path | None = None
    audio: Path | None = None
    layout: ClipLayout = field(default_factory=ClipLayout)
    syncnet: Path | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # the speaker region for a dub: bbox, not face
    device: str | None = None


@dataclass(frozen=True)
class ClipEval:
    index: int  # 1-based
    start_frame: int
    frames: int
    start_s: float
    delta_e_vs_first: float
    delta_e_vs_reference: float | None = None
    seam_ratio: float | None = None  # from the second clip on
    seam_flagged: bool = False
    outside_mad: float | None = None
    sync_c: float | None = None
    sync_d: float | None = None
    sync_offset: int | None = None


@dataclass(frozen=True)
class Outside:
    """Mean absolute difference to the source outside the speaker region, and the codec's own floor."""

    mad: float
    floor: float
    region: str  # face | bbox

    @property
    def drift(self) -> float:
        return max(0.0, self.mad - self.floor)


@dataclass(frozen=True)
class Sync:
    confidence: float  # Sync-C
    distance: float  # Sync-D
    offset: int
    windows: int


@dataclass(frozen=True)
class VideoEval:
    video: str
    frames: int
    width: int
    height: int
    layout: ClipLayout
    clips: tuple[ClipEval, ...]
    median_change: float
    reference: str | None = None
    drift_vs_first_per_minute: float | None = None
    drift_vs_reference_per_minute: float | None = None
    outside: Outside | None = None
    sync: Sync | None = None
    notes: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return self.frames / FPS

    @property
    def seams(self) -> list[int]:
        """1-based indices of the clips whose join is flagged."""
        return [c.index for c in self.clips if c.seam_flagged]

    def to_json(self) -> dict:
        """The machine form: `clips` in order, then the whole-video numbers."""
        ratios = [c.seam_ratio for c in self.clips if c.seam_ratio is not None]
        firsts = [c.delta_e_vs_first for c in self.clips]
        refs = [c.delta_e_vs_reference for c in self.clips if c.delta_e_vs_reference is not None]
        return {
            "video": self.video,
            "reference": self.reference,
            "frames": self.frames,
            "fps": FPS,
            "duration_s": round(self.duration_s, 3),
            "width": self.width,
            "height": self.height,
            "layout": asdict(self.layout),
            "clips": [asdict(c) for c in self.clips],
            "whole": {
                "delta_e_vs_first_mean": _mean(firsts[1:]),
                "delta_e_vs_first_max": max(firsts),
                "delta_e_vs_first_per_minute": self.drift_vs_first_per_minute,
                "delta_e_vs_reference_mean": _mean(refs),
                "delta_e_vs_reference_per_minute": self.drift_vs_reference_per_minute,
                "median_change": self.median_change,
                "seam_ratio_max": max(ratios) if ratios else None,
                "seams": self.seams,
                "outside": None if self.outside is None else {**asdict(self.outside), "drift": self.outside.drift},
                "sync": None if self.sync is None else asdict(self.sync),
            },
            "notes": list(self.notes),
        }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def eval_path(video: str | Path) -> Path:
    """Where `itk batch --eval` writes a video's eval: beside it, `talk.mp4` -> `talk.eval.json`."""
    video = Path(video)
    return video.with_name(video.stem + ".eval.json")


def syncnet_weights(weights_dir: Path) -> Path | None:
    """The SyncNet weights file under `weights_dir` (manifest component "syncnet") when fetched, else None."""
    from itk.runtime.manifest import load_manifest

    manifest = load_manifest()
    if SYNCNET_COMPONENT not in manifest.components:
        return None
    path = manifest.files_for([SYNCNET_COMPONENT])[0].local_path(weights_dir)
    return path if path.is_file() else None


# --- reading -------------------------------------------------------------------------------------------------
def _frames(path: Path, what: str) -> Iterator[np.ndarray]:
    from itk.runtime.video import VideoError, frames_at_25fps

    if not path.is_file():
        raise _bad(f"{what} {path} does not exist", "give the path of an existing file")
    try:
        yield from frames_at_25fps(path)
    except VideoError as exc:
        raise _bad(f"{what} {exc}", "give a video file that ffmpeg can decode") from exc


def read_audio(path: Path) -> np.ndarray | None:
    """Mono 16 kHz int16 samples of the first audio stream of `path` (a video or a sound file), or None when it
    has none."""
    import av

    if not path.is_file():
        raise _bad(f"audio {path} does not exist", "give the path of an existing sound file")
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(container.streams.audio[0]):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.error.FFmpegError as exc:
        raise _bad(f"{path}: cannot decode its sound ({exc})", "give a sound file that ffmpeg can decode") from exc
    return np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)


def _speech(request: EvalRequest) -> np.ndarray:
    """The speech the video is checked against: --audio, else the video's own sound (one line when none)."""
    source = request.audio or request.video
    samples = read_audio(source)
    if samples is None or not len(samples):
        raise _bad(f"{source} has no sound", "give the speech with --audio WAV")
    return samples


def _check_lengths(request: EvalRequest, speech: np.ndarray, frames: int) -> None:
    audio_s, video_s = len(speech) / SAMPLE_RATE, frames / FPS
    if abs(audio_s - video_s) > LENGTH_TOLERANCE_S:
        raise _bad(f"the sound lasts {audio_s:.2f} s but {request.video} lasts {video_s:.2f} s",
                   f"give the speech the video was made from (--audio WAV): lengths within {LENGTH_TOLERANCE_S} s")


# --- colour and change ---------------------------------------------------------------------------------------
def thumbnail_lab(frame: np.ndarray) -> np.ndarray:
    """[GRID, GRID, 3] CIE Lab of a frame box-averaged to GRID x GRID cells."""
    from PIL import Image
    from skimage.color import rgb2lab

    small = np.asarray(Image.fromarray(frame).resize((GRID, GRID), Image.BOX), dtype=np.float64) / 255
    return rgb2lab(small)


def delta_e(lab_a: np.ndarray, lab_b: np.ndarray) -> float:
    """Mean CIEDE2000 over the cells of two [GRID, GRID, 3] Lab signatures."""
    from skimage.color import deltaE_ciede2000

    return float(deltaE_ciede2000(lab_a, lab_b).mean())


def change(frame: np.ndarray, previous: np.ndarray) -> float:
    """Mean absolute difference (0-255) between two uint8 frames."""
    return float(np.abs(frame.astype(np.int16) - previous).mean())


def per_minute(times_s: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of `values` against `times_s`, per minute (None for fewer than two points)."""
    if len(values) < 2:
        return None
    return float(np.polyfit(np.asarray(times_s) / 60, np.asarray(values), 1)[0])


def seam_ratios(changes: Sequence[float], spans: Sequence[tuple[int, int]]) -> tuple[list[float | None], float]:
    """(the seam ratio of each clip (None for the first), the median change between frames of one clip);
    changes[i] is frame i's change from frame i-1 (changes[0] unused)."""
    joins = {start for start, _ in spans[1:]}
    inside = [c for i, c in enumerate(changes) if i and i not in joins]
    median = float(np.median(inside)) if inside else 0.0
    return [None] + [changes[start] / max(median, MEDIAN_FLOOR) for start, _ in spans[1:]], median


def outside_difference(frame: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference (0-255) over the pixels whose mask is exactly 0 (0.0 when there are none)."""
    outside = mask == 0
    if not outside.any():
        return 0.0
    return float(np.abs(frame[outside].astype(np.int16) - source[outside]).mean())


# --- the evaluation ------------------------------------------------------------------------------------------
@dataclass
class _Clip:
    """Running sums over one clip's frames."""

    lab: np.ndarray = field(default_factory=lambda: np.zeros((GRID, GRID, 3)))
    ref_lab: np.ndarray = field(default_factory=lambda: np.zeros((GRID, GRID, 3)))
    outside: float = 0.0
    frames: int = 0


@dataclass
class _Scan:
    """What one pass over the video (and its reference, in step) gathers."""

    clips: list[_Clip] = field(default_factory=list)
    changes: list[float] = field(default_factory=lambda: [0.0])  # changes[i]: frame i against frame i-1
    floor_frames: list[np.ndarray] = field(default_factory=list)  # the first fitted source frames (a dub)
    frames: int = 0


def _reference_frames(reference: Path | None, size: tuple[int, int]) -> Iterator[np.ndarray | None]:
    """The reference fitted to the output size, per output frame, endlessly: an image every time, a video
    frame by frame (its last frame held past its end), or None without a reference."""
    from itk.runtime.buckets import fit_frame

    if reference is None:
        yield from itertools.repeat(None)
        return
    if not is_video(reference):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(reference) as image:
                fitted = fit_frame(np.asarray(image.convert("RGB")), size)
        except (OSError, UnidentifiedImageError) as exc:
            raise _bad(f"reference {reference} is not a readable image or video", "give a PNG/JPEG image or a "
                       "video") from exc
        yield from itertools.repeat(fitted)
        return
    last = None
    for last in _frames(reference, "reference"):
        yield fit_frame(last, size)
    yield from itertools.repeat(fit_frame(last, size))


def _frame_count(path: Path) -> int:
    """Frames of a video at 25 fps, from its container (no decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames * FPS / float(stream.average_rate or FPS) + 0.5)
        return round(float(container.duration or 0) / av.time_base * FPS)


def _speaker_region(request: EvalRequest, size: tuple[int, int], notes: list[str]) -> DubRegion | None:
    """The speaker region of a dub (a video reference), built as `itk run` builds it, or None."""
    from itk.runtime.dub import DubRegion
    from itk.runtime.video import VideoError

    if request.reference is None or not is_video(request.reference):
        return None
    try:
        return DubRegion.for_video(request.reference, target=size, mode="bbox" if request.boxes else "face",
                                   length=_frame_count(request.video), boxes=request.boxes)
    except VideoError as exc:
        raise _bad(f"reference {exc}", "give a video file that ffmpeg can decode") from exc
    except UserError as exc:
        notes.append(f"outside-the-speaker drift not measured: {exc.message}")
        return None


def _scan(request: EvalRequest, frames: Iterator[np.ndarray], size: tuple[int, int], region: DubRegion | None,
          faces: FaceTracker | None) -> _Scan:
    """One pass: colour signatures, changes between frames, outside-the-speaker differences, face samples."""
    from itk.runtime.dub import DETECT_EVERY

    scan = _Scan()
    previous = None
    references = _reference_frames(request.reference, size)  # endless: a short reference holds its last frame
    for index, (frame, ref) in enumerate(zip(frames, references, strict=False)):
        scan.frames = index + 1
        if request.layout.clip_of(index) == len(scan.clips):
            scan.clips.append(_Clip())
        clip = scan.clips[-1]
        clip.frames += 1
        clip.lab += thumbnail_lab(frame)
        if previous is not None:
            scan.changes.append(change(frame, previous))
        if ref is not None:
            clip.ref_lab += thumbnail_lab(ref)
        if region is not None:
            clip.outside += outside_difference(frame, ref, region.mask_for(index))
            if len(scan.floor_frames) < FLOOR_FRAMES:
                scan.floor_frames.append(ref)
        if faces is not None and index % DETECT_EVERY == 0:
            faces.add(index, frame)
        previous = frame
    if faces is not None and previous is not None and (scan.frames - 1) % DETECT_EVERY:
        faces.add(scan.frames - 1, previous)  # the last frame too, so the track does not lag at the end
    return scan


def evaluate(request: EvalRequest) -> VideoEval:
    """Measure request.video (module doc). Raises UserError (exit 2) for input that cannot be evaluated."""
    from itk.runtime.dub import FaceTracker

    video = Path(request.video)
    frames = _frames(video, "video")
    first = next(frames, None)
    if first is None:
        raise _bad(f"video {video} has no frames", "give a finished video")
    speech = _speech(request)
    size = first.shape[:2]
    notes: list[str] = []
    region = _speaker_region(request, size, notes)
    faces = FaceTracker() if request.syncnet is not None else None
    scan = _scan(request, itertools.chain([first], frames), size, region, faces)
    _check_lengths(request, speech, scan.frames)

    spans = request.layout.spans(scan.frames)
    ratios, median = seam_ratios(scan.changes, spans)
    signatures = [c.lab / c.frames for c in scan.clips]
    mids = [(start + end) / 2 / FPS for start, end in spans]
    vs_first = [delta_e(s, signatures[0]) for s in signatures]
    vs_ref = None
    if request.reference is not None:
        vs_ref = [delta_e(s, c.ref_lab / c.frames) for s, c in zip(signatures, scan.clips, strict=True)]
    outside = None
    if region is not None:
        outside = Outside(sum(c.outside for c in scan.clips) / scan.frames, _codec_floor(scan.floor_frames, region),
                          "bbox" if request.boxes else "face")
    sync, per_clip, note = _lip_sync(request, spans, speech, scan.frames, faces)
    notes += [note] if note else []

    results = []
    for n, ((start, end), c) in enumerate(zip(spans, scan.clips, strict=True)):
        s = per_clip[n] if per_clip else None
        results.append(ClipEval(
            index=n + 1, start_frame=start, frames=end - start, start_s=start / FPS,
            delta_e_vs_first=vs_first[n], delta_e_vs_reference=None if vs_ref is None else vs_ref[n],
            seam_ratio=ratios[n], seam_flagged=ratios[n] is not None and ratios[n] > SEAM_FLAG,
            outside_mad=c.outside / c.frames if region is not None else None,
            sync_c=s.confidence if s else None, sync_d=s.distance if s else None, sync_offset=s.offset if s else None))
    return VideoEval(
        video=str(video), frames=scan.frames, width=size[1], height=size[0], layout=request.layout,
        clips=tuple(results), median_change=median,
        reference=None if request.reference is None else str(request.reference),
        drift_vs_first_per_minute=per_minute(mids, vs_first),
        drift_vs_reference_per_minute=None if vs_ref is None else per_minute(mids, vs_ref),
        outside=outside, sync=sync, notes=tuple(notes))


def _codec_floor(frames: list[np.ndarray], region: DubRegion) -> float:
    """Mean absolute difference outside the region between source frames and the same frames encoded as itk
    writes them and decoded again."""
    from itk.runtime.video import frames_at_25fps, write_mp4

    with tempfile.TemporaryDirectory(prefix="itk-eval-") as tmp:
        path = write_mp4(np.stack(frames), None, SAMPLE_RATE, Path(tmp) / "floor.mp4", crf=FLOOR_CRF)
        decoded = list(frames_at_25fps(path))
    pairs = enumerate(zip(decoded, frames, strict=False))  # an encoder may hold back a frame; compare those made
    diffs = [outside_difference(d, f, region.mask_for(i)) for i, (d, f) in pairs]
    return float(np.mean(diffs))


def _lip_sync(request: EvalRequest, spans: Sequence[tuple[int, int]], speech: np.ndarray, frames: int,
              faces: FaceTracker | None) -> tuple[Sync | None, list[Sync | None] | None, str]:
    """SyncNet over the whole video and per clip, or (None, None, why not)."""
    if request.syncnet is None or faces is None:
        return None, None, f"lip-sync not measured: the SyncNet weights are not fetched ({FETCH_SYNCNET})"
    from itk.runtime.models import syncnet

    windows = syncnet.window_count(frames, len(speech))
    if windows < 1:
        return None, None, f"lip-sync not measured: {frames} frames are too few (SyncNet needs 6)"
    try:
        track = faces.tracks(frames)[0]
    except UserError:
        return None, None, "lip-sync not measured: no face found in the video"
    import torch

    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = syncnet.load_syncnet(request.syncnet, device)
    crops = (syncnet.face_crop(frame, track[i]) for i, frame in enumerate(_frames(Path(request.video), "video")))
    lips, audio = syncnet.embed(model, crops, syncnet.mfcc(speech), windows)
    whole = _sync(syncnet.sync_score(lips, audio))
    per_clip = [_sync(syncnet.sync_score(lips[s:min(e, windows)], audio[s:min(e, windows)])) if s < windows else None
                for s, e in spans]
    return whole, per_clip, ""


def _sync(score: SyncScore) -> Sync:
    return Sync(score.confidence, score.distance, score.offset, score.windows)


# --- the plot ------------------------------------------------------------------------------------------------
def plot(result: VideoEval, path: str | Path) -> Path:
    """One PNG a person can read: colour drift, seams and lip-sync per clip over time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clips = result.clips
    t = [c.start_s + c.frames / FPS / 2 for c in clips]
    figure = Figure(figsize=(9, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    drift, seams, sync = figure.subplots(3, 1, sharex=True)
    figure.suptitle(f"{Path(result.video).name}: {result.frames} frames, {result.duration_s:.1f} s, "
                    f"{len(clips)} clips")

    drift.plot(t, [c.delta_e_vs_first for c in clips], "o-", label="vs first clip")
    if any(c.delta_e_vs_reference is not None for c in clips):
        drift.plot(t, [c.delta_e_vs_reference for c in clips], "s-", label="vs reference")
    title = "colour drift (mean CIEDE2000)"
    if result.drift_vs_first_per_minute is not None:
        title += f": {result.drift_vs_first_per_minute:+.2f} ΔE per minute"
    if result.outside is not None:
        title += f"; outside the speaker {result.outside.mad:.2f} (codec floor {result.outside.floor:.2f})"
    drift.set_title(title, fontsize=10)
    drift.set_ylabel("ΔE2000")
    drift.legend(loc="upper left", fontsize=8)
    drift.grid(alpha=0.3)

    joins = [(c.start_s, c.seam_ratio, c.seam_flagged) for c in clips if c.seam_ratio is not None]
    if joins:
        width = 0.4 * min(c.frames for c in clips) / FPS
        seams.bar([j[0] for j in joins], [j[1] for j in joins], width=width,
                  color=["tab:red" if j[2] else "tab:blue" for j in joins])
        seams.axhline(SEAM_FLAG, color="tab:red", linestyle="--", linewidth=1, label=f"flagged above {SEAM_FLAG:g}")
        seams.legend(loc="upper left", fontsize=8)
    seams.set_title("seams: change at each clip join / median change within clips", fontsize=10)
    seams.set_ylabel("ratio")
    seams.grid(alpha=0.3)

    if result.sync is not None:
        sync.plot(t, [c.sync_c for c in clips], "o-", color="tab:green", label="Sync-C (higher is better)")
        sync.plot(t, [c.sync_d for c in clips], "s-", color="tab:purple", label="Sync-D (lower is better)")
        sync.set_title(f"lip-sync (SyncNet): Sync-C {result.sync.confidence:.2f}, Sync-D {result.sync.distance:.2f}, "
                       f"offset {result.sync.offset:+d} frames", fontsize=10)
        sync.legend(loc="upper left", fontsize=8)
    else:
        sync.set_title("lip-sync", fontsize=10)
        sync.text(0.5, 0.5, f"not measured: {FETCH_SYNCNET}", ha="center", va="center", transform=sync.transAxes)
        sync.set_yticks([])
    sync.set_xlabel("time (s): drift and lip-sync at each clip's middle, seams at each join")
    sync.grid(alpha=0.3)
    sync.set_xlim(0, max(result.duration_s, 1 / FPS))

    path = Path(path)
    figure.savefig(path)
    return path


