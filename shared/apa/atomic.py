"""Replacing a file atomically: a reader sees the old file or the new one, never half of either.

Every writer of a file that another process may read or write at the same time (model-directory
JSON, sample files, aggregation caches, stage outputs, study results) goes through `replace_file`.
The temporary file is this writer's own (pid + uuid in its name), so two processes replacing the
same file cannot take each other's temporary file: the last rename wins. Its name starts with a
dot and ends in `.tmp`, so no listing of `*.json`, `*.npz` or `*.npy` ever picks it up.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["replace_file", "replace_text"]


def replace_file(
    path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = False, mode: int = 0o666
) -> None:
    """Replace `path` with what `write(handle)` writes to a binary handle.

    The temporary file beside `path` is created with `mode` (less the umask), synced to disk before
    the rename when `fsync` is set (durable once this returns), and removed if anything fails, in
    which case `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_text(path: Path, text: str, *, fsync: bool = False, mode: int = 0o666) -> None:
    """Replace `path` with `text` (UTF-8) through `replace_file`."""
    data = text.encode("utf-8")
    replace_file(path, lambda handle: handle.write(data), fsync=fsync, mode=mode)
