"""Trainer workers: the Celery app and the `retrain_shard(shard_id, generation)` task (`apa run-worker`).

A task delivery is `apa.retrains.run_task` (docs/ARCHITECTURE.md §7) around one training step:

1. `start`: the ledger row goes `queued -> started` (a task already done, failed or replaced does
   nothing; one already started was redelivered after its worker died: it runs again, after the
   artifacts its dead worker stored but never registered are deleted);
2. a heartbeat thread moves the row's `heartbeat_at` while it trains (`apa resume` replaces a task
   whose heartbeat stopped);
3. `apa.lifecycle.retrain_shard`: the shard's remaining samples from the registry, a fresh adapter
   trained from scratch with the shard's seed, the content-addressed artifact, registration under
   the promotion rule, the superseded artifacts deleted;
4. `finish`: the ledger row done with its audit row; a promoted version gives a `ready` shard event
   (state `serving`), one overtaken by newer erasures the next retrain task, both through the
   outbox; then this worker relays the outbox.

The worker runs `apa resume` when it starts, relays the outbox every 2 s (rows written by a
registry without Kafka), and scrubs the model directories registered on its machine at each task's
start and end. Broker, pool and device come from settings (`apa.taskqueue`): one worker process per
GPU with the solo pool.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from apa import retrains
from apa.artifacts import ArtifactStore
from apa.db.models import Model
from apa.db.session import make_engine, session_scope
from apa.failpoints import check_point
from apa.lifecycle import ShardRef, retrain_shard, scrub_model_dirs
from apa.liveness import Beat
from apa.logs import configure_logging
from apa.outbox import KafkaPublisher, Relay
from apa.pseudonyms import Pseudonymizer, pseudonymizer_from_settings
from apa.settings import Settings
from apa.taskqueue import RETRAIN_TASK, CelerySender, ledger_id, make_celery

if TYPE_CHECKING:
    from celery import Celery

    from apa.backbone import Backbone

log = logging.getLogger("apa.trainer")

RELAY_EVERY_S = 2.0
TRANSIENT_RETRY_S = 5
MAX_TRANSIENT_RETRIES = 20


class BackboneMismatch(RuntimeError):
    """The worker's backbone is not the base model the shard's adapters were trained on."""


def make_relay(engine: Engine, settings: Settings, app: Celery) -> tuple[Relay, KafkaPublisher | None]:
    """The outbox relay of a worker: shard events to Kafka (dropped without Kafka), tasks to Celery."""
    events = KafkaPublisher(settings) if settings.kafka_bootstrap else None
    relay = Relay(
        engine,
        settings,
        events=events,
        tasks=CelerySender(app, settings.retrain_queue),
        discard_events=not settings.kafka_bootstrap,
    )
    return relay, events


@dataclass
class WorkerContext:
    """What a worker process keeps between tasks: the database, the store, loaded backbones."""

    settings: Settings
    engine: Engine
    store: ArtifactStore
    pseudonymizer: Pseudonymizer
    relay: Relay
    backbones: dict[str, Backbone] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings, app: Celery) -> WorkerContext:
        engine = make_engine(settings=settings)
        relay, _events = make_relay(engine, settings, app)
        return cls(
            settings=settings,
            engine=engine,
            store=ArtifactStore(settings.artifact_store),
            pseudonymizer=pseudonymizer_from_settings(settings),
            relay=relay,
        )

    def scrub(self) -> None:
        """The registered model directories on this machine lose every erased sample (splits,
        partition, caches): at every task's start and end, so they follow the registry."""
        try:
            with session_scope(self.engine) as session:
                scrub_model_dirs(session, self.pseudonymizer)
        except Exception:  # retried at the next task and at the next start (resume)
            log.exception("scrubbing the model directories failed")

    def backbone(self, model_id: str) -> Backbone:
        """The frozen base model of `model_id`, loaded once per process: the registered model's
        backbone config (or `APA_WORKER_MODEL`, e.g. `tiny`) on `APA_WORKER_DEVICE`. Refuses a
        backbone whose weights differ from the model's recorded base model digest."""
        from apa.backbone import Backbone
        from apa.modeldir import ModelInfo

        with session_scope(self.engine) as session:
            model = session.get(Model, model_id)
            if model is None:
                raise LookupError(f"model {model_id!r} is not registered")
            info = ModelInfo.from_json(model.config, f"model {model_id} config")
        config = replace(info.backbone_config, device=self.settings.worker_device)
        if self.settings.worker_model:
            config = replace(config, model=self.settings.worker_model)
        key = repr(config)
        with self.lock:
            if key not in self.backbones:
                log.info("loading backbone %s on %s", config.model, config.device)
                self.backbones[key] = Backbone.load(config)
            backbone = self.backbones[key]
        if backbone.model_digest != info.base_model_digest:
            raise BackboneMismatch(
                f"backbone {config.model!r} has digest {backbone.model_digest[:12]}, model {model_id} was "
                f"trained on {info.base_model!r} ({info.base_model_digest[:12]}): refusing to retrain"
            )
        return backbone


