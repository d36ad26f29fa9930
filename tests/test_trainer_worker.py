"""Trainer workers as real Celery worker processes (no eager mode) on the local RabbitMQ and on the
embedded broker, retraining a tiny real model registered in Postgres: end to end from a raw Kafka
message to a completed request, a worker killed with SIGKILL mid-training, and erasures that hit a
shard while it retrains. Each ends with nothing lost and nothing tainted promoted."""

# ruff: noqa: F811 - pytest fixtures imported from the fixture modules are redefined as arguments

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.cli import main
from apa.db import audit
from apa.db.models import AdapterVersion, Sample
from apa.db.session import session_scope
from apa.events import ErasureRequested
from apa.modeldir import ModelDir
from apa.outbox import Relay
from apa.pseudonyms import pseudonymizer_from_settings
from apa.retrains import erase
from apa.settings import Settings
from apa.taskqueue import CelerySender, make_celery
from db_fixtures import pg_engine, pg_url  # noqa: F401 - fixtures
from dump_helpers import files_holding
from erasure_fixtures import (
    FAST_TRAIN,
    Names,
    ServiceProcess,
    bootstrapped,
    build_tiny_model,
    publish_raw,
    read_topic,
    requests,
    service_env,
    shards,
    tasks,
    wait_until,
)
from kafka_fixtures import kafka_bootstrap  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
MODEL = "tiny-shop"
VICTIM, SECOND, THIRD = "victim-0", "victim-1", "victim-2"
PSEUDO = pseudonymizer_from_settings()
SLOW_TRAIN = replace(FAST_TRAIN, epochs=40, patience=1000)
"""A retrain of one shard takes a few seconds: long enough to kill a worker in the middle of it."""


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K=2 model directory on the tiny model; each victim user has samples in both shards."""
    root = tmp_path_factory.mktemp("tiny") / MODEL
    build_tiny_model(root, train=32, shards=2, train_config=SLOW_TRAIN)
    partition = ModelDir(root).partition()
    for user in (VICTIM, SECOND, THIRD):
        index = int(user.rsplit("-", 1)[1])
        held = {
            k for k, ids in enumerate(partition.shards) for i in ids if int(i.rsplit(":", 1)[1]) % 6 == index
        }
        assert held == {0, 1}, (user, held)
    return root


@dataclass
class Stack:
    """A Postgres registry holding the tiny model, and the settings its services share."""

    engine: Engine
    url: str
    tmp: Path
    names: Names
    model_dir: Path
    store: ArtifactStore

    def env(self, broker: str | None, bootstrap: str | None = None, **extra: str) -> dict[str, str]:
        env = service_env(self.url, bootstrap, self.names, self.tmp, **extra)
        if broker:
            env["APA_CELERY_BROKER_URL"] = broker
        return env

    def settings(self, broker: str | None) -> Settings:
        return Settings(
            database_url=self.url,
            celery_broker_url=broker,
            celery_embedded_broker=str(self.tmp / "broker.sqlite"),
            retrain_queue=self.names.queue,
            shard_events_topic=self.names.shard_events_topic,
        )

    def worker(self, broker: str | None, name: str, **extra: str) -> ServiceProcess:
        return ServiceProcess(
            "services.trainer",
            self.env(broker, **extra),
            self.tmp / f"{name}.log",
            "--hostname",
            f"{name}@test",
        )

    def erase(self, broker: str | None, request_id: str, user: str) -> None:
        """What the erasure service does with one event: the transaction, then the relay."""
        settings = self.settings(broker)
        with session_scope(self.engine) as session:
            erase(session, ErasureRequested(request_id, user), PSEUDO, settings)
        Relay(
            self.engine,
            settings,
            tasks=CelerySender(make_celery(settings), settings.retrain_queue),
            discard_events=True,
        ).drain()


@pytest.fixture()
def stack(pg_engine: Engine, template: Path, tmp_path: Path) -> Iterator[Stack]:
    model_dir = Path(shutil.copytree(template, tmp_path / MODEL))
    store = ArtifactStore(tmp_path / "artifacts")
    bootstrapped(pg_engine, model_dir, store, PSEUDO, MODEL)
    names = Names.fresh()
    yield Stack(
        pg_engine, pg_engine.url.render_as_string(hide_password=False), tmp_path, names, model_dir, store
    )
    _delete_queue(names.queue)


def _delete_queue(queue: str) -> None:
    """Remove the test's queue from the shared RabbitMQ."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ, connect_timeout=5) as connection:
            channel = connection.channel()
            channel.queue_delete(queue)
    except Exception:  # never declared (embedded-broker tests), or RabbitMQ gone: nothing to clean
        pass


