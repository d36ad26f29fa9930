"""Anchors of the audit chain: signed copies of its head (sequence, hash, time) kept outside the
database, so that cutting the log back or rebuilding it is detected (docs/ARCHITECTURE.md §7).

An anchor says "at `anchored_at`, row `sequence` of registry `registry_id` had hash `hash`". It is
signed with the Ed25519 signing key (`apa.signing`), so anyone holding the public key can check it,
and written to one or more sinks:

* a JSON Lines file opened for append only (`file:PATH` or `PATH`; on Linux make it `chattr +a`,
  or put it on a WORM/object-lock store);
* a Kafka topic (`kafka:` = APA_KAFKA_BOOTSTRAP + APA_AUDIT_ANCHOR_TOPIC, or
  `kafka://host:port[,host:port]/topic`), keyed by registry id.

`anchor_now` writes one (`apa audit anchor`, `AnchorScheduler` in the registry service every
`audit_anchor_interval_s`); `read_anchors` + `check_anchors` are what `apa audit verify --anchors`
uses: every anchor's row must still exist with the anchored hash, and the log must reach the newest
anchor. The registry also keeps its own copy in `audit_anchors` (to find the anchor covering a
receipt); verification never trusts that copy.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.db import audit
from apa.db.models import AuditAnchor, AuditLog
from apa.settings import Settings
from apa.signing import PublicKey, SigningKey

log = logging.getLogger(__name__)

ANCHOR_FORMAT = "apa.audit-anchor/1"
_HEX = set("0123456789abcdef")


class AnchorError(RuntimeError):
    """An anchor could not be written, or a sink is misconfigured."""


class AnchorSourceError(AnchorError):
    """Anchors could not be read from a source."""


@dataclass(frozen=True)
class Anchor:
    """A signed statement of the chain head."""

    registry_id: str
    sequence: int
    """Id of the newest audit row (0: the empty chain)."""
    hash: str
    anchored_at: str
    audit_key_id: str
    """Fingerprint of the audit key the chain is written with."""
    key_id: str = ""
    """Fingerprint of the Ed25519 key that signed it."""
    signature: str = ""
    """Base64 Ed25519 signature of the canonical JSON of `body()`."""

    def body(self) -> dict[str, Any]:
        return {
            "format": ANCHOR_FORMAT,
            "registry_id": self.registry_id,
            "sequence": self.sequence,
            "hash": self.hash,
            "anchored_at": self.anchored_at,
            "audit_key_id": self.audit_key_id,
        }

    def message(self) -> bytes:
        return audit.canonical_json(self.body()).encode("ascii")

    def signed(self, key: SigningKey) -> Anchor:
        return replace(self, key_id=key.key_id, signature=key.sign(self.message()))

    def signature_ok(self, public_key: PublicKey) -> bool:
        return self.key_id == public_key.key_id and public_key.verify(self.message(), self.signature)

    @property
    def label(self) -> str:
        """How problems name it: `#<sequence>@<time>`."""
        return f"#{self.sequence}@{self.anchored_at}"

    def to_json(self) -> dict[str, Any]:
        return {
            **self.body(),
            "signature": {"alg": "Ed25519", "key_id": self.key_id, "value": self.signature},
        }

    @classmethod
    def from_json(cls, data: object) -> Anchor:
        """Parse an anchor; ValueError naming the field when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("an anchor must be a JSON object")
        if data.get("format") != ANCHOR_FORMAT:
            raise ValueError(f"format must be {ANCHOR_FORMAT!r}")
        sequence = data.get("sequence")
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
            raise ValueError("sequence must be a non-negative integer")
        hash_ = data.get("hash")
        if not isinstance(hash_, str) or len(hash_) != 64 or not set(hash_) <= _HEX:
            raise ValueError("hash must be 64 lowercase hex digits")
        fields = {}
        for name in ("registry_id", "anchored_at", "audit_key_id"):
            value = data.get(name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            fields[name] = value
        signature = data.get("signature")
        if not isinstance(signature, dict):
            raise ValueError("signature must be an object")
        key_id, value = signature.get("key_id"), signature.get("value")
        if not isinstance(key_id, str) or not isinstance(value, str):
            raise ValueError("signature must hold key_id and value strings")
        return cls(sequence=sequence, hash=hash_, key_id=key_id, signature=value, **fields)


# --- sinks -------------------------------------------------------------------------------------------


class AnchorSink(Protocol):
    """Where anchors are written, and read back by `verify`."""

    @property
    def name(self) -> str: ...

    def write(self, anchor: Anchor) -> None: ...

    def read(self) -> tuple[list[Anchor], list[str]]:
        """The anchors, oldest first, and a line for each entry that could not be parsed."""
        ...


@dataclass(frozen=True)
class FileAnchorSink:
    """A JSON Lines file, only ever appended to (O_APPEND, fsync after each anchor)."""

    path: Path

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def write(self, anchor: Anchor) -> None:
        line = (json.dumps(anchor.to_json(), sort_keys=True) + "\n").encode("ascii")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AnchorError(f"cannot append the anchor to {self.path}: {exc}") from exc

    def read(self) -> tuple[list[Anchor], list[str]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise AnchorSourceError(f"anchor file {self.path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AnchorSourceError(f"cannot read the anchor file {self.path}: {exc}") from exc
        return _parse_all((f"{self.path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip())


@dataclass(frozen=True)
class KafkaAnchorSink:
    """A Kafka topic, keyed by registry id (acks from all in-sync replicas)."""

    bootstrap: str
    topic: str
    timeout_s: float = 30.0

    @property
    def name(self) -> str:
        return f"kafka://{self.bootstrap}/{self.topic}"

    def write(self, anchor: Anchor) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        from apa.kafka import bootstrap_servers

        try:
            producer = KafkaProducer(
                bootstrap_servers=bootstrap_servers(self.bootstrap),
                acks="all",
                max_block_ms=int(self.timeout_s * 1000),
            )
        except (KafkaError, OSError) as exc:
            raise AnchorError(f"cannot reach Kafka at {self.bootstrap}: {exc!r}") from exc
        try:
            value = json.dumps(anchor.to_json(), sort_keys=True).encode("ascii")
            producer.send(self.topic, key=anchor.registry_id.encode(), value=value).get(
                timeout=self.timeout_s
            )
        except (KafkaError, OSError) as exc:
            raise AnchorError(f"cannot publish the anchor on {self.name}: {exc!r}") from exc
        finally:
            producer.close(timeout=self.timeout_s)

    def read(self) -> tuple[list[Anchor], list[str]]:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        from apa.kafka import bootstrap_servers

        try:
            consumer = KafkaConsumer(
                bootstrap_servers=bootstrap_servers(self.bootstrap),
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=int(self.timeout_s * 1000) + 1000,
            )
        except (KafkaError, OSError) as exc:
            raise AnchorSourceError(f"cannot reach Kafka at {self.bootstrap}: {exc!r}") from exc
        entries: list[tuple[str, str]] = []
        try:
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise AnchorSourceError(f"topic {self.topic} does not exist on {self.bootstrap}")
            assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            end = consumer.end_offsets(assigned)
            records: list[Any] = []
            deadline = datetime.now(UTC).timestamp() + self.timeout_s
            while any(consumer.position(tp) < end[tp] for tp in assigned):
                if datetime.now(UTC).timestamp() > deadline:
                    raise AnchorSourceError(f"reading {self.name} took longer than {self.timeout_s:.0f} s")
                for batch in consumer.poll(timeout_ms=1000).values():
                    records.extend(batch)
            records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
            for record in records:
                where = f"{self.name} partition {record.partition} offset {record.offset}"
                entries.append((where, (record.value or b"").decode("utf-8", errors="replace")))
        except KafkaError as exc:
            raise AnchorSourceError(f"cannot read {self.name}: {exc!r}") from exc
        finally:
            consumer.close()
        return _parse_all(entries)


def _parse_all(entries: Any) -> tuple[list[Anchor], list[str]]:
    anchors: list[Anchor] = []
    problems: list[str] = []
    for where, line in entries:
        try:
            anchors.append(Anchor.from_json(json.loads(line)))
        except ValueError as exc:  # JSONDecodeError is a ValueError
            problems.append(f"{where}: not an anchor ({exc})")
    return anchors, problems


def sink_for(source: str, settings: Settings) -> AnchorSink:
    """The sink a source string names: `kafka:`, `kafka://host:port/topic`, `file:PATH` or `PATH`."""
    if source == "kafka:" or source == "kafka":
        if not settings.kafka_bootstrap:
            raise AnchorError("`kafka:` needs APA_KAFKA_BOOTSTRAP")
        return KafkaAnchorSink(
            settings.kafka_bootstrap, settings.audit_anchor_topic, settings.kafka_timeout_s
        )
    if source.startswith("kafka://"):
        bootstrap, _, topic = source[len("kafka://") :].partition("/")
        if not bootstrap:
            raise AnchorError(f"{source!r}: expected kafka://host:port[,host:port]/topic")
        return KafkaAnchorSink(bootstrap, topic or settings.audit_anchor_topic, settings.kafka_timeout_s)
    path = source[len("file:") :] if source.startswith("file:") else source
    if not path:
        raise AnchorError("an anchor file path is empty")
    return FileAnchorSink(Path(path))


def configured_sinks(settings: Settings) -> list[AnchorSink]:
    """The sinks the settings name: APA_AUDIT_ANCHOR_FILE, and the Kafka topic when Kafka is set."""
    sinks: list[AnchorSink] = []
    if settings.audit_anchor_file:
        sinks.append(FileAnchorSink(Path(settings.audit_anchor_file)))
    if settings.kafka_bootstrap:
        sinks.append(
            KafkaAnchorSink(settings.kafka_bootstrap, settings.audit_anchor_topic, settings.kafka_timeout_s)
        )
    return sinks


def read_anchors(source: str, settings: Settings) -> tuple[list[Anchor], list[str]]:
    """The anchors of `source` (see `sink_for`) and the entries that could not be parsed."""
    try:
        sink = sink_for(source, settings)
    except AnchorError as exc:
        raise AnchorSourceError(str(exc)) from exc
    return sink.read()


# --- writing -----------------------------------------------------------------------------------------


def _chain_since(session: Session, since: int, key: audit.AuditKey, legacy_rows: int) -> str | None:
    """Why the rows after `since` do not chain (None: they do, up to the head)."""
    prev = session.scalars(select(AuditLog.hash).where(AuditLog.id == since)).first() if since else None
    prev_hash = prev if prev is not None else audit.GENESIS_HASH
    if since and prev is None:
        return f"row {since} of the previous anchor is gone"
    expected = since + 1
    for row in session.scalars(select(AuditLog).where(AuditLog.id > since).order_by(AuditLog.id)):
        row_key = None if row.id <= legacy_rows else key
        if row.id != expected or row.prev_hash != prev_hash:
            return f"row {expected} is missing or does not link"
        if audit.compute_hash(row.prev_hash, audit.row_content(row), row_key) != row.hash:
            return f"row {row.id} does not match its HMAC"
        expected, prev_hash = row.id + 1, row.hash
    return None


def anchor_now(
    engine: Engine,
    sinks: Sequence[AnchorSink],
    signer: SigningKey,
    key: audit.AuditKey,
    *,
    legacy_rows: int | None = None,
) -> Anchor:
    """Anchor the current head in every sink and record it in `audit_anchors`.

    Refuses (AnchorError) when the chain does not verify since the registry's previous anchor (it
    never blesses a rewritten log) or when a sink cannot be written (the anchor is recorded only
    when every sink took it)."""
    from apa.db.session import make_sessionmaker

    if legacy_rows is None:
        legacy_rows = Settings.from_env().audit_legacy_rows
    with make_sessionmaker(engine)() as session, session.begin():
        head = audit.lock_chain(session)
        previous = session.scalars(select(AuditAnchor).order_by(AuditAnchor.sequence.desc()).limit(1)).first()
        since = 0
        if previous is not None:
            if previous.sequence > head.last_id:
                raise AnchorError(
                    f"the log ends at row {head.last_id}, but row {previous.sequence} was anchored at "
                    f"{audit.format_ts(previous.anchored_at)}: the log was cut back; run `apa audit verify`"
                )
            row_hash = session.scalars(select(AuditLog.hash).where(AuditLog.id == previous.sequence)).first()
            if previous.sequence and row_hash != previous.hash:
                raise AnchorError(
                    f"row {previous.sequence} no longer has the hash anchored at "
                    f"{audit.format_ts(previous.anchored_at)}: the log was rewritten; run `apa audit verify`"
                )
            since = previous.sequence
        broken = _chain_since(session, since, key, legacy_rows)
        if broken:
            raise AnchorError(f"refusing to anchor: {broken}; run `apa audit verify`")
        anchor = Anchor(
            registry_id=audit.registry_identity(session),
            sequence=head.last_id,
            hash=head.last_hash,
            anchored_at=audit.format_ts(datetime.now(UTC)),
            audit_key_id=key.key_id,
        ).signed(signer)
        for sink in sinks:
            sink.write(anchor)
        session.add(
            AuditAnchor(
                sequence=anchor.sequence,
                hash=anchor.hash,
                anchored_at=datetime.fromisoformat(anchor.anchored_at),
                sinks=[s.name for s in sinks],
                document=anchor.to_json(),
            )
        )
    log.info("anchored audit row %d to %s", anchor.sequence, ", ".join(s.name for s in sinks))
    return anchor


def covering_anchor(session: Session, sequence: int) -> Anchor | None:
    """The registry's oldest recorded anchor of a row >= `sequence` (None: not anchored yet)."""
    row = session.scalars(
        select(AuditAnchor)
        .where(AuditAnchor.sequence >= sequence)
        .order_by(AuditAnchor.sequence, AuditAnchor.id)
        .limit(1)
    ).first()
    return Anchor.from_json(row.document) if row is not None else None


class AnchorScheduler:
    """Anchors the head every `interval_s` seconds in a daemon thread, when it moved since the last
    anchor (the registry service runs one per process)."""

    def __init__(
        self,
        engine: Engine,
        sinks: Sequence[AnchorSink],
        signer: SigningKey,
        key: audit.AuditKey,
        interval_s: float,
        *,
        legacy_rows: int | None = None,
    ) -> None:
        self.engine, self.sinks, self.signer, self.key = engine, list(sinks), signer, key
        self.interval_s = interval_s
        self.legacy_rows = legacy_rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apa-audit-anchors", daemon=True)
        self.last: Anchor | None = None

    def start(self) -> AnchorScheduler:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def tick(self) -> Anchor | None:
        """Anchor now if the head moved since this scheduler's last anchor."""
        from apa.db.models import AuditHead
        from apa.db.session import make_sessionmaker

        with make_sessionmaker(self.engine)() as session:
            head = session.get(AuditHead, audit.HEAD_ID)
            if head is None or (self.last is not None and self.last.sequence == head.last_id):
                return None
        self.last = anchor_now(self.engine, self.sinks, self.signer, self.key, legacy_rows=self.legacy_rows)
        return self.last

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:  # keep anchoring; a sink may come back
                log.error("audit anchor failed: %s", exc)


def check_anchors(
    anchors: Sequence[Anchor],
    registry_id: str,
    last_row: int,
    row_hashes: dict[int, str],
    key: audit.AuditKey,
    public_key: PublicKey | None,
) -> tuple[int, int | None, list[audit.Problem]]:
    """Check anchors against the log just verified (`last_row`: its newest row id; `row_hashes`: the
    hash of every anchored row). Returns (anchors checked, newest anchored sequence, problems)."""
    if public_key is None:
        from apa.signing import signing_key_from_settings

        public_key = signing_key_from_settings().public
    problems: list[audit.Problem] = []
    ours = [a for a in anchors if a.registry_id == registry_id]
    if anchors and not ours:
        others = sorted({a.registry_id for a in anchors})
        problems.append(
            audit.Problem(
                "anchor",
                "(none)",
                f"the source holds anchors of registries {', '.join(others)} but none of this registry "
                f"({registry_id or 'no registry_id'}): wrong source, or registry_meta was altered",
            )
        )
    checked, newest = 0, None
    for anchor in ours:
        if not anchor.signature_ok(public_key):
            problems.append(
                audit.Problem(
                    "anchor",
                    anchor.label,
                    f"signature does not verify under key {public_key.key_id}: forged or damaged",
                )
            )
            continue
        checked += 1
        newest = anchor.sequence if newest is None else max(newest, anchor.sequence)
        if anchor.audit_key_id != key.key_id:
            problems.append(
                audit.Problem("anchor", anchor.label, f"was made under audit key {anchor.audit_key_id}")
            )
        if anchor.sequence > last_row:
            problems.append(
                audit.Problem(
                    "anchor",
                    anchor.label,
                    f"row {anchor.sequence} was anchored at {anchor.anchored_at}, but the log now ends at "
                    f"row {last_row}: the log was cut back",
                )
            )
        elif anchor.sequence == 0:
            continue
        elif row_hashes.get(anchor.sequence) != anchor.hash:
            problems.append(
                audit.Problem(
                    "anchor",
                    anchor.label,
                    f"row {anchor.sequence} no longer has the hash anchored at {anchor.anchored_at}: "
                    "the log was rewritten",
                )
            )
    return checked, newest, problems


__all__ = [
    "ANCHOR_FORMAT",
    "Anchor",
    "AnchorError",
    "AnchorScheduler",
    "AnchorSink",
    "AnchorSourceError",
    "FileAnchorSink",
    "KafkaAnchorSink",
    "anchor_now",
    "check_anchors",
    "configured_sinks",
    "covering_anchor",
    "read_anchors",
    "sink_for",
]
