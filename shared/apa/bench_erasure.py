"""`apa bench erasure`: the erasure service's throughput and latency on real components.

Starts a tansu Kafka broker and a throwaway Postgres database, registers a synthetic model (K shards,
one user per erasure, each user's samples spread over shards; fake adapters: nothing is trained),
runs the erasure service as its own process (`apa run-erasure-consumer`, found through the
`apa.commands` entry points: the library does not import it) and publishes raw erasure messages:

* **latency** (paced): events at a steady rate; per event, publish -> its shards marked stale in the
  registry (`excluded_at`, set in the transaction that marks them) and publish -> the `stale` shard
  events acknowledged by Kafka (the outbox rows' `sent_at`);
* **throughput** (burst): events published as fast as the producer goes; events per second from the
  first publish to the last event's registry commit, and how many were lost (never recorded);
* **retrains per 100 erasures**, with and without coalescing: the retrain tasks 100 erasures queue
  when they arrive before any retrain starts (the common case: a burst of requests takes seconds, a
  retrain minutes), against the shards they made stale.

Writes `erasure.json` and `erasure.png` to OUT. Every clock read is on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import Engine

from apa.settings import Settings

log = logging.getLogger(__name__)

EVENTS_PER_SECOND_TARGET = 200.0
P99_LATENCY_TARGET_S = 1.0
DEFAULT_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"
MODEL_ID = "bench-model"
TIMEOUTS = {
    "APA_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "APA_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "APA_KAFKA_MAX_POLL_INTERVAL_MS": "60000",
    "APA_KAFKA_TIMEOUT_S": "10",
}


@dataclass(frozen=True)
class ErasureBenchConfig:
    """What `apa bench erasure` runs."""

    num_shards: int = 8
    """K of the synthetic model."""
    samples_per_user: int = 3
    """Train samples per user (each lands in a random shard), plus one validation sample."""
    paced_events: int = 200
    """Events of the latency phase."""
    paced_rate: float = 10.0
    """Events per second in the latency phase (below the service's capacity: latency without a backlog)."""
    burst_events: int = 1000
    """Events of the throughput phase, published at once."""
    coalesce_events: int = 100
    """Erasures per coalescing run (with, then without coalescing)."""
    inprocess_events: int = 100
    """Erasure transactions run in this process, without Kafka (what one costs the registry): this
    many one transaction each, then this many again in group-commit batches."""
    group_commit_batch: int = 100
    """Events per transaction in the in-process group-commit phase (the consumer's poll batch)."""
    partitions: int = 4
    """Partitions of the erasure topic."""
    seed: int = 0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": None if not values else round(1000 * (_pct(values, 50) or 0.0), 1),
        "p95_ms": None if not values else round(1000 * (_pct(values, 95) or 0.0), 1),
        "p99_ms": None if not values else round(1000 * (_pct(values, 99) or 0.0), 1),
        "max_ms": None if not values else round(1000 * max(values), 1),
    }


# --- the components ------------------------------------------------------------------------------------


