"""Settings from APA_* variables, the erasure event schema and the in-process event bus."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apa.events import (
    ErasureRequested,
    EventValidationError,
    InMemoryEventBus,
    ShardEvent,
    build_event_bus,
)
from apa.settings import Settings

# --- settings ----------------------------------------------------------------------------------------


def test_settings_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///./apa.db"
    assert settings.erasure_topic == "apa.erasure-requests"
    assert settings.shard_events_topic == "apa.shard-events"
    assert settings.dead_letter_topic == "apa.erasure-requests.dlq"
    assert settings.api_token is None and settings.kafka_bootstrap is None


def test_settings_read_and_convert_apa_variables() -> None:
    settings = Settings.from_env(
        {
            "APA_DATABASE_URL": "postgresql+psycopg2://u@db/apa",
            "APA_API_TOKEN": "t",
            "APA_ALLOW_UNAUTHENTICATED": "yes",
            "APA_REPLICA_LIVE_SECONDS": "12.5",
            "APA_KAFKA_BOOTSTRAP": "",
            "UNRELATED": "x",
        }
    )
    assert settings.database_url == "postgresql+psycopg2://u@db/apa"
    assert settings.api_token == "t" and settings.allow_unauthenticated is True
    assert settings.replica_live_seconds == 12.5
    assert settings.kafka_bootstrap is None  # empty optional -> unset


def test_settings_name_the_variable_that_does_not_parse() -> None:
    with pytest.raises(ValueError, match="APA_ALLOW_UNAUTHENTICATED"):
        Settings.from_env({"APA_ALLOW_UNAUTHENTICATED": "maybe"})
    with pytest.raises(ValueError, match="APA_REPLICA_LIVE_SECONDS"):
        Settings.from_env({"APA_REPLICA_LIVE_SECONDS": "soon"})


def test_api_token_is_required_unless_dev_mode() -> None:
    with pytest.raises(ValueError, match="APA_API_TOKEN"):
        Settings().require_api_token()
    assert Settings(allow_unauthenticated=True).require_api_token() is None
    assert Settings(api_token="t").require_api_token() == "t"


# --- ErasureRequested --------------------------------------------------------------------------------


def test_erasure_event_round_trips_through_json() -> None:
    event = ErasureRequested("r1", "u1", ["i1", "i2"], "2025-01-02T03:04:05+00:00")
    assert ErasureRequested.from_json(event.to_json()) == event
    assert event.scope == "interactions"
    whole = ErasureRequested.create("u2")
    assert whole.scope == "user" and "interactions" not in json.loads(whole.to_json())
    assert ErasureRequested.from_json(whole.to_json().encode()) == whole


def test_naive_timestamps_are_taken_as_utc() -> None:
    event = ErasureRequested("r1", "u1", requested_at="2025-01-02T03:04:05")
    assert event.requested_datetime.isoformat() == "2025-01-02T03:04:05+00:00"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("not json", "body"),
        ("[1]", "body"),
        ('{"user_id": "u", "requested_at": "2025-01-01T00:00:00Z"}', "request_id"),
        ('{"request_id": "r", "requested_at": "2025-01-01T00:00:00Z"}', "user_id"),
        ('{"request_id": "r", "user_id": "u"}', "requested_at"),
        ('{"request_id": "r", "user_id": "u", "requested_at": "never"}', "requested_at"),
        ('{"request_id": "", "user_id": "u", "requested_at": "2025-01-01T00:00:00Z"}', "request_id"),
        ('{"request_id": "r", "user_id": 5, "requested_at": "2025-01-01T00:00:00Z"}', "user_id"),
        ('{"request_id": "r", "user_id": " u", "requested_at": "2025-01-01T00:00:00Z"}', "user_id"),
        (
            '{"request_id": "r", "user_id": "u", "interactions": {}, "requested_at": "2025-01-01"}',
            "interactions",
        ),
        (
            '{"request_id": "r", "user_id": "u", "interactions": [], "requested_at": "2025-01-01"}',
            "interactions",
        ),
        (
            '{"request_id": "r", "user_id": "u", "interactions": ["a", null], "requested_at": "2025-01-01"}',
            "interactions[1]",
        ),
    ],
)
def test_malformed_erasure_event_names_the_bad_field(raw: str, field: str) -> None:
    with pytest.raises(EventValidationError) as info:
        ErasureRequested.from_json(raw)
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and str(info.value).startswith(field)


def test_shard_event_validates() -> None:
    event = ShardEvent("m/0", "stale", 3)
    assert ShardEvent.from_dict(event.to_dict()) == event
    with pytest.raises(EventValidationError) as info:
        ShardEvent.from_dict({**event.to_dict(), "state": "gone"})
    assert info.value.field == "state"


# --- event bus ---------------------------------------------------------------------------------------


def test_in_memory_bus_keeps_messages_and_calls_subscribers() -> None:
    bus = InMemoryEventBus()
    seen: list[tuple[str, str, dict[str, Any]]] = []
    bus.subscribe("t1", lambda topic, key, value: seen.append((topic, key, value)))
    payload = {"a": [1, 2]}
    bus.publish("t1", "k", payload)
    bus.publish("t2", "k2", {"b": 1})
    payload["a"].append(3)  # the bus kept a copy
    assert seen == [("t1", "k", {"a": [1, 2]})]
    assert [m.topic for m in bus.messages()] == ["t1", "t2"]
    assert bus.messages("t2")[0].value == {"b": 1}
    with pytest.raises(TypeError):
        bus.publish("t1", "k", {"not json": object()})


def test_event_bus_is_in_memory_without_kafka_settings() -> None:
    assert isinstance(build_event_bus(Settings()), InMemoryEventBus)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kafka-python's own, on import
def test_kafka_bus_waits_for_all_replicas_and_keys_by_the_given_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring only (no broker here): acks=all, UTF-8 key, JSON value, send waited on."""
    import kafka

    from apa.events import KafkaEventBus

    sent: list[tuple[str, bytes, bytes]] = []

    class FakeProducer:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def send(self, topic: str, key: str, value: dict[str, Any]) -> Any:
            sent.append((topic, self.kwargs["key_serializer"](key), self.kwargs["value_serializer"](value)))

            class Future:
                def get(self, timeout: float) -> None:
                    return None

            return Future()

    monkeypatch.setattr(kafka, "KafkaProducer", FakeProducer)
    bus = build_event_bus(Settings(kafka_bootstrap="k1:9092, k2:9092"))
    assert isinstance(bus, KafkaEventBus)
    producer = bus._producer
    assert producer.kwargs["acks"] == "all"
    assert producer.kwargs["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    event = ErasureRequested("r1", "user-7")
    bus.publish("apa.erasure-requests", event.user_id, event.to_dict())
    assert sent == [("apa.erasure-requests", b"user-7", event.to_json().encode())]
