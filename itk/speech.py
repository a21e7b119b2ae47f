"""Speech from text for a job: `itk run --text`, a job line's "text", the page's text box.

The text (optionally a two-speaker script tagged `(s1) ... (s2) ...`) is spoken by Kokoro-82M
(itk.runtime.tts, loaded offline from the weights folder) and written as real wavs beside the video, which
then go into the job exactly as recorded speech does: `<video>.speech.wav` for one speaker, or
`<video>.speech1.wav` and `<video>.speech2.wav` for two, each silent while the other talks (so the job's
audio_type is `para`: the turns are already laid out in time). A rerun of the same text, voices and speed
reuses the wavs (their sidecar `<video>.speech.json` says what they hold), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from itk.runtime.protocol import EXIT_BAD_INPUT, Job, UserError

SPEECH_SUFFIX = ".speech"


@dataclass(frozen=True, kw_only=True)
class SpeechText:
    """What to say and how: the text or script, speaker 1's and 2's voices (None: Kokoro's defaults), speed."""

    text: str
    voice: str | None = None
    voice2: str | None = None
    speed: float = 1.0

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def read_text_file(path: str | Path) -> str:
    """A script file's text; UserError (exit 2) naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--text-file {path} does not exist", "check the path", EXIT_BAD_INPUT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--text-file {path} cannot be read ({exc})", "give a UTF-8 text file", EXIT_BAD_INPUT) \
            from None


def check_text(speech: SpeechText) -> int:
    """The script's speaker count (1 or 2), checked without loading anything: BadInput for a bad script or speed."""
    from itk.runtime.speech_script import parse_script
    from itk.runtime.tts import check_speed

    check_speed(speech.speed)
    return len(parse_script(speech.text).speakers)


def speech_files(video: Path, speakers: int) -> list[Path]:
    """The wavs spoken for `video`'s job: `<video>.speech.wav`, or `.speech1.wav` and `.speech2.wav` for two."""
    stem = video.with_suffix("")
    if speakers == 1:
        return [stem.with_name(stem.name + SPEECH_SUFFIX + ".wav")]
    return [stem.with_name(f"{stem.name}{SPEECH_SUFFIX}{n}.wav") for n in (1, 2)]


def speech_sidecar(video: Path) -> Path:
    """`<video>.speech.json`: what the spoken wavs beside `video` hold (text, voices, speed), so a rerun reuses them."""
    stem = video.with_suffix("")
    return stem.with_name(stem.name + SPEECH_SUFFIX + ".json")


def speak(speech: SpeechText, *, video: Path, weights_dir: Path) -> dict[str, Path]:
    """The job's cond_audio for `speech`: wavs written beside `video` (or reused when they already hold this
    text, voices and speed). UserError with the install or fetch command when text-to-speech cannot run here."""
    from itk.runtime.atomic import atomic_write_text
    from itk.runtime.speech_script import parse_script
    from itk.runtime.tts import DEFAULT_VOICES, TtsFolders, load_tts, problem, write_wav

    script = parse_script(speech.text)
    files = speech_files(video, len(script.speakers))
    sidecar = speech_sidecar(video)
    if all(f.is_file() for f in files) and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text(encoding="utf-8")).get("key") == speech.key:
                return dict(zip(("person1", "person2"), files, strict=False))
        except (OSError, ValueError):
            pass
    folders = TtsFolders.under(weights_dir)
    if (why := problem(folders)) is not None:
        raise why
    voices = {1: speech.voice or DEFAULT_VOICES[0], 2: speech.voice2 or DEFAULT_VOICES[1]}
    tracks = load_tts(folders).speak_script(script, voices=voices, speed=speech.speed)
    video.parent.mkdir(parents=True, exist_ok=True)
    for path, samples in zip(files, tracks, strict=True):
        write_wav(path, samples)
    atomic_write_text(sidecar, json.dumps({"key": speech.key, **asdict(speech),
                                           "files": [str(f) for f in files]}, indent=2) + "\n")
    return dict(zip(("person1", "person2"), files, strict=False))


def job_with_speech(job: Job, speech: SpeechText, *, video: Path, weights_dir: Path) -> Job:
    """`job` (its picture and prompt) with the spoken text as its speech: two speakers laid out as `para`."""
    from dataclasses import replace

    audio = speak(speech, video=video, weights_dir=weights_dir)
    return replace(job, cond_audio=dict(audio), audio_type="para" if len(audio) > 1 else None)
