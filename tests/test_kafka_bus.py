"""The Kafka event path on a real Kafka-protocol broker (tansu, see kafka_fixtures): the event bus,
the registry's POST /erasures, and the consumer-group delivery guarantees the erasure service
relies on (at-least-once: an event is acknowledged only after its registry transaction commits).
"""

# ruff: noqa: F811 - pytest fixtures imported from the fixture modules are redefined as arguments

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.partitioner.default import murmur2
from sqlalchemy.engine import Engine

from apa.events import ErasureRequested, KafkaEventBus
from apa.kafka import commit_message, consumer_config, ensure_topic, make_consumer
from apa.settings import Settings
from db_fixtures import migrated_sqlite_template, sqlite_engine  # noqa: F401 - fixtures
from kafka_fixtures import kafka_bootstrap, kafka_settings  # noqa: F401 - fixtures
from services.registry.app import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kafka-python's own, on import

ERASURE_TOPIC = "apa.erasure-requests"
PARTITIONS = 4
TOKEN = "kafka-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Record = Any  # kafka.consumer.fetcher.ConsumerRecord


def _request_id(record: Record) -> str | None:
    try:
        value = json.loads(record.value)
    except ValueError:
        return None
    return value.get("request_id") if isinstance(value, dict) else None


def poll_until(consumer: Any, done: Callable[[list[Record]], bool], timeout_s: float = 30.0) -> list[Record]:
    """Poll `consumer` until `done(records so far)`; AssertionError after `timeout_s`."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while not done(records):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s; received {[_request_id(r) for r in records]}"
            )
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def poll_for(consumer: Any, *request_ids: str, timeout_s: float = 30.0) -> dict[str, Record]:
    """Poll until every request id was received; the record of each."""
    records = poll_until(consumer, lambda rs: set(request_ids) <= {_request_id(r) for r in rs}, timeout_s)
    return {rid: r for r in records if (rid := _request_id(r)) in request_ids}


def java_partition(key: str, partitions: int) -> int:
    """The partition the Java client's default partitioner picks for `key` (murmur2)."""
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions


def _group() -> str:
    return f"apa-erasure-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def erasure_topic(kafka_bootstrap: str) -> str:
    """`apa.erasure-requests` with several partitions, as a deployment creates it."""
    assert ensure_topic(kafka_bootstrap, ERASURE_TOPIC, PARTITIONS) == PARTITIONS
    return ERASURE_TOPIC


@pytest.fixture()
def bus(kafka_settings: Settings) -> Iterator[KafkaEventBus]:
    assert kafka_settings.kafka_bootstrap
    event_bus = KafkaEventBus(kafka_settings.kafka_bootstrap, timeout_s=kafka_settings.kafka_timeout_s)
    yield event_bus
    event_bus.close()


# --- configuration (no broker) -------------------------------------------------------------------


