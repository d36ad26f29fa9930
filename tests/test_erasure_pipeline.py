"""The erasure pipeline's library parts on SQLite, without services: event decoding for the dead-letter
topic, the one erasure transaction with its outbox rows, coalescing, the retrain-task ledger, the
relay (on the real embedded Celery broker), resume, "no data held" and GDPR deadlines."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.bootstrap import bootstrap
from apa.db.models import AdapterVersion, AuditLog, ErasureRequest, OutboxMessage, RetrainTask, Shard
from apa.db.session import session_scope
from apa.deadlines import deadlines_view, due_date
from apa.events import ErasureRequested, EventValidationError, InMemoryEventBus
from apa.lifecycle import ShardRef
from apa.outbox import BusPublisher, Relay
from apa.retrains import erase, finish, reject, resume, run_task, start
from apa.settings import Settings
from apa.taskqueue import CelerySender, make_celery, task_id
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PSEUDO,
    fake_model_template,
    make_manifest,
    migrated_sqlite_template,
    model_dir,
    pid,
    shard_id,
    sqlite_engine,
    store,
)

NOW = "2026-01-15T10:00:00+00:00"
CLEAR = {pid(i): i for i in ("t-a1", "t-b1", "t-c1", "t-a2", "t-b2", "t-c2")}
GOOD = {"request_id": "r-1", "user_id": "alice", "requested_at": NOW}


def _raw(**fields: Any) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


# --- decoding: what goes to the dead-letter topic, with which reason ----------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b"{not json", "body", "not valid JSON"),
        (b"\xff\xfe{}", "body", "not valid UTF-8"),
        (b"", "body", "empty message"),
        (None, "body", "empty message"),
        (b"[1, 2]", "body", "JSON object"),
        (b'{"request_id": "r", "requested_at": "2026-01-01T00:00:00Z"}', "user_id", "required"),
        (_raw(user_id="al\u0000ice"), "user_id", "control character"),
        (
            b'{"request_id": "r\\ud800", "user_id": "u", "requested_at": "2026-01-01T00:00:00Z"}',
            "request_id",
            "surrogate",
        ),
        (_raw(interactions=["i1", "i\u00002"]), "interactions[1]", "control character"),
        (b"[" * 100_000 + b"]" * 100_000, "body", "nested too deeply"),
        (_raw(user_id="u", pad="x" * 300_000), "body", "more than the limit"),
        (_raw(requested_at="9999-12-31T23:59:59-23:59"), "requested_at", "range"),
        (_raw(requested_at="1900-01-01T00:00:00Z"), "requested_at", "out of range"),
        (_raw(requested_at="2999-01-01T00:00:00Z"), "requested_at", "future"),
        (_raw(requested_at="2026-01-01\u0000"), "requested_at", "ISO-8601"),
        (
            b'{"request_id": "a", "request_id": "b", "user_id": "u", "requested_at": "2026-01-01"}',
            "request_id",
            "twice",
        ),
        (b'{"request_id": "a", "user_id": "u", "requested_at": "2026-01-01", "x": NaN}', "body", "NaN"),
    ],
)
def test_malformed_erasure_messages_are_refused_with_the_field_and_reason(
    raw: bytes | None, field: str, reason: str
) -> None:
    with pytest.raises(EventValidationError) as caught:
        ErasureRequested.from_json(raw)
    assert caught.value.field == field and reason in caught.value.message


def test_a_well_formed_message_decodes() -> None:
    event = ErasureRequested.from_json(_raw(interactions=["alice:1"]))
    assert event.request_id == "r-1" and event.interactions == ["alice:1"]


@pytest.mark.parametrize(
    ("requested", "due"),
    [
        ("2026-01-15T10:00:00+00:00", "2026-02-15T10:00:00+00:00"),
        ("2026-01-31T23:59:00+00:00", "2026-02-28T23:59:00+00:00"),
        ("2028-01-31T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
        ("2026-12-20T08:00:00+00:00", "2027-01-20T08:00:00+00:00"),
    ],
)
def test_an_erasure_is_due_one_calendar_month_after_it_was_requested(requested: str, due: str) -> None:
    assert due_date(datetime.fromisoformat(requested)) == datetime.fromisoformat(due)


def test_due_date_past_year_9999_overflows() -> None:
    with pytest.raises(OverflowError):
        due_date(datetime(9999, 12, 2, tzinfo=UTC))


# --- the erasure transaction ---------------------------------------------------------------------------


@pytest.fixture()
def loaded(sqlite_engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    """The fake model (alice, bob, carol: one train sample each in shards 0 and 1) on SQLite."""
    with session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    return sqlite_engine


SETTINGS = Settings(retrain_queue="apa.retrain.unit")


def _erase(engine: Engine, user: str, request_id: str, settings: Settings = SETTINGS, **kw: Any) -> Any:
    with session_scope(engine) as session:
        return erase(session, ErasureRequested(request_id, user, requested_at=NOW, **kw), PSEUDO, settings)


def _outbox(engine: Engine) -> list[OutboxMessage]:
    with session_scope(engine) as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def _tasks(engine: Engine) -> list[RetrainTask]:
    with session_scope(engine) as session:
        return list(session.scalars(select(RetrainTask).order_by(RetrainTask.id)))


def _audit_types(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return list(session.scalars(select(AuditLog.event_type).order_by(AuditLog.id)))


def test_one_transaction_writes_a_stale_event_and_a_retrain_task_per_stale_shard(loaded: Engine) -> None:
    outcome = _erase(loaded, "alice", "r-alice")
    assert {s.key for s in outcome.stale} == {shard_id(0), shard_id(1)}
    rows = _outbox(loaded)
    events = [r for r in rows if r.kind == "event"]
    tasks = [r for r in rows if r.kind == "task"]
    assert sorted((r.key, r.payload["state"], r.payload["generation"]) for r in events) == [
        (shard_id(0), "stale", 1),
        (shard_id(1), "stale", 1),
    ]
    ledger = _tasks(loaded)
    assert [(t.shard_id, t.state, t.reason, t.request_id) for t in ledger] == [
        (shard_id(0), "queued", "erasure", "r-alice"),
        (shard_id(1), "queued", "erasure", "r-alice"),
    ]
    assert sorted(r.payload["task_id"] for r in tasks) == [task_id(t.id) for t in ledger]
    assert all(r.sent_at is None and r.request_id == "r-alice" for r in rows)
    # nothing in the outbox names the user in clear
    assert "alice" not in json.dumps([r.payload for r in rows])


def test_a_redelivered_event_writes_nothing_new(loaded: Engine) -> None:
    _erase(loaded, "alice", "r-alice")
    before = (len(_outbox(loaded)), len(_tasks(loaded)), len(_audit_types(loaded)))
    again = _erase(loaded, "alice", "r-alice")
    assert not again.created
    assert (len(_outbox(loaded)), len(_tasks(loaded)), len(_audit_types(loaded))) == before


def test_erasures_of_a_shard_whose_task_is_still_queued_coalesce(loaded: Engine) -> None:
    _erase(loaded, "alice", "r-alice")
    _erase(loaded, "bob", "r-bob")
    _erase(loaded, "carol", "r-carol")
    ledger = _tasks(loaded)
    assert [(t.shard_id, t.coalesced, t.generation) for t in ledger] == [
        (shard_id(0), 2, 3),
        (shard_id(1), 2, 3),
    ]
    assert len([r for r in _outbox(loaded) if r.kind == "task"]) == 2
    assert len([r for r in _outbox(loaded) if r.kind == "event"]) == 6  # every stale change is announced


def test_without_coalescing_every_erasure_queues_its_own_tasks(loaded: Engine) -> None:
    no = replace(SETTINGS, retrain_coalesce=False)
    _erase(loaded, "alice", "r-alice", no)
    _erase(loaded, "bob", "r-bob", no)
    assert len(_tasks(loaded)) == 4


def test_an_erasure_after_the_task_started_queues_a_new_one(loaded: Engine) -> None:
    _erase(loaded, "alice", "r-alice")
    first = _tasks(loaded)[0]
    assert start(loaded, first.id, ShardRef(MODEL_ID, 0), 1).run
    _erase(loaded, "bob", "r-bob")
    ledger = [t for t in _tasks(loaded) if t.shard_id == shard_id(0)]
    assert [(t.state, t.reason) for t in ledger] == [("started", "erasure"), ("queued", "erasure")]


def test_a_finished_or_replaced_task_does_nothing_when_delivered_again(loaded: Engine) -> None:
    _erase(loaded, "alice", "r-alice")
    task = _tasks(loaded)[0]
    shard = ShardRef(MODEL_ID, 0)
    first = start(loaded, task.id, shard, 1)
    assert first.run and not first.redelivered
    redelivered = start(loaded, task.id, shard, 1)  # the worker died; the broker delivers it again
    assert redelivered.run and redelivered.redelivered
    finish(loaded, task.id, shard, None, SETTINGS)
    assert not start(loaded, task.id, shard, 1).run  # the relay published it twice
    assert _tasks(loaded)[0].deliveries == 2


def _fake_retrain(
    engine: Engine, store: ArtifactStore, k: int, during: Callable[[], object] = lambda: None
) -> Callable[[], Any]:
    """`apa.lifecycle.retrain_shard` itself, with a fake training step (`during`: what happens while
    it trains) that returns fake LoRA tensors: the registry, store and promotion logic are real."""
    import torch

    import apa.training
    from apa.lifecycle import retrain_shard
    from apa.training import TrainResult

    class FakeBackbone:
        model_id, model_digest = "tiny-llama", "0" * 64

    def train(backbone: Any, samples: Any, valid: Any, config: Any, *args: Any) -> TrainResult:
        during()
        weights = {"lora_A": torch.full((2, 4), float(len(samples))), "lora_B": torch.zeros(4, 2)}
        return TrainResult(adapter_state=weights, adapter_config={"r": 2}, train_seconds=0.01)

    def retrain() -> Any:
        real, apa.training.train_adapter = apa.training.train_adapter, train  # type: ignore[assignment]
        try:
            return retrain_shard(
                engine,
                ShardRef(MODEL_ID, k),
                backbone=FakeBackbone(),
                store=store,
                pseudonymizer=PSEUDO,  # type: ignore[arg-type]
            )
        finally:
            apa.training.train_adapter = real  # type: ignore[assignment]

    return retrain


def test_two_erasures_hitting_a_shard_while_it_retrains_give_a_second_retrain_and_no_stale_promotion(
    loaded: Engine, store: ArtifactStore
) -> None:
    _erase(loaded, "alice", "r-alice")
    shard = ShardRef(MODEL_ID, 0)
    first = _tasks(loaded)[0]

    def two_erasures() -> None:
        _erase(loaded, "bob", "r-bob")
        _erase(loaded, "carol", "r-carol")

    result = run_task(
        loaded, SETTINGS, store, first.id, shard, 1, _fake_retrain(loaded, store, 0, two_erasures)
    )
    assert result.finish is not None and result.finish.promoted is False
    assert result.finish.retrain_again is None  # bob's erasure queued one; carol's coalesced into it
    assert (
        result.outcome is not None and len(result.outcome.deleted_artifacts) == 1
    )  # the discarded weights left the store
    queued = [t for t in _tasks(loaded) if t.shard_id == shard.key and t.state == "queued"]
    # one task: queued by bob's erasure; carol's erasure and the refused retrain coalesced into it
    assert [(t.reason, t.coalesced) for t in queued] == [("erasure", 2)]
    with session_scope(loaded) as session:
        assert session.get(Shard, shard.key).state == "stale"  # type: ignore[union-attr]
        assert not [
            v
            for v in session.scalars(select(AdapterVersion))
            if v.shard_id == shard.key and v.state == "serving"
        ]

    second = run_task(loaded, SETTINGS, store, queued[0].id, shard, 3, _fake_retrain(loaded, store, 0))
    assert second.finish is not None and second.finish.promoted and second.outcome is not None
    assert set(second.outcome.manifest.sample_pids) == set()  # all three users erased from shard 0
    ready = [r.payload for r in _outbox(loaded) if r.kind == "event" and r.payload["state"] == "serving"]
    # v2 was the discarded attempt's number: never reused
    assert [(e["shard_id"], e["generation"], e["adapter_version"]) for e in ready] == [(shard.key, 3, 3)]
    with session_scope(loaded) as session:
        assert audit.verify(session).ok
        statuses = {r.request_id: r.status for r in session.scalars(select(ErasureRequest))}
        assert statuses == dict.fromkeys(("r-alice", "r-bob", "r-carol"), "retraining")  # shard 1 waits
    # the discarded v2 (trained with bob's and carol's samples) and the excluded v1 are gone; v3 serves
    # the emptied shard without an adapter
    assert second.outcome.artifact_key == "" and not [
        k for k in store.keys() if k.startswith(f"{MODEL_ID}/0/")
    ]


def test_a_retrain_overtaken_with_no_task_queued_queues_the_next_itself(
    loaded: Engine, store: ArtifactStore
) -> None:
    _erase(loaded, "alice", "r-alice")
    shard = ShardRef(MODEL_ID, 0)

    def erased_without_outbox() -> None:  # e.g. `apa erase`, which writes no outbox rows
        with session_scope(loaded) as session:
            registry.record_erasure(session, ErasureRequested("r-bob", "bob", requested_at=NOW), PSEUDO)

    task = _tasks(loaded)[0]
    result = run_task(
        loaded, SETTINGS, store, task.id, shard, 1, _fake_retrain(loaded, store, 0, erased_without_outbox)
    )
    assert result.finish is not None and result.finish.retrain_again is not None
    assert [t.reason for t in _tasks(loaded) if t.state == "queued" and t.shard_id == shard.key] == [
        "not_promoted"
    ]


def test_a_redelivered_task_removes_what_its_dead_worker_stored_but_never_registered(
    loaded: Engine, store: ArtifactStore
) -> None:
    import torch

    _erase(loaded, "alice", "r-alice")
    shard = ShardRef(MODEL_ID, 0)
    task = _tasks(loaded)[0]
    assert start(loaded, task.id, shard, 1).run  # the first worker ...
    left = store.put_trained(MODEL_ID, 0, 2, {"w": torch.ones(2)}, {"r": 2}, {"sample_pids": []})[
        0
    ]  # ... dies here
    result = run_task(loaded, SETTINGS, store, task.id, shard, 1, _fake_retrain(loaded, store, 0))
    assert result.deleted_unregistered == [left] and result.finish is not None and result.finish.promoted


# --- conflicts and "no data held" ------------------------------------------------------------------------


def test_a_request_id_reused_for_another_user_is_refused_and_audited(loaded: Engine) -> None:
    _erase(loaded, "alice", "r-1")
    event = ErasureRequested("r-1", "bob", requested_at=NOW)
    with pytest.raises(registry.ConflictError), session_scope(loaded) as session:
        erase(session, event, PSEUDO, SETTINGS)
    with session_scope(loaded) as session:
        reject(session, event, PSEUDO, "reused")
    with session_scope(loaded) as session:
        row = session.scalars(select(AuditLog).where(AuditLog.event_type == "erasure_rejected")).one()
        assert row.request_id == "r-1" and row.user_pid == PSEUDO.user("bob")
        assert not any(
            s.erased for s in session.scalars(select(registry.Sample)) if s.user_pid == PSEUDO.user("bob")
        )


@pytest.mark.parametrize(("user", "interactions"), [("nobody-typo", None), ("alice", ["alice:99"])])
def test_an_erasure_that_matches_nothing_completes_as_no_data_held(
    loaded: Engine, user: str, interactions: list[str] | None
) -> None:
    outcome = _erase(loaded, user, "r-none", interactions=interactions)
    assert outcome.status == "completed" and not outcome.stale and _outbox(loaded) == []
    with session_scope(loaded) as session:
        view = registry.erasure_status(session, "r-none")
        assert view["status"] == "completed" and view["outcome"] == "no_data_held" and view["no_data_held"]
        assert "erasure_no_data_held" in [row["event_type"] for row in view["timeline"]]
    _erase(loaded, "bob", "r-bob")
    with session_scope(loaded) as session:
        assert registry.erasure_status(session, "r-bob")["outcome"] == "erased"


# --- relay on the embedded Celery broker ----------------------------------------------------------------


def _broker_tasks(path: Path) -> list[dict[str, Any]]:
    """Task messages waiting in the embedded (kombu SQLAlchemy on SQLite) broker."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT payload FROM kombu_message WHERE visible = 1 ORDER BY id").fetchall()
    return [json.loads(payload)["headers"] for (payload,) in rows]