def run_retrain(
    ctx: WorkerContext, shard_id: str, generation: int, celery_task_id: str | None
) -> dict[str, Any]:
    """One delivery of `retrain_shard(shard_id, generation)` (see the module docstring)."""
    shard = ShardRef.parse(shard_id)
    log.info("task %s: %s (queued at generation %d)", celery_task_id, shard, generation)

    def train() -> Any:
        backbone = ctx.backbone(shard.model_id)
        return retrain_shard(
            ctx.engine, shard, backbone=backbone, store=ctx.store, pseudonymizer=ctx.pseudonymizer
        )

    ctx.scrub()
    result = retrains.run_task(
        ctx.engine, ctx.settings, ctx.store, ledger_id(celery_task_id), shard, generation, train
    )
    try:
        ctx.relay.drain()
    except Exception as exc:  # the relay thread retries; the task itself is done
        log.warning("outbox relay after task %s failed: %s", celery_task_id, exc)
    ctx.scrub()
    again = " (redelivered: its first worker died)" if result.redelivered else ""
    if result.skipped:
        log.info("task %s: nothing to do (%s)", celery_task_id, result.skipped)
    elif result.outcome is not None:
        log.info(
            "task %s: %s v%d %s%s",
            celery_task_id,
            shard,
            result.outcome.manifest.version,
            "promoted" if result.outcome.promoted else "not promoted (newer erasures)",
            again,
        )
    elif result.finish is not None:
        log.info("task %s: %s %s%s", celery_task_id, shard, "refused: newer erasures hit its data", again)
    return result.to_json()


class Trainer:
    """A worker process's Celery app with the retrain task registered, and its context (created at
    the first task: a process that only sends tasks never connects to anything else)."""

    def __init__(self, settings: Settings) -> None:
        check_point(settings.crash_at)
        self.settings = settings
        self.app = make_celery(settings, main="apa-trainer")
        self._context: WorkerContext | None = None
        self._lock = threading.Lock()
        trainer = self

        @self.app.task(
            name=RETRAIN_TASK,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            max_retries=MAX_TRANSIENT_RETRIES,
        )
        def retrain_shard_task(self: Any, shard_id: str, generation: int) -> dict[str, Any]:
            try:
                return run_retrain(trainer.context(), shard_id, generation, self.request.id)
            except (OperationalError, DBAPIError) as exc:
                log.warning(
                    "task %s: registry unavailable (%s); retrying", self.request.id, type(exc).__name__
                )
                raise self.retry(exc=exc, countdown=TRANSIENT_RETRY_S) from exc

    def context(self) -> WorkerContext:
        with self._lock:
            if self._context is None:
                self._context = WorkerContext.create(self.settings, self.app)
            return self._context


