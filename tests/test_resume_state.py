"""The resume state's own rules, without a generation: the fingerprint sees a same-size edit, state.json may
name only files inside its folder, and removing a state never reaches outside it. (End to end, with a killed
run on tiny weights: tests/test_long_video.py.)"""

from __future__ import annotations

import json
import os

import pytest

from itk.runtime.protocol import BadInput
from itk.runtime.resume import ResumeState, changes, fingerprint, remove_state, restart_fix


def test_an_input_edited_to_the_same_size_changes_the_fingerprint_by_its_modification_time(tmp_path):
    speech = tmp_path / "speech.wav"
    speech.write_bytes(b"RIFF" + bytes(100))
    before = fingerprint({"steps": 40}, {"person1": speech}, [])
    stat = speech.stat()
    speech.write_bytes(b"RIFF" + bytes(99) + b"\x01")
    os.utime(speech, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert speech.stat().st_size == stat.st_size
    assert changes(before, fingerprint({"steps": 40}, {"person1": speech}, [])) == ["input person1"]


def _state(folder, **edits) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"version": 2, "clips": 4, "clips_done": 1, "frames": 9, "video_s": 0.36,
              "carry": "carry-00001.safetensors", "fingerprint": {"setting steps": "2"},
              "hashes": {"clip-00000.mkv": "0" * 64, "carry-00001.safetensors": "0" * 64}}
    (folder / "state.json").write_text(json.dumps({**record, **edits}))


@pytest.mark.parametrize(("edits", "words"), [
    ({"carry": "../victim.safetensors"}, ("names the carry '../victim.safetensors'",)),
    ({"carry": "/etc/passwd"}, ("names the carry '/etc/passwd'",)),
    ({"hashes": {"../victim": "0" * 64, "carry-00001.safetensors": "0" * 64}}, ("hashes",)),
    ({"clips_done": "1"}, ("clips_done",)),
    ({"clips_done": 4}, ("4 of 4 clips",)),
    ({"version": 1}, ("version-2",)),
])
def test_a_state_naming_anything_but_its_own_files_is_refused_as_damaged(tmp_path, edits, words):
    folder = tmp_path / "talk.mp4.itk-resume"
    _state(folder, **edits)
    with pytest.raises(BadInput) as refused:
        ResumeState.load(folder)
    message = refused.value.message
    assert message.startswith(f"cannot resume {tmp_path / 'talk.mp4'}: {folder / 'state.json'}")
    assert all(word in message for word in words), message
    fix = refused.value.fix
    assert fix == restart_fix(folder) and "--restart" in fix and str(folder) in fix


def test_removing_a_state_unlinks_links_without_following_them(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    folder = tmp_path / "talk.mp4.itk-resume"
    folder.mkdir()
    (folder / "carry-00001.safetensors").symlink_to(keep / "precious.txt")
    (folder / "inner").symlink_to(keep, target_is_directory=True)
    remove_state(folder)
    assert not folder.exists() and (keep / "precious.txt").read_text() == "mine"
    folder.symlink_to(keep, target_is_directory=True)  # the folder itself a link: the link goes, not its target
    remove_state(folder)
    assert not folder.is_symlink() and (keep / "precious.txt").read_text() == "mine"
    remove_state(folder)  # nothing there: nothing to do


def test_a_file_under_the_state_folders_name_is_refused_not_deleted(tmp_path):
    folder = tmp_path / "talk.mp4.itk-resume"
    folder.write_text("someone's notes")
    with pytest.raises(BadInput, match="is not a folder"):
        ResumeState.prepare(tmp_path / "talk.mp4", {}, resume=False)
    assert folder.read_text() == "someone's notes"
