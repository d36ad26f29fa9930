"""kafka-python (de)serializers of the project's messages: UTF-8 keys, canonical JSON values.

They implement kafka-python's `Serializer` / `Deserializer` (plain callables are deprecated there)
and are callable too. Importing this module imports kafka-python: `apa.kafka` and `apa.events`
import it only when they build a client.
"""

from __future__ import annotations

import json
from typing import Any

from kafka.serializer import Deserializer, Serializer


class Utf8KeyDeserializer(Deserializer):
    """Message keys as text (undecodable bytes replaced); kafka-python's Deserializer, also callable."""

    def deserialize(self, topic: str, headers: list[tuple[str, bytes]], data: bytes | None) -> str | None:
        return self(data)

    def __call__(self, data: bytes | None) -> str | None:
        return None if data is None else data.decode("utf-8", errors="replace")


class Utf8KeySerializer(Serializer):
    """Message keys as UTF-8; kafka-python's Serializer, also callable."""

    def serialize(self, topic: str, headers: list[tuple[str, bytes]], data: str | None) -> bytes | None:
        return self(data)

    def __call__(self, data: str | None) -> bytes | None:
        return None if data is None else data.encode("utf-8")


class JsonValueSerializer(Serializer):
    """Message values as canonical JSON (sorted keys, UTF-8); kafka-python's Serializer, also callable."""

    def serialize(self, topic: str, headers: list[tuple[str, bytes]], data: Any) -> bytes:
        return self(data)

    def __call__(self, data: Any) -> bytes:
        return json.dumps(data, sort_keys=True).encode("utf-8")


__all__ = ["JsonValueSerializer", "Utf8KeyDeserializer", "Utf8KeySerializer"]