def resume(settings: Settings, app: Celery | None = None) -> retrains.ResumeReport:
    """`apa resume`: queue a retrain for every stale shard without a live task, scrub the model
    directories on this machine, and relay the outbox."""
    app = app or make_celery(settings)
    engine = make_engine(settings=settings)
    try:
        report = retrains.resume(engine, settings)
        with session_scope(engine) as session:
            scrubbed = scrub_model_dirs(session, pseudonymizer_from_settings(settings))
        relay, events = make_relay(engine, settings, app)
        relayed = relay.drain()
        if events is not None:
            events.close()
        log.info(
            "%s; %d model directories scrubbed; %d outbox rows published",
            report.summary(),
            len(scrubbed),
            relayed.sent,
        )
        return report
    finally:
        engine.dispose()


def _relay_loop(trainer: Trainer, stop: threading.Event) -> None:
    while not stop.wait(RELAY_EVERY_S):
        try:
            trainer.context().relay.drain()
        except Exception as exc:  # the next pass retries; nothing is marked sent on failure
            log.warning("outbox relay failed: %s", exc)


def run_worker_command(
    model: str | None = None,
    device: str | None = None,
    queue: str | None = None,
    pool: str | None = None,
    concurrency: int | None = None,
    hostname: str | None = None,
    resume_at_start: bool = True,
    log_level: str | None = None,
) -> int:
    """Run a trainer worker: retrain stale shards from Celery tasks (runs until SIGTERM).

    Settings come from APA_* variables (APA_DATABASE_URL, APA_CELERY_BROKER_URL (unset: the embedded
    SQLite broker), APA_ARTIFACT_STORE, APA_PSEUDONYM_KEY, APA_KAFKA_BOOTSTRAP); the options
    override them. Run one worker process per GPU (`--device cuda:N`) with the solo pool.

    Args:
        model: backbone to train with instead of the registered model's (`tiny`: the random test
            model, for smoke tests of a deployment without weights).
        device: auto, cpu, cuda or cuda:N.
        queue: Celery queue (default APA_RETRAIN_QUEUE).
        pool: solo (default; torch-safe), prefork or threads.
        concurrency: tasks at once (1 with solo).
        hostname: Celery node name (default apa-trainer@<host>).
        resume_at_start: run `apa resume` before taking tasks.
        log_level: logging level (default APA_LOG_LEVEL).
    """
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "worker_model": model,
            "worker_device": device,
            "retrain_queue": queue,
            "worker_pool": pool,
            "worker_concurrency": concurrency,
            "log_level": log_level,
        }.items()
        if value is not None
    }
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level)
    trainer = Trainer(settings)
    if resume_at_start:
        try:
            resume(settings, trainer.app)
        except Exception:  # e.g. the database is still starting: the tasks themselves retry
            log.exception("resume at start-up failed; run `apa resume` once the registry is reachable")
    stop = threading.Event()
    relay = threading.Thread(target=_relay_loop, args=(trainer, stop), name="outbox-relay", daemon=True)
    relay.start()
    argv = [
        "worker",
        f"--pool={settings.worker_pool}",
        f"--concurrency={1 if settings.worker_pool == 'solo' else settings.worker_concurrency}",
        f"--queues={settings.retrain_queue}",
        "--prefetch-multiplier=1",
        f"--hostname={hostname or 'apa-trainer@' + socket.gethostname()}",
        f"--loglevel={settings.log_level.upper()}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    from celery.signals import worker_ready

    beat = Beat(settings.liveness_file)
    worker_ready.connect(lambda **_: beat.start(), weak=False)  # alive once it takes tasks
    try:
        trainer.app.worker_main(argv)
    finally:
        stop.set()
        beat.stop()
    return 0


def resume_command(url: str | None = None) -> int:
    """Queue a retrain for every stale shard without a live task, scrub model directories, relay the outbox.

    Also run by every worker at start. A started task whose heartbeat is older than
    APA_TASK_LOST_AFTER_S counts as lost and is replaced.

    Args:
        url: database URL (default: APA_DATABASE_URL).
    """
    overrides: dict[str, Any] = {"database_url": url} if url else {}
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level)
    from apa.db.session import check_schema

    engine = make_engine(settings=settings)
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    report = resume(settings)
    print(report.summary())
    return 0
