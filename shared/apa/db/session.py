"""Engines, sessions and migrations of the registry database (Postgres or embedded SQLite).

Transactions belong to the caller: the registry functions (`apa.db.registry`) never commit;
wrap them in `session_scope(...)` or `with session.begin():`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from apa.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str | None = None, *, settings: Settings | None = None, **kwargs: Any) -> Engine:
    """An engine for `url` (default: `settings.database_url`, itself default from the environment).

    SQLite gets foreign keys on, a busy timeout and `BEGIN IMMEDIATE` transactions (one writer
    at a time, so the audit chain cannot fork); an in-memory SQLite URL gets one shared
    connection. Postgres gets pre-ping.
    """
    if url is None:
        url = (settings or Settings.from_env()).database_url
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(sa_url, **kwargs)

    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("check_same_thread", False)
    if sa_url.database in (None, "", ":memory:"):
        kwargs.setdefault("poolclass", StaticPool)
    engine = create_engine(sa_url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back on an exception."""
    with make_sessionmaker(engine)() as session, session.begin():
        yield session


# --- migrations (Alembic) ------------------------------------------------------------------------


MIGRATIONS_PACKAGE = "apa.migrations"
"""The repository's `migrations/` folder, shipped as this package (pyproject.toml `package-dir`)."""


def migrations_dir(settings: Settings | None = None) -> Path:
    """The Alembic directory: `APA_MIGRATIONS_DIR`, else the installed package `apa.migrations`."""
    settings = settings or Settings.from_env()
    if settings.migrations_dir:
        return Path(settings.migrations_dir)
    from importlib.resources import files

    return Path(str(files(MIGRATIONS_PACKAGE)))


def alembic_config(url: str | None = None, *, connection: Connection | None = None) -> Any:
    """An Alembic Config for `migrations/alembic.ini`, found relative to the package, not the cwd."""
    from alembic.config import Config

    directory = migrations_dir()
    ini = directory / "alembic.ini"
    if not ini.is_file():
        raise FileNotFoundError(f"Alembic configuration not found at {ini} (set APA_MIGRATIONS_DIR)")
    config = Config(str(ini))
    config.set_main_option("script_location", str(directory))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to `revision`."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection=connection), revision)


def downgrade(engine: Engine, revision: str = "-1") -> None:
    """Undo migrations down to `revision` (`base` drops everything)."""
    from alembic import command

    with engine.begin() as connection:
        command.downgrade(alembic_config(connection=connection), revision)


def head_revision() -> str | None:
    """The newest migration revision."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