def _samples_of(engine: Engine, user: str) -> set[str]:
    with session_scope(engine) as session:
        return set(session.scalars(select(Sample.sample_pid).where(Sample.user_pid == PSEUDO.user(user))))


def _serving(engine: Engine) -> dict[str, AdapterVersion]:
    with session_scope(engine) as session:
        return {
            v.shard_id: v
            for v in session.scalars(select(AdapterVersion).where(AdapterVersion.state == "serving"))
        }


def _all_serving_again(engine: Engine) -> bool:
    return all(s.state == "serving" for s in shards(engine).values())


def _check_exact(stack: Stack, users: list[str]) -> None:
    """Every request completed, the audit verifies, no serving manifest (registry or store) and no
    file of the model directory holds an erased user's samples."""
    assert {r.status for r in requests(stack.engine).values()} == {"completed"}
    with session_scope(stack.engine) as session:
        assert audit.verify(session).ok
    erased = set().union(*(_samples_of(stack.engine, u) for u in users))
    assert erased
    for shard_id, version in _serving(stack.engine).items():
        assert version.version >= 2, shard_id  # retrained, not the bootstrap version
        assert not erased & set(version.manifest["sample_pids"]), shard_id
        stored = stack.store.manifest(version.artifact_uri)
        assert not erased & set(stored["sample_pids"]) and stored["adapter_sha256"] == version.adapter_sha256
    assert main(["audit", "verify", "--url", stack.url]) == 0
    assert files_holding(stack.model_dir, users) == {}


def test_a_raw_kafka_erasure_ends_with_retrained_adapters_serving_and_the_request_completed(
    stack: Stack, kafka_bootstrap: str
) -> None:
    stack.names.create_topics(kafka_bootstrap)
    consumer = ServiceProcess(
        "services.erasure", stack.env(RABBITMQ, kafka_bootstrap), stack.tmp / "consumer.log"
    )
    worker = stack.worker(RABBITMQ, "w1", APA_KAFKA_BOOTSTRAP=kafka_bootstrap)
    try:
        message = {"request_id": "r-victim", "user_id": VICTIM, "requested_at": "2026-01-15T10:00:00+00:00"}
        publish_raw(
            kafka_bootstrap, stack.names.erasure_topic, [(VICTIM.encode(), json.dumps(message).encode())]
        )
        wait_until(
            lambda: any(s.state != "serving" for s in shards(stack.engine).values()), 90, "stale shards"
        )
        wait_until(
            lambda: requests(stack.engine)["r-victim"].status == "completed", 240, "the request completed"
        )
    finally:
        consumer.stop()
        worker.stop()
    assert _all_serving_again(stack.engine)
    _check_exact(stack, [VICTIM])
    events = [json.loads(r.value) for r in read_topic(kafka_bootstrap, stack.names.shard_events_topic, 4)]
    stale = {e["shard_id"] for e in events if e["state"] == "stale"}
    ready = {e["shard_id"]: e["adapter_version"] for e in events if e["state"] == "serving"}
    assert stale == set(ready) == set(shards(stack.engine))
    assert ready == {k: v.version for k, v in _serving(stack.engine).items()}
    assert [t.state for t in tasks(stack.engine)] == ["done"] * len(stale)


