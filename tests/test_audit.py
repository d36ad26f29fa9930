"""The hash-chained audit trail: tampering (edit, delete, reorder) is detected; served adapters are
checked against erased samples; the database itself refuses UPDATE/DELETE of audit rows."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.audit import GENESIS_HASH, audit_command
from apa.db.bootstrap import bootstrap
from apa.db.models import AdapterVersion, AuditLog, Sample
from apa.db.session import session_scope
from apa.events import ErasureRequested
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PSEUDO,
    disable_append_only_guard,
    fake_model_template,
    migrated_sqlite_template,
    model_dir,
    pg_engine,
    pg_url,
    pid,
    shard_id,
    sqlite_engine,
    store,
)


def _append_rows(engine: Engine, n: int) -> None:
    with session_scope(engine) as session:
        for i in range(n):
            audit.append(session, f"event_{i}", user_pid=f"u{i % 3}", payload={"i": i, "note": "é ☃"})


def _verify(engine: Engine) -> audit.VerifyResult:
    with Session(engine) as session:
        return audit.verify(session)


@pytest.fixture()
def chain(sqlite_engine: Engine) -> Engine:
    """Five audit rows, with the append-only triggers dropped so a test can tamper."""
    _append_rows(sqlite_engine, 5)
    disable_append_only_guard(sqlite_engine)
    return sqlite_engine


def test_hash_is_sha256_of_prev_hash_and_canonical_row(sqlite_engine: Engine) -> None:
    _append_rows(sqlite_engine, 2)
    with Session(sqlite_engine) as session:
        first, second = session.query(AuditLog).order_by(AuditLog.id).all()
        content = {
            "id": 1,
            "ts": first.ts.isoformat(timespec="microseconds"),
            "event_type": "event_0",
            "request_id": None,
            "user_pid": "u0",
            "shard_id": None,
            "adapter_version_id": None,
            "payload": {"i": 0, "note": "é ☃"},
            "prev_hash": GENESIS_HASH,
        }
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        assert first.prev_hash == GENESIS_HASH
        assert first.hash == hashlib.sha256((GENESIS_HASH + canonical).encode()).hexdigest()
        assert second.prev_hash == first.hash and second.id == 2


def test_untouched_chain_verifies(chain: Engine) -> None:
    result = _verify(chain)
    assert result.ok and result.rows_checked == 5 and result.first_bad_row is None


def test_tampered_audit_row_fails_verification(chain: Engine) -> None:
    with chain.begin() as conn:
        conn.execute(update(AuditLog).where(AuditLog.id == 3).values(payload={"i": 99, "note": "é ☃"}))
    result = _verify(chain)
    assert not result.ok and result.first_bad_row == 3
    assert "modified" in result.summary()


def test_deleted_audit_row_fails_verification(chain: Engine) -> None:
    with chain.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = 2"))
    result = _verify(chain)
    assert not result.ok and result.first_bad_row == 2


def test_deleting_newest_audit_row_fails_verification(chain: Engine) -> None:
    with chain.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = 5"))
    result = _verify(chain)
    assert not result.ok and result.first_bad_row == 5
    assert "head" in result.summary()


def test_reordered_audit_rows_fail_verification(chain: Engine) -> None:
    _swap_ids(chain, 2, 4)
    result = _verify(chain)
    assert not result.ok and result.first_bad_row == 2


def _swap_ids(engine: Engine, a: int, b: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET id = -1 WHERE id = :a"), {"a": a})
        conn.execute(text("UPDATE audit_log SET id = :a WHERE id = :b"), {"a": a, "b": b})
        conn.execute(text("UPDATE audit_log SET id = :b WHERE id = -1"), {"b": b})


def test_audit_log_refuses_update_and_delete(sqlite_engine: Engine) -> None:
    _append_rows(sqlite_engine, 2)
    for statement in (
        "UPDATE audit_log SET event_type = 'x' WHERE id = 1",
        "DELETE FROM audit_log WHERE id = 2",
    ):
        with pytest.raises(DBAPIError, match="append-only"), sqlite_engine.begin() as conn:
            conn.execute(text(statement))
    assert _verify(sqlite_engine).ok


def test_verify_names_serving_adapter_whose_manifest_holds_an_erased_sample(
    sqlite_engine: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    with session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
        registry.record_erasure(session, ErasureRequested("r1", "alice", ["alice:1"]), PSEUDO)
    assert _verify(sqlite_engine).ok  # the excluded adapter is not serving
    with sqlite_engine.begin() as conn:  # someone puts the excluded version back into service
        conn.execute(
            update(AdapterVersion).where(AdapterVersion.shard_id == shard_id(0)).values(state="serving")
        )
    result = _verify(sqlite_engine)
    assert not result.ok and result.first_bad_row is None
    assert result.bad_adapter == f"{shard_id(0)}@v1"
    assert pid("t-a1") in result.summary()


def test_verify_flags_erased_sample_whose_text_is_still_stored(
    sqlite_engine: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    with session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
        registry.record_erasure(session, ErasureRequested("r1", "bob"), PSEUDO)
    with sqlite_engine.begin() as conn:
        conn.execute(update(Sample).where(Sample.sample_pid == pid("v-b1")).values(text="{}"))
    result = _verify(sqlite_engine)
    assert not result.ok and pid("v-b1") in result.summary() and "record is stored" in result.summary()


def test_audit_verify_command_exits_1_and_names_the_first_bad_row(
    chain: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    url = chain.url.render_as_string(hide_password=False)
    assert audit_command("verify", url=url) == 0
    assert "OK: 5 audit rows" in capsys.readouterr().out
    with chain.begin() as conn:
        conn.execute(update(AuditLog).where(AuditLog.id == 4).values(event_type="forged"))
    assert audit_command("verify", url=url) == 1
    assert "FAILED: audit row 4" in capsys.readouterr().out
    assert audit_command("show", limit=2, url=url) == 0
    out = capsys.readouterr().out
    assert "forged" in out and "event_4" in out and "event_2" not in out


# --- property: any edit, delete or swap breaks verification; no change keeps it valid -----------------

_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_payload = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "tampered"), _json_scalar, max_size=4)
_rows = st.lists(
    st.tuples(st.sampled_from(["erasure_received", "shard_stale", "adapter_promoted"]), _payload),
    min_size=1,
    max_size=12,
)
_mutation = st.sampled_from(["none", "edit_payload", "edit_event", "edit_ts", "delete", "swap"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows, mutation=_mutation, pick=st.data())
def test_hash_chain_detects_any_edit_delete_or_swap(
    sqlite_engine: Engine,
    rows: list[tuple[str, dict[str, object]]],
    mutation: str,
    pick: st.DataObject,
) -> None:
    disable_append_only_guard(sqlite_engine)
    with sqlite_engine.begin() as conn:  # fresh chain for this example
        conn.execute(text("DELETE FROM audit_log"))
        conn.execute(text("UPDATE audit_head SET last_id = 0, last_hash = :h"), {"h": GENESIS_HASH})
    with session_scope(sqlite_engine) as session:
        for event_type, payload in rows:
            audit.append(session, event_type, payload=payload)
    n = len(rows)
    if mutation == "swap" and n < 2:
        mutation = "delete"
    target = pick.draw(st.integers(1, n), label="row")
    with sqlite_engine.begin() as conn:
        if mutation == "edit_payload":
            conn.execute(update(AuditLog).where(AuditLog.id == target).values(payload={"tampered": True}))
        elif mutation == "edit_event":
            conn.execute(
                text("UPDATE audit_log SET event_type = event_type || 'x' WHERE id = :i"), {"i": target}
            )
        elif mutation == "edit_ts":
            conn.execute(
                text("UPDATE audit_log SET ts = '2000-01-01 00:00:00.000000' WHERE id = :i"), {"i": target}
            )
        elif mutation == "delete":
            conn.execute(text("DELETE FROM audit_log WHERE id = :i"), {"i": target})
    if mutation == "swap":
        other = pick.draw(st.integers(1, n).filter(lambda j: j != target), label="other row")
        _swap_ids(sqlite_engine, target, other)
    result = _verify(sqlite_engine)
    if mutation == "none":
        assert result.ok, result.summary()
        assert result.rows_checked == n
    else:
        assert not result.ok, f"{mutation} of row {target} went unnoticed"
        assert result.first_bad_row is not None and result.first_bad_row <= target


# --- Postgres ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tampering_is_detected_on_postgres(pg_engine: Engine) -> None:
    _append_rows(pg_engine, 4)
    assert _verify(pg_engine).ok
    with pytest.raises(DBAPIError, match="append-only"), pg_engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = 2"))
    disable_append_only_guard(pg_engine)
    with pg_engine.begin() as conn:
        conn.execute(update(AuditLog).where(AuditLog.id == 2).values(user_pid="someone-else"))
    result = _verify(pg_engine)
    assert not result.ok and result.first_bad_row == 2