@contextmanager
def _tansu(workdir: Path) -> Iterator[str]:
    import socket

    from apa.kafka import tansu_command, wait_for_broker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (workdir / "tansu.log").open("ab") as out:
        process = subprocess.Popen(
            tansu_command(port), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_broker(f"127.0.0.1:{port}", timeout_s=60)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def _database(server: str) -> Iterator[str]:
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    name = f"apa_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _synthetic_model(root: Path, users: list[str], config: ErasureBenchConfig) -> None:
    """A model directory: every user has `samples_per_user` train samples in random shards and one
    validation sample; each shard a fake adapter (random LoRA-shaped tensors, nothing trained)."""
    import torch

    from apa.backbone import BackboneConfig
    from apa.data import Sample
    from apa.modeldir import ModelDir, ModelInfo, ShardManifest
    from apa.partition import Partition, PartitionConfig
    from apa.prompts import MOVIE_INSTRUCTION, answer_text
    from apa.pseudonyms import pseudonymizer_from_settings
    from apa.training import TrainConfig

    rng = random.Random(config.seed)
    pseudonymizer = pseudonymizer_from_settings()

    def sample(user: str, split: str, i: int) -> Sample:
        interactions = tuple(f"{user}:{split}:{i}:{j}" for j in range(3))
        return Sample(
            sample_id=f"{user}:{split}:{i}",
            user_id=user,
            split=split,  # type: ignore[arg-type]
            instruction=MOVIE_INSTRUCTION,
            input=f"User Preference: {list(interactions[:-1])}\nWhether the user will enjoy {interactions[-1]}?",
            output=answer_text(i % 2),
            label=i % 2,
            interaction_ids=interactions,
        )

    train = [sample(u, "train", i) for u in users for i in range(config.samples_per_user)]
    valid = [sample(u, "valid", 0) for u in users]
    shards: list[list[str]] = [[] for _ in range(config.num_shards)]
    for s in train:
        shards[rng.randrange(config.num_shards)].append(s.sample_id)
    train_config = TrainConfig(lora_r=2, lora_alpha=4)
    info = ModelInfo(
        base_model="bench-fake",
        base_model_digest="0" * 64,
        backbone_config=BackboneConfig(model="tiny"),
        partition_config=PartitionConfig(strategy="random", num_shards=config.num_shards),
        train_config=train_config,
        num_shards=config.num_shards,
        pseudonym_key_id=pseudonymizer.key_id,
    )
    md = ModelDir.create(
        root,
        info,
        {"train": train, "valid": valid, "test": []},
        Partition(shards=shards, centroids=None, config=info.partition_config),
    )
    for k, ids in enumerate(shards):
        manifest = ShardManifest(
            shard_index=k,
            version=1,
            sample_pids=tuple(pseudonymizer.sample(i) for i in ids),
            train_config=train_config,
            base_model=info.base_model,
            base_model_digest=info.base_model_digest,
            pseudonym_key_id=info.pseudonym_key_id,
        )
        weights = {"lora_A": torch.randn(2, 4), "lora_B": torch.zeros(4, 2)}
        md.save_shard(manifest, weights, {"r": 2, "peft_type": "LORA"})


class _Consumer:
    """The erasure service, as its own process (`python -m apa.cli run-erasure-consumer`)."""

    def __init__(self, env: dict[str, str], log_path: Path, workdir: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "apa.cli", "run-erasure-consumer"],
                cwd=workdir,  # not a source checkout: the installed package metadata names the command
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"the erasure service exited with {self.process.returncode}:\n{tail}")


# --- measuring ------------------------------------------------------------------------------------------


class _Run:
    """One benchmark run: the database, the broker, the producer and the publish clock."""

    def __init__(self, engine: Engine, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.engine, self.topic = engine, topic
        self.producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=2)
        self.published: dict[str, float] = {}

    def publish(self, request_id: str, user: str) -> None:
        body = {
            "request_id": request_id,
            "user_id": user,
            "requested_at": datetime.now().astimezone().isoformat(),
        }
        self.published[request_id] = time.time()
        self.producer.send(self.topic, key=user.encode(), value=json.dumps(body).encode())

    def recorded(self, request_ids: list[str]) -> dict[str, float]:
        """request id -> excluded_at (epoch seconds) of the ones the registry holds."""
        from apa.db.models import ErasureRequest

        out: dict[str, float] = {}
        with self.engine.connect() as conn:
            for chunk in range(0, len(request_ids), 1000):
                ids = request_ids[chunk : chunk + 1000]
                rows = conn.execute(
                    select(ErasureRequest.request_id, ErasureRequest.excluded_at).where(
                        ErasureRequest.request_id.in_(ids)
                    )
                )
                out.update({rid: at.timestamp() for rid, at in rows if at is not None})
        return out

    def wait(self, request_ids: list[str], consumer: _Consumer, timeout_s: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.recorded(request_ids)
            if len(found) == len(request_ids) or time.monotonic() > deadline:
                return found
            consumer.check()
            time.sleep(0.2)

    def stale_published(self, request_ids: list[str], timeout_s: float = 30.0) -> dict[str, float]:
        """request id -> when its last `stale` shard event was acknowledged by Kafka (outbox sent_at)."""
        from apa.db.models import OutboxMessage

        deadline = time.monotonic() + timeout_s
        wanted = set(request_ids)
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(OutboxMessage.request_id, OutboxMessage.sent_at).where(
                        OutboxMessage.kind == "event"
                    )
                ).all()
            pending = [rid for rid, sent in rows if rid in wanted and sent is None]
            if not pending or time.monotonic() > deadline:
                last: dict[str, float] = {}
                for rid, sent in rows:
                    if rid in wanted and sent is not None:
                        last[rid] = max(last.get(rid, 0.0), sent.timestamp())
                return last
            time.sleep(0.2)

    def tasks_created(self) -> int:
        from apa.db.models import RetrainTask

        with self.engine.connect() as conn:
            return len(conn.execute(select(RetrainTask.id)).all())

    def shards_hit(self, request_ids: list[str]) -> int:
        from apa.db.models import ErasureRequestShard

        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ErasureRequestShard.request_id).where(ErasureRequestShard.request_id.in_(request_ids))
            )
            return len(rows.all())

    def drain_tasks(self) -> None:
        """As if the workers had taken every queued task: later erasures find none to coalesce with."""
        from apa.db.models import RetrainTask

        with self.engine.begin() as conn:
            conn.execute(update(RetrainTask).where(RetrainTask.state == "queued").values(state="done"))


