"""The four tampering attacks of issue 12, on Postgres, each by an attacker who bypasses the triggers
as the audit tables' owner or a superuser (`SET session_replication_role = replica`, `ALTER TABLE
... DISABLE TRIGGER`) but holds neither APA_AUDIT_KEY nor the anchors; each is detected by
`apa audit verify`, naming the row, anchor, erasure or sample. Then: the application role cannot
do any of it (role separation, migration 0005), anchors (file and Kafka), and the receipt."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from apa.anchors import Anchor, AnchorError, FileAnchorSink, KafkaAnchorSink, anchor_now, read_anchors
from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.audit import GENESIS_HASH, audit_key_from_settings, verify_command
from apa.db.bootstrap import bootstrap
from apa.db.models import AuditLog, ErasureRequest, Sample
from apa.db.session import make_engine, session_scope
from apa.events import ErasureRequested
from apa.settings import Settings
from apa.signing import signing_key_from_settings
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PG_SERVER,
    PSEUDO,
    SAMPLES,
    fake_model_template,
    make_manifest,
    model_dir,
    pg_engine,
    pg_url,
    pid,
    shard_id,
    store,
)
from kafka_fixtures import kafka_bootstrap  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

KEY = audit_key_from_settings()
SIGNER = signing_key_from_settings()
CLEAR = {pid(sample_id): sample_id for rows in SAMPLES.values() for sample_id, _, _ in rows}


def _registry(engine: Engine, model_dir: Path, store: ArtifactStore) -> None:
    """The fake model bootstrapped; carol erased and both shards retrained; alice partly erased."""
    with session_scope(engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
        registry.record_erasure(session, ErasureRequested("req-carol", "carol"), PSEUDO)
    for k in (0, 1):
        with session_scope(engine) as session:
            generation = registry.mark_retraining(session, shard_id(k))
            remaining = [CLEAR[s.sample_pid] for s in registry.remaining_samples(session, shard_id(k))]
            registry.register_adapter_version(
                session,
                shard_id(k),
                make_manifest(k, remaining, version=2),
                f"file:///{k}/2",
                started_generation=generation,
            )
    with session_scope(engine) as session:
        registry.record_erasure(session, ErasureRequested("req-alice", "alice", ["alice:5"]), PSEUDO)
        registry.record_replica_heartbeat(session, "replica-1", {shard_id(0): 2, shard_id(1): 2})


def _verify(engine: Engine, anchors: list[Anchor] | None = None) -> audit.VerifyResult:
    with Session(engine) as session:
        return audit.verify(session, key=KEY, anchors=anchors, public_key=SIGNER.public, legacy_rows=0)


def _rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(AuditLog.__table__).order_by(AuditLog.id))]


@pytest.fixture()
def anchored(pg_engine: Engine, model_dir: Path, store: ArtifactStore, tmp_path: Path) -> tuple[Engine, Path]:
    """A Postgres registry with history, anchored to an append-only file after its last row."""
    _registry(pg_engine, model_dir, store)
    path = tmp_path / "anchors.jsonl"
    anchor_now(pg_engine, [FileAnchorSink(path)], SIGNER, KEY, legacy_rows=0)
    result = _verify(pg_engine, read_anchors(str(path), Settings())[0])
    assert result.ok and result.anchors_checked == 1, result.summary()
    return pg_engine, path


@contextmanager
def _as_replica(engine: Engine) -> Iterator[Connection]:
    """A transaction that fires no triggers (a superuser's `session_replication_role = replica`)."""
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        yield conn


# --- attack 1: delete the newest 5 rows and roll audit_head back ---------------------------------------


def test_cut_back_newest_rows_with_head_rolled_back_is_detected_by_the_anchor(
    anchored: tuple[Engine, Path],
) -> None:
    engine, anchors = anchored
    rows = _rows(engine)
    last, keep = rows[-1], rows[-6]
    with _as_replica(engine) as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id > :k"), {"k": keep["id"]})
        conn.execute(
            text("UPDATE audit_head SET last_id = :i, last_hash = :h"), {"i": keep["id"], "h": keep["hash"]}
        )
    loaded, _ = read_anchors(str(anchors), Settings())
    result = _verify(engine, loaded)
    assert not result.ok
    problem = result.first("anchor")
    assert problem is not None and problem.subject.startswith(f"#{last['id']}@")
    assert f"now ends at row {keep['id']}: the log was cut back" in problem.reason
    assert result.first_bad_row is None  # the chain alone is consistent: only the anchor shows it
    # the registry refuses to anchor over it, and the CLI exits 1 naming the anchor
    with pytest.raises(AnchorError, match="cut back"):
        anchor_now(engine, [FileAnchorSink(anchors)], SIGNER, KEY, legacy_rows=0)


# --- attack 2: truncate the log and reset the head to genesis ---------------------------------------


def test_truncated_log_with_head_reset_to_genesis_is_detected(anchored: tuple[Engine, Path]) -> None:
    engine, anchors = anchored
    last = _rows(engine)[-1]
    with engine.begin() as conn:  # as the tables' owner: disable the guards, then truncate
        conn.execute(text("SET LOCAL ROLE apa_audit_owner"))
        conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        conn.execute(text("ALTER TABLE audit_head DISABLE TRIGGER USER"))
        conn.execute(text("TRUNCATE audit_log"))
        conn.execute(text("UPDATE audit_head SET last_id = 0, last_hash = :h"), {"h": GENESIS_HASH})
    result = _verify(engine, read_anchors(str(anchors), Settings())[0])
    assert not result.ok and result.rows_checked == 0
    problem = result.first("anchor")
    assert problem is not None and problem.subject.startswith(f"#{last['id']}@")
    assert "now ends at row 0: the log was cut back" in problem.reason
    # without the anchors the registry's own state still betrays it
    bare = _verify(engine)
    subjects = {(p.kind, p.subject) for p in bare.problems}
    assert ("erasure", "req-carol") in subjects and ("erasure", "req-alice") in subjects
    assert ("adapter", f"{shard_id(0)}@v2") in subjects
    assert "its registration is not in the audit log" in str(bare.first("adapter"))


# --- attack 3: rebuild the whole chain with plain sha256 after removing one user's rows ---------------


def _rebuild_without(engine: Engine, user_pid: str, mac: Any) -> None:
    rows = [r for r in _rows(engine) if r["user_pid"] != user_pid]
    prev = GENESIS_HASH
    with _as_replica(engine) as conn:
        conn.execute(text("DELETE FROM audit_log"))
        for new_id, row in enumerate(rows, 1):
            row = {**row, "id": new_id, "prev_hash": prev}
            content = {
                k: row[k]
                for k in (
                    "id",
                    "event_type",
                    "request_id",
                    "user_pid",
                    "shard_id",
                    "adapter_version_id",
                    "payload",
                    "prev_hash",
                )
            }
            content["ts"] = audit.format_ts(row["ts"])
            row["hash"] = mac(prev + audit.canonical_json(content))
            conn.execute(AuditLog.__table__.insert(), [row])
            prev = row["hash"]
        conn.execute(text("UPDATE audit_head SET last_id = :i, last_hash = :h"), {"i": len(rows), "h": prev})


@pytest.mark.parametrize("forger", ["sha256", "guessed HMAC key"])
def test_chain_rebuilt_without_the_key_after_removing_a_users_rows_is_detected(
    anchored: tuple[Engine, Path], forger: str
) -> None:
    engine, anchors = anchored
    guessed = audit.AuditKey.from_secret("0" * 64)
    mac = (lambda m: hashlib.sha256(m.encode()).hexdigest()) if forger == "sha256" else guessed.mac
    last = _rows(engine)[-1]
    _rebuild_without(engine, PSEUDO.user("carol"), mac)
    bare = _verify(engine)
    assert not bare.ok and bare.first_bad_row == 1
    assert "does not match its HMAC" in str(bare.first("row"))
    assert ("erasure", "req-carol") in {(p.kind, p.subject) for p in bare.problems}
    anchored_result = _verify(engine, read_anchors(str(anchors), Settings())[0])
    problem = anchored_result.first("anchor")
    assert problem is not None and problem.subject.startswith(f"#{last['id']}@")


# --- attack 4: un-erase a user -------------------------------------------------------------------


def test_un_erased_user_is_detected_against_the_log(anchored: tuple[Engine, Path]) -> None:
    engine, anchors = anchored
    carol = PSEUDO.user("carol")
    with _as_replica(engine) as conn:
        conn.execute(
            text(
                "UPDATE samples SET erased = false, erased_at = NULL, erasure_request_id = NULL, label = 1, "
                "text = '{}', interaction_pids = '[]' WHERE user_pid = :u"
            ),
            {"u": carol},
        )
        conn.execute(text("UPDATE users SET erased_at = NULL WHERE pid = :u"), {"u": carol})
        conn.execute(text("DELETE FROM erasure_request_shards WHERE request_id = 'req-carol'"))
        conn.execute(text("DELETE FROM erasure_requests WHERE request_id = 'req-carol'"))
    result = _verify(engine, read_anchors(str(anchors), Settings())[0])
    assert not result.ok and result.first_bad_row is None and result.first("anchor") is None
    erasure = result.first("erasure")
    assert erasure is not None and erasure.subject == "req-carol"
    assert "its erasure_requests row is gone" in erasure.reason
    back = {p.subject for p in result.problems if p.kind == "sample" and "back in samples" in p.reason}
    assert back == {f"{MODEL_ID}/{pid(s)}" for s in ("t-c1", "t-c2", "s-c1")}


def test_un_erasing_by_putting_an_excluded_adapter_back_is_detected(anchored: tuple[Engine, Path]) -> None:
    engine, _ = anchored
    with _as_replica(engine) as conn:
        conn.execute(
            text("UPDATE adapter_versions SET state = 'retired' WHERE shard_id = :s AND version = 2"),
            {"s": shard_id(0)},
        )
        conn.execute(
            text("UPDATE adapter_versions SET state = 'serving' WHERE shard_id = :s AND version = 1"),
            {"s": shard_id(0)},
        )
    result = _verify(engine)
    assert result.bad_adapter == f"{shard_id(0)}@v1"
    assert "excluded it" in str(result.first("adapter"))


def test_a_replica_confirmation_written_into_the_registry_without_a_heartbeat_is_detected(
    anchored: tuple[Engine, Path],
) -> None:
    """Issue 9: flipping an erasure to "replicas confirmed" while a replica still serves the
    excluded adapter. Over HTTP only the replica token can post heartbeats (test_registry_api*);
    written straight into the table, the confirmation has no audit row and verify names it."""
    engine, _ = anchored
    with session_scope(engine) as session:
        registry.record_erasure(session, ErasureRequested("req-bob", "bob"), PSEUDO)
    with session_scope(engine) as session:  # replica-1 still serves the versions bob's erasure excluded
        request = session.get(ErasureRequest, "req-bob")
        assert request is not None and request.replicas_confirmed_at is None
        status = registry.replica_confirmation(session, request)
        assert status.state == "waiting" and status.pending == ["replica-1"]
    assert _verify(engine).ok
    with engine.begin() as conn:  # the application role may write this table
        conn.execute(
            text("UPDATE erasure_requests SET replicas_confirmed_at = now() WHERE request_id = 'req-bob'")
        )
    result = _verify(engine)
    assert not result.ok and result.first_bad_row is None
    erasure = result.first("erasure")
    assert erasure is not None and erasure.subject == "req-bob"
    assert "no replicas_confirmed row" in erasure.reason


def test_verify_command_exits_1_naming_the_anchor(
    anchored: tuple[Engine, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    engine, anchors = anchored
    url = engine.url.render_as_string(hide_password=False)
    assert verify_command(anchors=str(anchors), url=url) == 0
    assert "1 anchors match" in capsys.readouterr().out
    rows = _rows(engine)
    with _as_replica(engine) as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = :i"), {"i": rows[-1]["id"]})
        conn.execute(
            text("UPDATE audit_head SET last_id = :i, last_hash = :h"),
            {"i": rows[-2]["id"], "h": rows[-2]["hash"]},
        )
    assert verify_command(anchors=f"file:{anchors}", url=url) == 1
    assert f"FAILED: anchor #{rows[-1]['id']}@" in capsys.readouterr().out


# --- role separation ------------------------------------------------------------------------------------


@pytest.fixture()
def app_role(pg_engine: Engine, pg_url: str) -> Iterator[Engine]:
    """An engine logged in as a fresh role that is a member of `apa_app` only (as the services are)."""
    role = f"apa_test_app_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN IN ROLE apa_app"))
    server, _, database = pg_url.rpartition("/")
    engine = make_engine(f"{server.replace('//postgres@', f'//{role}@')}/{database}")
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:  # the role owns nothing and holds no privilege of its own
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


def test_the_application_role_can_append_but_cannot_alter_the_audit_tables(
    app_role: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    _registry(app_role, model_dir, store)  # the whole registry life cycle runs as the app role
    assert _verify(app_role).ok
    refused = {
        "UPDATE audit_log SET event_type = 'x' WHERE id = 1": "permission denied",
        "DELETE FROM audit_log WHERE id = 1": "permission denied",
        "TRUNCATE audit_log": "permission denied",
        "UPDATE audit_head SET last_id = 0": "permission denied",
        "DELETE FROM audit_head": "permission denied",
        "DELETE FROM audit_anchors": "permission denied",
        "ALTER TABLE audit_log DISABLE TRIGGER USER": "must be owner",
        "ALTER TABLE audit_head DISABLE TRIGGER audit_head_guard": "must be owner",
        "ALTER TABLE audit_log OWNER TO CURRENT_USER": "must be owner",
        "DROP TABLE audit_log": "must be owner",
        "DROP TRIGGER audit_log_extends_head ON audit_log": "must be owner",
        "SET session_replication_role = replica": "permission denied",
        "SET ROLE apa_audit_owner": "permission denied",
    }
    for statement, message in refused.items():
        with pytest.raises(DBAPIError, match=message), app_role.begin() as conn:
            conn.execute(text(statement))
    # An INSERT that does not extend the head is refused by the database itself ...
    with pytest.raises(DBAPIError, match="does not extend the chain head"), app_role.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (id, ts, event_type, payload, prev_hash, hash) "
                "VALUES (1000, now(), 'forged', '{}', :h, :x)"
            ),
            {"h": GENESIS_HASH, "x": "f" * 64},
        )
    # ... and one that does, forged without the key, is named by verify.
    with Session(app_role) as session:
        head = session.execute(text("SELECT last_id, last_hash FROM audit_head")).one()
    with app_role.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (id, ts, event_type, payload, prev_hash, hash) "
                "VALUES (:i, now(), 'forged', '{}', :h, :x)"
            ),
            {"i": head.last_id + 1, "h": head.last_hash, "x": "f" * 64},
        )
    result = _verify(app_role)
    assert result.first_bad_row == head.last_id + 1 and "HMAC" in result.summary()


