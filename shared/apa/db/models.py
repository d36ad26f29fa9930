"""Registry schema (SQLAlchemy 2.0 typed models). The schema only changes through `migrations/`.

Tables: `models`, `users`, `samples`, `interactions` (interaction -> samples holding it),
`shards`, `adapter_versions`, `erasure_requests`, `erasure_request_shards` (which shards an
erasure request waits on, and the adapter versions it excluded and got back), `replicas`,
`audit_log` (append-only, HMAC chained), `audit_head` (the chain's last id and hash, so that
deleting the newest rows is detected too; moved by the database only), `audit_anchors` (the
anchors of the head written outside the database), `registry_meta` (key fingerprints, the
registry's id), `outbox` (messages a relay publishes after the transaction that wrote them
committed), `retrain_tasks` (the ledger of shard retrain tasks: coalescing, redelivery, resume) and
`item_catalogue` (item id -> title per model, for the prompts of the inference service).

Personal data: every user, sample and interaction id column holds a keyed pseudonym (`*_pid`,
HMAC-SHA256 under `APA_PSEUDONYM_KEY`, see `apa.pseudonyms`), never the id itself. The only clear
data is a live sample's record (`samples.text`, and its `label`); an erasure deletes both and the
sample's interaction rows, so afterwards the registry holds nothing an id could be read from, and
an auditor holding a user's id finds their requests, samples and audit rows by recomputing the
pseudonym. A shard is `<model_id>/<k>` (k = the shard index of the model directory).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ShardState = Literal["serving", "stale", "retraining"]
"""serving: its current adapter may be used; stale: its data changed, adapter excluded; retraining:
stale and a retrain is running."""
SHARD_STATES: tuple[str, ...] = ("serving", "stale", "retraining")

AdapterState = Literal["serving", "excluded", "retired", "stale"]
"""serving: the shard's current adapter; excluded: withdrawn because an erasure hit its training
data; retired: replaced by a newer serving version; stale: registered after newer erasures hit the
shard (docs/ARCHITECTURE.md §5), never served."""
ADAPTER_STATES: tuple[str, ...] = ("serving", "excluded", "retired", "stale")

RequestStatus = Literal["received", "excluded", "retraining", "completed"]
REQUEST_STATUSES: tuple[str, ...] = ("received", "excluded", "retraining", "completed")

RequestOutcome = Literal["erased", "no_data_held"]
"""erased: the request reached data the registry held (now erased, or erased by an earlier request);
no_data_held: it matched nothing (an unknown user, or interactions no sample holds): completed at
once, and said so distinctly, so that a typo does not look like a normal success."""
REQUEST_OUTCOMES: tuple[str, ...] = ("erased", "no_data_held")

OutboxKind = Literal["event", "task"]
"""event: a Kafka message (destination = topic); task: a Celery task (destination = task name)."""
OUTBOX_KINDS: tuple[str, ...] = ("event", "task")

RetrainTaskState = Literal["queued", "started", "done", "failed", "lost"]
"""queued: written, not yet started by a worker (a shard with one gets no second: coalescing);
started: a worker runs it (heartbeat_at moves while it trains); done / failed: finished; lost:
its worker stopped heart-beating, `resume` queued a new task in its place."""
RETRAIN_TASK_STATES: tuple[str, ...] = ("queued", "started", "done", "failed", "lost")

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")

ID = 128
"""Length of request, model and replica ids (`apa.ids`)."""
PID = 64
"""Length of a pseudonym (hex HMAC-SHA256)."""
SHARD_ID = 160
"""Length of a shard id (`<model_id>/<k>`)."""
SHA256 = 64

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, as an aware UTC datetime (the registry's only clock)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite stores naive text; we read it back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the registry stores aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


BigID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    """A trained APA model: one model directory (docs/ARCHITECTURE.md §4) imported by `apa bootstrap`."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    base_model: Mapped[str | None] = mapped_column(String(512))
    base_model_digest: Mapped[str | None] = mapped_column(String(128))
    num_shards: Mapped[int] = mapped_column(Integer)
    partition_strategy: Mapped[str | None] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    """model.json as read at bootstrap."""
    model_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)


