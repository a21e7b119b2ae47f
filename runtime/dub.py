"""Dubbing a source video: where the generated frames replace the source's, and the compositing itself.

`itk run --dub-region` for a video input:
- full: the generated frames as they are (the official behaviour; nothing here runs);
- face: the speaker's face is found in the source, tracked smoothly over time, and the generated frames are
  pasted onto the source's own frames inside a feathered region around the face and mouth;
- bbox: the same inside the --bbox1 (and --bbox2) boxes, fixed over time.
Outside the region every pixel is the source frame's, exactly; two speakers get the union of both regions.

Geometry: the generated video is at its bucket size, made from the source by a PIL bilinear resize to cover
and a centre crop (`buckets.fit_frame`). Compositing happens at that size, onto the source frames
fitted by the same function, so generated and source pixels are the same points of the picture and the
output keeps the generated video's size. Boxes given in source pixels are mapped through the same fit.

Face detector: scikit-image's LBP frontal-face cascade (`skimage.feature.Cascade` with the cascade file that
ships inside scikit-image, already a dependency): nothing is downloaded, nothing is added to the install, and
it works with NumPy 2. (opencv-python-headless 4.13+ would also do, with its bundled Haar cascades, but it is a
60 MB wheel carrying a second copy of ffmpeg beside PyAV's, its 4.12 capped NumPy below 2.3, and its 5.x wheels
no longer ship the cascades; MediaPipe's current wheels ship no face model and need a download.)

Tracking: faces are detected every `DETECT_EVERY` frames (the largest per speaker), implausible jumps are
removed by a running median over the detections, frames between (or without) detections take values
interpolated from their neighbours, and a Gaussian over time (sigma `SMOOTH_SIGMA` frames) smooths the track.

Region: the tracked face box grown by `MARGIN` of its size on every side and by `CHIN` of its height below
(the jaw and chin move when a person talks and lie below a frontal detector's box), as a rounded rectangle.
Its blend band lies inside its outer edge, `FEATHER` of the region's smaller side wide (at least
`MIN_BAND_PX`): the mask is 1 inside the band, falls smoothly to 0 across it, and is exactly 0 outside.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from itk.runtime.buckets import cover_crop, fit_frame
from itk.runtime.protocol import DUB_REGIONS, BadInput

DUB_REGION_HELP = MappingProxyType({
    "full": "the whole generated frame, as the official generator makes it (default)",
    "face": "the speaker's face and mouth, found and tracked in the source video; every other pixel stays the "
            "source's own, with a soft edge between them",
    "bbox": "the --bbox1 (and --bbox2) boxes; every other pixel stays the source's own, with a soft edge",
})

DETECT_EVERY = 5  # frames between face detections (0.2 s at 25 fps)
DETECT_SIDE = 240  # the detector sees frames scaled so their shorter side is this many pixels (never enlarged)
SMOOTH_SIGMA = 5.0  # frames: the temporal Gaussian over the interpolated track
MEDIAN_SAMPLES = 5  # detections in the running median that removes implausible jumps
MARGIN = 0.25  # of the face box's size, added on every side
CHIN = 0.35  # of the face box's height, added below it
ROUNDNESS = 0.9  # corner radius of a face region, as a fraction of half its smaller side
FEATHER = 0.15  # blend band width, as a fraction of the region's smaller side
MIN_BAND_PX = 2.0

Box = Sequence[float]  # [row_min, col_min, row_max, col_max], the official bbox order


@dataclass(frozen=True)
class Shape:
    """One speaker's region in one frame, in output pixels: a rounded rectangle with a blend band inside."""

    top: float
    left: float
    bottom: float
    right: float
    radius: float
    band: float

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """[H, W] float32: 1 deeper inside than `band`, a smoothstep across the band, exactly 0 outside."""
        height, width = size
        mask = np.zeros(size, np.float32)
        r0, r1 = max(0, math.floor(self.top)), min(height, math.ceil(self.bottom) + 1)
        c0, c1 = max(0, math.floor(self.left)), min(width, math.ceil(self.right) + 1)
        if r0 >= r1 or c0 >= c1:
            return mask
        rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5  # pixel centres
        cols = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
        centre_r, centre_c = (self.top + self.bottom) / 2, (self.left + self.right) / 2
        half_r, half_c = (self.bottom - self.top) / 2, (self.right - self.left) / 2
        # Signed distance to the rounded rectangle (negative inside), exact for this shape.
        qr = np.abs(rows - centre_r) - (half_r - self.radius)
        qc = np.abs(cols - centre_c) - (half_c - self.radius)
        outside = np.hypot(np.maximum(qr, 0), np.maximum(qc, 0))
        distance = outside + np.minimum(np.maximum(qr, qc), 0) - self.radius
        t = np.clip(-distance / self.band, 0, 1)
        mask[r0:r1, c0:c1] = t * t * (3 - 2 * t)
        return mask