def test_the_relay_publishes_events_and_enqueues_tasks_once_in_order(loaded: Engine, tmp_path: Path) -> None:
    settings = replace(SETTINGS, celery_embedded_broker=str(tmp_path / "broker.sqlite"))
    _erase(loaded, "alice", "r-alice", settings)
    _erase(loaded, "bob", "r-bob", settings)
    bus = InMemoryEventBus()
    relay = Relay(
        loaded,
        settings,
        events=BusPublisher(bus),
        tasks=CelerySender(make_celery(settings), settings.retrain_queue),
    )
    result = relay.drain()
    assert (result.sent, result.failed) == (6, 0)
    assert relay.drain().sent == 0  # marked sent: never twice
    assert [(m.key, m.value["generation"]) for m in bus.messages(settings.shard_events_topic)] == [
        (shard_id(0), 1),
        (shard_id(1), 1),
        (shard_id(0), 2),
        (shard_id(1), 2),
    ]
    queued = _broker_tasks(tmp_path / "broker.sqlite")
    assert [(h["task"], h["id"]) for h in queued] == [
        ("apa.retrain_shard", task_id(t.id)) for t in _tasks(loaded)
    ]
    assert all(r.sent_at is not None for r in _outbox(loaded))


def test_a_broker_outage_keeps_tasks_unsent_and_lets_events_through(loaded: Engine) -> None:
    down = replace(SETTINGS, celery_broker_url="amqp://guest:guest@127.0.0.1:1//")
    _erase(loaded, "alice", "r-alice", down)
    bus = InMemoryEventBus()
    relay = Relay(
        loaded, down, events=BusPublisher(bus), tasks=CelerySender(make_celery(down), down.retrain_queue)
    )
    result = relay.drain()
    assert result.sent == 2 and result.failed == 1
    unsent = [r for r in _outbox(loaded) if r.sent_at is None]
    assert [r.kind for r in unsent] == ["task", "task"] and unsent[0].attempts == 1 and unsent[0].last_error
    assert len(bus.messages()) == 2


