"""The `apa` entry point: sub-command table, argument spelling users expect, clean errors."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from apa.cli import COMMANDS, ENTRY_POINT_GROUP, commands, main, normalise_args
from apa.db.session import make_engine, upgrade
from db_fixtures import pg_url  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


def _example(
    data: str = "x", full: bool = False, user_id: list[str] | None = None, train_limit: int | None = None
) -> int:
    return 0


def test_every_sub_command_resolves_to_a_documented_function():
    for name, command in commands().items():
        target = command.load()
        assert callable(target) and (target.__doc__ or "").strip(), name


def test_help_shows_each_commands_docstring_summary(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in commands().items():
        first_line = inspect.getdoc(command.load()).splitlines()[0]  # type: ignore[union-attr]
        assert command.summary() == first_line, name
        assert first_line.endswith("."), f"{name}: the docstring's first line must be a whole sentence"
        assert any(line.split() == [name, *first_line.split()] for line in out.splitlines()), name
        assert command.module not in out  # no module paths


def test_no_library_module_imports_or_names_a_service():
    offenders = []
    for path in sorted((REPO / "shared" / "apa").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]  # importlib.import_module("services...")
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno}: {n}"  # type: ignore[attr-defined]
                for n in names
                if n == "services" or n.startswith("services.")
            ]
    assert offenders == []


def test_no_service_imports_another_service():
    """Services are thin shells over the library: what two of them share lives in `apa`."""
    offenders = []
    for package in sorted(p for p in (REPO / "services").iterdir() if (p / "__init__.py").is_file()):
        own = f"services.{package.name}"
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [
                    f"{path.relative_to(REPO)}:{node.lineno}: {n}"  # type: ignore[attr-defined]
                    for n in names
                    if n.startswith("services.") and n != own and not n.startswith(own + ".")
                ]
    assert offenders == []


def test_serve_registry_is_registered_by_the_services_entry_point(capsys):
    assert "serve-registry" not in COMMANDS
    assert commands()["serve-registry"].target == "services.registry.app:serve_command"
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-registry", "--help"])
    assert exit_info.value.code == 0
    assert "--port" in capsys.readouterr().out


def test_python_m_services_registry_is_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "services.registry", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "usage: python -m services.registry" in done.stdout and "--workers" in done.stdout


def test_an_installed_package_adds_a_command_with_one_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hello_service.py").write_text(
        textwrap.dedent(
            '''
            def hello_command(name: str = "world") -> int:
                """Greet someone (a command a service registers)."""
                print(f"hello {name}")
                return 0
            '''
        )
    )
    dist_info = tmp_path / "hello_service-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-service\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nhello = hello_service:hello_command\ndb = hello_service:hello_command\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = commands()
    assert found["hello"].summary() == "Greet someone (a command a service registers)."
    assert "hello_service" not in sys.modules  # discovering does not import the command's module
    assert found["db"].target == COMMANDS["db"]  # a package cannot take over a library command
    assert main(["hello", "--name", "APA"]) == 0
    assert capsys.readouterr().out == "hello APA\n"


def test_help_and_db_commands_import_neither_services_nor_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from apa.cli import main
        main(["--help"])
        main(["db", "current", "--url", "sqlite:///{tmp_path / "x.db"}"])
        heavy = ["torch", "flask", "transformers", "services.registry", "services.registry.app"]
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_dashes_bare_bools_and_repeated_lists_are_accepted():
    args = ["--train-limit", "4", "--full", "--user-id", "1", "--user-id", "2", "pos"]
    assert normalise_args(_example, args) == [
        "--train_limit",
        "4",
        "--full=true",
        "--user_id+",
        "1",
        "--user_id+",
        "2",
        "pos",
    ]
    assert normalise_args(_example, ["--no-full"]) == ["--full=false"]
    assert normalise_args(_example, ["--full", "false"]) == ["--full", "false"]
    assert normalise_args(_example, ["--user_id", "[1,2]"]) == ["--user_id", "[1,2]"]


def test_unknown_command_and_missing_files_exit_2_with_a_message(capsys, tmp_path):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["unlearn", str(tmp_path / "missing"), "--user-id", "1"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", sorted(commands()))
def test_sub_command_help_exits_cleanly(name):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0


# --- database errors: one line naming the problem, no traceback ----------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_an_unparseable_database_url_is_one_line(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APA_DATABASE_URL", "notaurl")
    assert main(["db", "current"]) == 2
    assert "invalid database URL 'notaurl'" in _one_line_error(capsys, "apa db")
    assert main(["audit", "verify", "--url", "nodialect://user:secret@host/db"]) == 2
    line = _one_line_error(capsys, "apa audit")
    assert "invalid database URL" in line and "secret" not in line


def test_an_unreachable_database_is_one_line(capsys) -> None:
    assert main(["db", "current", "--url", "postgresql://nobody:secret@127.0.0.1:1/x"]) == 1
    line = _one_line_error(capsys, "apa db")
    assert "cannot connect to the registry database" in line and "127.0.0.1:1/x" in line
    assert "secret" not in line
    assert main(["erase", "--user-id", "1", "--url", "sqlite:////no/such/folder/registry.db"]) == 1
    assert "cannot connect" in _one_line_error(capsys, "apa erase")


def test_an_unknown_migration_revision_is_one_line(capsys, tmp_path: Path) -> None:
    assert main(["db", "upgrade", "--revision", "deadbeef", "--url", f"sqlite:///{tmp_path / 'r.db'}"]) == 2
    line = _one_line_error(capsys, "apa db")
    assert "deadbeef" in line and "revisions: base, head" in line


def _assert_commands_ask_for_a_migration(capsys, url: str, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    for args in (
        ["audit", "verify", "--url", url],
        ["bootstrap", str(tmp_path / "model"), "--url", url],
        ["erase", "--user-id", "1", "--url", url],
    ):
        assert main(args) == 1, args
        line = _one_line_error(capsys, f"apa {args[0]}")
        assert "has no schema" in line and "run `apa db upgrade`" in line


def test_an_unmigrated_sqlite_database_asks_for_a_migration(capsys, tmp_path: Path) -> None:
    _assert_commands_ask_for_a_migration(capsys, f"sqlite:///{tmp_path / 'empty.db'}", tmp_path)


@pytest.mark.integration
def test_an_unmigrated_postgres_database_asks_for_a_migration(capsys, tmp_path: Path, pg_url: str) -> None:
    _assert_commands_ask_for_a_migration(capsys, pg_url, tmp_path)


def test_a_database_newer_than_the_code_says_so(capsys, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    assert main(["audit", "verify", "--url", url]) == 1
    assert "revision f00d, which this version of apa does not know" in _one_line_error(capsys, "apa audit")


def test_the_installed_script_prints_the_error_without_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "apa.cli", "db", "current"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "APA_DATABASE_URL": "notaurl"},
    )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("apa db: error: invalid database URL") and len(done.stderr.splitlines()) == 1
    )
