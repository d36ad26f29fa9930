"""Event schemas and the event bus (Kafka in production, in-process for the demo and tests).

`ErasureRequested` is the JSON schema of topic `apa.erasure-requests` (docs/ARCHITECTURE.md, "Events"):
`{request_id, user_id, interactions?: [...], requested_at}`, keyed by user id. Parsing
validates and raises `EventValidationError` (a ValueError) naming the bad field, so a consumer
can send the message to the dead-letter topic with that reason.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from apa.ids import InvalidInput, id_problem, shard_id_problem
from apa.settings import Settings


class EventValidationError(InvalidInput):
    """A malformed event; `field` names the offending field ("body" for the whole message)."""


def utc_now_iso() -> str:
    """The current time as ISO-8601 UTC with an explicit offset."""
    return datetime.now(UTC).isoformat()


def parse_timestamp(value: object, field_name: str) -> datetime:
    """An ISO-8601 timestamp as an aware UTC datetime (naive input is taken as UTC)."""
    if not isinstance(value, str) or not value:
        raise EventValidationError(field_name, "must be an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise EventValidationError(field_name, f"not an ISO-8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise EventValidationError(field_name, f"out of the representable range: {value!r}") from None


MAX_EVENT_BYTES = 256 * 1024
"""Default bound on one erasure message (`Settings.erasure_max_event_bytes`); bigger ones are malformed."""
EARLIEST_REQUEST = datetime(2000, 1, 1, tzinfo=UTC)
"""`requested_at` before this is out of range (no such request exists; a parsing accident)."""
MAX_CLOCK_SKEW = timedelta(days=1)
"""`requested_at` may lie this far ahead of the receiving clock; further is out of range."""


_EVENT_FIELDS = frozenset({"request_id", "user_id", "interactions", "requested_at"})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:  # ambiguous: JSON parsers disagree on which value wins
            if key in _EVENT_FIELDS:
                raise EventValidationError(key, "appears twice in the JSON object")
            raise EventValidationError("body", "a key appears twice in one JSON object")
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise EventValidationError("body", f"{name} is not JSON")


def decode_json(raw: bytes | bytearray | str | None, *, max_bytes: int = MAX_EVENT_BYTES) -> Any:
    """The JSON value of a message, or EventValidationError ("body" or the duplicated key) for an
    empty or oversized message, bytes that are not UTF-8, text that is not JSON (NaN included),
    nesting too deep to parse, or a key that appears twice in one object."""
    if raw is None or len(raw) == 0:
        raise EventValidationError("body", "empty message")
    if len(raw) > max_bytes:
        raise EventValidationError("body", f"{len(raw)} bytes, more than the limit of {max_bytes}")
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventValidationError("body", f"not valid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise EventValidationError("body", f"not valid JSON: {exc}") from None
    except RecursionError:
        raise EventValidationError("body", "JSON nested too deeply") from None


def _check_id(value: object, field_name: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise EventValidationError(field_name, problem)
    assert isinstance(value, str)
    return value


@dataclass(frozen=True)
class ErasureRequested:
    """A GDPR erasure request: all of a user's data, or only the given interactions of that user."""

    request_id: str
    """Unique id of the request; processing is idempotent by it."""
    user_id: str
    """Whose data to erase (also the Kafka message key)."""
    interactions: list[str] | None = None
    """Interaction ids to erase; None erases the whole user."""
    requested_at: str = field(default_factory=utc_now_iso)
    """When the account system received the request (ISO-8601)."""

    def __post_init__(self) -> None:
        _check_id(self.request_id, "request_id")
        _check_id(self.user_id, "user_id")
        if self.interactions is not None:
            if not isinstance(self.interactions, list) or not self.interactions:
                raise EventValidationError(
                    "interactions", "must be a non-empty list of ids, or absent to erase the whole user"
                )
            for i, interaction in enumerate(self.interactions):
                _check_id(interaction, f"interactions[{i}]")
        requested = parse_timestamp(self.requested_at, "requested_at")
        if requested < EARLIEST_REQUEST:
            raise EventValidationError("requested_at", f"before {EARLIEST_REQUEST.date()}: out of range")
        if requested > datetime.now(UTC) + MAX_CLOCK_SKEW:
            raise EventValidationError("requested_at", "lies in the future: out of range")

    @property
    def scope(self) -> Literal["user", "interactions"]:
        """`user` (everything of the user) or `interactions` (only the listed ones)."""
        return "user" if self.interactions is None else "interactions"

    @property
    def requested_datetime(self) -> datetime:
        """`requested_at` as an aware UTC datetime."""
        return parse_timestamp(self.requested_at, "requested_at")

    @classmethod
    def create(cls, user_id: str, interactions: list[str] | None = None) -> ErasureRequested:
        """A new request with a random id, requested now."""
        return cls(request_id=str(uuid.uuid4()), user_id=user_id, interactions=interactions)

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (`interactions` omitted for a whole-user request)."""
        out: dict[str, Any] = {"request_id": self.request_id, "user_id": self.user_id}
        if self.interactions is not None:
            out["interactions"] = list(self.interactions)
        out["requested_at"] = self.requested_at
        return out

    def to_json(self) -> str:
        """The wire format of topic `apa.erasure-requests`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> ErasureRequested:
        """Validate a decoded message; raises EventValidationError naming the bad field."""
        if not isinstance(data, Mapping):
            raise EventValidationError("body", "must be a JSON object")
        for required in ("request_id", "user_id", "requested_at"):
            if required not in data:
                raise EventValidationError(required, "is required")
        interactions = data.get("interactions")
        if interactions is not None and not isinstance(interactions, list):
            raise EventValidationError("interactions", "must be a list of ids")
        return cls(
            request_id=data["request_id"],
            user_id=data["user_id"],
            interactions=list(interactions) if interactions is not None else None,
            requested_at=data["requested_at"],
        )

    @classmethod
    def from_json(
        cls, raw: str | bytes | bytearray | None, *, max_bytes: int = MAX_EVENT_BYTES
    ) -> ErasureRequested:
        """Parse and validate the wire format; raises EventValidationError naming the bad field
        (`decode_json`'s checks, then the schema's)."""
        return cls.from_dict(decode_json(raw, max_bytes=max_bytes))