def test_audit_head_is_guarded_even_for_a_superuser_with_triggers_on(pg_engine: Engine) -> None:
    with session_scope(pg_engine) as session:
        audit.append(session, "e1")
        audit.append(session, "e2")
    for statement in (
        "UPDATE audit_head SET last_id = 1",
        "UPDATE audit_head SET last_id = 0, last_hash = '" + GENESIS_HASH + "'",
        "DELETE FROM audit_head",
        "TRUNCATE audit_head",
        "INSERT INTO audit_head (id, last_id, last_hash) VALUES (2, 0, 'x')",
        "TRUNCATE audit_anchors",
    ):
        with (
            pytest.raises(DBAPIError, match="audit_head only advances|append-only"),
            pg_engine.begin() as conn,
        ):
            conn.execute(text(statement))
    assert _verify(pg_engine).ok


# --- anchors -------------------------------------------------------------------------------------------


def test_anchors_on_kafka_catch_a_cut_back_log(
    pg_engine: Engine, model_dir: Path, store: ArtifactStore, kafka_bootstrap: str
) -> None:
    topic = f"apa.audit-anchors.{uuid.uuid4().hex[:8]}"
    sink = KafkaAnchorSink(kafka_bootstrap, topic, timeout_s=20)
    _registry(pg_engine, model_dir, store)
    first = anchor_now(pg_engine, [sink], SIGNER, KEY, legacy_rows=0)
    with session_scope(pg_engine) as session:
        registry.record_erasure(session, ErasureRequested("req-bob", "bob"), PSEUDO)
    second = anchor_now(pg_engine, [sink], SIGNER, KEY, legacy_rows=0)
    assert second.sequence > first.sequence
    loaded, unreadable = read_anchors(f"kafka://{kafka_bootstrap}/{topic}", Settings())
    assert [a.sequence for a in loaded] == [first.sequence, second.sequence] and unreadable == []
    assert _verify(pg_engine, loaded).ok
    rows = _rows(pg_engine)
    keep = next(r for r in rows if r["id"] == first.sequence)
    with _as_replica(pg_engine) as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id > :k"), {"k": keep["id"]})
        conn.execute(
            text("UPDATE audit_head SET last_id = :i, last_hash = :h"), {"i": keep["id"], "h": keep["hash"]}
        )
    result = _verify(pg_engine, loaded)
    assert not result.ok and result.first("anchor").subject == second.label  # type: ignore[union-attr]


