"""Scheduling retrains: the erasure transaction with its outbox rows, the retrain-task ledger and resume.

* `erase` is what the erasure service does with one event, in the caller's transaction:
  `handle_erasure` (request, samples, stale shards, excluded adapters, audit), then for every shard
  it made stale a `stale` shard event and a retrain task, both as outbox rows (`apa.outbox`). The
  service applies a poll batch in one transaction, each event in a savepoint of its own
  (`erase_in_savepoint`; `erase_batch` for a list): group commit.
* The ledger (`retrain_tasks`) follows each retrain task from `queued` to `done`. Coalescing: a
  shard whose task is queued and not yet started gets no second task (the queued one will train on
  the newest remainder anyway). A task that finds itself already done (the relay published it twice)
  does nothing; one that finds itself started was redelivered after its worker died, and runs again.
* `finish` (a trainer, after `apa.lifecycle.retrain_shard`): a promoted version gives a `ready`
  shard event (state `serving`); a version overtaken by newer erasures gives a new task (unless
  one is queued), so the shard retrains on the newer remainder.
* `resume` (`apa resume`, and every worker at start): every stale or retraining shard without a
  live task (queued, or started with a recent heartbeat) gets one.

Every transition here takes the audit-chain lock first, like the registry's own: erasures, task
starts and promotions of one shard are serialised.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from apa.artifacts import ArtifactError, ArtifactStore
from apa.db import audit, registry
from apa.db.models import AdapterVersion, RetrainTask, Shard, utcnow
from apa.db.session import session_scope
from apa.events import ErasureRequested, ShardEvent
from apa.failpoints import crash_point
from apa.lifecycle import ErasureOutcome, ShardRef, handle_erasure
from apa.outbox import add_event, add_task
from apa.pseudonyms import Pseudonymizer
from apa.settings import Settings
from apa.taskqueue import RETRAIN_TASK, task_id

if TYPE_CHECKING:
    from apa.lifecycle import RetrainOutcome

log = logging.getLogger(__name__)

LIVE_STATES = ("queued", "started")


# --- enqueueing --------------------------------------------------------------------------------------


def request_retrains(
    session: Session,
    shards: dict[ShardRef, int],
    *,
    reason: str,
    settings: Settings,
    request_id: str | None = None,
    now: datetime | None = None,
    cached: bool = False,
) -> dict[ShardRef, tuple[RetrainTask, bool]]:
    """A retrain task for each shard (shard -> the generation it is queued for), in the caller's
    transaction, which holds the audit-chain lock: shard -> (task, created).

    With coalescing on (`settings.retrain_coalesce`), a shard whose task is queued and not yet
    started gets that task back instead of a new one (its `coalesced` count goes up). A new task is
    a ledger row and an outbox row that enqueues `retrain_shard(shard_id, generation)` under the
    Celery task id `apa-retrain-<row id>`. Queueing writes no audit row: the ledger is its record,
    and the erasure's own audit rows name the shards it made stale.

    `cached` (the erasures of one transaction): each shard's queued task is read once per
    transaction and kept under the chain lock (`audit.held_cache`; only lock holders start tasks).
    """
    now = now or utcnow()
    out: dict[ShardRef, tuple[RetrainTask, bool]] = {}
    cache = audit.held_cache(session) if cached else None
    queued_by_shard: dict[str, RetrainTask | None] = (
        cache.setdefault("queued_tasks", {}) if cache is not None else {}
    )
    if settings.retrain_coalesce and shards:
        keys = {shard.key: shard for shard in shards}
        unread = sorted(k for k in keys if cache is None or k not in queued_by_shard)
        if unread:
            found: dict[str, RetrainTask] = {}
            for row in session.scalars(
                select(RetrainTask)
                .where(RetrainTask.shard_id.in_(unread), RetrainTask.state == "queued")
                .order_by(RetrainTask.id)
                .with_for_update()
            ):
                found.setdefault(row.shard_id, row)
            queued_by_shard.update({k: found.get(k) for k in unread})
        for key, shard in sorted(keys.items()):
            queued = queued_by_shard.get(key)
            if queued is None or queued.state != "queued":
                continue
            queued.coalesced += 1
            queued.generation = max(queued.generation, shards[shard])
            out[shard] = (queued, False)
    created = {
        shard: RetrainTask(
            shard_id=shard.key,
            generation=generation,
            reason=reason,
            request_id=request_id,
            state="queued",
            coalesced=0,
            deliveries=0,
            created_at=now,
        )
        for shard, generation in sorted(shards.items())
        if shard not in out
    }
    if created:
        session.add_all(created.values())
        session.flush()  # the ledger ids name the Celery tasks
    for shard, task in created.items():
        queued_by_shard[shard.key] = task
        add_task(
            session,
            RETRAIN_TASK,
            shard.key,
            args=[shard.key, task.generation],
            task_id=task_id(task.id),
            request_id=request_id,
            now=now,
        )
        out[shard] = (task, True)
    return out


def request_retrain(
    session: Session,
    shard: ShardRef,
    generation: int,
    *,
    reason: str,
    settings: Settings,
    request_id: str | None = None,
    now: datetime | None = None,
) -> tuple[RetrainTask, bool]:
    """`request_retrains` for one shard: (task, created)."""
    return request_retrains(
        session, {shard: generation}, reason=reason, settings=settings, request_id=request_id, now=now
    )[shard]


def erase(
    session: Session,
    event: ErasureRequested,
    pseudonymizer: Pseudonymizer,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> ErasureOutcome:
    """One erasure event, in the caller's transaction (or savepoint): `handle_erasure`, then a `stale` shard
    event and a retrain task (coalesced) per shard it made stale, as outbox rows. A redelivered
    request changes nothing; ConflictError when its id was used for another user."""
    outcome = handle_erasure(session, event, pseudonymizer, now=now)
    if not outcome.created or not outcome.stale:
        return outcome
    for shard, generation in sorted(outcome.stale.items()):
        stale = ShardEvent(shard_id=shard.key, state="stale", generation=generation)
        add_event(
            session,
            settings.shard_events_topic,
            shard.key,
            stale.to_dict(),
            request_id=outcome.request_id,
            now=now,
        )
    request_retrains(
        session,
        dict(outcome.stale),
        reason="erasure",
        settings=settings,
        request_id=outcome.request_id,
        now=now,
        cached=True,
    )
    return outcome


def erase_in_savepoint(
    session: Session,
    event: ErasureRequested,
    pseudonymizer: Pseudonymizer,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> ErasureOutcome:
    """`erase` in a savepoint of the caller's transaction: an event that raises rolls back alone
    (every row it wrote, its audit rows included) and the transaction goes on with the next one."""
    with session.begin_nested():
        return erase(session, event, pseudonymizer, settings, now=now)


def erase_batch(
    session: Session,
    events: list[ErasureRequested],
    pseudonymizer: Pseudonymizer,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> list[ErasureOutcome | Exception]:
    """Group commit: several erasure events in the caller's one transaction, each in a savepoint of
    its own (`erase_in_savepoint`), with the audit-chain lock taken once for all of them. Returns,
    per event, its outcome or the exception that rolled it back (the others stand). A database
    error that leaves the transaction unusable (a lost connection) is raised: nothing commits."""
    audit.lock_chain(session, keep_cache=True)  # outside the savepoints: no rollback releases it
    registry.prefetch_erasures(session, events, pseudonymizer)
    out: list[ErasureOutcome | Exception] = []
    for event in events:
        try:
            out.append(erase_in_savepoint(session, event, pseudonymizer, settings, now=now))
        except Exception as exc:
            if transaction_lost(session, exc):
                raise
            out.append(exc)
    return out


def transaction_lost(session: Session, exc: BaseException) -> bool:
    """True when `exc` means the database went away or the session's transaction can no longer be
    used (retry everything later), False when only the failed savepoint was rolled back."""
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    root = session.get_transaction()
    return root is None or not root.is_active


def reject(session: Session, event: ErasureRequested, pseudonymizer: Pseudonymizer, reason: str) -> None:
    """Audit a refused erasure event (its request id was already used for another user or other
    interactions), in the caller's transaction or savepoint: the refused event changed nothing else."""
    audit.lock_chain(session, keep_cache=True)
    audit.append(
        session,
        "erasure_rejected",
        request_id=event.request_id,
        user_pid=pseudonymizer.user(event.user_id),
        payload={"reason": reason, "scope": event.scope},
    )


