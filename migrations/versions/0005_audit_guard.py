"""Audit guard: the database moves and protects audit_head, keeps the anchors, and (Postgres) hands
the audit tables to a separate owner role so that the application role cannot alter them.

* `audit_head` is moved by the database only: an AFTER INSERT trigger on audit_log advances it and
  refuses a row that does not extend the chain (id = last_id + 1, prev_hash = last_hash); a guard
  on audit_head refuses every other UPDATE, and any DELETE, INSERT or TRUNCATE.
* New table `audit_anchors` (append-only): the anchors of the head written outside the database.
* registry_meta gets `registry_id` (a random id the anchors name) and, when the log already holds
  rows, `audit_legacy_rows` (rows written with plain sha256 before the chain was keyed; set
  APA_AUDIT_LEGACY_ROWS to that number).
* Postgres only: role `apa_audit_owner` (NOLOGIN) owns audit_log, audit_head, audit_anchors and
  their trigger functions; group role `apa_app` (NOLOGIN) gets SELECT and INSERT on audit_log and
  audit_anchors, SELECT on audit_head, and SELECT/INSERT/UPDATE/DELETE on the other tables (also
  on tables later migrations create). Services log in as a role that is a member of `apa_app` and
  of nothing else: it cannot UPDATE, DELETE or TRUNCATE audit rows, move the head, ALTER the audit
  tables or DISABLE their triggers (only their owner or a superuser can). The role that runs this
  migration needs CREATEROLE (or a superuser), or the two roles created beforehand (README,
  "Postgres roles"); it is a member of `apa_audit_owner` only while the migration runs.

SQLite has triggers only: anyone who can write the database file can drop them. There the keyed
chain and the anchors are the protection.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNER_ROLE = "apa_audit_owner"
"""Owns the audit tables and their triggers; nobody logs in as it."""
APP_ROLE = "apa_app"
"""What the services may do; grant it to the services' login role."""
AUDIT_TABLES = ("audit_log", "audit_head", "audit_anchors")
FUNCTIONS = (
    "apa_audit_log_append_only()",
    "apa_audit_extend_head()",
    "apa_audit_head_guard()",
    "apa_append_only()",
)
SHA256 = 64


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "audit_anchors",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sequence", _big_id(), nullable=False),
        sa.Column("hash", sa.String(SHA256), nullable=False),
        sa.Column("anchored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sinks", sa.JSON(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_anchors"),
    )
    op.create_index("ix_audit_anchors_sequence", "audit_anchors", ["sequence"])
    _record_meta(bind)
    if bind.dialect.name == "postgresql":
        _postgres_triggers(bind)
        _postgres_roles(bind)
    else:
        _sqlite_triggers()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        _postgres_downgrade(bind)
    else:
        for trigger in (
            "audit_log_extends_head",
            "audit_head_guard_update",
            "audit_head_no_delete",
            "audit_head_no_insert",
            "audit_anchors_no_update",
            "audit_anchors_no_delete",
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.drop_index("ix_audit_anchors_sequence", table_name="audit_anchors")
    op.drop_table("audit_anchors")
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS apa_append_only()")
    op.execute("DELETE FROM registry_meta WHERE key IN ('registry_id', 'audit_legacy_rows', 'audit_key_id')")


def _record_meta(bind: sa.engine.Connection) -> None:
    meta = sa.table("registry_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    held = dict(bind.execute(sa.select(meta.c.key, meta.c.value)).all())
    rows = []
    if "registry_id" not in held:
        rows.append({"key": "registry_id", "value": uuid.uuid4().hex})
    legacy = bind.execute(sa.text("SELECT last_id FROM audit_head WHERE id = 1")).scalar() or 0
    if legacy and "audit_legacy_rows" not in held:
        rows.append({"key": "audit_legacy_rows", "value": str(legacy)})
        print(
            f"apa: migration 0005: the audit log holds {legacy} rows written with plain sha256; set "
            f"APA_AUDIT_LEGACY_ROWS={legacy} wherever APA_AUDIT_KEY is set (keep it outside the database)",
            file=sys.stderr,
        )
    if rows:
        op.bulk_insert(meta, rows)


def _sqlite_triggers() -> None:
    op.execute(
        """
        CREATE TRIGGER audit_log_extends_head AFTER INSERT ON audit_log
        BEGIN
            SELECT RAISE(ABORT, 'audit_log row does not extend the chain head')
            WHERE NOT EXISTS (
                SELECT 1 FROM audit_head WHERE id = 1 AND last_id = NEW.id - 1 AND last_hash = NEW.prev_hash
            );
            UPDATE audit_head SET last_id = NEW.id, last_hash = NEW.hash WHERE id = 1;
        END
        """
    )
    op.execute(
        """
        CREATE TRIGGER audit_head_guard_update BEFORE UPDATE ON audit_head
        WHEN NEW.id IS NOT OLD.id OR NEW.last_id IS NOT OLD.last_id + 1 OR NOT EXISTS (
            SELECT 1 FROM audit_log WHERE id = NEW.last_id AND hash = NEW.last_hash AND prev_hash = OLD.last_hash
        )
        BEGIN
            SELECT RAISE(ABORT, 'audit_head only advances to the newest audit_log row (UPDATE refused)');
        END
        """
    )
    for action, table, message in (
        ("DELETE", "audit_head", "audit_head cannot be deleted (DELETE refused)"),
        ("INSERT", "audit_head", "audit_head holds its one row (INSERT refused)"),
        ("UPDATE", "audit_anchors", "audit_anchors is append-only (UPDATE refused)"),
        ("DELETE", "audit_anchors", "audit_anchors is append-only (DELETE refused)"),
    ):
        name = f"{table}_no_{action.lower()}"
        op.execute(
            f"CREATE TRIGGER {name} BEFORE {action} ON {table} BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )


def _postgres_triggers(bind: sa.engine.Connection) -> None:
    schema = bind.execute(sa.text("SELECT current_schema()")).scalar()
    path = f'SET search_path = "{schema}", pg_temp'
    op.execute(
        f"""
        CREATE FUNCTION apa_audit_extend_head() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {path} AS $$
        BEGIN
            UPDATE audit_head SET last_id = NEW.id, last_hash = NEW.hash
             WHERE id = 1 AND last_id = NEW.id - 1 AND last_hash = NEW.prev_hash;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'audit_log row % does not extend the chain head', NEW.id
                    USING ERRCODE = 'integrity_constraint_violation';
            END IF;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_log_extends_head AFTER INSERT ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION apa_audit_extend_head()"
    )
    op.execute(
        f"""
        CREATE FUNCTION apa_audit_head_guard() RETURNS trigger LANGUAGE plpgsql {path} AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.last_id = OLD.last_id + 1 AND EXISTS (
                SELECT 1 FROM audit_log
                 WHERE id = NEW.last_id AND hash = NEW.last_hash AND prev_hash = OLD.last_hash
            ) THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'audit_head only advances to the newest audit_log row (% refused)', TG_OP;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_head_guard BEFORE INSERT OR UPDATE OR DELETE ON audit_head "
        "FOR EACH ROW EXECUTE FUNCTION apa_audit_head_guard()"
    )
    op.execute(
        "CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head "
        "FOR EACH STATEMENT EXECUTE FUNCTION apa_audit_head_guard()"
    )
    op.execute(
        f"""
        CREATE FUNCTION apa_append_only() RETURNS trigger LANGUAGE plpgsql {path} AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_anchors_append_only BEFORE UPDATE OR DELETE ON audit_anchors "
        "FOR EACH ROW EXECUTE FUNCTION apa_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_anchors_no_truncate BEFORE TRUNCATE ON audit_anchors "
        "FOR EACH STATEMENT EXECUTE FUNCTION apa_append_only()"
    )


def _scalar(bind: sa.engine.Connection, sql: str, **params: object) -> object:
    return bind.execute(sa.text(sql), params).scalar()


def _become_owner_member(bind: sa.engine.Connection) -> bool:
    """Make the migrating role able to act as the owner role; True when it was made a member here
    (and must be removed again)."""
    if _scalar(bind, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        return False
    if _scalar(bind, "SELECT pg_has_role(current_user, :r, 'MEMBER')", r=OWNER_ROLE):
        return False
    op.execute(f"GRANT {OWNER_ROLE} TO CURRENT_USER")
    return True


def _postgres_roles(bind: sa.engine.Connection) -> None:
    missing = [
        role
        for role in (OWNER_ROLE, APP_ROLE)
        if not _scalar(bind, "SELECT 1 FROM pg_roles WHERE rolname = :r", r=role)
    ]
    if missing and not _scalar(
        bind, "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ):
        raise RuntimeError(
            f"migration 0005 needs the roles {', '.join(missing)}: run it as a role with CREATEROLE, or "
            f"create them first as a superuser (CREATE ROLE {OWNER_ROLE} NOLOGIN; CREATE ROLE {APP_ROLE} "
            "NOLOGIN; see README, 'Postgres roles')"
        )
    for role in missing:  # roles are cluster-wide: tolerate another database creating it meanwhile
        op.execute(
            f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
    joined = _become_owner_member(bind)
    schema = _scalar(bind, "SELECT current_schema()")
    # A new owner needs CREATE on the schema while ownership moves, and USAGE afterwards (its
    # SECURITY DEFINER trigger moves audit_head).
    op.execute(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO {OWNER_ROLE}')
    for table in AUDIT_TABLES:
        op.execute(f"ALTER TABLE {table} OWNER TO {OWNER_ROLE}")
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} OWNER TO {OWNER_ROLE}")
    op.execute(f'REVOKE CREATE ON SCHEMA "{schema}" FROM {OWNER_ROLE}')
    op.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {APP_ROLE}')
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO {APP_ROLE}')
    op.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA "{schema}" TO {APP_ROLE}')
    op.execute(f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {APP_ROLE}")
    for table in AUDIT_TABLES:
        op.execute(f"REVOKE ALL ON {table} FROM PUBLIC, {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON audit_log, audit_anchors TO {APP_ROLE}")
    op.execute(f"GRANT SELECT ON audit_head TO {APP_ROLE}")
    op.execute(
        f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_ROLE}'
    )
    op.execute(
        f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT USAGE, SELECT ON SEQUENCES TO {APP_ROLE}'
    )
    if not _scalar(bind, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        op.execute(f"GRANT {APP_ROLE} TO CURRENT_USER")  # the migrating role may run the services too
    if joined:
        op.execute(f"REVOKE {OWNER_ROLE} FROM CURRENT_USER")


def _postgres_downgrade(bind: sa.engine.Connection) -> None:
    joined = _become_owner_member(bind)
    schema = _scalar(bind, "SELECT current_schema()")
    for table in AUDIT_TABLES:
        op.execute(f"ALTER TABLE {table} OWNER TO CURRENT_USER")
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} OWNER TO CURRENT_USER")
    op.execute("DROP TRIGGER IF EXISTS audit_log_extends_head ON audit_log")
    op.execute("DROP TRIGGER IF EXISTS audit_head_guard ON audit_head")
    op.execute("DROP TRIGGER IF EXISTS audit_head_no_truncate ON audit_head")
    op.execute("DROP TRIGGER IF EXISTS audit_anchors_append_only ON audit_anchors")
    op.execute("DROP TRIGGER IF EXISTS audit_anchors_no_truncate ON audit_anchors")
    op.execute("DROP FUNCTION IF EXISTS apa_audit_extend_head()")
    op.execute("DROP FUNCTION IF EXISTS apa_audit_head_guard()")
    op.execute(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" REVOKE ALL ON TABLES FROM {APP_ROLE}')
    op.execute(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" REVOKE ALL ON SEQUENCES FROM {APP_ROLE}')
    op.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{schema}" FROM {APP_ROLE}')
    op.execute(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "{schema}" FROM {APP_ROLE}')
    op.execute(f'REVOKE USAGE ON SCHEMA "{schema}" FROM {APP_ROLE}, {OWNER_ROLE}')
    if joined:
        op.execute(f"REVOKE {OWNER_ROLE} FROM CURRENT_USER")
