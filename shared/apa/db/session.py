"""Engines, sessions and migrations of the registry database (Postgres or embedded SQLite).

Transactions belong to the caller: the registry functions (`apa.db.registry`) never commit;
wrap them in `session_scope(...)` or `with session.begin():`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from apa.errors import UserError
from apa.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_DRIVER = "psycopg2"
"""Driver of a `postgresql://` URL that names none (the one pyproject.toml installs)."""


class RegistryDatabaseError(UserError):
    """The registry database cannot be used as asked; the message names it, the problem and the fix."""


class InvalidDatabaseURL(RegistryDatabaseError):
    """The database URL cannot be parsed, or names a dialect or driver that is not installed."""

    exit_code = 2


class RegistryUnavailable(RegistryDatabaseError):
    """The database cannot be reached (server down, wrong host or port, unknown database or user)."""


class SchemaNotMigrated(RegistryDatabaseError):
    """The database is not at the newest migration (never migrated, behind, or unknown to this code)."""


class MigrationError(RegistryDatabaseError):
    """Alembic refused the migration target (an unknown revision, a step past base or head)."""

    exit_code = 2


def _redacted(url: str) -> str:
    """`url` with any password replaced, also when it cannot be parsed."""
    return re.sub(r"(//[^/:@]*):[^@/]*@", r"\1:***@", url)


def describe(engine_or_url: Engine | URL) -> str:
    """The database's URL without its password, for messages."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    return url.render_as_string(hide_password=True)


def make_engine(url: str | None = None, *, settings: Settings | None = None, **kwargs: Any) -> Engine:
    """An engine for `url` (default: `settings.database_url`, itself default from the environment).

    SQLite gets foreign keys on, a busy timeout and `BEGIN IMMEDIATE` transactions (one writer
    at a time, so the audit chain cannot fork); an in-memory SQLite URL gets one shared
    connection. Postgres gets pre-ping, and psycopg2 when the URL names no driver.

    Raises InvalidDatabaseURL for a URL that cannot be parsed or whose driver is not installed.
    Nothing is connected yet: `connect` and `check_schema` report an unreachable database.
    """
    if url is None:
        url = (settings or Settings.from_env()).database_url
    fix = "set APA_DATABASE_URL (or --url), e.g. postgresql://user@host:5432/apa or sqlite:///apa.db"
    try:
        sa_url = make_url(url)
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername=f"postgresql+{POSTGRES_DRIVER}")
        sa_url.get_dialect()  # an unknown dialect or driver fails here, not at first use
    except ArgumentError as exc:
        raise InvalidDatabaseURL(f"invalid database URL {_redacted(url)!r}: {exc}; {fix}") from exc
    try:
        return _create_engine(sa_url, **kwargs)
    except ImportError as exc:
        raise InvalidDatabaseURL(
            f"the database driver of {describe(sa_url)} is not installed ({exc}); {fix}"
        ) from exc


def _create_engine(sa_url: URL, **kwargs: Any) -> Engine:
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


def connect(engine: Engine) -> Connection:
    """A connection of `engine`; raises RegistryUnavailable, naming the database and the driver's
    reason, when it cannot be reached."""
    try:
        return engine.connect()
    except DBAPIError as exc:
        reason = " ".join(str(exc.orig or exc).strip().splitlines()[0].split())
        fix = (
            "that its folder exists and is writable"
            if engine.dialect.name == "sqlite"
            else "that the database server is running and the database exists"
        )
        raise RegistryUnavailable(
            f"cannot connect to the registry database {describe(engine)}: {reason}; "
            f"check APA_DATABASE_URL (or --url) and {fix}"
        ) from exc


def check_schema(engine: Engine) -> str:
    """The revision of the database, which must be the newest migration.

    Raises RegistryUnavailable when the database cannot be reached and SchemaNotMigrated when it
    was never migrated or is behind; commands call this before they touch a table.
    """
    current, head = current_revision(engine), head_revision()
    if current is not None and current == head:
        return current
    where = describe(engine)
    if current is None:
        problem = "has no schema (it was never migrated)"
    elif _known_revision(current):
        problem = f"is at revision {current}, the code needs {head}"
    else:
        raise SchemaNotMigrated(
            f"the registry database {where} is at revision {current}, which this version of apa does "
            f"not know (its newest is {head}); upgrade apa"
        )
    raise SchemaNotMigrated(f"the registry database {where} {problem}; run `apa db upgrade` on it first")


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


def _migrate(engine: Engine, direction: str, revision: str) -> None:
    """Run Alembic's `upgrade` or `downgrade` to `revision` in one transaction."""
    from alembic import command
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    with connect(engine) as connection, connection.begin():
        try:
            getattr(command, direction)(alembic_config(connection=connection), revision)
        except (CommandError, RevisionError) as exc:
            known = ", ".join(["base", "head", *(s.revision for s in _script_directory().walk_revisions())])
            raise MigrationError(
                f"cannot {direction} {describe(engine)} to {revision!r}: {exc} (revisions: {known}; "
                "relative steps like -1 or +1; `apa db current` shows where the database is)"
            ) from exc


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to `revision` (MigrationError for a revision Alembic cannot reach)."""
    _migrate(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str = "-1") -> None:
    """Undo migrations down to `revision` (`base` drops everything)."""
    _migrate(engine, "downgrade", revision)


def _script_directory() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def _known_revision(revision: str) -> bool:
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    try:
        return _script_directory().get_revision(revision) is not None
    except (CommandError, RevisionError):
        return False


def head_revision() -> str | None:
    """The newest migration revision."""
    return _script_directory().get_current_head()  # type: ignore[no-any-return]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated); RegistryUnavailable when it cannot
    be reached."""
    from alembic.runtime.migration import MigrationContext

    with connect(engine) as connection:
        return MigrationContext.configure(connection).get_current_revision()