class User(Base):
    """A user the registry holds (or held) data of, by pseudonym only."""

    __tablename__ = "users"

    pid: Mapped[str] = mapped_column(String(PID), primary_key=True)
    """Pseudonym of the user id."""
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When a whole-user erasure removed all their samples (None: not erased as a whole)."""


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("model_id", "index"),
        CheckConstraint("state IN ('serving', 'stale', 'retraining')", name="state"),
    )

    id: Mapped[str] = mapped_column(String(SHARD_ID), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    index: Mapped[int] = mapped_column(Integer)
    """k: the shard's index in the model directory (shards/<k>/)."""
    generation: Mapped[int] = mapped_column(Integer, default=0)
    """Bumped by every erasure that removes samples from the shard."""
    state: Mapped[str] = mapped_column(String(16))
    retrain_generation: Mapped[int | None] = mapped_column(Integer)
    """The generation the running retrain started from (None: no retrain running)."""
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("model_id", "sample_pid"),
        CheckConstraint("split IN ('train', 'valid', 'test')", name="split"),
        Index("ix_samples_user_pid", "user_pid"),
        Index("ix_samples_shard_id", "shard_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    sample_pid: Mapped[str] = mapped_column(String(PID))
    """Pseudonym of the sample's id in the model directory (what adapter manifests list)."""
    user_pid: Mapped[str] = mapped_column(ForeignKey("users.pid"))
    split: Mapped[str] = mapped_column(String(8))
    shard_id: Mapped[str | None] = mapped_column(ForeignKey("shards.id"))
    """The train shard holding the sample (None for valid/test samples)."""
    label: Mapped[int | None] = mapped_column(Integer)
    """1 liked / 0 not; deleted (NULL) on erasure."""
    content_hmac: Mapped[str] = mapped_column(String(PID))
    """Keyed digest of the sample record (`Pseudonymizer.content`); kept after erasure as proof
    of what was held, without letting anyone confirm a guess of it."""
    text: Mapped[str | None] = mapped_column(Text)
    """The sample record (canonical JSON, clear ids inside); deleted (NULL) on erasure."""
    interaction_pids: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    """Pseudonyms of every interaction the sample contains, the target last; NULL after erasure."""
    erased: Mapped[bool] = mapped_column(Boolean, default=False)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    erasure_request_id: Mapped[str | None] = mapped_column(ForeignKey("erasure_requests.request_id"))
    """The request that erased the sample."""


class Interaction(Base):
    """Index interaction -> every live sample that contains it (as history or as target); an
    erasure deletes the rows of the samples it erases."""

    __tablename__ = "interactions"
    __table_args__ = (
        UniqueConstraint("interaction_pid", "sample_pk"),
        CheckConstraint("role IN ('history', 'target')", name="role"),
        Index("ix_interactions_user_pid_interaction_pid", "user_pid", "interaction_pid"),
        Index("ix_interactions_sample_pk", "sample_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    interaction_pid: Mapped[str] = mapped_column(String(PID))
    sample_pk: Mapped[int] = mapped_column(ForeignKey("samples.id"))
    """samples.id of the sample holding the interaction."""
    user_pid: Mapped[str] = mapped_column(String(PID))
    """Owner of the sample (an erasure request only ever reaches its own user's samples)."""
    role: Mapped[str] = mapped_column(String(8))


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("shard_id", "version"),
        CheckConstraint("state IN ('serving', 'excluded', 'retired', 'stale')", name="state"),
        Index("ix_adapter_versions_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"))
    version: Mapped[int] = mapped_column(Integer)
    """The manifest's version (1, +1 per retrain)."""
    artifact_uri: Mapped[str] = mapped_column(Text)
    adapter_sha256: Mapped[str | None] = mapped_column(String(SHA256))
    """sha256 of adapter_model.safetensors; None for a shard left without samples (no adapter:
    inference gives it weight 0)."""
    manifest_digest: Mapped[str] = mapped_column(String(SHA256))
    """sha256 of the canonical JSON of `manifest`."""
    sample_digest: Mapped[str] = mapped_column(String(SHA256))
    """sha256 of the sorted training sample ids joined by newlines."""
    num_samples: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The full training manifest, training sample ids included (checked by `apa audit verify`)."""
    trained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_generation: Mapped[int] = mapped_column(Integer)
    """The shard generation the training data was taken at."""
    state: Mapped[str] = mapped_column(String(16))
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    excluded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ErasureRequest(Base):
    __tablename__ = "erasure_requests"
    __table_args__ = (
        CheckConstraint("status IN ('received', 'excluded', 'retraining', 'completed')", name="status"),
        CheckConstraint("scope IN ('user', 'interactions')", name="scope"),
        Index("ix_erasure_requests_user_pid", "user_pid"),
        Index("ix_erasure_requests_status", "status"),
        Index("ix_erasure_requests_due_at", "due_at"),
        CheckConstraint("outcome IN ('erased', 'no_data_held')", name="outcome"),
    )

    request_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    user_pid: Mapped[str] = mapped_column(ForeignKey("users.pid"))
    scope: Mapped[str] = mapped_column(String(16))
    interaction_pids: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    """Pseudonyms of the erased interactions (scope `interactions`), sorted."""
    status: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    excluded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When the request's samples were erased and every adapter trained on them was excluded."""
    retraining_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When every affected shard had a retrained adapter serving again."""
    replicas_confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When every live inference replica reported a loaded set without an excluded adapter."""
    samples_erased: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """The GDPR Art. 12(3) deadline: `requested_at` + one calendar month (`apa.deadlines`); set for
    every request (nullable in the schema only: migration 0003 added it without a table rebuild)."""
    outcome: Mapped[str | None] = mapped_column(String(16))
    """`erased` or `no_data_held` (RequestOutcome); None for requests recorded before migration 0003."""


class ErasureRequestShard(Base):
    """A shard an erasure request affected: the version it excluded and the one that replaced it."""

    __tablename__ = "erasure_request_shards"
    __table_args__ = (Index("ix_erasure_request_shards_shard_id", "shard_id"),)

    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.request_id"), primary_key=True)
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"), primary_key=True)
    excluded_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    retrained_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    retrained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Replica(Base):
    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    model_id: Mapped[str | None] = mapped_column(String(ID))
    loaded: Mapped[dict[str, int]] = mapped_column(JSON)
    """Adapter versions the replica has loaded: shard id -> version."""
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime)
    loaded_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditLog(Base):
    """Append-only, keyed hash chain: hash = HMAC-SHA256(APA_AUDIT_KEY, prev_hash + canonical JSON
    of the row's content) (`apa.db.audit`)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_request_id", "request_id"),
        Index("ix_audit_log_user_pid", "user_pid"),
        Index("ix_audit_log_shard_id", "shard_id"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=False)
    """1, 2, 3, ... without gaps (assigned under the chain lock)."""
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    event_type: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(ID))
    user_pid: Mapped[str | None] = mapped_column(String(PID))
    """The pseudonym of the user the row is about (never a clear id: rows outlive erasures)."""
    shard_id: Mapped[str | None] = mapped_column(String(SHARD_ID))
    adapter_version_id: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(SHA256))
    hash: Mapped[str] = mapped_column(String(SHA256), unique=True)


class AuditHead(Base):
    """One row (id 1): the id and hash of the newest audit row. Only the database moves it (a trigger
    on INSERT into audit_log, migration 0005), one row at a time."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(BigID)
    last_hash: Mapped[str] = mapped_column(String(SHA256))


class AuditAnchor(Base):
    """The registry's own record of the anchors of the chain head it wrote outside the database
    (`apa.anchors`); append-only. It finds the anchor covering a receipt; `apa audit verify` never
    trusts it and reads the anchors from their sink instead."""

    __tablename__ = "audit_anchors"
    __table_args__ = (Index("ix_audit_anchors_sequence", "sequence"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sequence: Mapped[int] = mapped_column(BigID)
    """Id of the newest audit row when anchored."""
    hash: Mapped[str] = mapped_column(String(SHA256))
    anchored_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sinks: Mapped[list[str]] = mapped_column(JSON)
    """Where it was written (`file:...`, `kafka://...`)."""
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The signed anchor as written."""


class RegistryMeta(Base):
    """Registry-wide facts, one row each: `pseudonym_key_id` (the fingerprint of the key every
    pseudonym was made with; a process holding another key refuses to write), `audit_key_id` (the
    same for the audit chain's key), `registry_id` (named by the audit anchors) and
    `audit_legacy_rows` (unkeyed rows found by migration 0005)."""

    __tablename__ = "registry_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class OutboxMessage(Base):
    """A message written in the transaction that caused it (transactional outbox): a relay
    (`apa.outbox.relay`) publishes it after the commit and sets `sent_at`, so a crash between the
    commit and the publish loses nothing (it is published again: consumers are idempotent)."""

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint("kind IN ('event', 'task')", name="kind"),
        Index("ix_outbox_sent_at_id", "sent_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    """Publication order."""
    kind: Mapped[str] = mapped_column(String(8))
    destination: Mapped[str] = mapped_column(String(255))
    """The Kafka topic (event) or the Celery task name (task)."""
    key: Mapped[str] = mapped_column(String(SHARD_ID))
    """Kafka message key (the shard id); for a task, the shard it retrains."""
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The event (JSON), or the task's `args`, `kwargs` and `task_id`. Pseudonyms only."""
    request_id: Mapped[str | None] = mapped_column(String(ID))
    """The erasure request whose transaction wrote the row (None for a trainer's row)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When the relay had it acknowledged by the broker (None: still to publish)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class RetrainTask(Base):
    """One retrain task of a shard (Celery task id `apa-retrain-<id>`), from queued to done."""

    __tablename__ = "retrain_tasks"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'started', 'done', 'failed', 'lost')", name="state"),
        Index("ix_retrain_tasks_shard_id_state", "shard_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"))
    generation: Mapped[int] = mapped_column(Integer)
    """The shard generation the task was queued for (it trains on the newest remainder)."""
    reason: Mapped[str] = mapped_column(String(16))
    """erasure | not_promoted (a retrain overtaken by newer erasures) | resume."""
    request_id: Mapped[str | None] = mapped_column(String(ID))
    """The erasure request that queued it (None for not_promoted / resume)."""
    state: Mapped[str] = mapped_column(String(16))
    coalesced: Mapped[int] = mapped_column(Integer, default=0)
    """Later erasures of the shard that found this task queued and added no task of their own."""
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    """How often a worker started it (more than 1: redelivered after a worker died)."""
    worker: Mapped[str | None] = mapped_column(String(ID))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Moved by the worker while it trains; a started task without a recent one is lost."""
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    adapter_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    """The version the retrain registered."""
    promoted: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)


class CatalogueItem(Base):
    """An item of a model's data set (ML-100K `item_id` -> its title), filled by `apa bootstrap`;
    the inference service turns the item ids of a request into prompt titles with it. Not personal
    data: no user, sample or interaction id."""

    __tablename__ = "item_catalogue"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    title: Mapped[str] = mapped_column(Text)