def _phase(
    run: _Run, consumer: _Consumer, users: list[str], prefix: str, rate: float | None
) -> dict[str, Any]:
    ids = [f"{prefix}-{i}" for i in range(len(users))]
    started = time.time()
    for i, (request_id, user) in enumerate(zip(ids, users, strict=True)):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        run.publish(request_id, user)
    run.producer.flush()
    published = time.time()
    found = run.wait(ids, consumer, timeout_s=120 + len(ids) / 20)
    stale = run.stale_published(ids)
    latencies = [found[r] - run.published[r] for r in ids if r in found]
    event_latencies = [stale[r] - run.published[r] for r in ids if r in stale]
    span = (max(found.values()) - run.published[ids[0]]) if found else None
    return {
        "events": len(ids),
        "recorded": len(found),
        "lost": len(ids) - len(found),
        "publish_seconds": round(published - started, 3),
        "seconds_to_last_commit": None if span is None else round(span, 3),
        "events_per_second": None if not span else round(len(found) / span, 1),
        "publish_to_stale_registry": _summary(latencies),
        "publish_to_stale_event_acked": _summary(event_latencies),
        "_latencies": latencies,
        "_event_latencies": event_latencies,
    }


def _coalescing(run: _Run, consumer: _Consumer, users: list[str], prefix: str) -> dict[str, Any]:
    run.drain_tasks()
    before = run.tasks_created()
    result = _phase(run, consumer, users, prefix, rate=None)
    ids = [f"{prefix}-{i}" for i in range(len(users))]
    created = run.tasks_created() - before
    return {
        "erasures": len(users),
        "lost": result["lost"],
        "shards_made_stale": run.shards_hit(ids),
        "retrain_tasks_queued": created,
        "retrains_per_100_erasures": round(100 * created / max(1, len(users)), 1),
    }


def _registry_only(engine: Engine, users: list[str], batch: int = 0) -> dict[str, Any]:
    """The erasure transaction alone (in this process, no Kafka): its wall time and SQL statements
    per event, the ceiling of the consumer's throughput. `batch` 0: one transaction per event
    (`apa.retrains.erase`); otherwise group commit as the consumer does it, `batch` events per
    transaction with a savepoint each (`apa.retrains.erase_batch`)."""
    from sqlalchemy import event as sa_event

    from apa.db.session import session_scope
    from apa.events import ErasureRequested
    from apa.pseudonyms import pseudonymizer_from_settings
    from apa.retrains import erase, erase_batch

    pseudonymizer, settings = pseudonymizer_from_settings(), Settings()
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    sa_event.listen(engine, "before_cursor_execute", count)
    started = time.perf_counter()
    try:
        if not batch:
            for i, user in enumerate(users):
                with session_scope(engine) as session:
                    erase(session, ErasureRequested(f"inproc-{i}", user), pseudonymizer, settings)
        for start in range(0, len(users), batch or len(users)) if batch else ():
            events = [
                ErasureRequested(f"group-{start + i}", u) for i, u in enumerate(users[start : start + batch])
            ]
            with session_scope(engine) as session:
                failed = [
                    r
                    for r in erase_batch(session, events, pseudonymizer, settings)
                    if isinstance(r, Exception)
                ]
            if failed:
                raise RuntimeError(f"group commit: {len(failed)} events failed, the first: {failed[0]!r}")
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
    seconds = time.perf_counter() - started
    return {
        "events": len(users),
        "events_per_transaction": batch or 1,
        "ms_per_event": round(1000 * seconds / max(1, len(users)), 1),
        "events_per_second": round(len(users) / seconds, 1),
        "sql_statements_per_event": round(statements / max(1, len(users)), 1),
    }


