"""Atomic output files: the old file or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import stat

import pytest

from virtualst.files import write_atomically, write_bytes_atomically, write_text_atomically


def test_writes_through_a_hidden_temporary_with_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        seen = []
        path = write_atomically(tmp_path / "sub" / "a.csv", lambda tmp: seen.append(tmp.name) or tmp.write_text("x,y\n"))
    finally:
        os.umask(old)
    assert seen[0].startswith(".a.csv.") and path.read_text() == "x,y\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert write_bytes_atomically(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_text_atomically(tmp_path / "c.txt", "µm").read_text(encoding="utf-8") == "µm"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomically(tmp_path / "r.json", "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
