"""Text to speech with Kokoro-82M (the `kokoro` package, extra `itk[tts]`), offline: 24 kHz mono speech.

Everything comes from two folders the manifest fills, and nothing from a hub at run time:
- `kokoro`: hexgrad/Kokoro-82M's layout: config.json, the weights file (a dict of five state dicts, bert,
  bert_encoder, predictor, text_encoder and decoder, keys prefixed `module.`), voices/NAME.pt (a [510, 1, 256]
  style tensor per phoneme count). `kokoro.KModel` builds from the config and loads the file; passed both, it
  downloads nothing. Its loader falls back to a non-strict load for the `module.` prefix, so the weights it
  would leave at random are checked here.
- `g2p`: a spaCy English pipeline folder (spacy/en_core_web_sm's layout). Kokoro's grapheme-to-phoneme step,
  `misaki.en.G2P`, tags parts of speech with it (heteronyms, punctuation, numbers); misaki's own constructor
  installs the pipeline by name with `spacy download` (network) when the package is absent, so the G2P is
  built here from the loaded folder instead. Words outside misaki's dictionaries (shipped in its wheel) go to
  its espeak-ng fallback, whose library and data ship in the `espeakng-loader` wheel.

American (voice names a*) and British (b*) English voices; Kokoro's other languages are not wired. Torch,
kokoro, misaki and spaCy are imported inside the functions that use them: importing this module costs nothing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from itk.runtime.atomic import atomic_write
from itk.runtime.protocol import EXIT_MISSING_WEIGHTS, BadInput, UserError
from itk.runtime.speech_script import Script, speaker_tracks

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 24_000  # Kokoro's output rate
REPO_ID = "hexgrad/Kokoro-82M"
CONFIG_FILE = "config.json"
VOICES_DIR = "voices"
G2P_FILES = ("config.cfg", "meta.json")  # what makes a folder a spaCy pipeline
G2P_COMPONENTS = ("tok2vec", "tagger")  # the pipes misaki enables; the others are not loaded (nor fetched)
MAX_PHONEMES = 510  # per model call: a voice holds one style per phoneme count up to this
STYLE_SIZE = 256  # a voice's style vector: the decoder's 128 values, then the prosody predictor's 128
SPEED_RANGE = (0.5, 2.0)
DEFAULT_VOICES = ("af_heart", "am_adam")  # speaker 1, speaker 2
LANGUAGES = MappingProxyType({"a": "American English", "b": "British English"})  # a voice name's first letter
VOICE_NAME = re.compile(r"[a-z]{2}_[a-z0-9]+")
# Kokoro's ALBERT computes a pooled output it never uses (it returns the last hidden state), so the pooler's
# weights may be absent from a checkpoint without changing the speech.
UNUSED_WEIGHTS = ("bert.pooler.",)
BREAKS = ("!.?…", ":;", ",—")  # where a long line is cut into model calls, strongest first
PACKAGES = MappingProxyType({  # module -> distribution
    "kokoro": "kokoro", "misaki": "misaki", "spacy": "spacy", "espeakng_loader": "espeakng-loader",
    "phonemizer": "phonemizer-fork",
})
INSTALL_FIX = "pip install 'itk[tts]'"
FETCH_FIX = "itk fetch --component tts"


@dataclass(frozen=True)
class TtsFolders:
    kokoro: Path  # hexgrad/Kokoro-82M's layout
    g2p: Path  # a spaCy English pipeline (spacy/en_core_web_sm's layout)

    @classmethod
    def under(cls, weights_dir: Path) -> TtsFolders:
        """Kokoro's and the G2P pipeline's folders under the weights folder (the manifest's local folders)."""
        from itk.runtime.manifest import load_manifest

        repos = load_manifest().repos
        return cls(kokoro=weights_dir / repos["kokoro"].local_dir, g2p=weights_dir / repos["spacy-en"].local_dir)

    def missing_files(self) -> list[Path]:
        wanted = [self.kokoro / CONFIG_FILE, self.kokoro / model_file(), *(self.g2p / f for f in G2P_FILES)]
        return [p for p in wanted if not p.is_file()]


def model_file() -> str:
    """Kokoro's weights file name in its folder: the manifest's one file of role tts-model (the manifest alone
    names weight files)."""
    from itk.runtime.manifest import load_manifest

    (entry,) = load_manifest().select("tts-model")
    return entry.path


def missing_packages() -> list[str]:
    """The distributions text-to-speech needs that are not installed (found without importing them)."""
    return [dist for module, dist in PACKAGES.items() if importlib.util.find_spec(module) is None]


def list_voices(kokoro_dir: Path) -> list[str]:
    """The voice names in `kokoro_dir`/voices, sorted."""
    folder = kokoro_dir / VOICES_DIR
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []


def problem(folders: TtsFolders) -> UserError | None:
    """Why text-to-speech cannot run here (packages, then files), or None; imports nothing heavy."""
    if missing := missing_packages():
        return UserError(f"text-to-speech needs {', '.join(missing)}, not installed", INSTALL_FIX)
    if missing_files := folders.missing_files():
        more = f" and {len(missing_files) - 1} more" if len(missing_files) > 1 else ""
        return UserError(f"text-to-speech weights missing: {missing_files[0]}{more}", FETCH_FIX,
                         EXIT_MISSING_WEIGHTS)
    if not list_voices(folders.kokoro):
        return UserError(f"no Kokoro voice in {folders.kokoro / VOICES_DIR}", FETCH_FIX, EXIT_MISSING_WEIGHTS)
    return None


def check_speed(speed: float) -> float:
    low, high = SPEED_RANGE
    if not low <= speed <= high:
        raise BadInput(f"speech speed {speed:g} is outside {low:g}-{high:g}", "use --speed 1 for the voice's pace")
    return speed


def chunk_phonemes(tokens: Iterable[tuple[str, bool]], limit: int = MAX_PHONEMES) -> list[str]:
    """Phoneme strings of at most `limit` characters from (phonemes, space after) tokens, cut after the
    last sentence end that fits, else the last clause or comma, else the last token that fits; a single
    token longer than `limit` is truncated."""
    chunks: list[str] = []
    current: list[str] = []
    for phonemes, space in tokens:
        piece = phonemes + (" " if space else "")
        while current and len("".join([*current, piece]).strip()) > limit:
            cut = _break_after(current)
            chunks.append("".join(current[:cut]).strip())
            current = current[cut:]
        current.append(piece)
    chunks.append("".join(current).strip())
    return [c[:limit] for c in chunks if c]


class Kokoro:
    """Kokoro loaded from our folders (`load_tts`); English G2Ps and voice packs are loaded on first use."""

    def __init__(self, *, model: Any, nlp: Any, kokoro_dir: Path):
        self.model = model  # kokoro.KModel
        self.nlp = nlp  # the spaCy pipeline the G2P tags with
        self.kokoro_dir = kokoro_dir  # its voices are kokoro_dir/voices/NAME.pt
        self._g2ps: dict[bool, Any] = {}  # british -> misaki.en.G2P
        self._packs: dict[Path, torch.Tensor] = {}

    def phonemes(self, text: str, *, voice: str) -> list[str]:
        """The phoneme strings the model speaks for `text` in `voice`'s English, one per model call (each
        line of the text, cut to MAX_PHONEMES)."""
        _, british = self._voice_file(voice)
        g2p = self._g2p(british)
        chunks = []
        for line in text.splitlines():
            if line.strip():
                _, tokens = g2p(line)
                chunks += chunk_phonemes((t.phonemes or "", bool(t.whitespace)) for t in tokens)
        return chunks

    def synthesize(self, text: str, *, voice: str, speed: float = 1.0) -> np.ndarray:
        """Float32 samples at SAMPLE_RATE of `text` read by `voice` (a name in the voices folder, or a .pt
        file) at `speed` (1 = the voice's pace). Lines are spoken one after another."""
        check_speed(speed)
        pack = self._pack(self._voice_file(voice)[0])
        chunks = self.phonemes(text, voice=voice)
        if not any(c.isalpha() for chunk in chunks for c in chunk):  # nothing, or punctuation only
            raise BadInput(f"no speakable words in {text.strip()[:40]!r}", "write the speech as English words")
        audio = [self.model(phonemes, pack[len(phonemes) - 1], speed).numpy() for phonemes in chunks]
        return np.concatenate(audio).astype(np.float32, copy=False)

    def speak_script(self, script: Script, *, voices: Mapping[int, str], speed: float = 1.0) -> tuple[np.ndarray, ...]:
        """One track per speaker of `script` (`script.speakers` order, see speech_script.speaker_tracks), each
        turn read by `voices[turn.speaker]`."""
        spoken = []
        for turn in script.turns:
            try:
                spoken.append(self.synthesize(turn.text, voice=voices[turn.speaker], speed=speed))
            except BadInput as exc:
                raise BadInput(f"line {turn.line}: {exc.message}", exc.fix) from None
        return speaker_tracks(script, spoken)

    def _voice_file(self, voice: str) -> tuple[Path, bool]:
        """The voice's file and whether it is British."""
        named = voice.endswith(".pt")
        folder = self.kokoro_dir / VOICES_DIR
        path = Path(voice) if named else folder / f"{voice}.pt"
        there = ", ".join(list_voices(self.kokoro_dir)) or "none"
        if not named and not VOICE_NAME.fullmatch(voice):
            raise BadInput(f"voice {voice!r} is not a Kokoro voice name (like {DEFAULT_VOICES[0]})",
                           f"use one of: {there}")
        if not path.is_file():
            raise BadInput(f"voice {voice!r} not found (voices in {folder}: {there})",
                           f"use one of them, or put Kokoro-82M's voices/{path.name} in {folder}")
        if path.name[0] not in LANGUAGES:
            known = " or ".join(f"{letter} ({language})" for letter, language in LANGUAGES.items())
            raise BadInput(f"voice {voice!r} is not English: its name must start with {known}",
                           f"use {DEFAULT_VOICES[0]}")
        return path, path.name[0] == "b"

    def _pack(self, path: Path) -> torch.Tensor:
        import torch

        if path not in self._packs:
            try:
                pack = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
                raise UserError(f"voice file {path} is unreadable ({type(exc).__name__})", FETCH_FIX) from None
            if not isinstance(pack, torch.Tensor) or pack.ndim != 3 or pack.shape[0] < MAX_PHONEMES \
                    or tuple(pack.shape[1:]) != (1, STYLE_SIZE):
                shape = list(pack.shape) if isinstance(pack, torch.Tensor) else type(pack).__name__
                raise UserError(f"voice file {path} holds {shape}, not a Kokoro voice "
                                f"[{MAX_PHONEMES}, 1, {STYLE_SIZE}]", FETCH_FIX)
            self._packs[path] = pack.float()
        return self._packs[path]

    def _g2p(self, british: bool) -> Any:
        if british not in self._g2ps:
            self._g2ps[british] = english_g2p(self.nlp, british=british)
        return self._g2ps[british]


def load_tts(folders: TtsFolders, *, device: str = "cpu") -> Kokoro:
    """Kokoro from `folders`, on `device`. UserError: packages missing (fix: install the extra), files
    missing (fix: fetch), or files that do not make a Kokoro (config and weights disagree, weights left out)."""
    if (reason := problem(folders)) is not None:
        raise reason
    return Kokoro(model=load_model(folders.kokoro, device=device), nlp=load_g2p_pipeline(folders.g2p),
                  kokoro_dir=folders.kokoro)


def load_model(folder: Path, *, device: str = "cpu") -> Any:
    """kokoro.KModel built from `folder`/config.json with every used weight from its weights file (`model_file`)."""
    import torch
    from kokoro import KModel

    config_path, weights = folder / CONFIG_FILE, folder / model_file()
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path} is not readable JSON ({exc})", FETCH_FIX) from None
    try:
        with warnings.catch_warnings():
            # torch's weight_norm deprecation and the LSTMs' dropout note: Kokoro's code, nothing to act on.
            warnings.simplefilter("ignore", (FutureWarning, UserWarning))
            model = KModel(repo_id=REPO_ID, config=config, model=str(weights))
        saved = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, AssertionError, KeyError, TypeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{weights} does not load with {config_path}: {first}", FETCH_FIX) from None
    missing = [f"{part}.{name}" for part, module in model.named_children()
               for name in module.state_dict().keys() - {k.removeprefix("module.") for k in saved.get(part, {})}]
    missing = [m for m in missing if not m.startswith(UNUSED_WEIGHTS)]
    if missing:
        raise UserError(f"{weights} lacks {len(missing)} weights of the model {config_path} describes "
                        f"(first: {sorted(missing)[0]})", FETCH_FIX)
    return model.to(device).eval()