def face_shape(box: Box) -> Shape:
    """The dub region around a face box [row_min, col_min, row_max, col_max] (module doc: MARGIN, CHIN)."""
    r0, c0, r1, c1 = (float(v) for v in box)
    h, w = r1 - r0, c1 - c0
    top, bottom = r0 - MARGIN * h, r1 + (MARGIN + CHIN) * h
    left, right = c0 - MARGIN * w, c1 + MARGIN * w
    side = min(bottom - top, right - left)
    return Shape(top, left, bottom, right, ROUNDNESS * side / 2, max(MIN_BAND_PX, FEATHER * side))


def box_shape(box: Box) -> Shape:
    """The dub region of a person box: the box itself, its corners rounded by the band's width."""
    r0, c0, r1, c1 = (float(v) for v in box)
    band = max(MIN_BAND_PX, FEATHER * min(r1 - r0, c1 - c0))
    return Shape(r0, c0, r1, c1, min(band, (r1 - r0) / 2, (c1 - c0) / 2), band)


def box_to_output(box: Box, source_hw: tuple[int, int], target: tuple[int, int]) -> tuple[float, ...]:
    """A box in source pixels -> the same box in output pixels, through `fit_frame`'s resize and crop
    (`buckets.cover_crop`), clipped to the output frame."""
    h, w, top, left = cover_crop(source_hw[0], source_hw[1], target)
    sr, sc = h / source_hw[0], w / source_hw[1]
    r0, c0, r1, c1 = (float(v) for v in box)
    return (min(max(r0 * sr - top, 0.0), target[0]), min(max(c0 * sc - left, 0.0), target[1]),
            min(max(r1 * sr - top, 0.0), target[0]), min(max(c1 * sc - left, 0.0), target[1]))


