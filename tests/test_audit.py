"""The hash-chained audit trail: tampering (edit, delete, reorder) is detected; served adapters are
checked against erased samples; the database itself refuses UPDATE/DELETE of audit rows."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import hashlib
import hmac
import json
import os
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
from apa.db.audit import GENESIS_HASH, show_command, verify_command
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


def test_hash_is_hmac_of_prev_hash_and_canonical_row_under_the_audit_key(sqlite_engine: Engine) -> None:
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
        key = bytes.fromhex(os.environ["APA_AUDIT_KEY"])
        assert first.hash == hmac.new(key, (GENESIS_HASH + canonical).encode(), hashlib.sha256).hexdigest()
        assert first.hash != hashlib.sha256((GENESIS_HASH + canonical).encode()).hexdigest()
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
    problems = [str(p) for p in result.problems]
    assert any("excluded it" in p for p in problems)  # the log says an erasure excluded it
    assert any(pid("t-a1") in p and "erased samples" in p for p in problems)


def test_verify_flags_erased_sample_whose_text_is_still_stored(
    sqlite_engine: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    with session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
        registry.record_erasure(session, ErasureRequested("r1", "bob"), PSEUDO)
    with sqlite_engine.begin() as conn:
        conn.execute(update(Sample).where(Sample.sample_pid == pid("v-b1")).values(text="{}"))
    result = _verify(sqlite_engine)
    assert not result.ok and pid("v-b1") in result.summary()
    assert any(pid("v-b1") in str(p) and "record is stored" in str(p) for p in result.problems)


def test_audit_verify_command_exits_1_and_names_the_first_bad_row(
    chain: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    url = chain.url.render_as_string(hide_password=False)
    assert verify_command(url=url) == 0
    assert "OK: 5 audit rows" in capsys.readouterr().out
    with chain.begin() as conn:
        conn.execute(update(AuditLog).where(AuditLog.id == 4).values(event_type="forged"))
    assert verify_command(url=url) == 1
    assert "FAILED: audit row 4" in capsys.readouterr().out
    assert show_command(limit=2, url=url) == 0
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


# --- the key, the guarded head, anchors (SQLite) ------------------------------------------------------


def test_a_chain_under_another_key_fails_verification_and_refuses_appends(sqlite_engine: Engine) -> None:
    _append_rows(sqlite_engine, 3)
    other = audit.AuditKey.from_secret("ab" * 32, source="another key")
    with Session(sqlite_engine) as session:
        result = audit.verify(session, key=other)
    assert not result.ok and result.first("key") is not None and result.first_bad_row == 1
    with (
        pytest.raises(audit.AuditKeyMismatch, match="APA_AUDIT_KEY"),
        session_scope(sqlite_engine) as session,
    ):
        session.info[audit.SESSION_KEY] = other
        audit.append(session, "forged")
    assert _verify(sqlite_engine).ok


def test_legacy_unkeyed_rows_verify_only_up_to_the_configured_count(sqlite_engine: Engine) -> None:
    """Rows written before migration 0005 (plain sha256) verify when APA_AUDIT_LEGACY_ROWS covers them;
    the first keyed row links to them, so they cannot change either."""
    disable_append_only_guard(sqlite_engine)
    prev = GENESIS_HASH
    with sqlite_engine.begin() as conn:  # two rows as the pre-0005 code wrote them
        for i in (1, 2):
            row = AuditLog(id=i, ts=audit.utcnow(), event_type=f"old_{i}", payload={}, prev_hash=prev)
            row.hash = audit.compute_hash(prev, audit.row_content(row), None)
            conn.execute(
                AuditLog.__table__.insert(),
                [
                    {c: getattr(row, c) for c in audit.row_content(row) if c != "ts"}
                    | {"ts": row.ts, "hash": row.hash}
                ],
            )
            prev = row.hash
    _append_rows(sqlite_engine, 2)
    with Session(sqlite_engine) as session:
        assert audit.verify(session, legacy_rows=2).ok
        strict = audit.verify(session, legacy_rows=0)
        assert strict.first_bad_row == 1 and "HMAC" in strict.summary()
    with sqlite_engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET event_type = 'rewritten' WHERE id = 1"))
    with Session(sqlite_engine) as session:
        assert audit.verify(session, legacy_rows=2).first_bad_row == 1


def test_audit_head_moves_only_with_an_insert_that_extends_the_chain(sqlite_engine: Engine) -> None:
    _append_rows(sqlite_engine, 2)
    with Session(sqlite_engine) as session:
        head = session.get(audit.AuditHead, 1)
        assert head is not None and head.last_id == 2
        last_hash = head.last_hash
    for statement, message in (
        ("UPDATE audit_head SET last_id = 1", "only advances"),
        ("UPDATE audit_head SET last_id = 0, last_hash = '" + GENESIS_HASH + "'", "only advances"),
        ("DELETE FROM audit_head", "cannot be deleted"),
        ("INSERT INTO audit_head (id, last_id, last_hash) VALUES (2, 0, 'x')", "one row"),
        (
            "INSERT INTO audit_log (id, ts, event_type, payload, prev_hash, hash) "
            f"VALUES (7, '2020-01-01', 'x', '{{}}', '{last_hash}', 'h')",
            "does not extend the chain head",
        ),
        (
            "INSERT INTO audit_log (id, ts, event_type, payload, prev_hash, hash) "
            f"VALUES (3, '2020-01-01', 'x', '{{}}', '{GENESIS_HASH}', 'h')",
            "does not extend the chain head",
        ),
    ):
        with pytest.raises(DBAPIError, match=message), sqlite_engine.begin() as conn:
            conn.execute(text(statement))
    assert _verify(sqlite_engine).ok


def test_anchors_prove_the_log_was_not_cut_back_since_the_newest_anchor(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    from apa.anchors import AnchorScheduler, FileAnchorSink, read_anchors
    from apa.settings import Settings
    from apa.signing import signing_key_from_settings

    path = tmp_path / "anchors.jsonl"
    scheduler = AnchorScheduler(
        sqlite_engine,
        [FileAnchorSink(path)],
        signing_key_from_settings(),
        audit.audit_key_from_settings(),
        3600,
    )
    _append_rows(sqlite_engine, 3)
    assert scheduler.tick() is not None and scheduler.tick() is None  # nothing new: no second anchor
    _append_rows(sqlite_engine, 2)
    assert scheduler.tick() is not None
    anchors, unreadable = read_anchors(f"file:{path}", Settings())
    assert [a.sequence for a in anchors] == [3, 5] and unreadable == []
    with Session(sqlite_engine) as session:
        assert audit.verify(session, anchors=anchors).ok
    disable_append_only_guard(sqlite_engine)
    with sqlite_engine.begin() as conn:  # cut back to row 4, head and all
        conn.execute(text("DELETE FROM audit_log WHERE id = 5"))
        conn.execute(
            text("UPDATE audit_head SET last_id = 4, last_hash = (SELECT hash FROM audit_log WHERE id = 4)")
        )
    assert _verify(sqlite_engine).ok  # the chain alone cannot tell
    with Session(sqlite_engine) as session:
        result = audit.verify(session, anchors=anchors)
    assert not result.ok and result.first("anchor").subject == anchors[1].label  # type: ignore[union-attr]


def test_periodic_anchoring_runs_in_the_background(sqlite_engine: Engine, tmp_path: Path) -> None:
    import time

    from apa.anchors import AnchorScheduler, FileAnchorSink
    from apa.signing import signing_key_from_settings

    _append_rows(sqlite_engine, 1)
    path = tmp_path / "anchors.jsonl"
    scheduler = AnchorScheduler(
        sqlite_engine,
        [FileAnchorSink(path)],
        signing_key_from_settings(),
        audit.audit_key_from_settings(),
        0.05,
    ).start()
    try:
        deadline = time.monotonic() + 20
        while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert json.loads(path.read_text().splitlines()[0])["sequence"] == 1


def test_audit_cli_anchors_and_verifies_with_anchors(
    chain: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apa.cli import main

    url = chain.url.render_as_string(hide_password=False)
    anchors = tmp_path / "a.jsonl"
    assert main(["audit", "anchor", "--anchors", str(anchors), "--url", url]) == 0
    assert "anchored row 5" in capsys.readouterr().out
    assert main(["audit", "verify", "--anchors", str(anchors), "--url", url]) == 0
    assert "1 anchors match (newest: row 5)" in capsys.readouterr().out
    with chain.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = 5"))
        conn.execute(
            text("UPDATE audit_head SET last_id = 4, last_hash = (SELECT hash FROM audit_log WHERE id = 4)")
        )
    assert main(["audit", "verify", "--anchors", str(anchors), "--url", url]) == 1
    assert "FAILED: anchor #5@" in capsys.readouterr().out
    assert main(["audit", "anchor", "--anchors", str(anchors), "--url", url]) == 1  # never blesses a cut-back
    assert "cut back" in capsys.readouterr().err
    assert main(["audit", "verify", "--anchors", str(tmp_path / "missing.jsonl"), "--url", url]) == 1
    assert "does not exist" in capsys.readouterr().err
