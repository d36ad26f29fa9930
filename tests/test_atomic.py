"""`apa.atomic`: the one way files that other processes read are replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from apa.atomic import replace_file, replace_text


def test_a_reader_sees_the_old_file_until_the_rename_and_listings_never_see_the_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache" / "abc.json"
    replace_text(path, '{"v": 1}')
    seen: list[tuple[str, list[str]]] = []

    def write(handle: BinaryIO) -> None:
        handle.write(b'{"v": ')
        seen.append((path.read_text(), sorted(p.name for p in path.parent.glob("*.json"))))
        handle.write(b"2}")

    replace_file(path, write)
    assert seen == [('{"v": 1}', ["abc.json"])]  # old content; the half-written file is not listed
    assert path.read_text() == '{"v": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["abc.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    replace_text(path, "old")

    def fail(handle: BinaryIO) -> None:
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_file(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_mode_and_fsync(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        replace_text(tmp_path / "public.json", "{}", fsync=True)
        replace_text(tmp_path / "private.json", "{}", mode=0o600)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "public.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_numpy_writers_keep_the_target_name(tmp_path: Path) -> None:
    """np.save / np.savez append a suffix to a path, never to a handle: the file lands where asked."""
    replace_file(tmp_path / "part.npy", lambda handle: np.save(handle, np.arange(3)))
    replace_file(tmp_path / "cache.npz", lambda handle: np.savez(handle, x=np.ones(2)))
    np.testing.assert_array_equal(np.load(tmp_path / "part.npy"), np.arange(3))
    with np.load(tmp_path / "cache.npz") as data:
        np.testing.assert_array_equal(data["x"], np.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz", "part.npy"]
