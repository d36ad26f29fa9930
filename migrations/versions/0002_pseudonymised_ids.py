"""Pseudonymised ids: every user, sample and interaction id column holds a keyed pseudonym.

users.id -> users.pid; samples.sample_id/user_id/content_digest/interaction_ids ->
sample_pid/user_pid/content_hmac/interaction_pids (the last nullable: erased on erasure);
interactions.interaction_id/user_id -> interaction_pid/user_pid; erasure_requests.user_id/
interactions -> user_pid/interaction_pids; audit_log.user_id -> user_pid; new table
registry_meta (the pseudonym key's fingerprint).

Pseudonyms need the secret key, which a migration must not handle, so this revision rebuilds the
affected tables and refuses to upgrade a registry that already holds data: export what you need,
`apa db downgrade base`, `apa db upgrade` and `apa bootstrap` again. The downgrade drops the
rebuilt tables with their rows (pseudonyms cannot be turned back into ids), as `base` would.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 128
PID = 64
SHARD_ID = 160
SHA256 = 64
REBUILT = ("erasure_request_shards", "interactions", "samples", "erasure_requests", "users", "audit_log")
MUST_BE_EMPTY = (*REBUILT, "models", "adapter_versions")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _refuse_unless_empty(direction: str) -> None:
    bind = op.get_bind()
    held = [t for t in MUST_BE_EMPTY if bind.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar()]
    if held:
        raise RuntimeError(
            f"migration 0002 {direction} rebuilds the id columns and needs an empty registry, but "
            f"{', '.join(held)} hold rows: export what you need, `apa db downgrade base`, "
            "`apa db upgrade`, then `apa bootstrap` again"
        )


def _drop_rebuilt() -> None:
    _drop_append_only_guard()
    for table in REBUILT:
        op.drop_table(table)


def upgrade() -> None:
    _refuse_unless_empty("upgrade")
    _drop_rebuilt()
    op.create_table(
        "registry_meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_registry_meta"),
    )
    op.create_table(
        "users",
        sa.Column("pid", sa.String(PID), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("erased_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("pid", name="pk_users"),
    )
    op.create_table(
        "erasure_requests",
        sa.Column("request_id", sa.String(ID), nullable=False),
        sa.Column("user_pid", sa.String(PID), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("interaction_pids", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("excluded_at", _ts(), nullable=True),
        sa.Column("retraining_at", _ts(), nullable=True),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.Column("replicas_confirmed_at", _ts(), nullable=True),
        sa.Column("samples_erased", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "status IN ('received', 'excluded', 'retraining', 'completed')", name="ck_erasure_requests_status"
        ),
        sa.CheckConstraint("scope IN ('user', 'interactions')", name="ck_erasure_requests_scope"),
        sa.ForeignKeyConstraint(["user_pid"], ["users.pid"], name="fk_erasure_requests_user_pid_users"),
        sa.PrimaryKeyConstraint("request_id", name="pk_erasure_requests"),
    )
    op.create_index("ix_erasure_requests_user_pid", "erasure_requests", ["user_pid"])
    op.create_index("ix_erasure_requests_status", "erasure_requests", ["status"])
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("sample_pid", sa.String(PID), nullable=False),
        sa.Column("user_pid", sa.String(PID), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=True),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("content_hmac", sa.String(PID), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("interaction_pids", sa.JSON(), nullable=True),
        sa.Column("erased", sa.Boolean(), nullable=False),
        sa.Column("erased_at", _ts(), nullable=True),
        sa.Column("erasure_request_id", sa.String(ID), nullable=True),
        sa.CheckConstraint("split IN ('train', 'valid', 'test')", name="ck_samples_split"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_samples_model_id_models"),
        sa.ForeignKeyConstraint(["user_pid"], ["users.pid"], name="fk_samples_user_pid_users"),
        sa.ForeignKeyConstraint(["shard_id"], ["shards.id"], name="fk_samples_shard_id_shards"),
        sa.ForeignKeyConstraint(
            ["erasure_request_id"],
            ["erasure_requests.request_id"],
            name="fk_samples_erasure_request_id_erasure_requests",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.UniqueConstraint("model_id", "sample_pid", name="uq_samples_model_id_sample_pid"),
    )
    op.create_index("ix_samples_user_pid", "samples", ["user_pid"])
    op.create_index("ix_samples_shard_id", "samples", ["shard_id"])
    op.create_table(
        "interactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("interaction_pid", sa.String(PID), nullable=False),
        sa.Column("sample_pk", sa.Integer(), nullable=False),
        sa.Column("user_pid", sa.String(PID), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.CheckConstraint("role IN ('history', 'target')", name="ck_interactions_role"),
        sa.ForeignKeyConstraint(["sample_pk"], ["samples.id"], name="fk_interactions_sample_pk_samples"),
        sa.PrimaryKeyConstraint("id", name="pk_interactions"),
        sa.UniqueConstraint("interaction_pid", "sample_pk", name="uq_interactions_interaction_pid_sample_pk"),
    )
    op.create_index(
        "ix_interactions_user_pid_interaction_pid", "interactions", ["user_pid", "interaction_pid"]
    )
    op.create_index("ix_interactions_sample_pk", "interactions", ["sample_pk"])
    _create_erasure_request_shards()
    _create_audit_log("user_pid", PID)
    _create_append_only_guard()


def downgrade() -> None:
    _drop_rebuilt()
    op.drop_table("registry_meta")
    op.create_table(
        "users",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("erased_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
    )
    op.create_table(
        "erasure_requests",
        sa.Column("request_id", sa.String(ID), nullable=False),
        sa.Column("user_id", sa.String(ID), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("interactions", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("excluded_at", _ts(), nullable=True),
        sa.Column("retraining_at", _ts(), nullable=True),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.Column("replicas_confirmed_at", _ts(), nullable=True),
        sa.Column("samples_erased", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "status IN ('received', 'excluded', 'retraining', 'completed')", name="ck_erasure_requests_status"
        ),
        sa.CheckConstraint("scope IN ('user', 'interactions')", name="ck_erasure_requests_scope"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_erasure_requests_user_id_users"),
        sa.PrimaryKeyConstraint("request_id", name="pk_erasure_requests"),
    )
    op.create_index("ix_erasure_requests_user_id", "erasure_requests", ["user_id"])
    op.create_index("ix_erasure_requests_status", "erasure_requests", ["status"])
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("sample_id", sa.String(ID), nullable=False),
        sa.Column("user_id", sa.String(ID), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=True),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("content_digest", sa.String(SHA256), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("interaction_ids", sa.JSON(), nullable=False),
        sa.Column("erased", sa.Boolean(), nullable=False),
        sa.Column("erased_at", _ts(), nullable=True),
        sa.Column("erasure_request_id", sa.String(ID), nullable=True),
        sa.CheckConstraint("split IN ('train', 'valid', 'test')", name="ck_samples_split"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_samples_model_id_models"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_samples_user_id_users"),
        sa.ForeignKeyConstraint(["shard_id"], ["shards.id"], name="fk_samples_shard_id_shards"),
        sa.ForeignKeyConstraint(
            ["erasure_request_id"],
            ["erasure_requests.request_id"],
            name="fk_samples_erasure_request_id_erasure_requests",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.UniqueConstraint("model_id", "sample_id", name="uq_samples_model_id_sample_id"),
    )
    op.create_index("ix_samples_user_id", "samples", ["user_id"])
    op.create_index("ix_samples_shard_id", "samples", ["shard_id"])
    op.create_table(
        "interactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("interaction_id", sa.String(ID), nullable=False),
        sa.Column("sample_pk", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(ID), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.CheckConstraint("role IN ('history', 'target')", name="ck_interactions_role"),
        sa.ForeignKeyConstraint(["sample_pk"], ["samples.id"], name="fk_interactions_sample_pk_samples"),
        sa.PrimaryKeyConstraint("id", name="pk_interactions"),
        sa.UniqueConstraint("interaction_id", "sample_pk", name="uq_interactions_interaction_id_sample_pk"),
    )
    op.create_index("ix_interactions_user_id_interaction_id", "interactions", ["user_id", "interaction_id"])
    op.create_index("ix_interactions_sample_pk", "interactions", ["sample_pk"])
    _create_erasure_request_shards()
    _create_audit_log("user_id", ID)
    _create_append_only_guard()


def _create_erasure_request_shards() -> None:
    op.create_table(
        "erasure_request_shards",
        sa.Column("request_id", sa.String(ID), nullable=False),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=False),
        sa.Column("excluded_version_id", sa.Integer(), nullable=True),
        sa.Column("retrained_version_id", sa.Integer(), nullable=True),
        sa.Column("retrained_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["erasure_requests.request_id"],
            name="fk_erasure_request_shards_request_id_erasure_requests",
        ),
        sa.ForeignKeyConstraint(
            ["shard_id"], ["shards.id"], name="fk_erasure_request_shards_shard_id_shards"
        ),
        sa.ForeignKeyConstraint(
            ["excluded_version_id"],
            ["adapter_versions.id"],
            name="fk_erasure_request_shards_excluded_version_id_adapter_versions",
        ),
        sa.ForeignKeyConstraint(
            ["retrained_version_id"],
            ["adapter_versions.id"],
            name="fk_erasure_request_shards_retrained_version_id_adapter_versions",
        ),
        sa.PrimaryKeyConstraint("request_id", "shard_id", name="pk_erasure_request_shards"),
    )
    op.create_index("ix_erasure_request_shards_shard_id", "erasure_request_shards", ["shard_id"])


def _create_audit_log(user_column: str, width: int) -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", _big_id(), autoincrement=False, nullable=False),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(ID), nullable=True),
        sa.Column(user_column, sa.String(width), nullable=True),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=True),
        sa.Column("adapter_version_id", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(SHA256), nullable=False),
        sa.Column("hash", sa.String(SHA256), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sa.UniqueConstraint("hash", name="uq_audit_log_hash"),
    )
    op.create_index("ix_audit_log_request_id", "audit_log", ["request_id"])
    op.create_index(f"ix_audit_log_{user_column}", "audit_log", [user_column])
    op.create_index("ix_audit_log_shard_id", "audit_log", ["shard_id"])


def _create_append_only_guard() -> None:
    """Refuse UPDATE, DELETE (and TRUNCATE on Postgres) of audit_log rows in the database itself."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION apa_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
            END;
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION apa_audit_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION apa_audit_log_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{action.lower()} BEFORE {action} ON audit_log "
                f"BEGIN SELECT RAISE(ABORT, 'audit_log is append-only ({action} refused)'); END"
            )


def _drop_append_only_guard() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS apa_audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