class FaceDetector:
    """Frontal faces in RGB uint8 frames, with the cascade that ships inside scikit-image."""

    def __init__(self) -> None:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        self._cascade = Cascade(lbp_frontal_face_cascade_filename())

    def __call__(self, frame: np.ndarray) -> list[tuple[float, float, float, float]]:
        """Face boxes [row_min, col_min, row_max, col_max] in the frame's pixels, largest first."""
        from PIL import Image

        grey = Image.fromarray(frame).convert("L")
        scale = min(1.0, DETECT_SIDE / min(frame.shape[:2]))
        if scale < 1:
            grey = grey.resize((round(frame.shape[1] * scale), round(frame.shape[0] * scale)), Image.BOX)
        pixels = np.asarray(grey, dtype=np.float32) / 255
        side = min(pixels.shape)
        found = self._cascade.detect_multi_scale(pixels, scale_factor=1.2, step_ratio=1, min_size=(24, 24),
                                                 max_size=(side, side))
        sr, sc = frame.shape[0] / pixels.shape[0], frame.shape[1] / pixels.shape[1]
        boxes = [(d["r"] * sr, d["c"] * sc, (d["r"] + d["height"]) * sr, (d["c"] + d["width"]) * sc) for d in found]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def _pick(boxes: list[tuple[float, ...]], speakers: int, last: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """The box of each speaker among one frame's detections (largest first): with every speaker found, the
    largest `speakers` boxes left to right; with fewer, each box goes to the speaker last seen nearest to it."""
    chosen: list[np.ndarray | None] = [None] * speakers
    if len(boxes) >= speakers:
        for n, box in enumerate(sorted(boxes[:speakers], key=lambda b: b[1] + b[3])):
            chosen[n] = np.asarray(box)
        return chosen
    for box in boxes:
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        known = [(float(np.hypot(*(centre - [(p[0] + p[2]) / 2, (p[1] + p[3]) / 2]))), n)
                 for n, p in enumerate(last) if p is not None and chosen[n] is None]
        if known:
            chosen[min(known)[1]] = np.asarray(box)
    return chosen


def smooth_track(frames: Sequence[int], boxes: np.ndarray, length: int) -> np.ndarray:
    """Detections [K, 4] at frame indices `frames` (ascending) -> one box per frame [length, 4]: a running
    median over `MEDIAN_SAMPLES` detections, linear interpolation between them (the ends hold the nearest),
    then a Gaussian over time of `SMOOTH_SIGMA` frames. The track is extended past both ends by point
    reflection before the Gaussian, so a face moving steadily is followed to the last frame without lag."""
    from scipy.ndimage import gaussian_filter1d, median_filter

    at = np.asarray(frames, dtype=np.float64)
    cleaned = median_filter(np.asarray(boxes, np.float64), size=(min(MEDIAN_SAMPLES, len(at)), 1), mode="nearest")
    every = np.arange(length, dtype=np.float64)
    track = np.stack([np.interp(every, at, cleaned[:, k]) for k in range(4)], axis=1)
    pad = min(length - 1, math.ceil(3 * SMOOTH_SIGMA))
    if pad < 1:
        return track
    extended = np.concatenate([2 * track[0] - track[pad:0:-1], track, 2 * track[-1] - track[-2:-pad - 2:-1]])
    return gaussian_filter1d(extended, SMOOTH_SIGMA, axis=0, mode="nearest")[pad:pad + length]


def sampled(frames: Iterable[np.ndarray], length: int | None = None,
            every: int = DETECT_EVERY) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) for every `every`-th of the first `length` frames (None: all) and the last of them:
    the frames the detector looks at."""
    for index, frame in enumerate(frames):
        if length is not None and index >= length:
            return
        if index % every == 0 or index == (length or 0) - 1:
            yield index, frame


class FaceTracker:
    """Face detections gathered frame by frame (`add` the sampled frames), smoothed into tracks at the end."""

    def __init__(self, speakers: int = 1, detector: FaceDetector | None = None) -> None:
        self.speakers = speakers
        self._detector = detector or FaceDetector()
        self._found: list[tuple[list[int], list[np.ndarray]]] = [([], []) for _ in range(speakers)]
        self._last: list[np.ndarray | None] = [None] * speakers
        self._seen = 0

    def add(self, index: int, frame: np.ndarray) -> None:
        """Detect in frame `index` (RGB uint8; indices ascending) and give each speaker its box."""
        self._seen = index + 1
        for n, box in enumerate(_pick(self._detector(frame), self.speakers, self._last)):
            if box is not None:
                self._found[n][0].append(index)
                self._found[n][1].append(box)
                self._last[n] = box

    def tracks(self, length: int | None = None) -> np.ndarray:
        """[speakers, length, 4]: each speaker's box in every frame (None: up to the last frame added),
        smoothed by `smooth_track`. Raises BadInput when a speaker's face was never found."""
        tracks = []
        for n, (at, boxes) in enumerate(self._found, start=1):
            if not at:
                who = "the speaker's face" if self.speakers == 1 else f"speaker {n}'s face"
                raise BadInput(f"--dub-region face: {who} was not found in the source video",
                               "give the region with --dub-region bbox --bbox1 ROW0,COL0,ROW1,COL1 (--bbox2 for a"
                               " second speaker), or use --dub-region full")
            tracks.append(smooth_track(at, np.stack(boxes), self._seen if length is None else length))
        return np.stack(tracks)