def test_a_forged_anchor_is_named_and_ignored(anchored: tuple[Engine, Path]) -> None:
    engine, path = anchored
    [good] = read_anchors(str(path), Settings())[0]
    forged = Anchor(
        good.registry_id,
        good.sequence + 50,
        "a" * 64,
        good.anchored_at,
        good.audit_key_id,
        good.key_id,
        good.signature,
    )
    with path.open("a") as handle:
        handle.write(json.dumps(forged.to_json()) + "\n" + "not json\n")
    loaded, unreadable = read_anchors(str(path), Settings())
    assert len(unreadable) == 1 and "not an anchor" in unreadable[0]
    result = _verify(engine, loaded)
    assert [p.subject for p in result.problems] == [forged.label]
    assert "signature does not verify" in result.problems[0].reason


def test_un_erased_sample_reinserted_under_a_new_row_is_found_by_its_content_hmac(
    anchored: tuple[Engine, Path],
) -> None:
    engine, _ = anchored
    with Session(engine) as session:
        erased = session.scalars(select(Sample).where(Sample.sample_pid == pid("t-c1"))).one()
        hmac_, user = erased.content_hmac, erased.user_pid
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO samples (model_id, sample_pid, user_pid, split, shard_id, label, content_hmac, "
                "text, interaction_pids, erased) VALUES (:m, :p, :u, 'train', :s, 1, :c, '{}', '[]', false)"
            ),
            {"m": MODEL_ID, "p": "b" * 64, "u": user, "s": shard_id(0), "c": hmac_},
        )
    result = _verify(engine)
    problem = result.first("sample")
    assert problem is not None and problem.subject == f"{MODEL_ID}/{'b' * 64}"
    assert f"holds the record of sample {MODEL_ID}/{pid('t-c1')}" in problem.reason


