"""One generation request, typed: the generator's flag values checked as a whole, plus the job they name.

`Request.from_flags` turns the parsed flags into this dataclass (combinations checked, the job read, the
output path chosen and checked writable) and raises BadInput with one line and a fix for anything unusable;
`read_media` reads the reference image or video and the speech, turning decoder errors, images too large or
too small and speech too short into BadInput too. All of it happens before any model loads, so a bad input
costs seconds, not a generation. The engine takes a Request and never sees a flag. Torch is imported only
by `read_media`.

The rules `itk run` applies before launching are the same functions (itk/inputs.py imports them):
`check_clip_settings` (clip lengths that can make a video), `file_problem` (an input that is not a regular
file, said as what it is), `check_output_name` (a name the output and its temporary files fit) and
`image_size` (the pixel limit, read from the header).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import stat
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itk.runtime.layout import Layout, LayoutError, parse_layout
from itk.runtime.paths import check_output
from itk.runtime.protocol import (
    FPS,
    JOB_HELP,
    SAMPLE_RATE,
    SPEAKERS,
    BadInput,
    Job,
    pair_loras,
    read_job,
)
from itk.runtime.sampling import Sampling

if TYPE_CHECKING:
    import numpy as np
    import torch

    from itk.runtime.models.audio import SpeakerTracks
    from itk.runtime.pipeline import ReferenceSource

MAX_SEED = 99999999  # the official script draws a negative --base_seed's replacement from [0, this]
# The smallest reference: one source pixel per token the DiT sees. A token covers 16x16 output pixels (the
# VAE's 8x stride times the DiT's 2x2 patch), so a smaller image gives tokens made only of interpolation: a
# 1x1 image becomes a flat colour and the model has no face to animate. The minimum follows the bucket the
# image is resized to (40x40 for 480p's square bucket, 60x60 at 720p; a tiny test bucket needs a few pixels).
OUTPUT_PIXELS_PER_TOKEN = 16
# More pixels than this is refused from the image's header, before decoding: PIL's own default limit, fixed
# here so no other code's setting of PIL.Image.MAX_IMAGE_PIXELS changes the rule (PIL only warns up to twice it).
MAX_IMAGE_PIXELS = 89_478_485
NAME_MAX = 255  # bytes in one file or folder name (Linux and macOS file systems)
# The longest name made from an output `NAME` is the encoder's temporary file beside it,
# `.NAME.XXXXXXXX.partial.mp4` (runtime/atomic.py's mkstemp name, video.PARTIAL_SUFFIX): NAME gets the rest.
OUTPUT_NAME_MAX = NAME_MAX - len(".") - len(".XXXXXXXX") - len(".partial.mp4")


@dataclass(frozen=True)
class Request:
    """Everything one run needs to know, none of it a flag."""

    job: Job
    output: Path
    size: str
    sampling: Sampling
    ckpt_dir: Path
    wav2vec_dir: Path
    infinitetalk: Path | None  # the unquantised adapter file (without quant)
    quant: str | None  # "fp8" or None
    quant_file: Path | None  # the quantised DiT file (with quant)
    model_config: Path | None
    t5_cpu: bool
    persistent_params: int | None  # None: the DiT stays resident; N: N parameters on the GPU, the rest streamed
    variant: str = "single"  # the InfiniteTalk weights for the job's speakers (single | multi)
    loras: tuple[tuple[Path, float], ...] = ()  # (file, scale): --lora_dir zipped with --lora_scale
    lora_alpha: str = "ignore"  # --lora_alpha
    gpu_layout: Layout | None = None  # --gpu_layout: how a torchrun launch splits the work (None: chosen there)
    dub_region: str = "full"  # --dub_region: where a source video's frames are replaced (runtime/dub.py)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> Request:
        """The request for parsed flag values (protocol.build_parser's, by name). Raises BadInput."""
        f = flags
        if f["quant"] and not f["quant_dir"]:
            raise BadInput(f"--quant {f['quant']} needs --quant_dir (the quantised DiT file)",
                           "add --quant_dir with the FP8 DiT file `itk fetch` downloads")
        if not f["quant"] and not f["infinitetalk_dir"]:
            raise BadInput("--infinitetalk_dir is required without --quant (the InfiniteTalk adapter file)",
                           "add --infinitetalk_dir, or --quant fp8 with --quant_dir")
        sampling = Sampling.from_flags(f)
        check_clip_settings(sampling)
        if f["model_config"] and not Path(f["model_config"]).is_file():
            raise BadInput(f"--model_config {f['model_config']}: file not found", "check the path")
        job = _read_job(Path(f["input_json"]))
        _check_job(job)
        dit_flag = "--quant_dir" if f["quant"] else "--infinitetalk_dir"
        dit_file = f["quant_dir"] if f["quant"] else f["infinitetalk_dir"]
        variant = choose_variant(job, Path(dit_file), dit_flag)
        if sampling.seed < 0:  # the official rule: a negative --base_seed draws one
            sampling = dataclasses.replace(sampling, seed=random.randint(0, MAX_SEED))
        stem = f["save_file"] or default_stem(task=f["task"], size=f["size"], ulysses=f["ulysses_size"],
                                              ring=f["ring_size"], prompt=job.prompt)
        output = Path(f"{stem}.mp4")
        check_output_name(output, "--save_file")
        check_output(output, "--save_file", Path("talk"), inputs=[job.cond_video, *job.audio_files().values()])
        return cls(
            job=job, output=output, size=f["size"], sampling=sampling,
            ckpt_dir=Path(f["ckpt_dir"]), wav2vec_dir=Path(f["wav2vec_dir"]),
            infinitetalk=Path(f["infinitetalk_dir"]) if f["infinitetalk_dir"] else None,
            quant=f["quant"], quant_file=Path(f["quant_dir"]) if f["quant_dir"] else None,
            model_config=Path(f["model_config"]) if f["model_config"] else None, t5_cpu=f["t5_cpu"],
            persistent_params=f["num_persistent_param_in_dit"], variant=variant,
            loras=tuple(pair_loras(f["lora_dir"], f["lora_scale"])),
            lora_alpha=f["lora_alpha"], gpu_layout=_gpu_layout(f.get("gpu_layout")),
            dub_region=_dub_region(f.get("dub_region") or "full", job),
        )

    @property
    def speech(self) -> Path:
        """The first speaker's track that has a file (person1 unless it is the official "None")."""
        return next(iter(self.job.audio_files().values()))


def _read_job(path: Path) -> Job:
    """protocol.read_job, with the file checked first (a name too long, a device) and a JSON nested too deeply
    for Python's parser refused like any other unreadable job file. A pipe is read as given (`<(...)`)."""
    problem = file_problem(path, pipes=True)
    if problem and problem != MISSING:  # read_job names a missing file itself
        raise BadInput(f"job file {path} {problem}", "give the path of a .json job file to --input_json")
    try:
        return read_job(path)
    except RecursionError:
        raise BadInput(f"job file {path}: its JSON is nested too deeply to read", JOB_HELP) from None


def _check_job(job: Job) -> None:
    """The job's files exist, and a two-speaker job is complete (both boxes or none, one real track at least)."""
    for what, path in (("cond_video", job.cond_video),
                       *((f"cond_audio.{key}", p) for key, p in job.audio_files().items())):
        problem = file_problem(path)
        if problem:
            raise BadInput(f"{what} {path} {problem}" + (" (relative paths: the current folder, then the job "
                           "file's folder)" if problem == MISSING else ""), "check the path in the job file")
    if job.speakers < 2:
        return
    if not job.audio_files():
        raise BadInput('cond_audio: both speakers are "None": the job has no speech',
                       "give a speech file for person1 or person2")
    if job.bbox is not None and sorted(job.bbox) != list(SPEAKERS):
        raise BadInput(f"bbox: gives {', '.join(sorted(job.bbox)) or 'no box'}; two speakers need a box each "
                       "(or no bbox at all: the official left/right split)",
                       '"bbox": {"person1": [row_min, col_min, row_max, col_max], "person2": [...]}')


def dit_variant(path: Path | None) -> str | None:
    """single / multi when `path` is one of the manifest's variant DiT files by name (the unquantised adapters
    of both variants share one file name: their folder tells them apart),
    else None (a file of the user's own, taken as given)."""
    from itk.runtime.manifest import load_manifest

    if path is None:
        return None
    m = load_manifest()
    named = [f for f in m.select("dit", None) + m.select("dit", "fp8") if f.variant and Path(f.path).name == path.name]
    if len({f.variant for f in named}) > 1:
        named = [f for f in named if Path(f.path).parent.name == path.parent.name]
    return named[0].variant if named else None


def choose_variant(job: Job, dit_file: Path | None, flag: str) -> str:
    """The DiT variant of the run: the given file's, else the one the job's speaker count needs. Two speakers
    on the single-speaker DiT are refused: its audio layers were never trained to tell two voices apart."""
    from itk.runtime.manifest import load_manifest

    known = dit_variant(dit_file)
    if job.speakers > 1 and known == "single":
        multi = next(f.path for f in load_manifest().select("dit", "fp8" if flag == "--quant_dir" else None, "multi")
                     if f.variant == "multi")
        raise BadInput(f"cond_audio.person2: two speakers need the multi-speaker InfiniteTalk DiT, but {flag} "
                       f"{dit_file} is the single-speaker one",
                       f"`itk fetch --preset PRESET --variant multi` downloads {multi}: give it as {flag} (`itk run` "
                       "picks it by itself)")
    return known or ("multi" if job.speakers > 1 else "single")


def _dub_region(region: str, job: Job) -> str:
    """--dub_region, checked against the job: a region needs a source video, and bbox the job's boxes."""
    if region != "full" and not job.is_video:
        raise BadInput(f"--dub_region {region}: dubbing keeps a source video outside the speaker, and "
                       f"cond_video {job.cond_video} is an image", "leave out --dub_region for an image")
    if region == "bbox" and not job.bbox:
        raise BadInput("--dub_region bbox: the job gives no bbox", "add the speaker's box (itk run --bbox1 "
                       "row_min,col_min,row_max,col_max), or use --dub_region face")
    return region


def _gpu_layout(text: str | None) -> Layout | None:
    if not text:
        return None
    try:
        return parse_layout(text)
    except LayoutError as exc:
        raise BadInput(str(exc), "leave --gpu_layout to `itk run --gpus N`, which writes it") from None


MISSING = "does not exist"
FILE_KINDS = ((stat.S_ISDIR, "is a folder, not a file"),
              (stat.S_ISCHR, "is a character device, not a file"),
              (stat.S_ISBLK, "is a block device (a disk), not a file"), (stat.S_ISFIFO, "is a pipe (FIFO), not a file"),
              (stat.S_ISSOCK, "is a socket, not a file"))


def long_name(path: Path) -> str | None:
    """Why `path` cannot be a name on this file system (a name over NAME_MAX bytes), or None."""
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            return (f"has a name of {size} bytes ({part[:24]}...); a file or folder name may have at most "
                    f"{NAME_MAX} bytes")
    return None


def file_problem(path: Path, pipes: bool = False) -> str | None:
    """Why `path` cannot be read as an input file, said as what it is ("does not exist", "is a folder, not a
    file", "is a character device ...", a name too long), or None for a regular file (or a link to one). Both
    `itk run` and the generator ask this; the message reads after the path. `pipes`: a pipe is fine too (a job
    file read once, e.g. from a shell's process substitution `<(...)`; media are read more than once)."""
    too_long = long_name(path)
    if too_long:
        return too_long
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return MISSING
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return f"is a path of {len(os.fsencode(str(path)))} bytes, longer than this system allows"
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if pipes and stat.S_ISFIFO(mode):
        return None
    return next((what for test, what in FILE_KINDS if test(mode)), None if stat.S_ISREG(mode) else "is not a file")


def check_output_name(path: Path, flag: str) -> None:
    """Refuse an output whose name (or a folder's on its way) the file system cannot hold, counting the
    temporary names made beside it (OUTPUT_NAME_MAX): one line naming `flag` instead of Errno 36."""
    folder_problem = long_name(path.parent)
    if folder_problem:
        raise BadInput(f"{flag} {path}: a folder {folder_problem}", f"choose a shorter {flag}")
    size = len(os.fsencode(path.name))
    if size > OUTPUT_NAME_MAX:
        raise BadInput(f"{flag} {path}: the video's name is {size} bytes; with the temporary files made beside it, "
                       f"at most {OUTPUT_NAME_MAX} fit (a name may have {NAME_MAX} bytes)", f"choose a shorter {flag}")


def check_clip_settings(s: Sampling) -> None:
    """Refuse clip lengths that cannot make the video they describe, each with its reason: frame_num not 4n+1
    (the VAE packs 4 frames per latent after the first), motion_frame not below frame_num (each clip after
    the first starts frame_num - motion_frame frames later: at 0 the clips never advance), and in streaming
    mode a max_frame_num below one clip (the video is made of whole clips, so the first would be cut short and
    the plan would not say what the video holds)."""
    if (s.frame_num - 1) % 4:
        raise BadInput(f"--frame_num {s.frame_num}: must be 4n+1 (e.g. 81)", "use --frame_num 81")
    if s.motion_frame >= s.frame_num:
        raise BadInput(f"--motion_frame {s.motion_frame}: must be less than frame_num {s.frame_num} (each clip after "
                       "the first starts frame_num - motion_frame frames after the one before)",
                       "use --motion_frame 9 with --frame_num 81 (the official values)")
    if s.streaming and s.max_frame_num < s.frame_num:
        raise BadInput(f"--max_frame_num {s.max_frame_num}: shorter than one clip of frame_num {s.frame_num} frames "
                       f"({s.frame_num / FPS:.2f} s); a streaming video is made of whole clips",
                       f"use --max_frame_num {s.frame_num} or more, or a smaller --frame_num (4n+1)")


def default_stem(*, task: str, size: str, ulysses: int, ring: int, prompt: str) -> str:
    """The official output name when --save_file is not given."""
    text = prompt.replace(" ", "_").replace("/", "_")[:50]
    return f"{task}_{size}_{ulysses}_{ring}_{text}_{time.strftime('%Y%m%d_%H%M%S')}"


@dataclass(frozen=True)
class Media:
    """The job's inputs, decoded: the reference frames' source and the prepared speech (for two speakers also
    each speaker's track, the masks saying where each one is, and what was done beyond the official code)."""

    reference: ReferenceSource
    speech: np.ndarray  # mono float32 at SAMPLE_RATE, loudness-normalised: the video's sound (two speakers: the mix)
    sample_rate: int = SAMPLE_RATE
    speakers: SpeakerTracks | None = None  # two speakers: each one's track, laid out by audio_type
    speaker_masks: torch.Tensor | None = None  # two speakers: [3, N_h*N_w] (runtime/speakers.py)
    notes: tuple[str, ...] = ()  # padding of `para` tracks, overlapping boxes: said in the log and as an event
    track_samples: tuple[int, int] | None = None  # two speakers: each track's length ("None": the other's)


def read_media(request: Request, table: dict[str, list[int]]) -> Media:
    """Decode the reference (image or video, bucketed by `table`) and the speech. Raises BadInput."""
    from itk.runtime.pipeline import ReferenceSource

    path = request.job.cond_video
    if not request.job.is_video:
        check_image_size(path, table)  # from the header, before decoding a possibly enormous image
    try:
        reference = ReferenceSource(path, table)
    except Exception as exc:  # PIL / PyAV errors: an unreadable or non-image file
        raise BadInput(f"cond_video {path}: cannot read as image or video ({exc})",
                       "give a .png/.jpg image or a video (.mp4 ...)") from exc
    if request.job.is_video:
        check_reference_size(path, *reference.size, table)
    if request.job.speakers > 1:
        return read_two_speakers(request.job, reference)
    return Media(reference, read_speech(request.speech))


def read_two_speakers(job: Job, reference: ReferenceSource) -> Media:
    """Both tracks laid out by the job's audio_type (the sound track is their mix) and the speaker masks from
    its bbox (rows first, as officially) or the official left/right split, on the reference's token grid."""
    from itk.runtime.models.audio import combine_speakers
    from itk.runtime.speakers import check_boxes, speaker_masks

    tracks = [None if path is None else read_speech(path, f"cond_audio.{key}") for key, path in job.cond_audio.items()]
    speakers = combine_speakers(tracks[0], tracks[1], job.audio_type or "")
    boxes = [job.bbox[key] for key in SPEAKERS] if job.bbox else None
    fix = "give [row_min, col_min, row_max, col_max] in pixels of the image (rows first, as the official bbox)"
    try:
        notes = check_boxes(boxes, reference.size) if boxes else []
        masks = speaker_masks(reference.size, reference.target, boxes)
    except ValueError as exc:
        raise BadInput(f"bbox: {str(exc).split(': give')[0]}", fix) from None
    lengths = [len(t) if t is not None else 0 for t in tracks]
    samples = (lengths[0] or lengths[1], lengths[1] or lengths[0])
    return Media(reference, speakers.mix.astype("float32"), speakers=speakers, speaker_masks=masks,
                 notes=(*speakers.notes, *notes), track_samples=samples)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image's header, or None when PIL cannot open it as an image (its decoder
    then says why). BadInput for more than MAX_IMAGE_PIXELS (a decompression bomb, or a photo far larger than
    any output): the one pixel rule, for `itk run` and the generator alike, found before decoding anything."""
    from PIL import Image

    def refuse() -> BadInput:
        return BadInput(f"the image {path} has more pixels than the limit of {MAX_IMAGE_PIXELS} "
                        "(a decompression bomb, or a photo far larger than any output size)",
                        "give a smaller image (a few megapixels is plenty)")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise refuse() from None
    except Exception:
        return None
    if width * height > MAX_IMAGE_PIXELS:
        raise refuse()
    return width, height


def check_image_size(path: Path, table: dict[str, list[int]]) -> None:
    """Refuse an image over the pixel limit (`image_size`) or too small for its bucket, reading only the
    image's header."""
    size = image_size(path)
    if size is not None:  # not an image PIL can open: ReferenceSource reports it with the decoder's words
        check_reference_size(path, size[1], size[0], table)


