"""`apa stack`: the real multi-process system on one machine (tansu, registry API, erasure consumer,
Celery trainer worker), started healthy and stopped with no process left behind.

The inference replica is covered by the inference service's own tests; these start the other parts
with the `tiny` backbone so that they take seconds.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apa import stack
from apa.settings import ENV_PREFIX
from db_fixtures import pg_url  # noqa: F401

PARTS_WITHOUT_INFERENCE = ("kafka", "registry", "erasure", "trainer")


def _members(state: stack.StackState) -> dict[str, list[int]]:
    return {p.name: stack.group_members(p.pid) for p in state.parts if p.pid is not None}


def _quiet(_message: str) -> None:
    pass


def test_stack_env_points_every_part_at_the_embedded_defaults(tmp_path: Path) -> None:
    env, external = stack.stack_env(stack.StackConfig(root=tmp_path, model="tiny"), {})
    assert external == {}
    assert env[ENV_PREFIX + "DATABASE_URL"] == f"sqlite:///{tmp_path.resolve() / 'registry.db'}"
    assert env[ENV_PREFIX + "CELERY_EMBEDDED_BROKER"].endswith("celery-broker.db")
    assert env[ENV_PREFIX + "WORKER_MODEL"] == "tiny"
    # the compliance token and the replicas' heartbeat token are generated, and differ
    assert len(env[ENV_PREFIX + "API_TOKEN"]) >= 24
    assert env[ENV_PREFIX + "API_TOKEN"] != env[ENV_PREFIX + "REPLICA_TOKEN"]


def test_settings_given_in_the_environment_win_and_name_the_external_parts(tmp_path: Path) -> None:
    given = {
        ENV_PREFIX + "DATABASE_URL": "postgresql+psycopg2://db/apa",
        ENV_PREFIX + "KAFKA_BOOTSTRAP": "kafka:9092",
        ENV_PREFIX + "CELERY_BROKER_URL": "amqp://guest:guest@rabbit:5672//",
        ENV_PREFIX + "API_TOKEN": "given-token",
    }
    env, external = stack.stack_env(stack.StackConfig(root=tmp_path), given)
    assert external == {
        "database": "postgresql+psycopg2://db/apa",
        "kafka": "kafka:9092",
        "celery broker": "amqp://guest:guest@rabbit:5672//",
    }
    for key, value in given.items():
        assert env[key] == value


def test_status_without_a_stack_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no stack is recorded here"):
        stack.StackState.load(tmp_path)


def test_stack_up_is_healthy_and_down_leaves_no_process(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    config = stack.StackConfig(root=root, parts=PARTS_WITHOUT_INFERENCE, model="tiny", ready_timeout_s=240)
    state = stack.up(
        config, {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}, say=_quiet
    )
    try:
        assert [p.name for p in state.parts] == list(PARTS_WITHOUT_INFERENCE)
        assert {p.name: stack.health(p) for p in state.parts} == dict.fromkeys(
            PARTS_WITHOUT_INFERENCE, "healthy"
        )
        table = stack.status_table(stack.StackState.load(root))
        for part in state.parts:
            assert part.name in table and part.log in table
            assert Path(part.log).is_file()
        env_file = root / stack.ENV_FILE
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it holds the generated tokens
        members = _members(state)
        assert all(members[name] for name in PARTS_WITHOUT_INFERENCE), members
        with pytest.raises(RuntimeError, match="already running"):
            stack.up(config, {}, say=_quiet)
    finally:
        stopped = stack.down(root, say=_quiet)
    assert sorted(stopped) == sorted(PARTS_WITHOUT_INFERENCE)
    assert _members(state) == {name: [] for name in PARTS_WITHOUT_INFERENCE}
    assert {stack.health(p) for p in stack.StackState.load(root).parts} == {"exited"}
    assert stack.down(root, say=_quiet) == []  # a second down finds nothing running


def test_a_part_that_dies_while_starting_stops_the_whole_stack(tmp_path: Path) -> None:
    root = tmp_path / "stack"

    def break_the_worker(state: stack.StackState) -> None:
        trainer = next(p for p in state.parts if p.name == "trainer")
        trainer.argv = [sys.executable, "-c", "import sys; print('worker: cannot start'); sys.exit(3)"]

    config = stack.StackConfig(
        root=root, parts=("kafka", "registry", "trainer"), model="tiny", ready_timeout_s=120
    )
    with pytest.raises(RuntimeError, match="trainer exited while starting(.|\n)*worker: cannot start"):
        stack.up(config, {}, say=_quiet, plan=break_the_worker)
    state = stack.StackState.load(root)
    assert _members(state) == {p.name: [] for p in state.parts}


def test_each_part_can_use_real_infrastructure(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """Postgres for the registry and RabbitMQ for Celery instead of the embedded parts."""
    root = tmp_path / "stack"
    environ = {
        ENV_PREFIX + "DATABASE_URL": pg_url,
        ENV_PREFIX + "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
    }
    config = stack.StackConfig(root=root, parts=("registry", "trainer"), model="tiny", ready_timeout_s=240)
    state = stack.up(config, environ, say=_quiet)
    try:
        assert state.external == {
            "database": pg_url,
            "celery broker": environ[ENV_PREFIX + "CELERY_BROKER_URL"],
        }
        assert {p.name: stack.health(p) for p in state.parts} == {"registry": "healthy", "trainer": "healthy"}
        assert not (root / "registry.db").exists()  # nothing fell back to SQLite
        table = stack.status_table(state)
        assert "external" in table and "database" in table
    finally:
        stack.down(root, say=_quiet)
    assert _members(state) == {"registry": [], "trainer": []}


def test_the_cli_shows_status_and_stops_the_stack(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    apa = [sys.executable, "-m", "apa.cli", "stack"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    up = subprocess.run(
        [
            *apa,
            "up",
            "--dir",
            str(root),
            "--model",
            "tiny",
            "--parts",
            "kafka",
            "--parts",
            "registry",
            "--detach",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert up.returncode == 0, up.stderr
    state = stack.StackState.load(root)
    try:
        shown = subprocess.run([*apa, "status", "--dir", str(root)], env=env, capture_output=True, text=True)
        assert shown.returncode == 0
        assert "registry" in shown.stdout and "healthy" in shown.stdout
    finally:
        down = subprocess.run([*apa, "down", "--dir", str(root)], env=env, capture_output=True, text=True)
    assert down.returncode == 0 and "stopped" in down.stdout
    deadline = time.monotonic() + 10
    while any(_members(state).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _members(state) == {"kafka": [], "registry": []}