def test_migration_0005_as_a_createrole_admin_leaves_it_outside_the_owner_role(
    model_dir: Path, store: ArtifactStore
) -> None:
    """README "Postgres roles": the migrating admin is no superuser; afterwards it is not a member of
    apa_audit_owner (it cannot disable the audit triggers either), and up/down/up works."""
    from apa.db.session import downgrade, upgrade

    role, database = f"apa_test_admin_{uuid.uuid4().hex[:8]}", f"apa_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN CREATEROLE"))
        conn.execute(text(f'CREATE DATABASE "{database}" OWNER {role}'))
    server = PG_SERVER.replace("//postgres@", f"//{role}@")
    engine = make_engine(f"{server}/{database}")
    try:
        upgrade(engine)
        with engine.connect() as conn:
            assert not conn.execute(
                text("SELECT pg_has_role(current_user, 'apa_audit_owner', 'MEMBER')")
            ).scalar()
            owners = dict(
                conn.execute(
                    text("SELECT tablename, tableowner FROM pg_tables WHERE tablename LIKE 'audit%'")
                ).all()
            )
        assert owners == dict.fromkeys(("audit_log", "audit_head", "audit_anchors"), "apa_audit_owner")
        _registry(engine, model_dir, store)
        assert _verify(engine).ok
        with pytest.raises(DBAPIError, match="must be owner"), engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        downgrade(engine, "base")
        upgrade(engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()
