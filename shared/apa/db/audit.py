"""The audit trail: an append-only, keyed hash chain of every registry state change, its verifier
and `apa audit` (docs/ARCHITECTURE.md §7).

Row i's hash is HMAC-SHA256(APA_AUDIT_KEY, prev_hash + canonical JSON of its content), where the
content is (id, ts, event_type, request_id, user_pid, shard_id, adapter_version_id, payload,
prev_hash) and canonical JSON means sorted keys, separators (",", ":"), ASCII only. The key lives
outside the database, so someone who can only write the database cannot forge a row or rebuild
the chain; `verify` needs the key. Rows 1..`APA_AUDIT_LEGACY_ROWS`, written before migration 0005,
are plain sha256 (the first keyed row links to them, so they cannot change either).

Ids are 1, 2, 3, ... without gaps; `audit_head` holds the newest id and hash. The database moves
the head itself (a trigger on INSERT into audit_log, migration 0005) and refuses an insert that
does not extend it and any other change of it. Appends are serialised by the chain lock: a
transaction-scoped advisory lock on Postgres (the application role needs no UPDATE right on
audit_head), BEGIN IMMEDIATE on SQLite. A transaction takes the lock and reads the head once, however
many rows it appends (the erasure service appends a whole poll batch's rows in one): `append` keeps
the head in memory and leaves its row to the session's next flush, which inserts the pending rows in
order, several per statement; any rollback, a savepoint's included, makes the next append lock and
read the head again.

What the chain alone cannot show, a cut-back of the newest rows (with the head rolled back) or a
log rebuilt from scratch, the **anchors** show (`apa.anchors`): signed copies of the head written
outside the database. `verify` also cross-checks the registry's state against the log (every
erasure still in force, no erased sample back, every serving adapter registered in the log).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value

from apa.db.models import (
    AdapterVersion,
    AuditHead,
    AuditLog,
    ErasureRequest,
    Interaction,
    RegistryMeta,
    Sample,
    Shard,
    User,
    utcnow,
)
from apa.errors import UserError

if TYPE_CHECKING:
    from apa.anchors import Anchor
    from apa.settings import Settings
    from apa.signing import PublicKey

GENESIS_HASH = "0" * 64
"""prev_hash of the first row."""
HEAD_ID = 1
MAX_PROBLEMS = 20
CHAIN_LOCK_KEY = 0x41504131
"""Postgres advisory lock ("APA1") that serialises every registry writer (`lock_chain`)."""
AUDIT_KEY_ID = "audit_key_id"
"""registry_meta key: the fingerprint of the audit key the chain is written with."""
REGISTRY_ID = "registry_id"
"""registry_meta key: this registry's random id (migration 0005), named by its anchors."""
LEGACY_ROWS = "audit_legacy_rows"
"""registry_meta key: how many unkeyed rows migration 0005 found (informational; the trusted
value is the setting `audit_legacy_rows`)."""
CHAIN_STATE = "apa.audit_chain"
"""`Session.info` entry: the chain lock this session holds in its current transaction (`lock_chain`)."""
SESSION_KEY = "apa.audit_key"
"""`Session.info` entry holding the `AuditKey` a session writes and verifies with."""
DEV_AUDIT_KEY_FILE = "dev-audit.key"
MIN_KEY_BYTES = 16


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


def compute_hash(prev_hash: str, content: dict[str, Any], key: AuditKey | None) -> str:
    """HMAC-SHA256(key, prev_hash + canonical JSON of content), hex; plain sha256 when `key` is
    None (only for the legacy rows written before migration 0005)."""
    message = prev_hash + canonical_json(content)
    if key is None:
        return sha256_hex(message)
    return key.mac(message)


# --- the key -----------------------------------------------------------------------------------------


class AuditKeyMismatch(UserError):
    """The chain was written under another audit key than the one this process holds."""