def load_g2p_pipeline(folder: Path) -> Any:
    """The spaCy pipeline in `folder` with the pipes misaki uses (the others are left unloaded). UserError
    when the installed spaCy is not one the pipeline was made for (meta.json's spacy_version)."""
    import spacy

    try:
        wanted = json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("spacy_version", "")
        if wanted and spacy.util.is_compatible_version(spacy.about.__version__, wanted) is False:
            raise UserError(f"the spaCy pipeline in {folder} needs spaCy {wanted}; spaCy "
                            f"{spacy.about.__version__} is installed", f"pip install 'spacy{wanted}'")
        pipes = spacy.util.load_config(folder / "config.cfg")["nlp"]["pipeline"]
        return spacy.load(folder, exclude=[p for p in pipes if p not in G2P_COMPONENTS])
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the spaCy pipeline in {folder} does not load: {first}", FETCH_FIX) from None


def english_g2p(nlp: Any, *, british: bool) -> Any:
    """misaki's English G2P (as Kokoro's pipeline makes it: unknown words spoken by espeak-ng, unknown
    symbols dropped) tagging with `nlp`. misaki.en.G2P's constructor would install a spaCy pipeline by name
    from the network; this sets the same fields with our pipeline instead (misaki 0.9)."""
    from misaki import en, espeak

    g2p = en.G2P.__new__(en.G2P)
    g2p.version, g2p.british, g2p.nlp, g2p.unk = None, british, nlp, ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # misaki reads its dictionaries with open_text
        g2p.lexicon = en.Lexicon(british)
    try:
        g2p.fallback = espeak.EspeakFallback(british=british)
    except Exception as exc:  # noqa: BLE001 - espeak-ng's loader fails in many ways; one answer
        raise UserError(f"espeak-ng (misaki's fallback for unknown words) does not load: {exc}",
                        f"reinstall it: {INSTALL_FIX}") from None
    return g2p


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """`samples` (float, clipped to [-1, 1]) as a 16-bit PCM wav at `path`, written atomically."""
    import soundfile

    data = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return atomic_write(path, lambda tmp: soundfile.write(tmp, data, rate, subtype="PCM_16", format="WAV"),
                        suffix=".wav")


def _break_after(pieces: list[str]) -> int:
    """Where to cut `pieces`: after the last one ending a sentence, else a clause, else a comma; else all."""
    ends = [p.rstrip()[-1:] for p in pieces]
    for marks in BREAKS:
        for i in range(len(pieces) - 1, 0, -1):
            if ends[i - 1] and ends[i - 1] in marks:
                return i
    return len(pieces)
