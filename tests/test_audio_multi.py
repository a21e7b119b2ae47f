"""Two speakers' speech against the official audio_prepare_multi + get_embedding (golden audio_multi_A):
`add`, `para`, a silent ("None") speaker, both do_normalize variants; `para` of unequal tracks, which the
official code refuses, is padded with a note; the video length follows both speakers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_audio import VARIANTS, write_folder

from itk.runtime.models.audio import AudioEncoder, AudioError, SpeakerTracks, combine_speakers, two_speaker_frames
from itk.runtime.protocol import SILENT_SPEAKER
from itk.runtime.request import read_speech

from golden import GOLDENS, load_golden, rel_err, weights_of

TOL = 1e-5
WAV = {n: GOLDENS / f"audio_multi_{n}.wav" for n in (1, 2, 3)}
CASES = {"add": (WAV[1], WAV[2], "add"), "para": (WAV[2], WAV[3], "para"), "para_none": (WAV[1], "None", "para")}


@pytest.fixture(scope="module")
def golden():
    return load_golden("audio_multi_A")


@pytest.fixture(scope="module")
def encoders(golden, tmp_path_factory) -> dict[bool, AudioEncoder]:
    meta, tensors = golden
    root = tmp_path_factory.mktemp("w2v_multi")
    return {flag: AudioEncoder.from_folder(write_folder(root / name, meta, weights_of(meta, tensors), flag))
            for flag, name in VARIANTS.items()}


def prepare_speakers(first, second, mode: str) -> SpeakerTracks:
    """Both tracks as the generator reads them (request.read_speech: loaded and loudness-normalised each on its
    own; "None": a silent speaker), laid out by `mode`."""
    tracks = [None if str(path) == SILENT_SPEAKER else read_speech(path) for path in (first, second)]
    return combine_speakers(tracks[0], tracks[1], mode)


@pytest.fixture(scope="module")
def prepared():
    return {case: prepare_speakers(*args) for case, args in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_the_tracks_have_the_official_layout_dtype_and_length(golden, prepared, case):
    meta, t = golden
    info = meta["cases"][case]
    tracks = prepared[case]
    assert [len(tracks.first), len(tracks.second)] == info["speech_samples"]
    assert [tracks.first.dtype.name, tracks.second.dtype.name] == [info["speech1_dtype"], info["speech2_dtype"]]
    assert tracks.mix.dtype.name == info["sum_dtype"]
    assert tracks.notes == ()
    loud = {n: t[f"intermediate.loudness_normalized.{n}"].numpy() for n in (1, 2, 3)}
    expected = {
        "add": (np.concatenate([loud[1], np.zeros(32000)]), np.concatenate([np.zeros(24000), loud[2]])),
        "para": (loud[2], loud[3]),
        "para_none": (loud[1], np.zeros(24000)),
    }[case]
    for ours, ref in zip((tracks.first, tracks.second), expected, strict=True):
        assert rel_err(torch.from_numpy(ours), torch.from_numpy(ref)) < TOL


@pytest.mark.parametrize("do_normalize", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_each_speakers_embedding_matches_the_official_one(golden, prepared, encoders, case, do_normalize):
    meta, t = golden
    tracks = prepared[case]
    embeddings = encoders[do_normalize].embed_speakers([tracks.first, tracks.second])
    frames = meta["cases"][case]["person1_frames int(video_length)"]
    assert embeddings.shape == (2, frames, 3, 32) and embeddings.dtype == torch.float32
    for n in (1, 2):
        ref = t[f"output.{case}.person{n}.audio_embedding.{VARIANTS[do_normalize]}"]
        assert rel_err(embeddings[n - 1], ref) < TOL, n


@pytest.mark.parametrize("case", ["add", "para"])
def test_normalisation_runs_over_the_whole_padded_track(golden, prepared, encoders, case):
    _, t = golden
    tracks = prepared[case]
    for n, track in ((1, tracks.first), (2, tracks.second)):
        ref = t[f"intermediate.{case}.person{n}.input_values.do_normalize_true"]
        assert rel_err(encoders[True].input_values(track), ref) < TOL


def test_para_with_tracks_of_different_lengths_pads_the_shorter_and_says_so(golden):
    meta, t = golden
    short, long = t["intermediate.loudness_normalized.1"].numpy(), t["intermediate.loudness_normalized.2"].numpy()
    for first, second, padded in ((short, long, 1), (long, short, 2)):
        tracks = combine_speakers(first, second, "para")
        assert len(tracks.first) == len(tracks.second) == 32000
        track = tracks.first if padded == 1 else tracks.second
        assert np.array_equal(track[:24000], short) and not track[24000:].any()
        assert track.dtype == np.float32
        assert len(tracks.notes) == 1 and f"speaker {padded}'s track (1.50 s) is shorter" in tracks.notes[0]
        assert "padded with 0.50 s of silence" in tracks.notes[0]


def test_the_mix_is_the_sum_of_the_two_tracks(prepared):
    tracks = prepared["add"]
    assert np.array_equal(tracks.mix, tracks.first + tracks.second)


def test_the_video_length_follows_both_speakers():
    assert two_speaker_frames(24000, 32000, "add") == 87
    assert two_speaker_frames(24000, 32000, "para") == 50
    assert two_speaker_frames(32000, 24000, "para") == 50  # the official rule (speaker 1 only) agrees here
    assert two_speaker_frames(24000, 24000, "para") == 37
    with pytest.raises(ValueError, match="expected one of add, para"):
        two_speaker_frames(1, 1, "mix")


def test_bad_modes_and_two_silent_speakers_are_refused():
    with pytest.raises(ValueError, match="audio mode 'both'"):
        combine_speakers(np.zeros(10, np.float32), None, "both")
    with pytest.raises(ValueError, match="both speakers are silent"):
        combine_speakers(None, None, "add")


def test_tracks_of_different_lengths_are_not_embedded_side_by_side(encoders):
    with pytest.raises(AudioError, match="different lengths"):
        encoders[True].embed_speakers([np.zeros(16000, np.float32), np.zeros(8000, np.float32)])