@dataclass(frozen=True)
class AuditKey:
    """The secret of the chain's HMAC (`APA_AUDIT_KEY`)."""

    key: bytes = field(repr=False)
    source: str = "explicit"

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"the audit key must have at least {MIN_KEY_BYTES} bytes")

    def mac(self, message: str) -> str:
        return hmac.new(self.key, message.encode("utf-8"), hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """A fingerprint of the key (not the key), recorded in registry_meta and in anchors."""
        return hmac.new(self.key, b"apa:audit-key-id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_secret(cls, secret: str, source: str = "explicit") -> AuditKey:
        """From the text of a secret (`apa.devkeys.secret_bytes`)."""
        from apa.devkeys import secret_bytes

        return cls(secret_bytes(secret), source)


@lru_cache(maxsize=8)
def _key_for(secret: str | None) -> AuditKey:
    if secret:
        return AuditKey.from_secret(secret, source="APA_AUDIT_KEY")
    from apa.devkeys import development_secret

    dev, path = development_secret(DEV_AUDIT_KEY_FILE, "APA_AUDIT_KEY")
    return AuditKey.from_secret(dev, source=f"development key {path}")


def audit_key_from_settings(settings: Settings | None = None) -> AuditKey:
    """`APA_AUDIT_KEY`, else the generated development key (with a loud warning)."""
    from apa.settings import Settings

    settings = settings or Settings.from_env()
    return _key_for(settings.audit_key)


def chain_key(session: Session) -> AuditKey:
    """The key a session writes and verifies with: `session.info[SESSION_KEY]` (set by a service
    from its settings), else the process's settings."""
    key = session.info.get(SESSION_KEY)
    return key if isinstance(key, AuditKey) else audit_key_from_settings()


def _check_key(session: Session, key: AuditKey) -> None:
    """Refuse to extend a chain written under another key (it could never verify); the first writer
    records its key's fingerprint."""
    row = session.get(RegistryMeta, AUDIT_KEY_ID)
    if row is None:
        session.add(RegistryMeta(key=AUDIT_KEY_ID, value=key.key_id))
        session.flush()
    elif row.value != key.key_id:
        raise AuditKeyMismatch(
            f"the audit chain was written under audit key {row.value}, but this process holds key "
            f"{key.key_id} ({key.source}); set APA_AUDIT_KEY to the key it was written with"
        )


# --- appending ---------------------------------------------------------------------------------------


@dataclass
class _ChainState:
    """The chain as this transaction holds it: locked since `transaction` began (the root
    transaction of the session), with the head as of the newest row this session appended."""

    transaction: SessionTransaction
    head: AuditHead
    last_id: int
    last_hash: str
    key: AuditKey | None = None
    """The audit key, checked against the chain's once per transaction."""
    checked: set[str] = field(default_factory=set)
    """What other checks this transaction made once (`mark_checked`)."""
    cache: dict[str, Any] = field(default_factory=dict)
    """Registry rows read under the lock (`held_cache`)."""


def _held(session: Session) -> _ChainState | None:
    """The chain state when this session holds the lock in its current root transaction."""
    state = session.info.get(CHAIN_STATE)
    if not isinstance(state, _ChainState):
        return None
    root = session.get_transaction()
    if root is None or root is not state.transaction or not root.is_active:
        session.info.pop(CHAIN_STATE, None)
        return None
    return state


@sa_event.listens_for(Session, "after_soft_rollback")
def _forget_on_rollback(session: Session, _previous: SessionTransaction) -> None:
    """Any rollback, a savepoint's included, may undo appended rows (and a lock taken inside the
    savepoint): the next writer locks and reads the head again."""
    session.info.pop(CHAIN_STATE, None)


@sa_event.listens_for(Session, "after_transaction_end")
def _forget_on_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the root transaction: the lock is gone with it
        session.info.pop(CHAIN_STATE, None)


def lock_chain(session: Session, *, keep_cache: bool = False) -> AuditHead:
    """Take the chain lock for the rest of the transaction (it serialises every registry writer)
    and return the head as committed by the previous holder (and extended by this transaction).

    The lock is taken and the head read once per transaction: later calls in the same transaction
    (a consumer's batch of erasures) cost no statement. A rollback, a savepoint's included, makes
    the next call lock and read again. A later call also empties `held_cache` unless `keep_cache`
    (the erasures that fill it): whatever else the caller is about to change is not cached."""
    state = _held(session)
    if state is not None:
        if not keep_cache:
            state.cache.clear()
        set_committed_value(state.head, "last_id", state.last_id)
        set_committed_value(state.head, "last_hash", state.last_hash)
        return state.head
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
    head = session.scalars(
        select(AuditHead).where(AuditHead.id == HEAD_ID).execution_options(populate_existing=True)
    ).one_or_none()
    if head is None:
        raise RuntimeError("audit_head row missing: run `apa db upgrade` on this database")
    root = session.get_transaction()
    assert root is not None  # the statements above began it
    session.info[CHAIN_STATE] = _ChainState(root, head, head.last_id, head.last_hash)
    return head


def was_checked(session: Session, what: str) -> bool:
    """True when `mark_checked(what)` was called in this transaction, under the chain lock."""
    state = _held(session)
    return state is not None and what in state.checked


def mark_checked(session: Session, what: str) -> None:
    """Remember for the rest of this transaction that `what` was checked (only under the lock)."""
    state = _held(session)
    if state is not None:
        state.checked.add(what)


def held_cache(session: Session) -> dict[str, Any] | None:
    """A dict that lives while this session holds the chain lock in its current transaction, None
    when it does not. Any rollback (a savepoint's included) and the transaction's end drop it. What
    only lock holders write can be kept in it: no other transaction changes it meanwhile."""
    state = _held(session)
    return None if state is None else state.cache


def lock_is_fresh(session: Session) -> bool:
    """True unless this session already holds the chain lock in its current transaction (then what
    it read since is current: every other writer waits for the lock)."""
    return _held(session) is None


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
    Rows outlive every erasure: they name users, samples and interactions by pseudonym only.

    The row is added to the session, not flushed: the session inserts its pending rows in the order
    they were appended at its next flush (several in one statement), and the database's trigger
    checks that each extends the head. The head this transaction extends is kept in memory."""
    state = _held(session)
    if state is None:
        lock_chain(session)
        state = _held(session)
        assert state is not None
    key = state.key
    if key is None:
        key = chain_key(session)
        _check_key(session, key)
        state.key = key
    # Normalise the payload to what the JSON column gives back (lists, str keys, no NaN).
    normalised = json_roundtrip(payload or {})
    row = AuditLog(
        id=state.last_id + 1,
        ts=now or utcnow(),
        event_type=event_type,
        request_id=request_id,
        user_pid=user_pid,
        shard_id=shard_id,
        adapter_version_id=adapter_version_id,
        payload=normalised,
        prev_hash=state.last_hash,
    )
    row.hash = compute_hash(row.prev_hash, row_content(row), key)
    session.add(row)
    # The database's trigger moves audit_head with the insert; mirror it without an UPDATE.
    state.last_id, state.last_hash = row.id, row.hash
    set_committed_value(state.head, "last_id", row.id)
    set_committed_value(state.head, "last_hash", row.hash)
    return row


# --- verification ----------------------------------------------------------------------------------

ProblemKind = Literal["row", "head", "key", "anchor", "erasure", "adapter", "sample"]


@dataclass(frozen=True)
class Problem:
    """One finding of `verify`: a broken audit row or head, a wrong key, an anchor the log no
    longer matches, or registry state that contradicts the log (an erasure, adapter or sample)."""

    kind: ProblemKind
    subject: str
    """The audit row id, anchor (`#<sequence>@<time>`), erasure request id, adapter version
    (`<shard>@v<version>`) or sample (`<model>/<pid>`) the problem is about."""
    reason: str

    def __str__(self) -> str:
        label = {
            "row": "audit row",
            "head": "audit head",
            "key": "audit key",
            "anchor": "anchor",
            "erasure": "erasure",
            "adapter": "adapter",
            "sample": "sample",
        }[self.kind]
        return f"{label} {self.subject}: {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of `verify`: ok, or the problems found (chain problems first)."""

    rows_checked: int
    head_hash: str
    adapters_checked: int
    problems: list[Problem] = field(default_factory=list)
    erasures_checked: int = 0
    anchors_checked: int = 0
    last_anchor: int | None = None
    """Sequence of the newest anchor checked (None: no anchors were checked)."""
    key_id: str = ""

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

    def first(self, kind: ProblemKind) -> Problem | None:
        """The first problem of `kind`."""
        return next((p for p in self.problems if p.kind == kind), None)

    @property
    def bad_adapter(self) -> str | None:
        """The first serving adapter (`<shard>@v<version>`) that contradicts the log or an erasure."""
        problem = self.first("adapter")
        return problem.subject if problem else None

    def summary(self) -> str:
        if self.ok:
            anchored = (
                f"; {self.anchors_checked} anchors match (newest: row {self.last_anchor})"
                if self.anchors_checked
                else "; no anchors checked (pass --anchors to detect a cut-back log)"
            )
            return (
                f"OK: {self.rows_checked} audit rows chain to head {self.head_hash[:16]}... under audit key "
                f"{self.key_id}, {self.erasures_checked} erasures in force, {self.adapters_checked} serving "
                f"adapters registered in the log and free of erased samples{anchored}"
            )
        return f"FAILED: {self.problems[0]}" + (
            f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        )


@dataclass
class LogFacts:
    """What the log says the registry's state must be, collected while the chain is verified."""

    requests: dict[str, tuple[int, str | None, str | None]] = field(default_factory=dict)
    """request id -> (row of erasure_received, user pseudonym, scope)."""
    excluded_requests: dict[str, int] = field(default_factory=dict)
    """request id -> row of erasure_excluded."""
    confirmed_requests: dict[str, int] = field(default_factory=dict)
    """request id -> row of replicas_confirmed."""
    erased_samples: dict[tuple[str, str], tuple[int, str | None, str | None]] = field(default_factory=dict)
    """(model id, sample pseudonym) -> (row of samples_erased, request id, content HMAC)."""
    excluded_versions: dict[int, int] = field(default_factory=dict)
    """adapter version id -> row of the shard_stale that excluded it."""
    registrations: dict[int, tuple[int, str | None, dict[str, Any]]] = field(default_factory=dict)
    """adapter version id -> (row of adapter_registered, shard id, payload)."""
    anchored_hashes: dict[int, str] = field(default_factory=dict)
    """row id -> hash, for the rows an anchor names."""
    last_id: int = 0
    """Id of the newest row."""

    def collect(self, row: AuditLog) -> None:
        payload = row.payload if isinstance(row.payload, dict) else {}
        kind = row.event_type
        if kind == "erasure_received" and row.request_id is not None:
            self.requests.setdefault(row.request_id, (row.id, row.user_pid, payload.get("scope")))
        elif kind == "erasure_excluded" and row.request_id is not None:
            self.excluded_requests.setdefault(row.request_id, row.id)
        elif kind == "replicas_confirmed" and row.request_id is not None:
            self.confirmed_requests.setdefault(row.request_id, row.id)
        elif kind == "samples_erased":
            for sample in payload.get("samples") or []:
                if isinstance(sample, dict) and sample.get("model_id") and sample.get("sample_pid"):
                    where = (str(sample["model_id"]), str(sample["sample_pid"]))
                    self.erased_samples.setdefault(
                        where, (row.id, row.request_id, sample.get("content_hmac"))
                    )
        elif kind == "shard_stale" and row.adapter_version_id is not None:
            self.excluded_versions.setdefault(row.adapter_version_id, row.id)
        elif kind == "adapter_registered" and row.adapter_version_id is not None:
            self.registrations[row.adapter_version_id] = (row.id, row.shard_id, payload)


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


def verify_chain(
    session: Session,
    key: AuditKey | None = None,
    *,
    legacy_rows: int = 0,
    facts: LogFacts | None = None,
) -> tuple[int, str, list[Problem]]:
    """Recompute the chain with the audit key: (rows checked, head hash, problems). Rows
    1..`legacy_rows` are checked as plain sha256. `facts`, when given, collects what the log says."""
    key = key or chain_key(session)
    problems: list[Problem] = []
    recorded = session.get(RegistryMeta, AUDIT_KEY_ID, populate_existing=True)
    if recorded is not None and recorded.value != key.key_id:
        problems.append(
            Problem(
                "key",
                recorded.value,
                f"the chain was written under audit key {recorded.value}, this process holds "
                f"{key.key_id} ({key.source}): set APA_AUDIT_KEY to the chain's key",
            )
        )
    migrated = session.get(RegistryMeta, LEGACY_ROWS)
    if migrated is not None and migrated.value.isdigit() and int(migrated.value) != legacy_rows:
        problems.append(
            Problem(
                "key",
                "legacy rows",
                f"migration 0005 found {migrated.value} unkeyed rows, but APA_AUDIT_LEGACY_ROWS is "
                f"{legacy_rows}: set it to the number the migration printed",
            )
        )
    expected_id, prev_hash, count = 1, GENESIS_HASH, 0
    row_problems = 0
    for row in _iter_rows(session):
        count += 1
        if facts is not None:
            facts.collect(row)
            facts.last_id = row.id
            if row.id in facts.anchored_hashes:
                facts.anchored_hashes[row.id] = row.hash
        if row_problems >= MAX_PROBLEMS:
            expected_id, prev_hash = row.id + 1, row.hash
            continue
        if row.id != expected_id:
            missing = f"{expected_id}" if row.id == expected_id + 1 else f"{expected_id}..{row.id - 1}"
            problems.append(
                Problem("row", str(expected_id), f"missing (next row is {row.id}): rows {missing} deleted")
            )
            row_problems += 1
        elif row.prev_hash != prev_hash:
            problems.append(Problem("row", str(row.id), "prev_hash does not match the previous row's hash"))
            row_problems += 1
        row_key = None if row.id <= legacy_rows else key
        if compute_hash(row.prev_hash, row_content(row), row_key) != row.hash:
            what = "sha256 (a legacy row)" if row_key is None else "HMAC under the audit key"
            problems.append(
                Problem(
                    "row",
                    str(row.id),
                    f"content does not match its {what}: the row was modified or forged without the key",
                )
            )
            row_problems += 1
        expected_id, prev_hash = row.id + 1, row.hash
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


def _shown(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def verify_served_adapters(session: Session, facts: LogFacts | None = None) -> tuple[int, list[Problem]]:
    """Check every adapter version in state serving: its stored manifest matches its digest and
    names no erased sample (by pseudonym) of its model, erased by the registry's state or by the
    log; with `facts`, it was registered in the log as it is now and was never excluded. Also
    checks that erased samples kept nothing in clear: no record, no label, no interactions."""
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
    if facts is not None:
        for model_id, sample_pid in facts.erased_samples:
            if model_id in erased:
                erased[model_id].add(sample_pid)
    for version, model_id in serving:
        name = f"{version.shard_id}@v{version.version}"
        if facts is not None:
            problem = _registration_problem(version, facts)
            if problem:
                problems.append(Problem("adapter", name, problem))
        if manifest_digest(version.manifest) != version.manifest_digest:
            problems.append(Problem("adapter", name, "stored manifest does not match its manifest digest"))
            continue
        hit = sorted(erased[model_id].intersection(version.manifest.get("sample_pids", [])))
        if hit:
            problems.append(
                Problem(
                    "adapter",
                    name,
                    f"serving, but its manifest contains {len(hit)} erased samples: {_shown(hit)}",
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


def _registration_problem(version: AdapterVersion, facts: LogFacts) -> str | None:
    """Why a serving adapter version contradicts the log (None: it does not)."""
    if version.id in facts.excluded_versions:
        return f"serving, but audit row {facts.excluded_versions[version.id]} excluded it (an erasure hit its data)"
    registered = facts.registrations.get(version.id)
    if registered is None:
        return "serving, but its registration is not in the audit log"
    row_id, shard_id, payload = registered
    now = {
        "shard_id": version.shard_id,
        "version": version.version,
        "adapter_sha256": version.adapter_sha256,
        "manifest_digest": version.manifest_digest,
    }
    then = {
        "shard_id": shard_id,
        "version": payload.get("version"),
        "adapter_sha256": payload.get("adapter_sha256"),
        "manifest_digest": payload.get("manifest_digest"),
    }
    changed = [k for k in now if now[k] != then[k]]
    if changed:
        return f"serving, but its {', '.join(changed)} differ from its registration at audit row {row_id}"
    return None


def verify_erasures(session: Session, facts: LogFacts) -> tuple[int, list[Problem]]:
    """Cross-check the registry's erasure state against the log: every erasure recorded in the
    log is still in force (request present, excluded, its user and samples still erased), no
    erased sample is live again (by pseudonym or by the keyed digest of its record), every
    erasure request of the registry was recorded in the log, and a request is replica-confirmed in
    the registry exactly when the log recorded its confirmation."""
    problems: list[Problem] = []
    state = {
        r.request_id: r
        for r in session.scalars(select(ErasureRequest).execution_options(populate_existing=True))
    }
    for request_id, (row_id, user_pid, scope) in facts.requests.items():
        request = state.get(request_id)
        if request is None:
            problems.append(
                Problem(
                    "erasure",
                    request_id,
                    f"recorded at audit row {row_id}, but its erasure_requests row is gone: "
                    "the erasure is no longer in force",
                )
            )
            continue
        if request.user_pid != user_pid or (scope is not None and request.scope != scope):
            problems.append(
                Problem("erasure", request_id, f"user or scope differ from its record at audit row {row_id}")
            )
        excluded_row = facts.excluded_requests.get(request_id)
        if excluded_row is not None and request.excluded_at is None:
            problems.append(
                Problem(
                    "erasure",
                    request_id,
                    f"excluded at audit row {excluded_row}, but the registry says it never was",
                )
            )
        confirmed_row = facts.confirmed_requests.get(request_id)
        if confirmed_row is not None and request.replicas_confirmed_at is None:
            problems.append(
                Problem(
                    "erasure",
                    request_id,
                    f"replica-confirmed at audit row {confirmed_row}, but the registry says it never was",
                )
            )
        if confirmed_row is None and request.replicas_confirmed_at is not None:
            problems.append(
                Problem(
                    "erasure",
                    request_id,
                    "marked replica-confirmed, but no replicas_confirmed row is in the log: no heartbeat "
                    "confirmed it",
                )
            )
        if request.scope == "user":
            user = session.get(User, request.user_pid)
            if user is None or user.erased_at is None:
                problems.append(
                    Problem(
                        "erasure",
                        request_id,
                        f"whole-user erasure recorded at audit row {row_id}, but the user is no longer "
                        "marked erased",
                    )
                )
    for request_id in sorted(set(state) - set(facts.requests)):
        problems.append(
            Problem(
                "erasure", request_id, "in erasure_requests, but its erasure_received row is not in the log"
            )
        )

    erased_hmacs = {
        hmac_: (row_id, where)
        for where, (row_id, _request_id, hmac_) in facts.erased_samples.items()
        if hmac_ is not None
    }
    seen: set[tuple[str, str]] = set()
    sample_rows = session.execute(
        select(
            Sample.model_id,
            Sample.sample_pid,
            Sample.erased,
            Sample.content_hmac,
            Sample.text.is_not(None) | Sample.label.is_not(None) | Sample.interaction_pids.is_not(None),
        ).order_by(Sample.id)
    )
    back: list[Problem] = []
    for model_id, sample_pid, erased, content_hmac, has_record in sample_rows:
        where = (model_id, sample_pid)
        logged = facts.erased_samples.get(where)
        if logged is not None:
            seen.add(where)
            if not erased or has_record:
                back.append(
                    Problem(
                        "sample",
                        f"{model_id}/{sample_pid}",
                        f"erased at audit row {logged[0]} (request {logged[1]}), but it is back in samples",
                    )
                )
        elif not erased and content_hmac in erased_hmacs:
            row_id, (other_model, other_pid) = erased_hmacs[content_hmac]
            back.append(
                Problem(
                    "sample",
                    f"{model_id}/{sample_pid}",
                    f"holds the record of sample {other_model}/{other_pid}, erased at audit row {row_id}",
                )
            )
    for where in sorted(set(facts.erased_samples) - seen):
        row_id, erasing_request, _ = facts.erased_samples[where]
        back.append(
            Problem(
                "sample",
                f"{where[0]}/{where[1]}",
                f"erased at audit row {row_id} (request {erasing_request}), but its row is gone from samples",
            )
        )
    if len(back) > MAX_PROBLEMS:
        extra = len(back) - MAX_PROBLEMS
        back = back[:MAX_PROBLEMS] + [Problem("sample", "...", f"{extra} more samples contradict the log")]
    return len(facts.requests), problems + back


def verify(
    session: Session,
    *,
    key: AuditKey | None = None,
    anchors: Sequence[Anchor] | None = None,
    public_key: PublicKey | None = None,
    legacy_rows: int | None = None,
) -> VerifyResult:
    """Recompute the keyed chain, check it against `anchors` (signed by `public_key`; default: the
    signing key of the settings), and cross-check the registry's state against the log."""
    from apa.settings import Settings

    key = key or chain_key(session)
    if legacy_rows is None:
        legacy_rows = Settings.from_env().audit_legacy_rows
    facts = LogFacts()
    registry_id = registry_identity(session)
    anchor_list = list(anchors or [])
    for anchor in anchor_list:
        if anchor.registry_id == registry_id and anchor.sequence > 0:
            facts.anchored_hashes[anchor.sequence] = ""
    rows, head_hash, problems = verify_chain(session, key, legacy_rows=legacy_rows, facts=facts)
    anchor_problems: list[Problem] = []
    checked, newest = 0, None
    if anchors is not None:
        from apa.anchors import check_anchors

        checked, newest, anchor_problems = check_anchors(
            anchor_list, registry_id, facts.last_id, facts.anchored_hashes, key, public_key
        )
    erasures, erasure_problems = verify_erasures(session, facts)
    adapters, adapter_problems = verify_served_adapters(session, facts)
    return VerifyResult(
        rows,
        head_hash,
        adapters,
        problems + anchor_problems + erasure_problems + adapter_problems,
        erasures_checked=erasures,
        anchors_checked=checked,
        last_anchor=newest,
        key_id=key.key_id,
    )


def registry_identity(session: Session) -> str:
    """This registry's id (registry_meta `registry_id`, written by migration 0005)."""
    row = session.get(RegistryMeta, REGISTRY_ID)
    return row.value if row is not None else ""


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


def verify_command(anchors: str | None = None, public_key: str | None = None, url: str | None = None) -> int:
    """Verify the keyed chain, the anchors and the registry's state against the log (exit 1 on a problem).

    Needs APA_AUDIT_KEY (the chain's key). With --anchors, also proves that the log was not cut back
    or rewritten since the newest anchor: every anchor's row must still exist with the anchored hash.

    Args:
        anchors: where the anchors are: a file path (`file:PATH` or PATH), `kafka:` (APA_KAFKA_BOOTSTRAP
            and APA_AUDIT_ANCHOR_TOPIC) or `kafka://host:port[,host:port]/topic`.
        public_key: file with the public key that signed the anchors (default: that of APA_SIGNING_KEY).
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.anchors import AnchorSourceError, read_anchors
    from apa.db.session import check_schema, make_engine, make_sessionmaker
    from apa.settings import Settings

    settings = Settings.from_env()
    loaded = None
    problems: list[str] = []
    if anchors is not None:
        try:
            loaded, problems = read_anchors(anchors, settings)
        except AnchorSourceError as exc:
            raise UserError(str(exc)) from exc
    engine = make_engine(url, settings=settings)
    try:
        check_schema(engine)
        with make_sessionmaker(engine)() as session:
            result = verify(
                session,
                key=audit_key_from_settings(settings),
                anchors=loaded,
                public_key=_public_key(public_key, settings),
                legacy_rows=settings.audit_legacy_rows,
            )
    finally:
        engine.dispose()
    print(result.summary())
    for problem in result.problems[1:]:
        print(f"  also: {problem}")
    for line in problems:
        print(f"  also: anchor source: {line}")
    return 0 if result.ok and not problems else 1


def _public_key(path: str | None, settings: Settings) -> PublicKey:
    from pathlib import Path

    from apa.signing import PublicKey, signing_key_from_settings

    if path is None:
        return signing_key_from_settings(settings).public
    try:
        return PublicKey.parse(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the public key {path}: {exc}") from exc


def show_command(limit: int = 20, url: str | None = None) -> int:
    """Show the newest audit rows.

    Args:
        limit: how many of the newest rows to print.
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.db.session import check_schema, make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        check_schema(engine)
        with make_sessionmaker(engine)() as session:
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


def anchor_command(anchors: list[str] | None = None, url: str | None = None) -> int:
    """Anchor the chain head now: write a signed (sequence, hash, time) outside the database.

    Writes to every sink given, else to those the settings configure (APA_AUDIT_ANCHOR_FILE, and the
    topic APA_AUDIT_ANCHOR_TOPIC when APA_KAFKA_BOOTSTRAP is set). Refuses to anchor a chain that
    does not verify since the previous anchor.

    Args:
        anchors: sinks, e.g. --anchors anchors.jsonl --anchors kafka: (same forms as `verify --anchors`).
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.anchors import AnchorError, anchor_now, configured_sinks, sink_for
    from apa.db.session import check_schema, make_engine
    from apa.settings import Settings
    from apa.signing import signing_key_from_settings

    settings = Settings.from_env()
    try:
        sinks = [sink_for(s, settings) for s in anchors] if anchors else configured_sinks(settings)
    except AnchorError as exc:
        raise UserError(str(exc)) from exc
    if not sinks:
        raise UserError(
            "no anchor sink: pass --anchors PATH or kafka:, or set APA_AUDIT_ANCHOR_FILE / APA_KAFKA_BOOTSTRAP"
        )
    engine = make_engine(url, settings=settings)
    try:
        check_schema(engine)
        try:
            anchor = anchor_now(
                engine, sinks, signing_key_from_settings(settings), audit_key_from_settings(settings)
            )
        except AnchorError as exc:
            raise UserError(str(exc)) from exc
    finally:
        engine.dispose()
    print(
        f"anchored row {anchor.sequence} (hash {anchor.hash[:16]}...) at {anchor.anchored_at} to "
        f"{', '.join(s.name for s in sinks)}"
    )
    return 0


def check_receipt_command(file: str, public_key: str | None = None) -> int:
    """Check an erasure receipt offline: its signature, its anchor and its consistency (exit 1 if not valid).

    Needs no database and no secret. Without --public-key the key embedded in the receipt is used;
    compare its id with the one the controller published.

    Args:
        file: the receipt (JSON from GET /erasures/{id}/receipt).
        public_key: file with the controller's published public key (PEM, base64 or hex).
    """
    from pathlib import Path

    from apa.receipts import check_receipt
    from apa.signing import PublicKey

    try:
        document = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the receipt {file}: {exc}") from exc
    key = None
    if public_key is not None:
        try:
            key = PublicKey.parse(Path(public_key).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the public key {public_key}: {exc}") from exc
    result = check_receipt(document, key)
    for line in result.lines():
        print(line)
    return 0 if result.ok else 1


def public_key_command(pem: bool = True) -> int:
    """Print the public key that checks receipts and anchors (publish it for regulators).

    Args:
        pem: PEM (default) or, with --no-pem, base64 of the 32 raw bytes.
    """
    from apa.signing import signing_key_from_settings

    key = signing_key_from_settings().public
    print(key.pem().strip() if pem else key.b64)
    print(f"key id {key.key_id}", file=sys.stderr)
    return 0


def audit_command() -> int:
    """Verify the audit trail, anchor it, show it, check an erasure receipt offline.

    Sub-commands: `verify [--anchors SOURCE]`, `anchor`, `show`, `check-receipt FILE`, `public-key`,
    `deadlines [--within-days N]` (erasure requests overdue or due soon).
    """
    return 0


from apa.deadlines import deadlines_command  # noqa: E402 - a sub-command of `apa audit`

audit_command.subcommands = {  # type: ignore[attr-defined]
    "verify": verify_command,
    "anchor": anchor_command,
    "show": show_command,
    "check-receipt": check_receipt_command,
    "public-key": public_key_command,
    "deadlines": deadlines_command,
}