def run_erasure_bench(out: Path, config: ErasureBenchConfig, postgres: str | None = None) -> dict[str, Any]:
    """Run the three phases (module docstring) and return the report (also written to OUT)."""
    from apa.db.bootstrap import bootstrap
    from apa.db.session import make_engine, session_scope, upgrade
    from apa.kafka import ensure_topic
    from apa.pseudonyms import pseudonymizer_from_settings

    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = Settings.from_env()
    if postgres is None:
        postgres = (
            settings.database_url.rsplit("/", 1)[0]
            if settings.database_url.startswith("postgresql")
            else DEFAULT_POSTGRES
        )
    out.mkdir(parents=True, exist_ok=True)
    total_users = (
        20
        + config.paced_events
        + config.burst_events
        + 2 * config.coalesce_events
        + 2 * config.inprocess_events
    )
    users = [f"bench-user-{i}" for i in range(total_users)]
    workdir = Path(tempfile.mkdtemp(prefix="apa-bench-erasure-"))
    report: dict[str, Any] = {"config": config.__dict__, "machine": _machine()}
    try:
        with _tansu(workdir) as bootstrap_servers, _database(postgres) as url:
            engine = make_engine(url)
            upgrade(engine)
            started = time.perf_counter()
            _synthetic_model(workdir / MODEL_ID, users, config)
            from apa.artifacts import ArtifactStore

            with session_scope(engine) as session:
                bootstrap(
                    session,
                    workdir / MODEL_ID,
                    pseudonymizer_from_settings(),
                    ArtifactStore(workdir / "artifacts"),
                    model_id=MODEL_ID,
                )
            report["setup_seconds"] = round(time.perf_counter() - started, 1)
            log.info(
                "registry ready: %d users, K=%d (%.0f s)",
                total_users,
                config.num_shards,
                report["setup_seconds"],
            )
            topic = f"apa.erasure-requests.bench-{uuid.uuid4().hex[:6]}"
            ensure_topic(bootstrap_servers, topic, config.partitions)
            env = {
                "APA_DATABASE_URL": url,
                "APA_KAFKA_BOOTSTRAP": bootstrap_servers,
                "APA_ERASURE_TOPIC": topic,
                "APA_SHARD_EVENTS_TOPIC": topic + ".shard-events",
                "APA_DEAD_LETTER_TOPIC": topic + ".dlq",
                "APA_ERASURE_CONSUMER_GROUP": "apa-bench",
                "APA_ARTIFACT_STORE": str(workdir / "artifacts"),
                "APA_CELERY_EMBEDDED_BROKER": str(workdir / "broker.sqlite"),
                "APA_LOG_LEVEL": "WARNING",
                **TIMEOUTS,
            }
            run = _Run(engine, bootstrap_servers, topic)
            cursor = 0

            def take(n: int) -> list[str]:
                nonlocal cursor
                cursor += n
                return users[cursor - n : cursor]

            consumer = _Consumer(env, out / "erasure-consumer.log", workdir)
            try:
                log.info("warm-up: 20 events (consumer start and group join)")
                _phase(run, consumer, take(20), "warmup", rate=None)
                log.info("latency: %d events at %.0f/s", config.paced_events, config.paced_rate)
                report["latency_paced"] = _phase(
                    run, consumer, take(config.paced_events), "paced", config.paced_rate
                )
                log.info("throughput: %d events at once", config.burst_events)
                report["throughput_burst"] = _phase(
                    run, consumer, take(config.burst_events), "burst", rate=None
                )
                log.info("coalescing on: %d erasures", config.coalesce_events)
                report["retrains_with_coalescing"] = _coalescing(
                    run, consumer, take(config.coalesce_events), "co"
                )
            finally:
                consumer.stop()
            consumer = _Consumer({**env, "APA_RETRAIN_COALESCE": "0"}, out / "erasure-consumer.log", workdir)
            try:
                log.info("coalescing off: %d erasures", config.coalesce_events)
                report["retrains_without_coalescing"] = _coalescing(
                    run, consumer, take(config.coalesce_events), "noco"
                )
            finally:
                consumer.stop()
            log.info("registry transaction alone: %d erasures in this process", config.inprocess_events)
            report["registry_transaction_only"] = _registry_only(engine, take(config.inprocess_events))
            log.info(
                "registry group commit: %d erasures in this process, %d per transaction",
                config.inprocess_events,
                config.group_commit_batch,
            )
            report["registry_group_commit"] = _registry_only(
                engine, take(config.inprocess_events), batch=config.group_commit_batch
            )
            run.producer.close()
            engine.dispose()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    burst, paced = report["throughput_burst"], report["latency_paced"]
    report["targets"] = {
        "events_per_second": EVENTS_PER_SECOND_TARGET,
        "events_per_second_met": (burst["events_per_second"] or 0) >= EVENTS_PER_SECOND_TARGET
        and burst["lost"] == 0,
        "p99_publish_to_stale_ms": P99_LATENCY_TARGET_S * 1000,
        "p99_met": (paced["publish_to_stale_registry"]["p99_ms"] or 1e9) < P99_LATENCY_TARGET_S * 1000,
    }
    _plot(report, out / "erasure.png")
    for phase in (burst, paced):
        phase.pop("_latencies")
        phase.pop("_event_latencies")
    (out / "erasure.json").write_text(json.dumps(report, indent=2))
    return report


