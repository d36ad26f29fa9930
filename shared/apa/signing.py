"""Keys that live outside the registry database: the Ed25519 key that signs erasure receipts and
audit anchors, and the generated development secrets used when a key is not configured.

Why Ed25519 and not an HMAC for receipts: a regulator must be able to check a receipt offline
without holding a secret that would also let them forge one. With a public-key signature the
controller publishes the public key (`apa audit public-key`); anyone can verify, only the holder
of `APA_SIGNING_KEY` can sign. The implementation is PyCA `cryptography` (OpenSSL underneath).

The audit chain itself stays an HMAC (`apa.db.audit`): only the controller recomputes it, and
an HMAC per row is cheap.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from apa.devkeys import development_secret

ALGORITHM = "Ed25519"
DEV_SIGNING_KEY_FILE = "dev-signing.key"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64") from None


def public_key_id(raw_public_key: bytes) -> str:
    """A key's fingerprint: the first 16 hex digits of sha256 of its 32 raw bytes."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: checks signatures made by the matching `SigningKey`."""

    raw: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        return public_key_id(self.raw)

    @property
    def b64(self) -> str:
        return b64(self.raw)

    def pem(self) -> str:
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def verify(self, message: bytes, signature_b64: str) -> bool:
        """True when `signature_b64` is this key's signature of `message`."""
        try:
            signature = unb64(signature_b64, "signature")
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """From PEM (SubjectPublicKeyInfo), base64 of the 32 raw bytes, or 64 hex digits."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("the PEM public key is not an Ed25519 key")
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        try:
            raw = bytes.fromhex(text) if len(text) == 64 else unb64(text, "public key")
        except ValueError:
            raise ValueError("a public key must be PEM, base64 of 32 bytes, or 64 hex digits") from None
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key has 32 bytes")
        return cls(raw)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key (receipts and anchors are signed with it)."""

    private: Ed25519PrivateKey = field(repr=False)
    source: str = "explicit"

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> str:
        """The base64 Ed25519 signature of `message`."""
        return b64(self.private.sign(message))

    @classmethod
    def parse(cls, text: str, source: str = "explicit") -> SigningKey:
        """From 64 hex digits (the 32-byte seed) or a PEM PKCS#8 private key."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{source}: the PEM private key is not an Ed25519 key")
            return cls(key, source)
        try:
            seed = bytes.fromhex(text)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{source}: an Ed25519 signing key is 64 hex digits (its seed) or PEM")
        return cls(Ed25519PrivateKey.from_private_bytes(seed), source)


def signing_key_from_settings(settings: Any | None = None) -> SigningKey:
    """`APA_SIGNING_KEY`, else the generated development key (with a warning)."""
    from apa.settings import Settings

    settings = settings if isinstance(settings, Settings) else Settings.from_env()
    if settings.signing_key:
        return SigningKey.parse(settings.signing_key, source="APA_SIGNING_KEY")
    secret, path = development_secret(DEV_SIGNING_KEY_FILE, "APA_SIGNING_KEY")
    return SigningKey.parse(secret, source=f"development key {path}")


__all__ = [
    "ALGORITHM",
    "PublicKey",
    "SigningKey",
    "public_key_id",
    "signing_key_from_settings",
]