def test_a_worker_killed_mid_training_gets_its_task_redelivered_and_nothing_is_lost(stack: Stack) -> None:
    stack.erase(RABBITMQ, "r-victim", VICTIM)
    queued = tasks(stack.engine)
    first = stack.worker(RABBITMQ, "w1")
    second = None
    try:
        wait_until(
            lambda: any(s.state == "retraining" for s in shards(stack.engine).values()),
            120,
            "a retrain to start",
            0.05,
        )
        time.sleep(0.5)  # in the middle of training
        first.kill9()
        killed = [t for t in tasks(stack.engine) if t.state == "started"]
        assert len(killed) == 1 and not any(v.version >= 2 for v in _serving(stack.engine).values())
        second = stack.worker(RABBITMQ, "w2")
        wait_until(lambda: _all_serving_again(stack.engine), 240, "every shard serving again")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    ledger = tasks(stack.engine)
    assert [t.id for t in ledger] == [t.id for t in queued]  # redelivered, not queued again
    assert {t.id: t.deliveries for t in ledger}[killed[0].id] == 2
    assert all(t.state == "done" and t.promoted for t in ledger)
    assert "2 already have a live task" in second.log() and "redelivered" in second.log()
    _check_exact(stack, [VICTIM])
    assert len([k for k in stack.store.keys() if "/v2-" in k]) == len(ledger)  # no orphan artifact


def test_two_erasures_hitting_a_retraining_shard_give_a_second_retrain_and_no_stale_promotion(
    stack: Stack,
) -> None:
    stack.erase(RABBITMQ, "r-1", VICTIM)
    worker = stack.worker(RABBITMQ, "w1")
    try:
        wait_until(
            lambda: any(s.state == "retraining" for s in shards(stack.engine).values()),
            120,
            "a retrain to start",
            0.05,
        )
        stack.erase(RABBITMQ, "r-2", SECOND)
        stack.erase(RABBITMQ, "r-3", THIRD)
        wait_until(
            lambda: (
                _all_serving_again(stack.engine)
                and len(requests(stack.engine)) == 3
                and {r.status for r in requests(stack.engine).values()} == {"completed"}
            ),
            300,
            "every request completed",
        )
    finally:
        worker.stop()
    ledger = tasks(stack.engine)
    refused = [t for t in ledger if t.promoted is False]
    assert refused, "the retrain overtaken by the two erasures must not be promoted"
    with session_scope(stack.engine) as session:
        stale_versions = session.scalars(select(AdapterVersion).where(AdapterVersion.state == "stale")).all()
        served = session.scalars(select(AdapterVersion).where(AdapterVersion.promoted_at.is_not(None))).all()
    erased_later = _samples_of(stack.engine, SECOND) | _samples_of(stack.engine, THIRD)
    for version in served:  # nothing promoted ever held a sample erased before its promotion
        if version.version >= 2:
            assert not erased_later & set(version.manifest["sample_pids"]), version.shard_id
    assert all(not v.promoted_at for v in stale_versions)
    _check_exact(stack, [VICTIM, SECOND, THIRD])
    # coalescing: at most one retrain per shard per burst, plus one per overtaken retrain
    assert len(ledger) <= 2 * len(shards(stack.engine))


def test_on_the_embedded_broker_a_worker_resumes_stale_shards_at_start(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    # `apa erase` records the erasure without any outbox row: only resume can find the stale shards
    assert main(["erase", "--user-id", VICTIM, "--request-id", "r-cli", "--url", stack.url]) == 0
    capsys.readouterr()
    assert not tasks(stack.engine)
    worker = stack.worker(None, "w1")
    try:
        wait_until(
            lambda: requests(stack.engine)["r-cli"].status == "completed", 240, "the request completed"
        )
    finally:
        worker.stop()
    assert "resume: 2 stale shards queued for retraining" in worker.log()
    assert (stack.tmp / "broker.sqlite").is_file()
    assert [t.reason for t in tasks(stack.engine)] == ["resume", "resume"]
    _check_exact(stack, [VICTIM])