def minimum_size(height: int, width: int, table: dict[str, list[int]]) -> tuple[int, int]:
    """(h, w): the smallest reference for the bucket an image of this shape is resized to."""
    from itk.runtime.buckets import choose_bucket

    th, tw = choose_bucket(height, width, table)
    return math.ceil(th / OUTPUT_PIXELS_PER_TOKEN), math.ceil(tw / OUTPUT_PIXELS_PER_TOKEN)


def check_reference_size(path: Path, height: int, width: int, table: dict[str, list[int]]) -> None:
    """Refuse a reference smaller than `minimum_size` (see OUTPUT_PIXELS_PER_TOKEN for why)."""
    from itk.runtime.buckets import choose_bucket

    low_h, low_w = minimum_size(height, width, table)
    if height < low_h or width < low_w:
        th, tw = choose_bucket(height, width, table)
        raise BadInput(f"the picture {path} is {width}x{height} pixels, too small: the minimum size is "
                       f"{low_w}x{low_h} (width x height) for its {tw}x{th} output",
                       f"give an image or video of at least {low_w}x{low_h} pixels")


def read_speech(path: Path, what: str = "cond_audio.person1") -> np.ndarray:
    """16 kHz mono speech, loudness-normalised to -23 LUFS; silence is refused (nothing to lip-sync; a silent
    second speaker is the job's "None"). `what` names the track in errors."""
    from itk.runtime.models.audio import frame_count, load_speech, loudness_normalize

    try:
        samples = load_speech(path)
    except Exception as exc:  # the loader's one-line message names the file
        raise BadInput(f"{what} {path}: cannot read audio ({str(exc).splitlines()[0]})",
                       "give a speech recording (.wav, .flac, .mp3)") from exc
    if len(samples) == 0 or float(abs(samples).max()) < 1e-4:
        raise BadInput(f"{what} {path}: the audio is silent", "give a speech recording")
    if frame_count(len(samples)) < 1:  # no video frame to animate; found here, before any model loads
        seconds = len(samples) / SAMPLE_RATE
        raise BadInput(f"{what} {path}: {seconds * 1000:.0f} ms of audio is shorter than one video "
                       f"frame ({1000 // FPS} ms)", "give a longer speech recording")
    # Speech shorter than one 400 ms loudness block cannot be measured and stays as it is (the official rule
    # for unmeasurable tracks); loudness_normalize does that itself.
    return loudness_normalize(samples, SAMPLE_RATE)