def _machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, label in (("latency_paced", "paced"), ("throughput_burst", "burst")):
        values = sorted(1000 * v for v in report[name]["_latencies"])
        if values:
            ax.plot(
                values,
                np.arange(1, len(values) + 1) / len(values),
                label=f"{label}: publish -> stale (registry)",
            )
    events = sorted(1000 * v for v in report["latency_paced"]["_event_latencies"])
    if events:
        ax.plot(
            events,
            np.arange(1, len(events) + 1) / len(events),
            "--",
            label="paced: publish -> stale event on Kafka",
        )
    ax.axvline(P99_LATENCY_TARGET_S * 1000, color="grey", linestyle=":", label="p99 target 1 s")
    ax.axhline(0.99, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of events")
    ax.set_title("Latency from publish")
    ax.legend(fontsize=7)

    ax = axes[1]
    burst, alone = report["throughput_burst"], report["registry_transaction_only"]
    group = report["registry_group_commit"]
    values = [burst["events_per_second"] or 0.0, alone["events_per_second"], group["events_per_second"]]
    bars = ax.bar(
        [
            "consumer + registry\n(burst, Kafka)",
            "one transaction\nper event (in process)",
            f"{group['events_per_transaction']} events per\ntransaction (in process)",
        ],
        values,
    )
    ax.bar_label(bars, fmt="%.1f/s")
    ax.axhline(EVENTS_PER_SECOND_TARGET, color="grey", linestyle=":", label="target 200/s")
    ax.set_ylabel("events / s")
    ax.set_title(f"Throughput ({burst['events']} events, {burst['lost']} lost)")
    ax.legend(fontsize=7)

    ax = axes[2]
    on, off = report["retrains_with_coalescing"], report["retrains_without_coalescing"]
    ax.bar(
        ["with coalescing", "without"],
        [on["retrains_per_100_erasures"], off["retrains_per_100_erasures"]],
        color=["tab:green", "tab:red"],
    )
    ax.bar_label(ax.containers[0], fmt="%.0f")
    ax.set_ylabel("retrain tasks per 100 erasures")
    ax.set_title(f"Retrains (K={report['config']['num_shards']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(report: dict[str, Any]) -> None:
    burst, paced = report["throughput_burst"], report["latency_paced"]
    on, off = report["retrains_with_coalescing"], report["retrains_without_coalescing"]
    print(
        f"throughput: {burst['events_per_second']} events/s ({burst['events']} events, {burst['lost']} lost; "
        f"target >= {EVENTS_PER_SECOND_TARGET:.0f}/s)"
    )
    latency = paced["publish_to_stale_registry"]
    print(
        f"publish -> shards stale ({paced['events']} events at {report['config']['paced_rate']:.0f}/s): "
        f"p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms (target p99 < 1000 ms); "
        f"-> stale event on Kafka p50 {paced['publish_to_stale_event_acked']['p50_ms']} ms, "
        f"p99 {paced['publish_to_stale_event_acked']['p99_ms']} ms"
    )
    print(
        f"retrain tasks per 100 erasures: {on['retrains_per_100_erasures']} with coalescing, "
        f"{off['retrains_per_100_erasures']} without ({off['shards_made_stale']} shard hits)"
    )
    alone, group = report["registry_transaction_only"], report["registry_group_commit"]
    print(
        f"the erasure transaction alone (no Kafka): {alone['ms_per_event']} ms and "
        f"{alone['sql_statements_per_event']} SQL statements per event = {alone['events_per_second']}/s "
        f"one transaction each; {group['ms_per_event']} ms and {group['sql_statements_per_event']} "
        f"statements per event = {group['events_per_second']}/s with {group['events_per_transaction']} "
        f"events per transaction; load average {report['machine']['load_average_1m']} on "
        f"{report['machine']['cpu_count']} cores"
    )


__all__ = ["ErasureBenchConfig", "print_report", "run_erasure_bench"]
