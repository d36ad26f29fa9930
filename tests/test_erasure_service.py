"""The erasure service as a real process on real components: the tansu Kafka broker, Postgres and
the embedded Celery broker (kombu SQLAlchemy on SQLite). Raw Kafka messages in; registry rows,
outbox rows, shard events, dead letters, Celery task messages and committed offsets out. Every
fault test kills the service with SIGKILL at a precise point (`APA_CRASH_AT`) and checks that the
restarted service loses nothing and duplicates nothing that is not idempotent."""

# ruff: noqa: F811 - pytest fixtures imported from the fixture modules are redefined as arguments

from __future__ import annotations

import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.db import audit
from apa.db.models import AuditLog
from apa.db.session import session_scope
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PSEUDO,
    fake_model_template,
    model_dir,
    pg_engine,
    pg_url,
    store,
)
from dump_helpers import traces
from erasure_fixtures import (
    Names,
    ServiceProcess,
    bootstrapped,
    outbox,
    publish_raw,
    read_topic,
    requests,
    service_env,
    start_tansu,
    tasks,
    wait_until,
)
from kafka_fixtures import free_port, kafka_bootstrap  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REQUESTED = "2026-01-15T10:00:00+00:00"


def event(request_id: str, user: str, **extra: Any) -> tuple[bytes, bytes]:
    body = {"request_id": request_id, "user_id": user, "requested_at": REQUESTED, **extra}
    return user.encode(), json.dumps(body).encode()


@pytest.fixture()
def names(kafka_bootstrap: str) -> Names:
    fresh = Names.fresh()
    fresh.create_topics(kafka_bootstrap)
    return fresh


@pytest.fixture()
def registry_pg(pg_engine: Engine, model_dir: Path, tmp_path: Path) -> Engine:
    """The fake model (alice, bob, carol: one train sample each in shards 0 and 1) on Postgres."""
    return bootstrapped(pg_engine, model_dir, ArtifactStore(tmp_path / "artifacts"), PSEUDO, MODEL_ID)


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def consumer(engine: Engine, bootstrap: str, names: Names, tmp: Path, **extra: str) -> ServiceProcess:
    env = service_env(_url(engine), bootstrap, names, tmp, **extra)
    return ServiceProcess("services.erasure", env, tmp / "consumer.log")


def broker_tasks(tmp: Path) -> list[str]:
    """Celery task ids waiting in the embedded broker (in the order they were enqueued)."""
    path = tmp / "broker.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("SELECT payload FROM kombu_message ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
    return [json.loads(payload)["headers"]["id"] for (payload,) in rows]


def committed(bootstrap: str, names: Names) -> int:
    """Offsets the service's group committed, summed over the erasure topic's partitions."""
    client = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=names.group, enable_auto_commit=False)
    try:
        parts = client.partitions_for_topic(names.erasure_topic) or set()
        return sum(client.committed(TopicPartition(names.erasure_topic, p)) or 0 for p in parts)
    finally:
        client.close()


def audit_rows(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(AuditLog)) or 0)


def all_sent(engine: Engine) -> bool:
    rows = outbox(engine)
    return bool(rows) and all(r.sent_at is not None for r in rows)


def stale_events(bootstrap: str, names: Names, count: int) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in read_topic(bootstrap, names.shard_events_topic, count)]


