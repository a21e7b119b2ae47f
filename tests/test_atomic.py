"""One atomic-write helper for every file itk produces."""

from __future__ import annotations

import pytest

from itk.runtime.atomic import atomic_write, atomic_write_text


def test_a_failing_writer_leaves_neither_a_file_nor_a_temporary_behind(tmp_path):
    target = tmp_path / "job.json"

    def half_then_fail(tmp):
        tmp.write_text('{"prompt": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_a_rewrite_replaces_the_old_file_whole_and_keeps_it_readable(tmp_path):
    target = tmp_path / "sub" / "verified.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o444 and [p.name for p in target.parent.iterdir()] == ["verified.json"]


def test_a_written_file_gets_the_mode_an_ordinary_file_gets_under_this_umask(tmp_path):
    """mkstemp creates 0600; the finished file must be as readable as any file the user creates here."""
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    written = atomic_write_text(tmp_path / "written.txt", "x")
    assert ordinary.stat().st_mode & 0o777 != 0o600, "this test needs a umask that lets others read"
    assert written.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777