# --- the worker's side -------------------------------------------------------------------------------


def worker_name() -> str:
    """`<host>:<pid>`, as the ledger records who runs a task."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


@dataclass(frozen=True)
class TaskStart:
    """What `start` decided for a delivered task."""

    ledger_id: int
    run: bool
    """False: nothing to do (already done, failed or replaced; see `why`)."""
    why: str
    redelivered: bool = False
    """The task had been started before (its worker died): it runs again."""


def start(
    engine: Engine,
    ledger_id: int | None,
    shard: ShardRef,
    generation: int,
    *,
    worker: str | None = None,
    now: datetime | None = None,
) -> TaskStart:
    """A worker received a retrain task: mark it started (or decide it has nothing to do).

    A task without a ledger row (sent by hand, by name) gets one. A done, failed or lost task is
    not run again: a second delivery of a finished task, or one `resume` replaced."""
    now = now or utcnow()
    worker = worker or worker_name()
    with session_scope(engine) as session:
        audit.lock_chain(session)
        task = (
            session.scalars(select(RetrainTask).where(RetrainTask.id == ledger_id).with_for_update()).first()
            if ledger_id is not None
            else None
        )
        if task is None:
            if session.get(Shard, shard.key) is None:
                raise registry.NotFoundError(f"shard {shard.key!r}")
            task = RetrainTask(
                shard_id=shard.key,
                generation=generation,
                reason="manual",
                state="queued",
                coalesced=0,
                deliveries=0,
                created_at=now,
            )
            session.add(task)
            session.flush()
        if task.shard_id != shard.key:
            raise ValueError(f"task {task.id} retrains {task.shard_id}, not {shard.key}")
        if task.state not in LIVE_STATES:
            return TaskStart(task.id, run=False, why=f"task {task.id} is {task.state}")
        redelivered = task.state == "started"
        task.state = "started"
        task.started_at = task.started_at or now
        task.heartbeat_at = now
        task.deliveries += 1
        task.worker = worker
        return TaskStart(
            task.id, run=True, why="redelivered" if redelivered else "queued", redelivered=redelivered
        )


def heartbeat(engine: Engine, ledger_id: int, *, now: datetime | None = None) -> None:
    """The worker is still training this task."""
    with session_scope(engine) as session:
        session.execute(
            update(RetrainTask)
            .where(RetrainTask.id == ledger_id, RetrainTask.state == "started")
            .values(heartbeat_at=now or utcnow())
        )


@dataclass(frozen=True)
class TaskFinish:
    """What `finish` recorded."""

    promoted: bool | None
    """None: nothing was trained (the shard was serving already)."""
    retrain_again: int | None = None
    """Ledger id of the task queued because the result was overtaken by newer erasures (None: none
    was needed, or a queued one covers it)."""


def finish(
    engine: Engine,
    ledger_id: int,
    shard: ShardRef,
    outcome: RetrainOutcome | None,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> TaskFinish:
    """Record a finished retrain, in one transaction: the ledger row done; a promoted version gives a
    `ready` shard event (state `serving`, outbox); a version that was not promoted (newer erasures hit
    its training data: `retrain_shard` discarded it) gives another retrain task (coalesced with a
    queued one)."""
    now = now or utcnow()
    with session_scope(engine) as session:
        audit.lock_chain(session)
        task = session.get(RetrainTask, ledger_id, populate_existing=True)
        if task is None:
            raise registry.NotFoundError(f"retrain task {ledger_id}")
        task.state = "done"
        task.finished_at = now
        task.heartbeat_at = now
        again: int | None
        if outcome is None:
            audit.append(
                session,
                "retrain_finished",
                shard_id=shard.key,
                payload={"task": ledger_id, "trained": False, "reason": "shard already serving"},
                now=now,
            )
            # Announce what serves again: a worker that died between registering its version and
            # this step never published that version's `ready` event (a second one is harmless).
            current = session.get(Shard, shard.key, populate_existing=True)
            serving = session.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.shard_id == shard.key, AdapterVersion.state == "serving"
                )
            ).first()
            if current is not None and current.state == "serving" and serving is not None:
                ready = ShardEvent(
                    shard_id=shard.key,
                    state="serving",
                    generation=current.generation,
                    adapter_version=serving.version,
                )
                add_event(session, settings.shard_events_topic, shard.key, ready.to_dict(), now=now)
            return TaskFinish(promoted=None)
        task.adapter_version_id = outcome.adapter_version_id
        task.promoted = outcome.promoted
        audit.append(
            session,
            "retrain_finished",
            shard_id=shard.key,
            adapter_version_id=outcome.adapter_version_id,
            payload={
                "task": ledger_id,
                "trained": True,
                "version": outcome.manifest.version,
                "generation": outcome.generation,
                "promoted": outcome.promoted,
                "deliveries": task.deliveries,
            },
            now=now,
        )
        if outcome.promoted:
            ready = ShardEvent(
                shard_id=shard.key,
                state="serving",
                generation=outcome.generation,
                adapter_version=outcome.manifest.version,
            )
            add_event(session, settings.shard_events_topic, shard.key, ready.to_dict(), now=now)
            again = None
        else:
            again = _again(session, shard, settings, now)
        return TaskFinish(promoted=outcome.promoted, retrain_again=again)


def _again(session: Session, shard: ShardRef, settings: Settings, now: datetime) -> int | None:
    """Queue the next retrain of a shard whose result was overtaken (unless it serves again, or a
    queued task covers it); its ledger id when one was created."""
    current = session.get(Shard, shard.key, populate_existing=True)
    if current is None or current.state == "serving":  # another retrain of the remainder was promoted
        return None
    queued, created = request_retrain(
        session, shard, current.generation, reason="not_promoted", settings=settings, now=now
    )
    return queued.id if created else None


def fail(engine: Engine, ledger_id: int, error: str, *, now: datetime | None = None) -> None:
    """A retrain raised: the task is failed (the shard stays stale and excluded; `apa resume`
    queues it again)."""
    now = now or utcnow()
    with session_scope(engine) as session:
        audit.lock_chain(session)
        task = session.get(RetrainTask, ledger_id, populate_existing=True)
        if task is None or task.state not in LIVE_STATES:
            return
        task.state = "failed"
        task.finished_at = now
        task.error = error[:2000]
        audit.append(
            session,
            "retrain_failed",
            shard_id=task.shard_id,
            payload={"task": ledger_id, "error": error[:500]},
        )


def sweep_unregistered(
    engine: Engine, store: ArtifactStore, shard: ShardRef, *, leftovers: bool = False
) -> list[str]:
    """Delete the shard's artifact-store entries that no adapter version registers: always those
    whose manifest names an erased sample (a retrain the registry refused: it can never be
    registered), and with `leftovers` every unregistered one (what a worker that died between
    storing and registering left; call it only while this worker runs the shard's task). Audited
    as `adapter_artifact_deleted`; returns the deleted keys."""
    prefix = f"{shard.model_id}/{shard.index}/"
    stored = [key for key in store.keys() if key.startswith(prefix)]
    if not stored:
        return []
    with session_scope(engine) as session:
        registered = set(
            session.scalars(select(AdapterVersion.artifact_uri).where(AdapterVersion.shard_id == shard.key))
        )
        erased = registry.erased_sample_pids(session, shard.model_id)
    doomed: list[tuple[str, str]] = []
    for key in stored:
        if key in registered:
            continue
        try:
            pids = set(store.manifest(key).get("sample_pids") or [])
        except ArtifactError:
            pids = set()
        if pids & erased:
            doomed.append((key, "unregistered: trained on samples erased since"))
        elif leftovers:
            doomed.append((key, "unregistered: left by a worker that died before registering it"))
    deleted = [(key, why) for key, why in doomed if store.delete(key)]
    if deleted:
        with session_scope(engine) as session:
            audit.lock_chain(session)
            for key, why in deleted:
                audit.append(
                    session,
                    "adapter_artifact_deleted",
                    shard_id=shard.key,
                    payload={"artifact_key": key, "reason": why},
                )
    return [key for key, _ in deleted]


class Heartbeat:
    """Moves a started task's heartbeat every `every_s` seconds while the block runs."""

    def __init__(self, engine: Engine, ledger_id: int, every_s: float) -> None:
        self.engine, self.ledger_id, self.every_s = engine, ledger_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{ledger_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.engine, self.ledger_id)
            except Exception as exc:  # a missed beat risks a duplicate retrain at worst, never a loss
                log.warning("heartbeat of task %d failed: %s", self.ledger_id, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)


@dataclass(frozen=True)
class TaskResult:
    """What one delivery of a retrain task did."""

    shard: str
    ledger_id: int | None = None
    skipped: str | None = None
    """Why nothing was done (already done, failed or replaced)."""
    finish: TaskFinish | None = None
    outcome: RetrainOutcome | None = None
    deleted_unregistered: list[str] = field(default_factory=list)
    redelivered: bool = False
    """The task had been started before by a worker that died."""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"shard": self.shard, "task": self.ledger_id}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.finish is not None:
            out["promoted"] = self.finish.promoted
            out["retrain_again"] = self.finish.retrain_again
        if self.outcome is not None:
            out["version"] = self.outcome.manifest.version
            out["generation"] = self.outcome.generation
        return out


