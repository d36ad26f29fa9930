"""The `apa` entry point: sub-command table, argument spelling users expect, clean errors."""

from __future__ import annotations

import importlib

import pytest

from apa.cli import COMMANDS, main, normalise_args


def _example(
    data: str = "x", full: bool = False, user_id: list[str] | None = None, train_limit: int | None = None
) -> int:
    return 0


def test_every_sub_command_resolves_to_a_documented_function():
    for name, (module, func) in COMMANDS.items():
        target = getattr(importlib.import_module(module), func)
        assert callable(target) and (target.__doc__ or "").strip(), name


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
