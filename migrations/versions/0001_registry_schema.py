"""Registry schema: models, users, samples, interactions, shards, adapter versions, erasure
requests, replicas and the append-only, hash-chained audit log.

Revision ID: 0001
Revises:
Create Date: 2025-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64

ID = 128
SHARD_ID = 160
SHA256 = 64


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("base_model", sa.String(512), nullable=True),
        sa.Column("base_model_digest", sa.String(128), nullable=True),
        sa.Column("num_shards", sa.Integer(), nullable=False),
        sa.Column("partition_strategy", sa.String(32), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("model_dir", sa.Text(), nullable=True),
        sa.Column("created_at", _ts(), nullable=True),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("erased_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
    )
    op.create_table(
        "shards",
        sa.Column("id", sa.String(SHARD_ID), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("retrain_generation", sa.Integer(), nullable=True),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.CheckConstraint("state IN ('serving', 'stale', 'retraining')", name="ck_shards_state"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_shards_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_shards"),
        sa.UniqueConstraint("model_id", "index", name="uq_shards_model_id_index"),
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
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("adapter_sha256", sa.String(SHA256), nullable=True),
        sa.Column("manifest_digest", sa.String(SHA256), nullable=False),
        sa.Column("sample_digest", sa.String(SHA256), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("trained_at", _ts(), nullable=True),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("started_generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("promoted_at", _ts(), nullable=True),
        sa.Column("excluded_at", _ts(), nullable=True),
        sa.Column("retired_at", _ts(), nullable=True),
        sa.CheckConstraint(
            "state IN ('serving', 'excluded', 'retired', 'stale')", name="ck_adapter_versions_state"
        ),
        sa.ForeignKeyConstraint(["shard_id"], ["shards.id"], name="fk_adapter_versions_shard_id_shards"),
        sa.PrimaryKeyConstraint("id", name="pk_adapter_versions"),
        sa.UniqueConstraint("shard_id", "version", name="uq_adapter_versions_shard_id_version"),
    )
    op.create_index("ix_adapter_versions_state", "adapter_versions", ["state"])
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
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("model_id", sa.String(ID), nullable=True),
        sa.Column("loaded", sa.JSON(), nullable=False),
        sa.Column("first_seen", _ts(), nullable=False),
        sa.Column("last_heartbeat", _ts(), nullable=False),
        sa.Column("loaded_changed_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_replicas"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", _big_id(), autoincrement=False, nullable=False),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(ID), nullable=True),
        sa.Column("user_id", sa.String(ID), nullable=True),
        sa.Column("shard_id", sa.String(SHARD_ID), nullable=True),
        sa.Column("adapter_version_id", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(SHA256), nullable=False),
        sa.Column("hash", sa.String(SHA256), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sa.UniqueConstraint("hash", name="uq_audit_log_hash"),
    )
    op.create_index("ix_audit_log_request_id", "audit_log", ["request_id"])
    op.create_index("ix_audit_log_user_id", "audit_log", ["user_id"])
    op.create_index("ix_audit_log_shard_id", "audit_log", ["shard_id"])
    audit_head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_id", _big_id(), nullable=False),
        sa.Column("last_hash", sa.String(SHA256), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    )
    op.bulk_insert(audit_head, [{"id": 1, "last_id": 0, "last_hash": GENESIS_HASH}])
    _create_append_only_guard()


def downgrade() -> None:
    _drop_append_only_guard()
    op.drop_table("audit_head")
    op.drop_index("ix_audit_log_shard_id", table_name="audit_log")
    op.drop_index("ix_audit_log_user_id", table_name="audit_log")
    op.drop_index("ix_audit_log_request_id", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("replicas")
    op.drop_index("ix_erasure_request_shards_shard_id", table_name="erasure_request_shards")
    op.drop_table("erasure_request_shards")
    op.drop_index("ix_adapter_versions_state", table_name="adapter_versions")
    op.drop_table("adapter_versions")
    op.drop_index("ix_interactions_sample_pk", table_name="interactions")
    op.drop_index("ix_interactions_user_id_interaction_id", table_name="interactions")
    op.drop_table("interactions")
    op.drop_index("ix_samples_shard_id", table_name="samples")
    op.drop_index("ix_samples_user_id", table_name="samples")
    op.drop_table("samples")
    op.drop_index("ix_erasure_requests_status", table_name="erasure_requests")
    op.drop_index("ix_erasure_requests_user_id", table_name="erasure_requests")
    op.drop_table("erasure_requests")
    op.drop_table("shards")
    op.drop_table("users")
    op.drop_table("models")


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