def test_without_kafka_event_rows_are_marked_not_published(loaded: Engine, tmp_path: Path) -> None:
    settings = replace(SETTINGS, celery_embedded_broker=str(tmp_path / "broker.sqlite"))
    _erase(loaded, "alice", "r-alice", settings)
    relay = Relay(
        loaded,
        settings,
        tasks=CelerySender(make_celery(settings), settings.retrain_queue),
        discard_events=True,
    )
    assert relay.drain().discarded == 2
    assert all(r.sent_at is not None for r in _outbox(loaded))
    assert {r.last_error for r in _outbox(loaded) if r.kind == "event"} == {
        "not published: no Kafka configured (APA_KAFKA_BOOTSTRAP unset)"
    }


# --- resume ----------------------------------------------------------------------------------------------


def test_resume_queues_stale_shards_without_a_live_task_and_replaces_lost_ones(loaded: Engine) -> None:
    with session_scope(loaded) as session:  # stale without any task (recorded by `apa erase`)
        registry.record_erasure(session, ErasureRequested("r-alice", "alice", requested_at=NOW), PSEUDO)
    report = resume(loaded, SETTINGS)
    assert sorted(report.queued) == [shard_id(0), shard_id(1)] and not report.lost
    again = resume(loaded, SETTINGS)
    assert again.queued == [] and sorted(again.live) == [shard_id(0), shard_id(1)]
    # a worker took shard 0's task and died without heart-beating since
    t0 = next(t for t in _tasks(loaded) if t.shard_id == shard_id(0))
    old = datetime.now(UTC) - timedelta(seconds=SETTINGS.task_lost_after_s + 5)
    start(loaded, t0.id, ShardRef(MODEL_ID, 0), 1, now=old)
    third = resume(loaded, SETTINGS)
    assert third.lost == [t0.id] and third.queued == [shard_id(0)]
    assert [t.state for t in _tasks(loaded) if t.shard_id == shard_id(0)] == ["lost", "queued"]
    with session_scope(loaded) as session:
        assert session.get(Shard, shard_id(0)).state == "stale"  # type: ignore[union-attr]
        assert audit.verify(session).ok


