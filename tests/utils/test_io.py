"""Atomic writes: complete or absent, never half-written; readable like a normal file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fastserve.utils.io import atomic_dir, atomic_write_json


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_keeps_old_version(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("crash mid-write")
    assert (final / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left


def test_atomic_dir_replaces_existing(tmp_path):
    final = tmp_path / "out"
    for version in ("1", "2"):
        with atomic_dir(final) as tmp:
            (tmp / "v").write_text(version)
    assert (final / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_modes_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d"):
            pass
        atomic_write_json(tmp_path / "f.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": 1}
