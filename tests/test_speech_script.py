"""The speech script: (s1)/(s2) tags into turns, one-line errors with their fix, and the two tracks its turns
make (each speaker silent while the other talks)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from itk.runtime.protocol import EXIT_BAD_INPUT, BadInput
from itk.runtime.speech_script import Script, Turn, parse_script, speaker_tracks


def test_tags_hand_the_turn_from_one_speaker_to_the_other():
    script = parse_script("(s1) Hello there.\n(s2) Hi! How are you?\n(s1) Fine, thanks.")
    assert [(t.speaker, t.text, t.line) for t in script.turns] == [
        (1, "Hello there.", 1), (2, "Hi! How are you?", 2), (1, "Fine, thanks.", 3)]
    assert script.speakers == (1, 2) and script.two_speakers


def test_tags_may_sit_mid_line_in_any_case_and_spacing_and_a_turn_may_span_lines():
    script = parse_script("(S1) One.  ( s2 ) Two,\nstill two.")
    assert [(t.speaker, t.text) for t in script.turns] == [(1, "One."), (2, "Two,\nstill two.")]


def test_text_without_tags_is_one_speakers_job():
    script = parse_script("\n  Just one person talking.\n")
    assert script.turns == (Turn(speaker=1, text="Just one person talking.", line=2),)
    assert script.speakers == (1,) and not script.two_speakers


@pytest.mark.parametrize("text, speakers", [("(s1) A. (s1) B.", (1,)), ("(s2) only the second", (2,))])
def test_a_script_whose_tags_name_one_speaker_is_a_one_speaker_job(text, speakers):
    script = parse_script(text)
    assert script.speakers == speakers and not script.two_speakers


def test_parentheses_that_are_not_tags_are_words():
    script = parse_script("(s1) I said (so to speak) yes (see s2).")
    assert script.turns[0].text == "I said (so to speak) yes (see s2)."


@pytest.mark.parametrize("text, message, fix", [
    ("", "the speech text is empty", "give the words"),
    ("  \n ", "the speech text is empty", "give the words"),
    ("(s1) Hi.\n(s3) Who am I?", "line 2: unknown speaker tag (s3)", "(s1) or (s2)"),
    ("(s0) zero", "line 1: unknown speaker tag (s0)", "(s1) or (s2)"),
    ("\nHello.\n(s1) Hi.", "line 2: text before the first speaker tag: 'Hello.'", "start the script with"),
    ("(s1) Hi.\n(s2)\n(s1) Again.", "line 2: the turn of (s2) has no words", "after the tag"),
    ("(s1) Hi. (s2)  ", "line 1: the turn of (s2) has no words", "after the tag"),
])
def test_a_bad_script_is_one_line_with_its_fix(text, message, fix):
    with pytest.raises(BadInput) as err:
        parse_script(text)
    assert err.value.message.startswith(message) and "\n" not in err.value.message
    assert fix in err.value.fix and err.value.exit_code == EXIT_BAD_INPUT


def test_a_long_text_before_the_first_tag_is_quoted_short():
    with pytest.raises(BadInput) as err:
        parse_script("word " * 40 + "(s1) hi")
    assert len(err.value.message) < 120 and err.value.message.endswith("…'")


def test_each_speakers_track_is_silent_while_the_other_talks():
    script = parse_script("(s1) a (s2) b (s1) c")
    one, two = speaker_tracks(script, [np.full(3, 0.1), np.full(2, 0.2), np.full(4, 0.3)])
    assert one.dtype == two.dtype == np.float32 and len(one) == len(two) == 9
    np.testing.assert_allclose(one, [0.1] * 3 + [0] * 2 + [0.3] * 4)
    np.testing.assert_allclose(two, [0] * 3 + [0.2] * 2 + [0] * 4)


def test_a_one_speaker_script_makes_one_track_of_its_turns_in_order():
    (track,) = speaker_tracks(parse_script("(s2) a (s2) b"), [np.ones(2), np.zeros(3)])
    np.testing.assert_array_equal(track, [1, 1, 0, 0, 0])


def test_the_tracks_need_one_mono_array_per_turn():
    script = Script(turns=(Turn(1, "a", 1), Turn(2, "b", 1)))
    with pytest.raises(ValueError, match="1 sample arrays for 2 turns"):
        speaker_tracks(script, [np.ones(2)])
    with pytest.raises(ValueError, match="mono"):
        speaker_tracks(script, [np.ones(2), np.ones((2, 2))])


def test_the_parser_imports_nothing_heavy():
    code = "import sys, itk.runtime.speech_script; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
