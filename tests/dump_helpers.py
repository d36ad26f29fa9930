"""Finding ids in dumps and files: an id counts as found only as a whole token (`u1` is not found
inside `u10`), in UTF-8 (JSON, text, SQL dumps) and in UTF-32 (numpy string arrays in .npz)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

_ID_CHARS = "0-9A-Za-z:_#.-"


def _patterns(needle: str) -> list[re.Pattern[bytes]]:
    utf8 = re.escape(needle.encode("utf-8"))
    utf32 = re.escape(needle.encode("utf-32-le"))
    return [
        re.compile(rb"(?<![" + _ID_CHARS.encode() + rb"])" + utf8 + rb"(?![" + _ID_CHARS.encode() + rb"])"),
        re.compile(utf32 + rb"(?![" + _ID_CHARS.encode() + rb"]\x00\x00\x00)"),
    ]


def traces(data: bytes, needles: Iterable[str]) -> list[str]:
    """The needles that occur in `data` as whole ids."""
    return [n for n in needles if any(p.search(data) for p in _patterns(n))]


def files_holding(root: Path, needles: Iterable[str]) -> dict[str, list[str]]:
    """Every file under `root` that holds one of the needles, with the needles it holds."""
    needles = list(needles)
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        hits = traces(path.read_bytes(), needles)
        if hits:
            found[str(path.relative_to(root))] = hits
    return found
