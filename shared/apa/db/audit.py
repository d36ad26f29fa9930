"""The audit trail: an append-only, hash-chained log of every registry state change, its verifier
and `apa audit`.

Row i's hash is sha256(prev_hash + canonical JSON of its content), where the content is
(id, ts, event_type, request_id, user_pid, shard_id, adapter_version_id, payload, prev_hash) and
canonical JSON means sorted keys, separators (",", ":"), ASCII only. Ids are 1, 2, 3, ... without
gaps; `audit_head` holds the newest id and hash, so deleting the newest rows is detected too.
Appends take a row lock on `audit_head` (SELECT ... FOR UPDATE on Postgres; SQLite transactions
are BEGIN IMMEDIATE), so concurrent writers queue up instead of forking the chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from apa.db.models import AdapterVersion, AuditHead, AuditLog, Interaction, Sample, Shard, utcnow

GENESIS_HASH = "0" * 64
"""prev_hash of the first row."""
HEAD_ID = 1
MAX_PROBLEMS = 20


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN: the same text on every machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def json_roundtrip(value: Any) -> Any:
    """`value` as a JSON column gives it back (tuples become lists, keys strings); rejects NaN."""
    return json.loads(canonical_json(value))


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def format_ts(ts: datetime) -> str:
    """A timestamp as hashed: ISO-8601 UTC with microseconds (naive values are taken as UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def row_content(row: AuditLog) -> dict[str, Any]:
    """The fields of a row that its hash covers."""
    return {
        "id": row.id,
        "ts": format_ts(row.ts),
        "event_type": row.event_type,
        "request_id": row.request_id,
        "user_pid": row.user_pid,
        "shard_id": row.shard_id,
        "adapter_version_id": row.adapter_version_id,
        "payload": row.payload,
        "prev_hash": row.prev_hash,
    }


def compute_hash(prev_hash: str, content: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of content), hex."""
    return sha256_hex(prev_hash + canonical_json(content))


def lock_chain(session: Session) -> AuditHead:
    """Lock the chain head for the rest of the transaction (serialises every registry write)."""
    head = session.scalars(
        select(AuditHead)
        .where(AuditHead.id == HEAD_ID)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if head is None:
        raise RuntimeError("audit_head row missing: run `apa db upgrade` on this database")
    return head


def append(
    session: Session,
    event_type: str,
    *,
    request_id: str | None = None,
    user_pid: str | None = None,
    shard_id: str | None = None,
    adapter_version_id: int | None = None,
    payload: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditLog:
    """Append one row to the chain in the caller's transaction: the only way audit rows are written.
    Rows outlive every erasure: they name users, samples and interactions by pseudonym only."""
    head = lock_chain(session)
    # Normalise the payload to what the JSON column gives back (lists, str keys, no NaN).
    normalised = json_roundtrip(payload or {})
    row = AuditLog(
        id=head.last_id + 1,
        ts=now or utcnow(),
        event_type=event_type,
        request_id=request_id,
        user_pid=user_pid,
        shard_id=shard_id,
        adapter_version_id=adapter_version_id,
        payload=normalised,
        prev_hash=head.last_hash,
    )
    row.hash = compute_hash(row.prev_hash, row_content(row))
    session.add(row)
    head.last_id = row.id
    head.last_hash = row.hash
    session.flush()
    return row


# --- verification ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding of `verify`: a broken audit row, or an adapter/sample violating an erasure."""

    kind: Literal["row", "head", "adapter", "sample"]
    subject: str
    """The audit row id, adapter version (`<shard>@v<version>`) or sample the problem is about."""
    reason: str

    def __str__(self) -> str:
        label = {"row": "audit row", "head": "audit head", "adapter": "adapter", "sample": "sample"}[
            self.kind
        ]
        return f"{label} {self.subject}: {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of `verify`: ok, or the problems found (the first names the first bad row/adapter)."""

    rows_checked: int
    head_hash: str
    adapters_checked: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_row(self) -> int | None:
        """Id of the first audit row whose chain does not verify (None: the chain is intact)."""
        for problem in self.problems:
            if problem.kind in ("row", "head"):
                return int(problem.subject)
        return None

    @property
    def bad_adapter(self) -> str | None:
        """The first serving adapter (`<shard>@v<version>`) whose manifest holds erased data."""
        return next((p.subject for p in self.problems if p.kind == "adapter"), None)

    def summary(self) -> str:
        if self.ok:
            return (
                f"OK: {self.rows_checked} audit rows chain to head {self.head_hash[:16]}..., "
                f"{self.adapters_checked} serving adapters free of erased samples"
            )
        return f"FAILED: {self.problems[0]}" + (
            f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        )


def _iter_rows(session: Session, batch: int = 1000) -> Iterator[AuditLog]:
    last = 0
    while True:
        rows = list(
            session.scalars(select(AuditLog).where(AuditLog.id > last).order_by(AuditLog.id).limit(batch))
        )
        yield from rows
        if len(rows) < batch:
            return
        last = rows[-1].id
        for row in rows:  # keep memory flat on long logs
            session.expunge(row)


def verify_chain(session: Session) -> tuple[int, str, list[Problem]]:
    """Recompute the chain: (rows checked, head hash, problems)."""
    problems: list[Problem] = []
    expected_id, prev_hash, count = 1, GENESIS_HASH, 0
    for row in _iter_rows(session):
        count += 1
        if row.id != expected_id:
            missing = f"{expected_id}" if row.id == expected_id + 1 else f"{expected_id}..{row.id - 1}"
            problems.append(
                Problem("row", str(expected_id), f"missing (next row is {row.id}): rows {missing} deleted")
            )
        elif row.prev_hash != prev_hash:
            problems.append(Problem("row", str(row.id), "prev_hash does not match the previous row's hash"))
        if compute_hash(row.prev_hash, row_content(row)) != row.hash:
            problems.append(Problem("row", str(row.id), "content does not match its hash (row was modified)"))
        expected_id, prev_hash = row.id + 1, row.hash
        if len(problems) >= MAX_PROBLEMS:
            return count, prev_hash, problems
    head = session.get(AuditHead, HEAD_ID, populate_existing=True)
    if head is None:
        problems.append(Problem("head", "0", "audit_head row missing"))
    elif head.last_id != expected_id - 1 or head.last_hash != prev_hash:
        problems.append(
            Problem(
                "head",
                str(min(head.last_id, expected_id)),
                f"chain ends at row {expected_id - 1} but the head records row {head.last_id}: "
                "newest rows deleted or the log was rewritten",
            )
        )
    return count, prev_hash, problems


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a training manifest."""
    return sha256_hex(canonical_json(manifest))


def verify_served_adapters(session: Session) -> tuple[int, list[Problem]]:
    """Check every adapter version in state serving: its stored manifest matches its digest and
    names no erased sample (by pseudonym) of its model. Also checks that erased samples kept
    nothing in clear: no record, no label, no interactions."""
    problems: list[Problem] = []
    serving = session.execute(
        select(AdapterVersion, Shard.model_id)
        .join(Shard, Shard.id == AdapterVersion.shard_id)
        .where(AdapterVersion.state == "serving")
        .order_by(AdapterVersion.id)
    ).all()
    erased: dict[str, set[str]] = {}
    for model_id in {model_id for _, model_id in serving}:
        erased[model_id] = set(
            session.scalars(select(Sample.sample_pid).where(Sample.model_id == model_id, Sample.erased))
        )
    for version, model_id in serving:
        name = f"{version.shard_id}@v{version.version}"
        if manifest_digest(version.manifest) != version.manifest_digest:
            problems.append(Problem("adapter", name, "stored manifest does not match its manifest digest"))
            continue
        hit = sorted(erased[model_id].intersection(version.manifest.get("sample_pids", [])))
        if hit:
            shown = ", ".join(hit[:5]) + (" ..." if len(hit) > 5 else "")
            problems.append(
                Problem(
                    "adapter", name, f"serving, but its manifest contains {len(hit)} erased samples: {shown}"
                )
            )
    leaked = session.scalars(
        select(Sample)
        .where(
            Sample.erased,
            Sample.text.is_not(None) | Sample.label.is_not(None) | Sample.interaction_pids.is_not(None),
        )
        .order_by(Sample.id)
        .limit(5)
    ).all()
    for sample in leaked:
        problems.append(
            Problem("sample", f"{sample.model_id}/{sample.sample_pid}", "erased but its record is stored")
        )
    indexed = session.scalars(
        select(Sample)
        .where(Sample.erased, Sample.id.in_(select(Interaction.sample_pk)))
        .order_by(Sample.id)
        .limit(5)
    ).all()
    for sample in indexed:
        problems.append(
            Problem(
                "sample", f"{sample.model_id}/{sample.sample_pid}", "erased but its interactions are indexed"
            )
        )
    return len(serving), problems


def verify(session: Session) -> VerifyResult:
    """Recompute the hash chain and check the served adapters against the erased samples."""
    rows, head_hash, problems = verify_chain(session)
    adapters, adapter_problems = verify_served_adapters(session)
    return VerifyResult(rows, head_hash, adapters, problems + adapter_problems)


# --- reading ---------------------------------------------------------------------------------------


def row_view(row: AuditLog) -> dict[str, Any]:
    """An audit row as JSON: its content plus its hash."""
    return {**row_content(row), "hash": row.hash}


def page(session: Session, *, since: int = 0, limit: int = 100) -> list[AuditLog]:
    """Rows with id > since, oldest first, at most `limit`."""
    return list(
        session.scalars(select(AuditLog).where(AuditLog.id > since).order_by(AuditLog.id).limit(limit))
    )


def rows_for(
    session: Session, *, request_ids: Sequence[str] = (), user_pid: str | None = None
) -> list[AuditLog]:
    """Rows about the given requests, or about a user (by pseudonym), oldest first."""
    query = select(AuditLog).order_by(AuditLog.id)
    if request_ids:
        query = query.where(AuditLog.request_id.in_(list(request_ids)))
    if user_pid is not None:
        query = query.where(AuditLog.user_pid == user_pid)
    return list(session.scalars(query))


# --- CLI -------------------------------------------------------------------------------------------


def audit_command(action: Literal["verify", "show"], limit: int = 20, url: str | None = None) -> int:
    """Verify the audit trail (exit 1 on the first bad row or adapter), or show its newest rows.

    `verify` recomputes the hash chain and checks that no serving adapter's manifest contains an
    erased sample; it exits 1 and names the first bad row or adapter.

    Args:
        action: verify | show.
        limit: how many of the newest rows `show` prints.
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.db.session import check_schema, make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        check_schema(engine)
        with make_sessionmaker(engine)() as session:
            if action == "verify":
                result = verify(session)
                print(result.summary())
                for problem in result.problems[1:]:
                    print(f"  also: {problem}")
                return 0 if result.ok else 1
            rows = list(session.scalars(select(AuditLog).order_by(AuditLog.id.desc()).limit(max(limit, 0))))
            for row in reversed(rows):
                subjects = " ".join(
                    f"{k}={v}"
                    for k, v in (
                        ("request", row.request_id),
                        ("user", row.user_pid[:16] if row.user_pid else None),
                        ("shard", row.shard_id),
                        ("adapter", row.adapter_version_id),
                    )
                    if v is not None
                )
                print(f"{row.id:>6} {format_ts(row.ts)} {row.event_type:<24} {subjects}  {row.hash[:12]}")
                print(f"       {canonical_json(row.payload)}")
            return 0
    finally:
        engine.dispose()
