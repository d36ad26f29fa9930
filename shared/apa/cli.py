"""`apa`: one entry point, each sub-command a plain typed function (litgpt style).

The parser is built by jsonargparse from the function's signature and docstring, so a
sub-command's arguments are its documentation (`apa train --help`). Only the chosen
sub-command's module is imported: `apa db upgrade` does not pay for importing torch.

The library's own commands are in `COMMANDS`. Other installed packages (the services) add
commands through the entry-point group `apa.commands`, one line in their pyproject.toml:

    [project.entry-points."apa.commands"]
    serve-registry = "services.registry.app:serve_command"

so the library never imports or names a service. `apa --help` shows the first line of each
function's docstring, read from its source file without importing it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

from apa.errors import UserError

ENTRY_POINT_GROUP = "apa.commands"
"""Entry-point group through which installed packages add `apa` sub-commands."""

COMMANDS: dict[str, str] = {
    # name: "module:function" -- implementation lives next to the thing it drives
    "prepare": "apa.data:prepare_command",
    "train": "apa.sharded:train_command",
    "evaluate": "apa.sharded:evaluate_command",
    "unlearn": "apa.sharded:unlearn_command",
    "demo": "apa.demo:demo_command",
    "stack": "apa.stack:stack_command",
    "experiment": "apa.experiments:experiment_command",
    "bench": "apa.bench:bench_command",
    "db": "apa.db.cli:db_command",
    "bootstrap": "apa.db.bootstrap:bootstrap_command",
    "audit": "apa.db.audit:audit_command",
    "erase": "apa.db.cli:erase_command",
}
"""The library's sub-commands; services add theirs through `ENTRY_POINT_GROUP`."""


@dataclass(frozen=True)
class Command:
    """One sub-command: its name and the function behind it, as `module:function`."""

    name: str
    target: str

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def function(self) -> str:
        return self.target.partition(":")[2]

    def load(self) -> Callable[..., Any]:
        """Import the module and return the function."""
        return getattr(importlib.import_module(self.module), self.function)  # type: ignore[no-any-return]

    def summary(self) -> str:
        """The first line of the function's docstring, read from source (nothing is imported)."""
        doc = _docstring(self.module, self.function)
        return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def commands() -> dict[str, Command]:
    """Every sub-command: the library's, then those registered under `ENTRY_POINT_GROUP`.

    Discovery reads package metadata only; no command's module is imported. A registered name
    that the library already uses is ignored (the library's command wins).
    """
    from importlib.metadata import entry_points

    found = {name: Command(name, target) for name, target in COMMANDS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, Command(ep.name, ep.value))
    return found


def find_command(name: str) -> Command | None:
    """Sub-command `name` (None when there is none); package metadata is read only for a name
    that is not one of the library's."""
    if name in COMMANDS:
        return Command(name, COMMANDS[name])
    return commands().get(name)


def resolve(name: str) -> Callable[..., Any]:
    """The function behind sub-command `name` (KeyError when there is none)."""
    command = find_command(name)
    if command is None:
        raise KeyError(name)
    return command.load()


def _module_source(module: str) -> tuple[str, bool] | None:
    """The source text of `module` and whether it is a package, found without importing it or
    its parent packages (None when it cannot be found)."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None


def _docstring(module: str, name: str, depth: int = 3) -> str | None:
    """The docstring of function `name` of `module`, from its syntax tree; follows
    `from X import name` re-exports (`apa.data` re-exports `prepare_command`)."""
    found = _module_source(module)
    if found is None or depth == 0:
        return None
    source, is_package = found
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return ast.get_docstring(node)
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            package = module if is_package else module.rpartition(".")[0]
            source_module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            return _docstring(source_module, original, depth - 1)
    return None


def _usage(available: dict[str, Command]) -> str:
    lines = ["usage: apa <command> [options]   (apa <command> --help for its options)", "", "commands:"]
    width = max(len(name) for name in available) + 2
    for name, command in available.items():
        lines.append(f"  {name:<{width}}{command.summary()}".rstrip())
    return "\n".join(lines)


def _bool_params(func: Callable[..., Any]) -> set[str]:
    hints = typing.get_type_hints(func)
    return {
        name
        for name, hint in hints.items()
        if hint is bool
        or (typing.get_origin(hint) in (typing.Union, types.UnionType) and bool in typing.get_args(hint))
    }


def _list_params(func: Callable[..., Any]) -> set[str]:
    hints = typing.get_type_hints(func)

    def is_list(hint: Any) -> bool:
        if typing.get_origin(hint) is list:
            return True
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return any(is_list(h) for h in typing.get_args(hint))
        return False

    return {name for name, hint in hints.items() if is_list(hint)}


def normalise_args(func: Callable[..., Any], args: list[str]) -> list[str]:
    """Accept `--train-limit` for `--train_limit`, bool options bare (`--full`) or negated
    (`--no-full`), list options repeated (`--user-id 1 --user-id 2`), and a leading word for an
    optional `what` (`apa experiment mia`), as users expect."""
    signature = inspect.signature(func).parameters
    params = set(signature)
    what = signature.get("what")
    if args and not args[0].startswith("-") and what is not None and what.default is not what.empty:
        args = [f"--what={args[0]}", *args[1:]]  # `apa experiment mia`: a leading word picks `what`
    flags = _bool_params(func)
    lists = _list_params(func)
    out: list[str] = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        nxt = args[i + 1] if i + 1 < len(args) else "--"
        if name.startswith("no_") and name[3:] in flags and not eq:
            out.append(f"--{name[3:]}=false")
        elif name in flags and not eq and nxt.lower() not in {"true", "false"}:
            out.append(f"--{name}=true")
        elif name in lists and not eq and not nxt.startswith(("[", "--")):
            out.append(f"--{name}+")  # append one item; `--name '[a,b]'` still sets the whole list
        elif name in params:
            out.append(f"--{name}{eq}{value}")
        else:
            out.append(arg)
    return out


def run(func: Callable[..., Any], args: list[str], prog: str) -> int:
    """Parse `args` for `func` with jsonargparse, call it and return its exit status.

    A function with a `subcommands` attribute (name -> function) is a group: `args[0]` picks the
    sub-command (`apa audit verify --anchors F`). Errors the user can act on (`apa.errors.UserError`,
    a missing file, a bad value) are one line `<prog>: error: <message>` on stderr and a non-zero
    status, never a traceback.
    """
    from jsonargparse import CLI

    subcommands: dict[str, Callable[..., Any]] | None = getattr(func, "subcommands", None)
    try:
        if subcommands:  # `apa audit verify ...`: the function names its sub-commands
            name = args[0] if args else ""
            rest = normalise_args(subcommands[name], args[1:]) if name in subcommands else args[1:]
            result = CLI(subcommands, args=[name, *rest] if args else [], as_positional=True, prog=prog)
        else:
            result = CLI(func, args=normalise_args(func, args), as_positional=True, prog=prog)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, ValueError, LookupError) as exc:  # bad input: a message, not a traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return int(result) if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage(commands()))
        return 0
    name, rest = argv[0], argv[1:]
    command = find_command(name)
    if command is None:
        print(f"apa: error: unknown command {name!r}\n\n{_usage(commands())}", file=sys.stderr)
        return 2
    return run(command.load(), rest, prog=f"apa {name}")


if __name__ == "__main__":
    raise SystemExit(main())
