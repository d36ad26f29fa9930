"""Helpers for the erasure-service and trainer-worker tests: real service processes (`python -m
services.erasure`, `python -m services.trainer`) started with their settings in the environment,
Postgres registries, a tiny trained model, and readers for the Kafka topics and the registry.

Import what you use (`from erasure_fixtures import ServiceProcess, wait_until`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.db.bootstrap import bootstrap
from apa.db.models import ErasureRequest, OutboxMessage, RetrainTask, Shard
from apa.db.session import session_scope
from apa.kafka import ensure_topic, tansu_command, wait_for_broker
from apa.partition import PartitionConfig
from apa.pseudonyms import Pseudonymizer
from apa.training import TrainConfig

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
SERVICE_TIMEOUTS = {
    "APA_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "APA_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "APA_KAFKA_MAX_POLL_INTERVAL_MS": "30000",
    "APA_KAFKA_TIMEOUT_S": "10",
}
"""Short, Kafka-valid rebalance settings (tansu joins a group in about half the session timeout)."""
FAST_TRAIN = TrainConfig(
    lr=3e-2, epochs=2, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)


def wait_until(check: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


@dataclass
class Names:
    """Per-test Kafka topics, consumer group and Celery queue on the shared brokers."""

    erasure_topic: str
    dlq_topic: str
    shard_events_topic: str
    group: str
    queue: str

    @classmethod
    def fresh(cls) -> Names:
        tag = uuid.uuid4().hex[:8]
        return cls(
            f"apa.erasure-requests.{tag}",
            f"apa.erasure-requests.dlq.{tag}",
            f"apa.shard-events.{tag}",
            f"apa-erasure-{tag}",
            f"apa.retrain.{tag}",
        )

    def env(self) -> dict[str, str]:
        return {
            "APA_ERASURE_TOPIC": self.erasure_topic,
            "APA_DEAD_LETTER_TOPIC": self.dlq_topic,
            "APA_SHARD_EVENTS_TOPIC": self.shard_events_topic,
            "APA_ERASURE_CONSUMER_GROUP": self.group,
            "APA_RETRAIN_QUEUE": self.queue,
        }

    def create_topics(self, bootstrap: str, partitions: int = 2) -> None:
        ensure_topic(bootstrap, self.erasure_topic, partitions)
        ensure_topic(bootstrap, self.dlq_topic, 1)
        ensure_topic(bootstrap, self.shard_events_topic, 1)


class ServiceProcess:
    """A service started as its own process (`python -m <module>`), output to a log file."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.module, self.log_path = module, log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.module} still running after {timeout_s:.0f} s:\n{self.tail()}"
            ) from None

    def kill9(self) -> None:
        """SIGKILL: no clean-up, no commit, no leave-group."""
        if self.running():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout_s`)."""
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def start_tansu(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """An in-memory tansu broker on `port` (for tests that start the broker after a service)."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            tansu_command(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    wait_for_broker(f"127.0.0.1:{port}", timeout_s=30)
    return process


def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0) -> list[Any]:
    """The first `count` records of every partition of `topic`, read without a consumer group."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap], auto_offset_reset="earliest", enable_auto_commit=False
    )
    try:
        partitions = wait_until(lambda: consumer.partitions_for_topic(topic), 10, f"topic {topic}")
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        # a little longer, to see duplicates that should not be there
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def publish_raw(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    """Publish raw (key, value) bytes, as an account system's producer would."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", max_request_size=4 << 20)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


# --- registry state -----------------------------------------------------------------------------------


def requests(engine: Engine) -> dict[str, ErasureRequest]:
    with session_scope(engine) as session:
        return {r.request_id: r for r in session.scalars(select(ErasureRequest))}


def outbox(engine: Engine) -> list[OutboxMessage]:
    with session_scope(engine) as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def tasks(engine: Engine) -> list[RetrainTask]:
    with session_scope(engine) as session:
        return list(session.scalars(select(RetrainTask).order_by(RetrainTask.id)))


def shards(engine: Engine) -> dict[str, Shard]:
    with session_scope(engine) as session:
        return {s.id: s for s in session.scalars(select(Shard))}


def bootstrapped(
    engine: Engine, model_dir: Path, store: ArtifactStore, pseudonymizer: Pseudonymizer, model_id: str
) -> Engine:
    with session_scope(engine) as session:
        bootstrap(session, model_dir, pseudonymizer, store, model_id=model_id)
    return engine


def build_tiny_model(
    root: Path, *, users: int = 6, train: int = 24, shards: int = 3, train_config: TrainConfig = FAST_TRAIN
) -> Path:
    """A K-shard model directory trained on the loadable tiny model (seconds on CPU)."""
    from apa.pseudonyms import pseudonymizer_from_settings
    from apa.sharded import build_model
    from model_fixtures import loadable_tiny_backbone, make_samples

    splits = {
        "train": make_samples(train, seed=1, users=users, user_prefix="victim-"),
        "valid": make_samples(8, "valid", seed=2, users=users, user_prefix="victim-"),
        "test": make_samples(4, "test", seed=3, users=users, user_prefix="victim-"),
    }
    build_model(
        loadable_tiny_backbone(),
        splits,
        root,
        PartitionConfig(strategy="random", num_shards=shards, seed=0),
        train_config,
        pseudonymizer=pseudonymizer_from_settings(),
        progress=False,
    )
    return root


def service_env(url: str, bootstrap: str | None, names: Names, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a consumer or worker process of one test."""
    env = {
        "APA_DATABASE_URL": url,
        "APA_ARTIFACT_STORE": str(tmp / "artifacts"),
        "APA_CELERY_EMBEDDED_BROKER": str(tmp / "broker.sqlite"),
        "APA_LOG_LEVEL": "INFO",
        "APA_TASK_HEARTBEAT_S": "1",
        **SERVICE_TIMEOUTS,
        **names.env(),
        **extra,
    }
    if bootstrap:
        env["APA_KAFKA_BOOTSTRAP"] = bootstrap
    return env


def processes(*items: ServiceProcess) -> Iterator[None]:
    """Stop every process at the end of a test (for `yield from` in fixtures)."""
    try:
        yield
    finally:
        for item in items:
            item.stop()
