"""Alembic migrations: up, down and up again on SQLite and Postgres; the models match them."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from apa.db.cli import db_command
from apa.db.models import Base
from apa.db.session import current_revision, downgrade, head_revision, make_engine, upgrade
from db_fixtures import pg_url  # noqa: F401 - fixture

TABLES = {
    "users",
    "samples",
    "interactions",
    "shards",
    "adapter_versions",
    "erasure_requests",
    "replicas",
    "audit_log",
    # added by this schema: models, the request -> shard links, the chain head
    "models",
    "erasure_request_shards",
    "audit_head",
    # 0002: the pseudonym key's fingerprint
    "registry_meta",
    # 0003: the transactional outbox and the retrain-task ledger
    "outbox",
    "retrain_tasks",
    # 0005: the anchors of the audit chain's head
    "audit_anchors",
    # 0006: the item catalogue of the inference service
    "item_catalogue",
}


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _schema_drift(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _up_down_up(engine: Engine) -> None:
    assert current_revision(engine) is None and _tables(engine) == set()
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert _tables(engine) == TABLES
    assert _schema_drift(engine) == []
    downgrade(engine, "base")
    assert current_revision(engine) is None and _tables(engine) == set()
    upgrade(engine)
    assert _tables(engine) == TABLES


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        _up_down_up(engine)
    finally:
        engine.dispose()


@pytest.mark.integration
def test_upgrade_downgrade_upgrade_on_postgres(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        _up_down_up(engine)
    finally:
        engine.dispose()


def test_db_command_finds_the_migrations_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert db_command("upgrade", url=url) == 0
    assert "(at head)" in capsys.readouterr().out
    assert db_command("current", url=url) == 0
    assert f"revision {head_revision()} (at head)" in capsys.readouterr().out
    assert db_command("downgrade", url=url) == 0
    from apa.db.session import _script_directory

    previous = _script_directory().get_revision(head_revision()).down_revision
    assert f"revision {previous} (head is" in capsys.readouterr().out


def test_db_url_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APA_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert db_command("upgrade") == 0
    assert (tmp_path / "env.db").is_file()