def run_task(
    engine: Engine,
    settings: Settings,
    store: ArtifactStore,
    ledger_id: int | None,
    shard: ShardRef,
    generation: int,
    retrain: Callable[[], RetrainOutcome | None],
) -> TaskResult:
    """One delivery of `retrain_shard(shard, generation)`, with the training step `retrain` (a call of
    `apa.lifecycle.retrain_shard`): start it in the ledger, train with a heartbeat, finish it.

    A retrain overtaken by newer erasures (`retrain_shard` discards it and deletes its artifact) is
    a result that was not promoted: the shard retrains again. Any other error fails the task (it stays stale; `apa resume` queues it again), except a database
    outage, which is raised with the task left started, for the caller to retry."""
    started = start(engine, ledger_id, shard, generation)
    if not started.run:
        return TaskResult(shard.key, started.ledger_id, skipped=started.why)
    swept = sweep_unregistered(engine, store, shard, leftovers=True) if started.redelivered else []
    with Heartbeat(engine, started.ledger_id, settings.task_heartbeat_s):
        try:
            outcome = retrain()
        except (OperationalError, DBAPIError):
            raise
        except Exception as exc:
            fail(engine, started.ledger_id, f"{type(exc).__name__}: {exc}")
            raise
    crash_point(settings, "worker.after_register")
    done = finish(engine, started.ledger_id, shard, outcome, settings)
    return TaskResult(
        shard.key,
        started.ledger_id,
        finish=done,
        outcome=outcome,
        deleted_unregistered=swept,
        redelivered=started.redelivered,
    )