@dataclass(frozen=True)
class ShardEvent:
    """A shard state change on topic `apa.shard-events` (keyed by shard id)."""

    shard_id: str
    """Registry shard id (`<model_id>/<k>`)."""
    state: Literal["stale", "retraining", "serving"]
    """The shard's new state; `serving` means a retrained adapter is ready to load."""
    generation: int
    """The shard's data generation (bumped by every erasure that touches it)."""
    adapter_version: int | None = None
    """The serving adapter version when `state` is `serving`."""
    at: str = field(default_factory=utc_now_iso)
    """When the change happened (ISO-8601)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "state": self.state,
            "generation": self.generation,
            "adapter_version": self.adapter_version,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: object) -> ShardEvent:
        """Validate a decoded message; raises EventValidationError naming the bad field."""
        if not isinstance(data, Mapping):
            raise EventValidationError("body", "must be a JSON object")
        shard_id = data.get("shard_id")
        problem = shard_id_problem(shard_id)
        if problem is not None:
            raise EventValidationError("shard_id", problem)
        assert isinstance(shard_id, str)
        state = data.get("state")
        if state not in ("stale", "retraining", "serving"):
            raise EventValidationError("state", "must be one of stale, retraining, serving")
        generation = data.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise EventValidationError("generation", "must be a non-negative integer")
        version = data.get("adapter_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise EventValidationError("adapter_version", "must be an integer or null")
        at = data.get("at", utc_now_iso())
        parse_timestamp(at, "at")
        return cls(shard_id=shard_id, state=state, generation=generation, adapter_version=version, at=at)


@runtime_checkable
class EventBus(Protocol):
    """Publishes JSON events; Kafka in production, in-process for the demo and tests."""

    def publish(self, topic: str, key: str, value: dict[str, Any]) -> None:
        """Publish `value` (a JSON-ready dict) on `topic` with partition key `key`; returns once
        the broker has acknowledged it."""
        ...


Handler = Callable[[str, str, dict[str, Any]], None]
"""A subscriber of the in-memory bus: called with (topic, key, value)."""


@dataclass(frozen=True)
class Message:
    """One published event, as the in-memory bus keeps it."""

    topic: str
    key: str
    value: dict[str, Any]


class InMemoryEventBus:
    """An in-process bus: keeps every message and calls subscribers synchronously on publish."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[Message] = []
        self._subscribers: dict[str, list[Handler]] = {}

    def publish(self, topic: str, key: str, value: dict[str, Any]) -> None:
        value = json.loads(json.dumps(value))  # same guarantees as the wire: JSON only, a copy
        with self._lock:
            self._messages.append(Message(topic, key, value))
            handlers = list(self._subscribers.get(topic, ()))
        for handler in handlers:
            handler(topic, key, value)

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Call `handler(topic, key, value)` for every later message on `topic`."""
        with self._lock:
            self._subscribers.setdefault(topic, []).append(handler)

    def messages(self, topic: str | None = None) -> list[Message]:
        """Messages published so far, oldest first (all topics when `topic` is None)."""
        with self._lock:
            return [m for m in self._messages if topic is None or m.topic == topic]


class KafkaEventBus:
    """Publishes to Kafka with kafka-python: acks from all in-sync replicas, key = the given key
    (the user id for erasure events, so one user's events stay ordered on one partition)."""

    def __init__(self, bootstrap_servers: str, *, timeout_s: float = 30.0, **producer_kwargs: Any) -> None:
        from kafka import KafkaProducer

        from apa.kafka_serde import JsonValueSerializer, Utf8KeySerializer

        self.timeout_s = timeout_s
        # send() itself blocks up to max_block_ms (default 60 s) waiting for metadata when the
        # broker is unreachable; bound it by timeout_s too, so a publish fails within ~2x timeout_s.
        producer_kwargs.setdefault("max_block_ms", int(timeout_s * 1000))
        self._producer = KafkaProducer(
            bootstrap_servers=[s.strip() for s in bootstrap_servers.split(",") if s.strip()],
            acks="all",
            retries=5,
            key_serializer=Utf8KeySerializer(),
            value_serializer=JsonValueSerializer(),
            **producer_kwargs,
        )

    def publish(self, topic: str, key: str, value: dict[str, Any]) -> None:
        self._producer.send(topic, key=key, value=value).get(timeout=self.timeout_s)

    def close(self) -> None:
        self._producer.flush(timeout=self.timeout_s)
        self._producer.close(timeout=self.timeout_s)


def build_event_bus(settings: Settings) -> EventBus:
    """Kafka when `APA_KAFKA_BOOTSTRAP` is set, else a fresh in-process bus."""
    if settings.kafka_bootstrap:
        return KafkaEventBus(settings.kafka_bootstrap, timeout_s=settings.kafka_timeout_s)
    return InMemoryEventBus()
