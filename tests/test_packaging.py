"""The built package: an installed (non-editable) `apa` finds its migrations without the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from apa.db.session import head_revision, migrations_dir

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "shared", "services", "migrations"]


def test_migrations_are_found_through_the_package_and_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APA_MIGRATIONS_DIR", raising=False)
    import apa.migrations

    assert migrations_dir() == Path(apa.migrations.__file__).parent
    assert {"alembic.ini", "env.py", "script.py.mako", "versions"} <= {
        p.name for p in migrations_dir().iterdir()
    }
    copy = shutil.copytree(
        migrations_dir(), tmp_path / "elsewhere", ignore=shutil.ignore_patterns("__pycache__")
    )
    monkeypatch.setenv("APA_MIGRATIONS_DIR", str(copy))
    assert migrations_dir() == copy
    assert head_revision() is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of its sources (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + [str(src), "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("apa-*.whl")
    return built


def test_the_wheel_ships_every_migration_script(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"apa/migrations/{p.relative_to(REPO / 'migrations').as_posix()}"
        for p in (REPO / "migrations").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {
        "apa/migrations/alembic.ini",
        "apa/migrations/env.py",
        "apa/migrations/script.py.mako",
    } <= expected
    assert expected <= names
    assert not any(n.startswith("migrations/") for n in names)  # no top-level `migrations` package


def test_the_installed_wheel_migrates_a_database_from_its_own_files(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import apa
        from apa.db.session import head_revision, migrations_dir
        from apa.cli import main
        assert apa.__file__.startswith({str(target)!r}), apa.__file__
        assert migrations_dir().is_relative_to({str(target)!r}), migrations_dir()
        print(head_revision())
        sys.exit(main(["db", "upgrade", "--url", "sqlite:///{tmp_path / "installed.db"}"]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "APA_MIGRATIONS_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    head = head_revision()
    assert done.stdout.splitlines()[0] == head
    assert f"revision {head} (at head)" in done.stdout
