"""Generated development secrets, for when a key setting is not configured.

Each secret (`APA_PSEUDONYM_KEY`, `APA_AUDIT_KEY`, `APA_SIGNING_KEY`) falls back to a random 32-byte
hex value created once in the cache directory (`APA_CACHE_DIR` or ~/.cache/apa), never replaced,
readable by its owner only, with a loud warning the first time a process uses it. Production sets
the variables; a development machine keeps working across restarts with stable keys.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_warned: set[str] = set()


def cache_dir() -> Path:
    """Where development keys are kept: `APA_CACHE_DIR`, else ~/.cache/apa."""
    return Path(os.environ.get("APA_CACHE_DIR") or Path.home() / ".cache" / "apa")


def secret_bytes(secret: str) -> bytes:
    """The key bytes of a secret setting: 32+ hex digits are decoded, any other text is used as UTF-8."""
    text = secret.strip()
    if len(text) >= 32:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    return text.encode("utf-8")


def development_secret(filename: str, variable: str, *, warn: bool = True) -> tuple[str, Path]:
    """A random 32-byte hex secret created once in the cache directory (never replaced), with a
    loud warning that `variable` should be set instead. Returns (secret, path)."""
    directory = cache_dir()
    path = directory / filename
    with _lock:
        if not path.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # never replace a key another process created meanwhile
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        secret = path.read_text().strip()
        if warn and variable not in _warned:
            _warned.add(variable)
            print(
                f"apa: WARNING: {variable} is not set; using the generated development key {path}. "
                f"Never run production without {variable}.",
                file=sys.stderr,
            )
    return secret, path


__all__ = ["cache_dir", "development_secret", "secret_bytes"]
