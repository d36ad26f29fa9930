"""Transactional outbox, retrain-task ledger, erasure deadlines and the "no data held" outcome.

New table `outbox`: messages (Kafka shard events, Celery retrain tasks) written in the transaction
that caused them and published by a relay after the commit. New table `retrain_tasks`: one row per
retrain task of a shard (coalescing, redelivery, resume). `erasure_requests` gains `due_at` (the
GDPR Art. 12(3) deadline, requested_at + one calendar month; filled in for existing rows) and
`outcome` (`erased` | `no_data_held`; existing rows that erased samples get `erased`, the others
stay NULL: whether they found nothing or data an earlier request had erased is not recorded).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 128
SHARD_ID = 160


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _plus_one_month(ts: datetime) -> datetime:
    """A frozen copy of `apa.deadlines.due_date` (migrations must not change with the code)."""
    year, month = (ts.year + 1, 1) if ts.month == 12 else (ts.year, ts.month + 1)
    return ts.replace(year=year, month=month, day=min(ts.day, calendar.monthrange(year, month)[1]))


def _as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite returns text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    # Plain ADD/DROP COLUMN on both backends: a SQLite batch rebuild of erasure_requests would drop a
    # table that samples and erasure_request_shards reference (a foreign-key violation at commit).
    # So `due_at` stays nullable in the schema (the code always sets it), and the outcome's check
    # is a column constraint, which SQLite accepts in ADD COLUMN.
    op.add_column("erasure_requests", sa.Column("due_at", _ts(), nullable=True))
    op.execute(
        "ALTER TABLE erasure_requests ADD COLUMN outcome VARCHAR(16) "
        "CONSTRAINT ck_erasure_requests_outcome CHECK (outcome IN ('erased', 'no_data_held'))"
    )
    requests = sa.table(
        "erasure_requests",
        sa.column("request_id", sa.String),
        sa.column("requested_at", _ts()),
        sa.column("samples_erased", sa.Integer),
        sa.column("due_at", _ts()),
        sa.column("outcome", sa.String),
    )
    rows = bind.execute(sa.select(requests.c.request_id, requests.c.requested_at, requests.c.samples_erased))
    for request_id, requested_at, erased in rows.all():
        due = _plus_one_month(_as_utc(requested_at))
        bind.execute(
            requests.update()
            .where(requests.c.request_id == request_id)
            .values(
                due_at=due.replace(tzinfo=None) if sqlite else due,
                outcome="erased" if erased else None,
            )
        )
    op.create_index("ix_erasure_requests_due_at", "erasure_requests", ["due_at"])

    op.create_table(
        "outbox",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("key", sa.String(SHARD_ID), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(ID), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("sent_at", _ts(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('event', 'task')", name="ck_outbox_kind"),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_sent_at_id", "outbox", ["sent_at", "id"])

    op.create_table(
        "retrain_tasks",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(ID), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("coalesced", sa.Integer(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(ID), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("heartbeat_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("adapter_version_id", sa.Integer(), nullable=True),
        sa.Column("promoted", sa.Boolean(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'started', 'done', 'failed', 'lost')", name="ck_retrain_tasks_state"
        ),
        sa.ForeignKeyConstraint(["shard_id"], ["shards.id"], name="fk_retrain_tasks_shard_id_shards"),
        sa.ForeignKeyConstraint(
            ["adapter_version_id"],
            ["adapter_versions.id"],
            name="fk_retrain_tasks_adapter_version_id_adapter_versions",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_retrain_tasks"),
    )
    op.create_index("ix_retrain_tasks_shard_id_state", "retrain_tasks", ["shard_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_retrain_tasks_shard_id_state", table_name="retrain_tasks")
    op.drop_table("retrain_tasks")
    op.drop_index("ix_outbox_sent_at_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_erasure_requests_due_at", table_name="erasure_requests")
    op.execute("ALTER TABLE erasure_requests DROP COLUMN outcome")  # its check constraint goes with it
    op.execute("ALTER TABLE erasure_requests DROP COLUMN due_at")