def track_faces(samples: Iterable[tuple[int, np.ndarray]], length: int | None = None,
                speakers: int = 1) -> np.ndarray:
    """`FaceTracker.tracks` over the sampled frames (`sampled`: (index, RGB uint8 frame))."""
    tracker = FaceTracker(speakers)
    for index, frame in samples:
        tracker.add(index, frame)
    return tracker.tracks(length)


class DubRegion:
    """Where the generated frames show through, per output frame: one Shape per speaker (their union)."""

    def __init__(self, shapes: Sequence[Sequence[Shape]], size: tuple[int, int]) -> None:
        """shapes[speaker][frame]; a speaker with one shape keeps it for every frame (a fixed box); frames
        past a track's end keep its last shape. size: (H, W) of the output frames."""
        if not shapes or any(not s for s in shapes):
            raise ValueError("a dub region needs at least one shape per speaker")
        self.shapes = [list(s) for s in shapes]
        self.size = (int(size[0]), int(size[1]))

    @classmethod
    def from_tracks(cls, tracks: np.ndarray, size: tuple[int, int]) -> DubRegion:
        """From face boxes [speakers, frames, 4] in output pixels (`track_faces`)."""
        return cls([[face_shape(box) for box in track] for track in tracks], size)

    @classmethod
    def from_boxes(cls, boxes: Sequence[Box], source_hw: tuple[int, int], size: tuple[int, int]) -> DubRegion:
        """From the --bbox1/--bbox2 boxes in source pixels ([row_min, col_min, row_max, col_max])."""
        shapes = []
        for n, box in enumerate(boxes, start=1):
            if len(box) != 4:
                raise BadInput(f"--bbox{n} {list(box)} does not have 4 numbers",
                               "give ROW_MIN,COL_MIN,ROW_MAX,COL_MAX in pixels of the source video")
            r0, c0, r1, c1 = box_to_output(box, source_hw, size)
            if r1 - r0 < 1 or c1 - c0 < 1:
                raise BadInput(f"--bbox{n} {list(box)} lies outside the part of the {source_hw[1]}x{source_hw[0]} "
                               "source the video shows (or is empty)",
                               "give ROW_MIN,COL_MIN,ROW_MAX,COL_MAX in pixels of the source video, rows first")
            shapes.append([box_shape((r0, c0, r1, c1))])
        if not shapes:
            raise BadInput("--dub-region bbox needs a box", "give --bbox1 ROW_MIN,COL_MIN,ROW_MAX,COL_MAX (and --bbox2"
                           " for a second speaker), or use --dub-region face")
        return cls(shapes, size)

    @classmethod
    def from_frames(cls, frames: Sequence[np.ndarray] | np.ndarray, speakers: int = 1) -> DubRegion:
        """Face mode on frames already at the output size (RGB uint8 [N, H, W, 3]), one region per frame."""
        tracks = track_faces(sampled(frames, len(frames)), len(frames), speakers)
        return cls.from_tracks(tracks, frames[0].shape[:2])

    @classmethod
    def for_video(cls, path: str | Path, *, target: tuple[int, int], mode: str, length: int | None = None,
                  boxes: Sequence[Box] = (), speakers: int = 1) -> DubRegion:
        """The region of mode "face" or "bbox" for output frames of size `target` (H, W) made from the source
        video `path` (read at 25 fps): `length` output frames, a shorter source holding its last frame (None:
        the source's own length; later frames keep the last region). boxes: in source pixels, for "bbox"."""
        from itk.runtime.video import frames_at_25fps

        if mode == "bbox":
            first = next(iter(frames_at_25fps(path)))
            return cls.from_boxes(boxes, first.shape[:2], target)
        if mode != "face":
            raise ValueError(f"dub region mode {mode!r}: 'face' or 'bbox' ('full' needs no region)")
        frames = frames_at_25fps(path) if length is None else _held(frames_at_25fps(path))
        samples = ((i, fit_frame(f, target)) for i, f in sampled(frames, length))
        return cls.from_tracks(track_faces(samples, length, speakers), target)

    def shapes_at(self, index: int) -> list[Shape]:
        """Each speaker's shape in output frame `index`."""
        return [s[min(index, len(s) - 1)] for s in self.shapes]

    def mask_for(self, index: int) -> np.ndarray:
        """[H, W] float32 in [0, 1]: the union (maximum) of every speaker's mask in output frame `index`."""
        masks = [shape.mask(self.size) for shape in self.shapes_at(index)]
        return masks[0] if len(masks) == 1 else np.maximum.reduce(masks)