# --- deadlines -------------------------------------------------------------------------------------------


def test_open_requests_are_listed_when_overdue_or_due_soon(loaded: Engine) -> None:
    now = datetime.now(UTC)
    for request_id, user, age_days in (("r-old", "alice", 40), ("r-soon", "bob", 27), ("r-new", "carol", 1)):
        requested = (now - timedelta(days=age_days)).isoformat()
        with session_scope(loaded) as session:
            erase(session, ErasureRequested(request_id, user, requested_at=requested), PSEUDO, SETTINGS)
    with session_scope(loaded) as session:
        view = deadlines_view(session, within_days=7, now=now)
        assert [d["request_id"] for d in view["overdue"]] == ["r-old"]
        assert [d["request_id"] for d in view["due_soon"]] == ["r-soon"]
        assert view["overdue"][0]["user_pid"] == PSEUDO.user("alice")
        request = session.get(ErasureRequest, "r-new")
        assert request is not None and request.due_at == due_date(request.requested_at)
        status = registry.erasure_status(session, "r-old")
        assert status["overdue"] and status["due_at"]


def test_a_task_redelivered_after_its_worker_died_past_registration_announces_the_serving_version(
    loaded: Engine, store: ArtifactStore
) -> None:
    _erase(loaded, "alice", "r-alice")
    shard = ShardRef(MODEL_ID, 0)
    task = _tasks(loaded)[0]
    assert start(loaded, task.id, shard, 1).run
    promoted = _fake_retrain(loaded, store, 0)()  # registered and promoted; then the worker dies
    assert promoted.promoted
    assert not [r for r in _outbox(loaded) if r.kind == "event" and r.payload["state"] == "serving"]
    again = run_task(loaded, SETTINGS, store, task.id, shard, 1, _fake_retrain(loaded, store, 0))
    assert again.redelivered and again.outcome is None and again.deleted_unregistered == []
    ready = [r.payload for r in _outbox(loaded) if r.kind == "event" and r.payload["state"] == "serving"]
    assert [(e["shard_id"], e["adapter_version"]) for e in ready] == [(shard.key, 2)]
    assert [t.state for t in _tasks(loaded) if t.shard_id == shard.key] == ["done"]


