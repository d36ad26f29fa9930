"""One rule for every id the system accepts: users, samples, interactions, requests, models, replicas.

The same check runs at bootstrap, on events, over HTTP and in the CLI, so an id that can be
imported can also be erased and looked up through its URL:

* a string of 1 to `MAX_ID_LENGTH` characters;
* no leading or trailing whitespace;
* no control characters (NUL included) and no lone surrogates (it must encode as UTF-8);
* no `/` and not `.` or `..`: every id is one URL path segment (`/erasures/<request_id>`), and a
  shard's id is `<model_id>/<k>`.
"""

from __future__ import annotations

import unicodedata

MAX_ID_LENGTH = 128
"""Longest id accepted (ids are database keys)."""


class InvalidInput(ValueError):
    """Bad input; `field` names the offending field ("body" for a whole message)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def id_problem(value: object) -> str | None:
    """Why `value` is not a valid id, or None when it is."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters"
    if value != value.strip():
        return "must not start or end with whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode text)"
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return "contains a control character (NUL, tab, newline, ...)"
    if "/" in value or value in (".", ".."):
        return "must not contain '/' or be '.' or '..' (ids are URL path segments)"
    return None


def check_id(value: object, field: str) -> str:
    """`value` if it is a valid id; else `InvalidInput` naming `field`."""
    problem = id_problem(value)
    if problem is not None:
        raise InvalidInput(field, problem)
    assert isinstance(value, str)
    return value


def shard_id_problem(value: object) -> str | None:
    """Why `value` is not a shard id `<model_id>/<k>`, or None when it is."""
    if not isinstance(value, str):
        return "must be a string"
    model_id, sep, index = value.rpartition("/")
    if not sep or not (index.isascii() and index.isdigit()) or str(int(index)) != index:
        return "must be <model_id>/<k> with k a shard index"
    problem = id_problem(model_id)
    return None if problem is None else f"model id part {problem}"


def check_shard_id(value: object, field: str) -> str:
    """`value` if it is a shard id `<model_id>/<k>`; else `InvalidInput` naming `field`."""
    problem = shard_id_problem(value)
    if problem is not None:
        raise InvalidInput(field, problem)
    assert isinstance(value, str)
    return value


__all__ = ["MAX_ID_LENGTH", "InvalidInput", "check_id", "check_shard_id", "id_problem", "shard_id_problem"]
