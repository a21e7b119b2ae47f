"""A speech script: text for text-to-speech, where `(s1)` and `(s2)` tags hand the turn to speaker 1 or 2
(the official app's format), and the two speech tracks its turns make (torch-free).

    (s1) Hello, I am the one on the left.
    (s2) And I am on the right.
    (s1) Nice to meet you.

Text without any tag is one speaker's; a script whose tags name one speaker only is a one-speaker job too.
The tracks are the `add` layout written out in time: each turn follows the one before it, and each
speaker's track is silent while the other talks, so both tracks have the length of the whole conversation
and play together (the job's audio_type is `para` for tracks laid out this way).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from itk.runtime.protocol import BadInput

SPEAKER_NUMBERS = (1, 2)
TAG = re.compile(r"\(\s*s(\d+)\s*\)", re.IGNORECASE)  # (s1), (S2), ( s1 ): any number, so (s3) is named
FORMAT_HELP = "tag each turn with (s1) or (s2), e.g. '(s1) Hello. (s2) Hi there.'"


@dataclass(frozen=True)
class Turn:
    speaker: int  # 1 or 2
    text: str  # stripped, never empty; newlines kept (speech pauses at them)
    line: int  # the 1-based line of the script where the turn starts, for messages


@dataclass(frozen=True)
class Script:
    turns: tuple[Turn, ...]

    @property
    def speakers(self) -> tuple[int, ...]:
        """The speakers who talk, in number order: (1,), (2,) or (1, 2)."""
        return tuple(sorted({t.speaker for t in self.turns}))

    @property
    def two_speakers(self) -> bool:
        return len(self.speakers) == 2


def parse_script(text: str) -> Script:
    """The turns of `text`. BadInput (one line and its fix) for an empty script, an unknown tag such as
    (s3), text before the first tag, or a tag with no words after it."""
    if not text.strip():
        raise BadInput("the speech text is empty", "give the words to speak")
    first_line = _line(text, len(text) - len(text.lstrip()))
    tags = list(TAG.finditer(text))
    if not tags:
        return Script(turns=(Turn(speaker=1, text=text.strip(), line=first_line),))
    for tag in tags:
        if int(tag.group(1)) not in SPEAKER_NUMBERS:
            raise BadInput(f"line {_line(text, tag.start())}: unknown speaker tag {tag.group(0)}: a script has "
                           "speakers (s1) and (s2) only", FORMAT_HELP)
    before = text[:tags[0].start()].strip()
    if before:
        raise BadInput(f"line {first_line}: text before the first speaker tag: {_quote(before)}",
                       "start the script with (s1) or (s2), or remove the text before it")
    turns = []
    for tag, end in zip(tags, [t.start() for t in tags[1:]] + [len(text)], strict=True):
        words = text[tag.end():end].strip()
        if not words:
            raise BadInput(f"line {_line(text, tag.start())}: the turn of {tag.group(0)} has no words",
                           "write what the speaker says after the tag, or remove the tag")
        turns.append(Turn(speaker=int(tag.group(1)), text=words, line=_line(text, tag.start())))
    return Script(turns=tuple(turns))


def speaker_tracks(script: Script, spoken: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """One float32 track per speaker of the script (in `script.speakers` order) from each turn's samples
    (`spoken[i]` is turn i's speech, all at one sample rate): the turns follow each other, and a speaker's
    track is silent during the other's turns, so every track has the length of the whole script."""
    if len(spoken) != len(script.turns):
        raise ValueError(f"{len(spoken)} sample arrays for {len(script.turns)} turns")
    spoken = [np.asarray(s, dtype=np.float32) for s in spoken]
    if any(s.ndim != 1 for s in spoken):
        raise ValueError("each turn's samples must be one mono array")
    tracks = {n: np.zeros(sum(len(s) for s in spoken), dtype=np.float32) for n in script.speakers}
    start = 0
    for turn, samples in zip(script.turns, spoken, strict=True):
        tracks[turn.speaker][start:start + len(samples)] = samples
        start += len(samples)
    return tuple(tracks[n] for n in script.speakers)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _quote(words: str, limit: int = 40) -> str:
    words = " ".join(words.split())
    return repr(words if len(words) <= limit else words[:limit - 1] + "…")