def test_the_celery_configuration_is_at_least_once_one_task_at_a_time() -> None:
    from apa.taskqueue import celery_config

    config = celery_config(Settings(celery_broker_url="redis://127.0.0.1:6379/0"))
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_pool"] == "solo"
    assert config["worker_concurrency"] == 1 and config["broker_heartbeat"] == 0
    assert config["broker_transport_options"]["visibility_timeout"] >= 3600
    embedded = celery_config(Settings(celery_embedded_broker="/tmp/x/broker.sqlite"))
    assert embedded["broker_url"] == "sqla+sqlite:////tmp/x/broker.sqlite"
    with pytest.raises(ValueError, match="APA_WORKER_POOL"):
        celery_config(Settings(worker_pool="gevent"))


def test_the_embedded_broker_publishes_without_a_library_warning(tmp_path: Path) -> None:
    """kombu's SQLAlchemy transport trips a SQLAlchemy 2.1 deprecation on its first publish; a
    fresh process (the warning fires once per process) with warnings as errors must not see it."""
    import subprocess
    import sys

    code = (
        "from apa.settings import Settings\n"
        "from apa.taskqueue import CelerySender, make_celery\n"
        f"s = Settings(celery_embedded_broker={str(tmp_path / 'broker.sqlite')!r})\n"
        "CelerySender(make_celery(s), s.retrain_queue)('apa.retrain_shard', [1, 1], {}, 'apa-retrain-1')\n"
        "print('sent')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "sent", done.stderr[-2000:]
    assert "Warning" not in done.stderr


@pytest.mark.integration
def test_the_relay_enqueues_on_redis(loaded: Engine) -> None:
    import uuid

    from kombu import Connection

    queue = f"apa.retrain.redis-{uuid.uuid4().hex[:8]}"
    settings = replace(SETTINGS, celery_broker_url="redis://127.0.0.1:6379/0", retrain_queue=queue)
    _erase(loaded, "alice", "r-alice", settings)
    relay = Relay(loaded, settings, tasks=CelerySender(make_celery(settings), queue), discard_events=True)
    assert relay.drain().sent == 2
    with Connection(settings.celery_broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            ids = sorted(simple.get(timeout=5).headers["id"] for _ in range(2))
        finally:
            simple.queue.delete()
            simple.close()
    assert ids == sorted(task_id(t.id) for t in _tasks(loaded))
