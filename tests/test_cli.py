"""The `apa` entry point: sub-command table, argument spelling users expect, clean errors."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from apa.cli import COMMANDS, ENTRY_POINT_GROUP, commands, main, normalise_args

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


@pytest.mark.parametrize("name", ["prepare", "train", "db", "audit"])
def test_sub_command_help_exits_cleanly(name):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
