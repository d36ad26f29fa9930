"""`apa`: one entry point, each sub-command a plain typed function (litgpt style).

The parser is built by jsonargparse from the function's signature and docstring, so a
sub-command's arguments are its documentation (`apa train --help`). Only the chosen
sub-command's module is imported: `apa db upgrade` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, function) -- implementation lives next to the thing it drives
    "prepare": ("apa.data", "prepare_command"),
    "train": ("apa.sharded", "train_command"),
    "evaluate": ("apa.sharded", "evaluate_command"),
    "unlearn": ("apa.sharded", "unlearn_command"),
    "demo": ("apa.demo", "demo_command"),
    "experiment": ("apa.experiments", "experiment_command"),
    "bench": ("apa.bench", "bench_command"),
    "db": ("apa.db.cli", "db_command"),
    "bootstrap": ("apa.db.bootstrap", "bootstrap_command"),
    "audit": ("apa.db.audit", "audit_command"),
    "erase": ("apa.db.cli", "erase_command"),
    "serve-registry": ("services.registry.app", "serve_command"),
}


def _usage() -> str:
    lines = ["usage: apa <command> [options]   (apa <command> --help for its options)", "", "commands:"]
    for name, (module, func) in COMMANDS.items():
        lines.append(f"  {name:<16} {module}.{func}")
    return "\n".join(lines)


def resolve(name: str) -> Callable[..., Any]:
    """The function behind sub-command `name`."""
    module, func = COMMANDS[name]
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


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
    (`--no-full`), and list options repeated (`--user-id 1 --user-id 2`), as users expect."""
    params = set(inspect.signature(func).parameters)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"apa: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from jsonargparse import CLI

    func = resolve(name)
    try:
        result = CLI(func, args=normalise_args(func, rest), as_positional=True, prog=f"apa {name}")
    except (FileNotFoundError, ValueError, LookupError) as exc:  # bad input: a message, not a traceback
        print(f"apa {name}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "OperationalError" and "no such table" in str(exc):
            print(
                f"apa {name}: error: the registry database has no schema; run `apa db upgrade` first",
                file=sys.stderr,
            )
            return 2
        raise
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
