"""Group commit of the erasure transaction (`apa.retrains.erase_batch`, what the erasure consumer does
with a poll batch): several events in one transaction, a savepoint each, the audit-chain lock taken
once. On Postgres (a poisoned event made to fail inside the database) and on SQLite."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.bootstrap import bootstrap
from apa.db.models import AuditLog, ErasureRequest, OutboxMessage, RetrainTask, Sample, Shard
from apa.db.session import session_scope
from apa.events import ErasureRequested
from apa.lifecycle import ErasureOutcome
from apa.retrains import erase, erase_batch
from apa.settings import Settings
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PSEUDO,
    fake_model_template,
    migrated_sqlite_template,
    model_dir,
    pg_engine,
    pg_url,
    shard_id,
    sqlite_engine,
    store,
)

NOW = "2026-01-15T10:00:00+00:00"
SETTINGS = Settings(retrain_queue="apa.retrain.unit")


def _load(engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    with session_scope(engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    return engine


@pytest.fixture()
def pg_loaded(pg_engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    return _load(pg_engine, model_dir, store)


@pytest.fixture()
def sqlite_loaded(sqlite_engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    return _load(sqlite_engine, model_dir, store)


def _event(request_id: str, user: str) -> ErasureRequested:
    return ErasureRequested(request_id, user, requested_at=NOW)


def _poison(engine: Engine, request_id: str) -> None:
    """Make the database refuse one request's shard links (after its samples were erased, its shards
    made stale and its audit rows appended in the same savepoint)."""
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


def _state(engine: Engine) -> dict[str, object]:
    with session_scope(engine) as session:
        return {
            "requests": sorted(session.scalars(select(ErasureRequest.request_id))),
            "audit_requests": sorted(
                set(session.scalars(select(AuditLog.request_id).where(AuditLog.request_id.is_not(None))))
            ),
            "outbox_requests": sorted(set(session.scalars(select(OutboxMessage.request_id)))),
            "erased_users": sorted(
                set(session.scalars(select(Sample.user_pid).where(Sample.erased.is_(True))))
            ),
            "generations": dict(session.execute(select(Shard.id, Shard.generation)).all()),
            "tasks": int(session.scalar(select(func.count()).select_from(RetrainTask)) or 0),
        }


def test_a_poisoned_event_rolls_back_alone_and_the_rest_of_the_batch_commits(pg_loaded: Engine) -> None:
    _poison(pg_loaded, "r-bob")
    statements: list[str] = []
    sa_event.listen(pg_loaded, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with session_scope(pg_loaded) as session:
        results = erase_batch(
            session,
            [_event("r-alice", "alice"), _event("r-bob", "bob"), _event("r-carol", "carol")],
            PSEUDO,
            SETTINGS,
        )
    assert isinstance(results[0], ErasureOutcome) and results[0].created
    assert isinstance(results[1], Exception) and "poisoned request" in str(results[1])
    assert isinstance(results[2], ErasureOutcome) and results[2].created
    state = _state(pg_loaded)
    # bob's savepoint rolled back everything it wrote: request, erased samples, stale shards, audit
    # rows, outbox rows; alice and carol stand, each with their own rows
    assert state["requests"] == ["r-alice", "r-carol"]
    assert state["audit_requests"] == ["r-alice", "r-carol"]
    assert state["outbox_requests"] == ["r-alice", "r-carol"]
    assert state["erased_users"] == sorted([PSEUDO.user("alice"), PSEUDO.user("carol")])
    assert state["generations"] == {shard_id(0): 2, shard_id(1): 2}  # alice's and carol's bumps only
    assert state["tasks"] == 2  # coalesced across the batch: one per shard
    with session_scope(pg_loaded) as session:
        result = audit.verify(session)
        assert result.ok, result.summary()
    # the chain lock was taken once for the batch, and again after the rolled-back savepoint
    assert sum("pg_advisory_xact_lock" in s for s in statements) == 2
    # the poisoned event, once the database lets it through, is recorded like any other
    with pg_loaded.begin() as conn:
        conn.execute(text("DROP TRIGGER test_poison ON erasure_request_shards"))
    with session_scope(pg_loaded) as session:
        outcome = erase(session, _event("r-bob", "bob"), PSEUDO, SETTINGS)
    assert outcome.created and {s.key for s in outcome.stale} == {shard_id(0), shard_id(1)}
    with session_scope(pg_loaded) as session:
        assert audit.verify(session).ok


def test_a_batch_holds_duplicates_and_conflicts_exactly(pg_loaded: Engine) -> None:
    with session_scope(pg_loaded) as session:
        results = erase_batch(
            session,
            [
                _event("r-alice", "alice"),
                _event("r-alice", "alice"),  # redelivered within the batch: nothing new
                _event("r-alice", "bob"),  # the same id for another user: refused
                _event("r-typo", "alcie"),  # nobody: no data held
            ],
            PSEUDO,
            SETTINGS,
        )
    first, again, conflict, typo = results
    assert isinstance(first, ErasureOutcome) and first.created
    assert isinstance(again, ErasureOutcome) and not again.created
    assert isinstance(conflict, registry.ConflictError)
    assert isinstance(typo, ErasureOutcome) and typo.created and typo.status == "completed"
    with session_scope(pg_loaded) as session:
        received = session.scalars(
            select(AuditLog.request_id).where(AuditLog.event_type == "erasure_received")
        ).all()
        assert sorted(received) == ["r-alice", "r-typo"]
        assert audit.verify(session).ok


def test_group_commit_needs_fewer_statements_per_event_than_one_transaction_each(pg_loaded: Engine) -> None:
    counted: list[str] = []
    sa_event.listen(pg_loaded, "before_cursor_execute", lambda *a: counted.append(a[2]))
    with session_scope(pg_loaded) as session:
        erase(session, _event("r-alice", "alice"), PSEUDO, SETTINGS)
    alone = len(counted)
    counted.clear()
    with session_scope(pg_loaded) as session:
        results = erase_batch(session, [_event("r-bob", "bob"), _event("r-carol", "carol")], PSEUDO, SETTINGS)
    assert all(isinstance(r, ErasureOutcome) and r.created for r in results)
    assert sum("pg_advisory_xact_lock" in s for s in counted) == 1
    assert sum(s.startswith("SELECT audit_head") for s in counted) == 1
    assert len(counted) / 2 < alone  # the lock, the head, the key checks: once per batch
    with session_scope(pg_loaded) as session:
        assert audit.verify(session).ok


def test_group_commit_on_sqlite_matches_one_transaction_per_event(sqlite_loaded: Engine) -> None:
    with session_scope(sqlite_loaded) as session:
        results = erase_batch(
            session,
            [_event("r-alice", "alice"), _event("r-bob", "bob"), _event("r-alice", "alice")],
            PSEUDO,
            SETTINGS,
        )
    assert [isinstance(r, ErasureOutcome) and r.created for r in results] == [True, True, False]
    state = _state(sqlite_loaded)
    assert state["requests"] == ["r-alice", "r-bob"]
    assert state["generations"] == {shard_id(0): 2, shard_id(1): 2}
    with session_scope(sqlite_loaded) as session:
        types = list(session.scalars(select(AuditLog.event_type).order_by(AuditLog.id)))
        assert types.count("erasure_received") == 2 and types.count("shard_stale") == 4
        assert audit.verify(session).ok