def test_consumer_config_commits_by_hand_and_validates_timeouts() -> None:
    config = consumer_config(Settings(kafka_bootstrap="k1:9092, k2:9092"))
    assert config["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert config["group_id"] == "apa-erasure" and config["enable_auto_commit"] is False
    assert config["auto_offset_reset"] == "earliest"
    assert config["key_deserializer"](b"al\xffice") == "al\ufffdice"
    with pytest.raises(ValueError, match="APA_KAFKA_BOOTSTRAP"):
        consumer_config(Settings())
    with pytest.raises(ValueError, match="APA_KAFKA_HEARTBEAT_INTERVAL_MS"):
        consumer_config(Settings(kafka_bootstrap="k:9092", kafka_heartbeat_interval_ms=10000))
    env = {"APA_KAFKA_SESSION_TIMEOUT_MS": "6000", "APA_KAFKA_TIMEOUT_S": "2.5"}
    settings = Settings.from_env(env)
    assert (settings.kafka_session_timeout_ms, settings.kafka_timeout_s) == (6000, 2.5)


# --- the event bus -------------------------------------------------------------------------------


@pytest.mark.integration
def test_bus_publishes_erasures_keyed_by_user_one_partition_per_user(
    kafka_settings: Settings, erasure_topic: str, bus: KafkaEventBus
) -> None:
    other = next(
        u for u in ("bob", "carol", "dave", "erin") if java_partition(u, 4) != java_partition("alice", 4)
    )
    events = [
        ErasureRequested.create("alice"),
        ErasureRequested.create(other, [f"{other}:1", f"{other}:2"]),
        ErasureRequested.create("alice", ["alice:3"]),
    ]
    for event in events:
        bus.publish(erasure_topic, event.user_id, event.to_dict())

    with closing(make_consumer(kafka_settings, erasure_topic, group_id=_group())) as consumer:
        received = poll_for(consumer, *(e.request_id for e in events))
        assert {tp.partition for tp in consumer.assignment()} == set(range(PARTITIONS))

    for event in events:
        record = received[event.request_id]
        assert record.topic == erasure_topic and record.key == event.user_id
        assert record.value == event.to_json().encode("utf-8")  # the wire format, byte for byte
        assert ErasureRequested.from_json(record.value) == event
        # the Java client's partitioner: account systems and APA agree on each user's partition
        assert record.partition == java_partition(event.user_id, PARTITIONS)
    first, second, third = (received[e.request_id] for e in events)
    assert first.partition == third.partition != second.partition  # alice: one partition, in order
    assert first.offset < third.offset


# --- the registry API ----------------------------------------------------------------------------


@pytest.mark.integration
def test_registry_post_erasure_reaches_the_consumer_group_and_bad_input_publishes_nothing(
    kafka_settings: Settings, erasure_topic: str, bus: KafkaEventBus, sqlite_engine: Engine
) -> None:
    settings = replace(
        kafka_settings,
        database_url=sqlite_engine.url.render_as_string(hide_password=False),
        api_token=TOKEN,
    )
    client = create_app(settings, engine=sqlite_engine, event_bus=bus).test_client()
    with closing(make_consumer(settings, group_id=_group())) as consumer:
        response = client.post(
            "/erasures", headers=AUTH, json={"user_id": "carol", "interactions": ["carol:2"]}
        )
        accepted = response.get_json()
        assert response.status_code == 202 and accepted, accepted
        request_id = accepted["request_id"]

        record = poll_for(consumer, request_id)[request_id]
        assert record.key == "carol" and record.partition == java_partition("carol", PARTITIONS)
        event = ErasureRequested.from_json(record.value)
        assert (event.request_id, event.user_id, event.interactions) == (request_id, "carol", ["carol:2"])

        partitions = [TopicPartition(erasure_topic, p) for p in range(PARTITIONS)]
        before = consumer.end_offsets(partitions)
        for body, field in [
            ({"user_id": "carol", "interactions": "carol:2"}, "interactions"),
            ({"user_id": ""}, "user_id"),
            ({"user_id": "carol", "requested_at": "yesterday"}, "requested_at"),
            ({"user_id": "carol", "colour": "red"}, "colour"),
        ]:
            bad = client.post("/erasures", headers=AUTH, json=body)
            error = bad.get_json()
            assert bad.status_code == 400 and error and error["field"] == field and error["error"], error
        assert consumer.end_offsets(partitions) == before  # nothing reached the broker


# --- consumer-group delivery guarantees ----------------------------------------------------------


@pytest.fixture()
def private_topic(kafka_settings: Settings) -> Settings:
    """Settings whose erasure topic is a fresh 2-partition topic (offsets of this test only)."""
    assert kafka_settings.kafka_bootstrap
    topic = f"{ERASURE_TOPIC}.test-{uuid.uuid4().hex[:8]}"
    assert ensure_topic(kafka_settings.kafka_bootstrap, topic, 2) == 2
    return replace(kafka_settings, erasure_topic=topic)


@pytest.mark.integration
def test_unacknowledged_event_is_redelivered_to_the_group_and_acknowledged_one_is_not(
    private_topic: Settings, bus: KafkaEventBus
) -> None:
    settings, group = private_topic, _group()
    first = ErasureRequested.create("dora")
    bus.publish(settings.erasure_topic, first.user_id, first.to_dict())

    with closing(make_consumer(settings, group_id=group)) as crashed:
        record = poll_for(crashed, first.request_id)[first.request_id]
        # ... its registry transaction never commits: it closes without acknowledging
    partition = TopicPartition(settings.erasure_topic, record.partition)

    with closing(make_consumer(settings, group_id=group)) as successor:
        again = poll_for(successor, first.request_id)[first.request_id]
        assert (again.partition, again.offset, again.value) == (record.partition, record.offset, record.value)
        assert successor.committed(partition) is None
        commit_message(successor, again, timeout_s=settings.kafka_timeout_s)  # transaction committed
        assert successor.committed(partition) == again.offset + 1

    second = ErasureRequested.create("dora")
    bus.publish(settings.erasure_topic, second.user_id, second.to_dict())
    with closing(make_consumer(settings, group_id=group)) as next_member:
        records = poll_until(next_member, lambda rs: second.request_id in {_request_id(r) for r in rs})
        assert [_request_id(r) for r in records] == [
            second.request_id
        ]  # the acknowledged one is not redelivered


KILLED_CONSUMER = """
import sys, time
from apa.kafka import make_consumer
from apa.settings import Settings

consumer = make_consumer(Settings.from_env(), group_id=sys.argv[1])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for batch in consumer.poll(timeout_ms=200).values():
        for record in batch:
            print(record.partition, record.offset, flush=True)
            time.sleep(60)  # "in the registry transaction" when it is killed
"""


@pytest.mark.integration
def test_event_of_a_killed_consumer_is_redelivered_to_the_next_member(
    private_topic: Settings, bus: KafkaEventBus
) -> None:
    settings, group = private_topic, _group()
    event = ErasureRequested.create("erin")
    bus.publish(settings.erasure_topic, event.user_id, event.to_dict())

    env = {
        **os.environ,
        "APA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "APA_ERASURE_TOPIC": settings.erasure_topic,
        "APA_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "APA_KAFKA_HEARTBEAT_INTERVAL_MS": str(settings.kafka_heartbeat_interval_ms),
        "APA_KAFKA_MAX_POLL_INTERVAL_MS": str(settings.kafka_max_poll_interval_ms),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONSUMER, group], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        readable, _, _ = select.select([child.stdout], [], [], 30.0)
        assert readable, "the first consumer received nothing within 30 s"
        partition, offset = map(int, child.stdout.readline().split())
    finally:
        child.kill()  # SIGKILL: no leave-group, no commit, no clean-up
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()

    with closing(make_consumer(settings, group_id=group)) as successor:
        record = poll_for(successor, event.request_id)[event.request_id]
        assert (record.partition, record.offset) == (partition, offset)
        assert ErasureRequested.from_json(record.value) == event
        assert successor.committed(TopicPartition(settings.erasure_topic, partition)) is None