# --- resume ------------------------------------------------------------------------------------------


@dataclass
class ResumeReport:
    """What `resume` did."""

    queued: list[str] = field(default_factory=list)
    """Shards that got a new retrain task."""
    live: list[str] = field(default_factory=list)
    """Stale shards whose task is queued or running (left alone)."""
    lost: list[int] = field(default_factory=list)
    """Started tasks whose heartbeat stopped (marked lost, replaced)."""

    def summary(self) -> str:
        return (
            f"resume: {len(self.queued)} stale shards queued for retraining"
            + (f" ({', '.join(self.queued)})" if self.queued else "")
            + f", {len(self.live)} already have a live task, {len(self.lost)} lost tasks replaced"
        )


def resume(engine: Engine, settings: Settings, *, now: datetime | None = None) -> ResumeReport:
    """Give every stale or retraining shard without a live task a retrain task (one transaction).

    Live: queued, or started with a heartbeat newer than `settings.task_lost_after_s` (a worker is
    training it, or its broker will redeliver it). A started task with an older heartbeat is marked
    lost: its worker died and its broker lost it (e.g. the embedded broker keeps no unacknowledged
    tasks across a crash)."""
    now = now or utcnow()
    report = ResumeReport()
    lost_before = now - timedelta(seconds=settings.task_lost_after_s)
    with session_scope(engine) as session:
        audit.lock_chain(session)
        session.expire_all()
        for shard in registry.stale_shards(session):
            live = list(
                session.scalars(
                    select(RetrainTask)
                    .where(RetrainTask.shard_id == shard.id, RetrainTask.state.in_(LIVE_STATES))
                    .with_for_update()
                )
            )
            alive = False
            for task in live:
                if task.state == "started" and (task.heartbeat_at is None or task.heartbeat_at < lost_before):
                    task.state = "lost"
                    task.finished_at = now
                    report.lost.append(task.id)
                    audit.append(
                        session,
                        "retrain_lost",
                        shard_id=shard.id,
                        payload={"task": task.id, "worker": task.worker},
                        now=now,
                    )
                else:
                    alive = True
            if alive:
                report.live.append(shard.id)
                continue
            request_retrain(
                session,
                ShardRef(shard.model_id, shard.index),
                shard.generation,
                reason="resume",
                settings=settings,
                now=now,
            )
            report.queued.append(shard.id)
    return report


def task_counts(session: Session) -> dict[str, int]:
    """Ledger rows by state."""
    counts = dict.fromkeys(("queued", "started", "done", "failed", "lost"), 0)
    for state in session.scalars(select(RetrainTask.state)):
        counts[state] = counts.get(state, 0) + 1
    return counts


__all__ = [
    "Heartbeat",
    "ResumeReport",
    "TaskResult",
    "TaskFinish",
    "TaskStart",
    "erase",
    "fail",
    "finish",
    "heartbeat",
    "reject",
    "request_retrain",
    "request_retrains",
    "resume",
    "run_task",
    "start",
    "sweep_unregistered",
    "task_counts",
    "worker_name",
]