def composite(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """generated*mask + source*(1-mask), rounded, for uint8 frames [H, W, 3] (or [N, H, W, 3] with masks
    [N, H, W]); every pixel whose mask is 0 is the source's, exactly, and every pixel whose mask is 1 the
    generated one's."""
    if generated.shape != source.shape or generated.dtype != np.uint8 or source.dtype != np.uint8:
        raise ValueError(f"composite needs two uint8 frames of one shape, got {generated.shape} {generated.dtype}"
                         f" and {source.shape} {source.dtype}")
    if mask.shape != generated.shape[:-1]:
        raise ValueError(f"mask {mask.shape} does not match frames {generated.shape}")
    out = source.copy()
    inside = np.nonzero(mask.reshape(-1, *mask.shape[-2:]).any(axis=0))
    if not len(inside[0]):
        return out
    rows, cols = slice(inside[0].min(), inside[0].max() + 1), slice(inside[1].min(), inside[1].max() + 1)
    m = mask[..., rows, cols, None].astype(np.float32)
    s = source[..., rows, cols, :].astype(np.float32)
    blended = np.rint(s + m * (generated[..., rows, cols, :].astype(np.float32) - s))
    out[..., rows, cols, :] = np.where(m > 0, np.clip(blended, 0, 255), s).astype(np.uint8)
    return out


class Dubber:
    """Composites generated clips onto the source video's fitted frames inside a DubRegion."""

    def __init__(self, source: str | Path, region: DubRegion) -> None:
        from itk.runtime.video import VideoFrames

        self._source = VideoFrames(source)
        self.region = region

    @classmethod
    def open(cls, source: str | Path, *, target: tuple[int, int], length: int, mode: str,
             boxes: Sequence[Box] = (), speakers: int = 1) -> Dubber | None:
        """The dubber for `itk run --dub-region mode` (None for "full": the frames stay as generated)."""
        if mode not in DUB_REGIONS:
            raise BadInput(f"--dub-region {mode}: not one of {', '.join(DUB_REGIONS)}",
                           "; ".join(f"{k}: {v}" for k, v in DUB_REGION_HELP.items()))
        if mode == "full":
            return None
        return cls(source, DubRegion.for_video(source, target=target, length=length, mode=mode, boxes=boxes,
                                               speakers=speakers))

    def source_frame(self, index: int) -> np.ndarray:
        """The source's frame at 25 fps index `index`, fitted to the output size (past its end: the last)."""
        return fit_frame(self._source[index], self.region.size)

    def apply(self, frames: np.ndarray, start: int) -> np.ndarray:
        """[N, H, W, 3] uint8 generated frames that are output frames start..start+N-1 -> the composited ones."""
        return np.stack([composite(frame, self.source_frame(start + j), self.region.mask_for(start + j))
                         for j, frame in enumerate(frames)])


def _held(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The frames, then the last one forever (the generator holds a short source's last frame)."""
    last = None
    for last in frames:
        yield last
    while last is not None:
        yield last