def test_events_are_recorded_published_and_acknowledged_and_bad_ones_dead_lettered(
    registry_pg: Engine, kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh()  # one partition: the stream's order (and offsets) are the test's
    names.create_topics(kafka_bootstrap, partitions=1)
    deep = b"[" * 50_000 + b"]" * 50_000
    huge = json.dumps(
        {"request_id": "r-huge", "user_id": "bob", "requested_at": REQUESTED, "x": "y" * 400_000}
    )
    stream: list[tuple[bytes | None, bytes | None]] = [
        (b"x", b"{not json"),
        event("r-alice", "alice"),
        (b"u", b'{"request_id": "r-missing", "requested_at": "2026-01-15T10:00:00Z"}'),
        event("r-nul", "bo\u0000b"),
        (b"u", b'{"request_id": "r-sur\\ud800", "user_id": "bob", "requested_at": "2026-01-15T10:00:00Z"}'),
        (b"u", deep),
        (b"bob", huge.encode()),
        event("r-date", "bob", requested_at="9999-12-31T23:59:59-23:59"),
        (b"\xff", b"\xff\xfe not utf-8"),
        event("r-alice", "alice"),  # a duplicate
        event("r-alice", "bob"),  # the same request id for another user: refused
        event("r-typo", "alcie"),  # an unknown user: no data held
        event("r-bob", "bob", interactions=["bob:3"]),
    ]
    malformed = {0, 2, 3, 4, 5, 6, 7, 8}
    publish_raw(kafka_bootstrap, names.erasure_topic, stream)
    service = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(
            lambda: {"r-alice", "r-typo", "r-bob"} <= set(requests(registry_pg)), 90, "the good events"
        )
        wait_until(lambda: committed(kafka_bootstrap, names) == len(stream), 60, "every offset committed")
        wait_until(lambda: all_sent(registry_pg), 30, "the outbox relayed")
    finally:
        assert service.stop() == 0, service.tail()
    recorded = requests(registry_pg)
    assert set(recorded) == {"r-alice", "r-typo", "r-bob"}
    assert recorded["r-typo"].status == "completed" and recorded["r-typo"].outcome == "no_data_held"
    assert recorded["r-alice"].user_pid == PSEUDO.user("alice") and recorded["r-alice"].status == "excluded"

    dead = read_topic(kafka_bootstrap, names.dlq_topic, len(malformed) + 1)
    assert len(dead) == len(malformed) + 1  # + the refused request id
    by_source = {dict(r.headers)["apa-dlq-source"].decode().rsplit("/", 1)[1]: r for r in dead}
    for index in malformed:
        key, value = stream[index]
        record = by_source[str(index)]
        headers = dict(record.headers)
        assert record.key == key and int(headers["apa-dlq-original-bytes"]) == len(value or b"")
        assert record.value == value or (
            headers.get("apa-dlq-truncated") == b"true" and value.startswith(record.value)
        )  # type: ignore[union-attr]
    reasons = {int(s): dict(r.headers)["apa-dlq-reason"].decode() for s, r in by_source.items()}
    assert reasons[0].startswith("body: not valid JSON") and reasons[2] == "user_id: is required"
    assert (
        "control character" in reasons[3] and "surrogate" in reasons[4] and "nested too deeply" in reasons[5]
    )
    assert "more than the limit" in reasons[6] and reasons[7].startswith("requested_at:")
    assert "UTF-8" in reasons[8] and reasons[10].startswith("request_id: refused")

    with session_scope(registry_pg) as session:
        rejected = session.scalars(select(AuditLog).where(AuditLog.event_type == "erasure_rejected")).all()
        assert [(r.request_id, r.user_pid) for r in rejected] == [("r-alice", PSEUDO.user("bob"))]
        assert audit.verify(session).ok
    # alice hit shards 0 and 1, bob's interaction bob:3 too: 4 stale events, 2 coalesced tasks
    events = stale_events(kafka_bootstrap, names, 4)
    assert Counter((e["shard_id"], e["state"]) for e in events) == {
        (f"{MODEL_ID}/0", "stale"): 2,
        (f"{MODEL_ID}/1", "stale"): 2,
    }
    assert sorted(broker_tasks(tmp_path)) == sorted(f"apa-retrain-{t.id}" for t in tasks(registry_pg))
    assert len(tasks(registry_pg)) == 2
    assert traces(service.log().encode(), ["alice", "alcie", "bob", "bob:3"]) == []  # pseudonyms only


def test_kill9_between_the_database_commit_and_the_offset_commit_loses_and_duplicates_nothing(
    registry_pg: Engine, kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    publish_raw(kafka_bootstrap, names.erasure_topic, [event("r-alice", "alice")])
    first = consumer(registry_pg, kafka_bootstrap, names, tmp_path, APA_CRASH_AT="consumer.after_db_commit")
    assert first.wait_exit(90) == -signal.SIGKILL, first.tail()
    # committed in the registry; not acknowledged on Kafka; nothing published yet
    assert requests(registry_pg)["r-alice"].status == "excluded"
    assert committed(kafka_bootstrap, names) == 0
    rows_after_crash = audit_rows(registry_pg)
    assert len(outbox(registry_pg)) == 4 and not any(r.sent_at for r in outbox(registry_pg))

    second = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(lambda: committed(kafka_bootstrap, names) == 1, 90, "the redelivered event acknowledged")
        wait_until(lambda: all_sent(registry_pg), 30, "the outbox relayed")
    finally:
        assert second.stop() == 0, second.tail()
    assert "already recorded, nothing to do" in second.log()  # redelivered, idempotent
    assert audit_rows(registry_pg) == rows_after_crash and len(outbox(registry_pg)) == 4
    assert len(stale_events(kafka_bootstrap, names, 2)) == 2
    assert sorted(broker_tasks(tmp_path)) == sorted(f"apa-retrain-{t.id}" for t in tasks(registry_pg))
    assert len(tasks(registry_pg)) == 2


def test_kill9_between_the_commit_and_the_outbox_publish_publishes_at_the_next_start(
    registry_pg: Engine, kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    publish_raw(kafka_bootstrap, names.erasure_topic, [event("r-alice", "alice")])
    first = consumer(
        registry_pg, kafka_bootstrap, names, tmp_path, APA_CRASH_AT="consumer.after_offset_commit"
    )
    assert first.wait_exit(90) == -signal.SIGKILL, first.tail()
    assert committed(kafka_bootstrap, names) == 1  # acknowledged: Kafka will not deliver it again
    assert not any(r.sent_at for r in outbox(registry_pg)) and broker_tasks(tmp_path) == []

    second = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(lambda: all_sent(registry_pg), 60, "the start-up relay")
    finally:
        assert second.stop() == 0, second.tail()
    assert "start-up relay: 4 outbox rows published" in second.log()
    assert "already recorded" not in second.log()
    assert len(stale_events(kafka_bootstrap, names, 2)) == 2
    assert len(broker_tasks(tmp_path)) == 2


def test_kill9_between_publishing_and_marking_sent_publishes_again_and_tasks_stay_idempotent(
    registry_pg: Engine, kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    from apa.lifecycle import ShardRef
    from apa.retrains import finish, start

    publish_raw(kafka_bootstrap, names.erasure_topic, [event("r-alice", "alice")])
    first = consumer(registry_pg, kafka_bootstrap, names, tmp_path, APA_CRASH_AT="relay.after_publish")
    assert first.wait_exit(90) == -signal.SIGKILL, first.tail()
    assert not any(r.sent_at for r in outbox(registry_pg))
    assert len(broker_tasks(tmp_path)) == 2  # published, not marked

    second = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(lambda: all_sent(registry_pg), 60, "the start-up relay")
    finally:
        assert second.stop() == 0, second.tail()
    # at least once: each stale event and task twice, under the same ids
    assert Counter(e["shard_id"] for e in stale_events(kafka_bootstrap, names, 4)) == {
        f"{MODEL_ID}/0": 2,
        f"{MODEL_ID}/1": 2,
    }
    ids = broker_tasks(tmp_path)
    assert len(ids) == 4 and len(set(ids)) == 2
    # the ledger runs each task once: the second delivery of a finished task does nothing
    task = tasks(registry_pg)[0]
    shard = ShardRef.parse(task.shard_id)
    assert start(registry_pg, task.id, shard, task.generation).run
    from apa.settings import Settings

    finish(registry_pg, task.id, shard, None, Settings())
    assert not start(registry_pg, task.id, shard, task.generation).run


def test_a_broker_down_at_start_up_is_waited_for_and_the_backlog_caught_up(
    registry_pg: Engine, names: Names, tmp_path: Path
) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    service = consumer(registry_pg, bootstrap, names, tmp_path)
    broker = None
    try:
        wait_until(
            lambda: "Kafka not reachable, retrying" in service.log(), 60, "the service to wait for Kafka"
        )
        assert service.running()
        broker = start_tansu(port, tmp_path / "tansu.log")
        names.create_topics(bootstrap)
        backlog = [event(f"r-{user}", user) for user in ("alice", "bob", "carol")]
        publish_raw(bootstrap, names.erasure_topic, backlog)
        wait_until(lambda: len(requests(registry_pg)) == 3, 90, "the backlog")
        wait_until(lambda: committed(bootstrap, names) == 3, 60, "the offsets")
        wait_until(lambda: all_sent(registry_pg), 30, "the outbox relayed")
    finally:
        assert service.stop() == 0, service.tail()
        if broker is not None:
            broker.kill()
            broker.wait(timeout=10)
    assert len(tasks(registry_pg)) == 2  # three users, two shards: coalesced


# --- group commit: one transaction per poll batch, a savepoint per event ------------------------------


def _poison(engine: Engine, request_id: str) -> None:
    """Make the database refuse one request's shard links: a failure inside the event's savepoint,
    after its samples were erased, its shards made stale and its audit rows appended."""
    with engine.begin() as conn:
        conn.execute(
            text(
                f"""
            CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.request_id = '{request_id}' THEN
                    RAISE EXCEPTION 'poisoned request %', NEW.request_id;
                END IF;
                RETURN NEW;
            END;
            $$
            """
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER test_poison BEFORE INSERT ON erasure_request_shards "
                "FOR EACH ROW EXECUTE FUNCTION test_poison()"
            )
        )


def _per_request(
    engine: Engine,
) -> tuple[Counter[tuple[str | None, str]], Counter[tuple[str | None, str, str]]]:
    """(request id, audit event type) and (request id, outbox kind, key) counts."""
    from apa.db.models import OutboxMessage

    with session_scope(engine) as session:
        rows = session.execute(select(AuditLog.request_id, AuditLog.event_type)).all()
        boxed = session.execute(select(OutboxMessage.request_id, OutboxMessage.kind, OutboxMessage.key)).all()
    return Counter((r, t) for r, t in rows), Counter((r, k, key) for r, k, key in boxed)


def test_a_poisoned_event_in_a_batch_is_dead_lettered_and_the_others_commit(
    registry_pg: Engine, kafka_bootstrap: str, tmp_path: Path
) -> None:
    from apa.db.models import Sample

    names = Names.fresh()  # one partition: one poll batch holds all three, in this order
    names.create_topics(kafka_bootstrap, partitions=1)
    _poison(registry_pg, "r-bob")
    stream = [event("r-alice", "alice"), event("r-bob", "bob"), event("r-carol", "carol")]
    publish_raw(kafka_bootstrap, names.erasure_topic, stream)
    service = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(lambda: committed(kafka_bootstrap, names) == 3, 120, "every offset committed")
        wait_until(lambda: all_sent(registry_pg), 30, "the outbox relayed")
    finally:
        assert service.stop() == 0, service.tail()
    log = service.log()
    assert "request r-bob failed (1 of 3)" in log and "request r-bob failed (3 of 3)" in log
    assert set(requests(registry_pg)) == {"r-alice", "r-carol"}
    dead = read_topic(kafka_bootstrap, names.dlq_topic, 1)
    assert len(dead) == 1 and dead[0].value == stream[1][1]
    headers = dict(dead[0].headers)
    assert headers["apa-dlq-reason"].decode().startswith("body: processing failed")
    assert headers["apa-dlq-source"].decode().endswith("/0/1")
    # each rolled-back attempt took everything of bob's with it: no sample erased, no audit row,
    # no outbox row; alice and carol have their own rows, once each
    with session_scope(registry_pg) as session:
        erased = set(session.scalars(select(Sample.user_pid).where(Sample.erased.is_(True))))
        assert erased == {PSEUDO.user("alice"), PSEUDO.user("carol")}
        assert audit.verify(session).ok
    audited, boxed = _per_request(registry_pg)
    assert not any(r == "r-bob" for r, _ in audited) and not any(r == "r-bob" for r, _, _ in boxed)
    assert audited[("r-alice", "erasure_received")] == 1 and audited[("r-carol", "erasure_received")] == 1
    assert all(n == 1 for n in boxed.values())


def test_kill9_mid_batch_loses_and_duplicates_nothing(
    registry_pg: Engine, kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh()  # one partition: the first poll batch holds the whole stream
    names.create_topics(kafka_bootstrap, partitions=1)
    stream = [
        event("r-alice", "alice"),
        event("r-bob", "bob"),
        event("r-alice", "alice"),  # a duplicate in the same batch
        event("r-typo", "alcie"),
        event("r-carol", "carol", interactions=["carol:3"]),
    ]
    publish_raw(kafka_bootstrap, names.erasure_topic, stream)
    rows_before = audit_rows(registry_pg)
    first = consumer(registry_pg, kafka_bootstrap, names, tmp_path, APA_CRASH_AT="consumer.mid_batch")
    assert first.wait_exit(90) == -signal.SIGKILL, first.tail()
    # killed with the first event applied in the batch's transaction: nothing of it committed
    assert requests(registry_pg) == {} and audit_rows(registry_pg) == rows_before
    assert outbox(registry_pg) == [] and committed(kafka_bootstrap, names) == 0

    second = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(lambda: committed(kafka_bootstrap, names) == len(stream), 90, "the batch again")
        wait_until(lambda: all_sent(registry_pg), 30, "the outbox relayed")
    finally:
        assert second.stop() == 0, second.tail()
    assert set(requests(registry_pg)) == {"r-alice", "r-bob", "r-typo", "r-carol"}
    assert "already recorded, nothing to do" in second.log()  # the duplicate in the batch
    audited, boxed = _per_request(registry_pg)
    for request_id in ("r-alice", "r-bob", "r-typo", "r-carol"):
        assert audited[(request_id, "erasure_received")] == 1
    assert all(n == 1 for n in boxed.values())  # every outbox row once
    with session_scope(registry_pg) as session:
        assert audit.verify(session).ok
    assert sorted(broker_tasks(tmp_path)) == sorted(f"apa-retrain-{t.id}" for t in tasks(registry_pg))
    assert len(tasks(registry_pg)) == 2  # one per shard: coalesced across the batch


def test_a_connection_lost_mid_batch_rolls_the_batch_back_and_applies_it_again_once(
    registry_pg: Engine, kafka_bootstrap: str, tmp_path: Path
) -> None:
    names = Names.fresh()
    names.create_topics(kafka_bootstrap, partitions=1)
    # the first time bob's shard links are inserted, the database ends the consumer's connection
    # (a sequence: its counter survives the rollback), after alice's savepoint was released
    with registry_pg.begin() as conn:
        conn.execute(text("CREATE SEQUENCE test_kill_once"))
        conn.execute(
            text(
                """
                CREATE FUNCTION test_kill_once() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.request_id = 'r-bob' AND nextval('test_kill_once') = 1 THEN
                        PERFORM pg_terminate_backend(pg_backend_pid());
                    END IF;
                    RETURN NEW;
                END;
                $$
                """
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER test_kill_once BEFORE INSERT ON erasure_request_shards "
                "FOR EACH ROW EXECUTE FUNCTION test_kill_once()"
            )
        )
    stream = [event("r-alice", "alice"), event("r-bob", "bob"), event("r-carol", "carol")]
    publish_raw(kafka_bootstrap, names.erasure_topic, stream)
    service = consumer(registry_pg, kafka_bootstrap, names, tmp_path)
    try:
        wait_until(lambda: committed(kafka_bootstrap, names) == 3, 120, "every offset committed")
        wait_until(lambda: all_sent(registry_pg), 30, "the outbox relayed")
    finally:
        assert service.stop() == 0, service.tail()
    assert "registry transaction lost, the batch of" in service.log()
    assert "already recorded" not in service.log()  # alice's first attempt rolled back with the batch
    assert set(requests(registry_pg)) == {"r-alice", "r-bob", "r-carol"}
    audited, boxed = _per_request(registry_pg)
    for request_id in ("r-alice", "r-bob", "r-carol"):
        assert audited[(request_id, "erasure_received")] == 1
    assert all(n == 1 for n in boxed.values())
    assert read_topic(kafka_bootstrap, names.dlq_topic, 1, timeout_s=3) == []
    with session_scope(registry_pg) as session:
        assert audit.verify(session).ok
