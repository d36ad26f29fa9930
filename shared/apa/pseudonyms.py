"""Keyed pseudonyms: what the registry, the audit trail and the model directory keep instead of ids.

After an erasure nothing may hold the user's ids in clear, yet an auditor holding the user's id
must still be able to ask "was U erased, when, from which shards and adapter versions?". So every
stored user, sample and interaction id is an HMAC-SHA256 pseudonym under a secret key
(`APA_PSEUDONYM_KEY`) that lives outside every store: recomputing `pseudonymizer.user("42")` finds
user 42's rows; without the key the rows reveal nothing, not even to someone holding the public
MovieLens data (an unkeyed hash of a guessable id would).

Each kind of id has its own domain (`user`, `sample`, `interaction`, `content`), so a user id and
an interaction id with the same text get different pseudonyms. `key_id` fingerprints the key:
every store records it, and a process holding another key refuses to write there.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["user", "sample", "interaction", "content"]
DEV_KEY_FILE = "dev-pseudonym.key"
"""The generated development key's file in the cache directory (`apa.devkeys`)."""
MIN_KEY_BYTES = 16


class PseudonymKeyMismatch(RuntimeError):
    """A store was written under another pseudonym key than the one this process holds."""


@dataclass(frozen=True)
class Pseudonymizer:
    """HMAC-SHA256 pseudonyms under one secret key (hex output, 64 characters)."""

    key: bytes = field(repr=False)
    source: str = "explicit"
    """Where the key came from (`APA_PSEUDONYM_KEY`, the development key file, a test)."""

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key must have at least {MIN_KEY_BYTES} bytes")

    def pid(self, kind: Kind, value: str) -> str:
        """The pseudonym of `value` as an id of `kind`."""
        message = f"apa:{kind}:".encode() + value.encode("utf-8")
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def user(self, user_id: str) -> str:
        return self.pid("user", user_id)

    def sample(self, sample_id: str) -> str:
        return self.pid("sample", sample_id)

    def interaction(self, interaction_id: str) -> str:
        return self.pid("interaction", interaction_id)

    def content(self, text: str) -> str:
        """A keyed digest of a record's text: proves what was held without letting anyone confirm a
        guess of it."""
        return self.pid("content", text)

    def samples(self, sample_ids: Iterable[str]) -> list[str]:
        return [self.sample(s) for s in sample_ids]

    @property
    def key_id(self) -> str:
        """A fingerprint of the key (not the key): stores record it to detect a key mix-up."""
        return hmac.new(self.key, b"apa:key-id", hashlib.sha256).hexdigest()[:16]

    def check_key_id(self, recorded: str | None, where: str) -> None:
        """PseudonymKeyMismatch unless `recorded` (a store's key id) is this key's (None: unrecorded)."""
        if recorded is not None and recorded != self.key_id:
            raise PseudonymKeyMismatch(
                f"{where} was written under pseudonym key {recorded}, but this process holds key "
                f"{self.key_id} ({self.source}); set APA_PSEUDONYM_KEY to the key it was written with"
            )

    @classmethod
    def from_secret(cls, secret: str, source: str = "explicit") -> Pseudonymizer:
        """From the text of a secret (`apa.devkeys.secret_bytes`)."""
        from apa.devkeys import secret_bytes

        return cls(secret_bytes(secret), source)


def development_key(*, warn: bool = True) -> Pseudonymizer:
    """The generated development key (`apa.devkeys`), with a loud warning unless `warn` is False."""
    from apa.devkeys import development_secret

    secret, path = development_secret(DEV_KEY_FILE, "APA_PSEUDONYM_KEY", warn=warn)
    return Pseudonymizer.from_secret(secret, source=f"development key {path}")


def pseudonymizer_from_settings(settings: object | None = None) -> Pseudonymizer:
    """`APA_PSEUDONYM_KEY` from the settings, else the development key (with a warning)."""
    from apa.settings import Settings

    settings = settings if isinstance(settings, Settings) else Settings.from_env()
    if settings.pseudonym_key:
        return Pseudonymizer.from_secret(settings.pseudonym_key, source="APA_PSEUDONYM_KEY")
    return development_key()


__all__ = [
    "DEV_KEY_FILE",
    "Kind",
    "PseudonymKeyMismatch",
    "Pseudonymizer",
    "development_key",
    "pseudonymizer_from_settings",
]
