"""The transactional outbox: messages written in the transaction that caused them, published after.

The erasure transaction (and a trainer's task-finished transaction) cannot publish to Kafka or
enqueue a Celery task itself: a crash between the commit and the publish would lose the message,
and a publish before the commit could announce something that then rolls back. Instead it writes
`outbox` rows (`add_event`, `add_task`) in the same transaction, and a relay (`Relay.drain`) reads
the unsent rows in order, publishes them, waits for the brokers' acknowledgements and marks them
sent. A crash anywhere before the rows are marked publishes them again on the next drain: delivery
is at least once, so consumers are idempotent (shard events carry the shard's generation; retrain
tasks are checked against the task ledger, `apa.retrains`).

Several relays may run at once (the erasure consumer, every trainer worker): on Postgres each takes
its rows with `FOR UPDATE SKIP LOCKED`, so no row is published twice by two live relays; SQLite
serialises them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.db.models import OutboxMessage, utcnow
from apa.db.session import session_scope
from apa.events import EventBus
from apa.failpoints import crash_point
from apa.settings import Settings

if TYPE_CHECKING:
    from kafka import KafkaProducer

log = logging.getLogger(__name__)

NO_EVENT_BUS = "not published: no Kafka configured (APA_KAFKA_BOOTSTRAP unset)"


def add_event(
    session: Session,
    topic: str,
    key: str,
    value: dict[str, Any],
    *,
    request_id: str | None = None,
    now: datetime | None = None,
) -> OutboxMessage:
    """Queue a Kafka message (JSON `value`, keyed by `key`) in the caller's transaction."""
    row = OutboxMessage(
        kind="event",
        destination=topic,
        key=key,
        payload=value,
        request_id=request_id,
        created_at=now or utcnow(),
        attempts=0,
    )
    session.add(row)
    return row


def add_task(
    session: Session,
    name: str,
    key: str,
    *,
    args: Sequence[Any],
    task_id: str,
    kwargs: dict[str, Any] | None = None,
    request_id: str | None = None,
    now: datetime | None = None,
) -> OutboxMessage:
    """Queue a Celery task `name(*args, **kwargs)` with the given task id in the caller's transaction."""
    row = OutboxMessage(
        kind="task",
        destination=name,
        key=key,
        payload={"args": list(args), "kwargs": dict(kwargs or {}), "task_id": task_id},
        request_id=request_id,
        created_at=now or utcnow(),
        attempts=0,
    )
    session.add(row)
    return row


def pending_count(session: Session) -> int:
    """Outbox rows not sent yet."""
    return int(session.scalar(select(func.count()).where(OutboxMessage.sent_at.is_(None))) or 0)


# --- publishing ------------------------------------------------------------------------------------


Waiter = Callable[[], None]
"""Waits for a started publish to be acknowledged; raises if it failed."""


class EventPublisher(Protocol):
    """Where the relay publishes `event` rows."""

    def send(self, topic: str, key: str, value: dict[str, Any]) -> Waiter:
        """Start publishing; the returned function waits for the broker's acknowledgement."""
        ...


class TaskSender(Protocol):
    """Where the relay enqueues `task` rows (returns once the broker has the task)."""

    def __call__(self, name: str, args: list[Any], kwargs: dict[str, Any], task_id: str) -> None: ...


class KafkaPublisher:
    """Publishes JSON events with kafka-python (acks from all in-sync replicas), many in flight at
    once: a relay batch costs one round trip, not one per row."""

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        from apa.kafka import make_producer

        self.timeout_s = settings.kafka_timeout_s
        self.producer = producer or make_producer(settings)

    def send(self, topic: str, key: str, value: dict[str, Any]) -> Waiter:
        future = self.producer.send(topic, key=key, value=value)
        timeout = self.timeout_s
        return lambda: future.get(timeout=timeout) and None

    def close(self) -> None:
        self.producer.close(timeout=self.timeout_s)


class BusPublisher:
    """Publishes through an `EventBus` (the in-process bus of the embedded set-up), one at a time."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    def send(self, topic: str, key: str, value: dict[str, Any]) -> Waiter:
        self.bus.publish(topic, key, value)
        return lambda: None


@dataclass(frozen=True)
class RelayResult:
    """What one `Relay.drain` did."""

    sent: int = 0
    failed: int = 0
    """Rows whose publish failed (kept, retried on the next drain)."""
    discarded: int = 0
    """Event rows marked sent without publishing, because no Kafka is configured."""

    def __add__(self, other: RelayResult) -> RelayResult:
        return RelayResult(
            self.sent + other.sent, self.failed + other.failed, self.discarded + other.discarded
        )


class Relay:
    """Publishes unsent outbox rows in order and marks them sent.

    `events`: where event rows go; None leaves them for another relay, unless `discard_events`
    (no Kafka in this deployment: they are marked sent, with the reason, and not published).
    `tasks`: where task rows go; None leaves them for another relay. A failed publish is recorded on
    its row (`attempts`, `last_error`) and the relay sends no more rows of that kind for
    `retry_after_s`, so a broker outage neither reorders them nor stalls the caller on every drain
    (the other kind still flows).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        events: EventPublisher | None = None,
        tasks: TaskSender | None = None,
        discard_events: bool = False,
        retry_after_s: float = 5.0,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.events = events
        self.tasks = tasks
        self.discard_events = discard_events
        self.retry_after_s = retry_after_s
        self._paused_until: dict[str, float] = {}

    def drain(self, max_batches: int = 50) -> RelayResult:
        """Relay batches of `settings.outbox_batch` rows until none is left (or a publish fails)."""
        total = RelayResult()
        for _ in range(max_batches):
            result, more = self._batch()
            total = total + result
            if not more or result.failed:
                break
        return total

    def _batch(self) -> tuple[RelayResult, bool]:
        kinds = {"event"} if self.events is not None or self.discard_events else set()
        if self.tasks is not None:
            kinds.add("task")
        now_s = time.monotonic()
        kinds = {k for k in kinds if self._paused_until.get(k, 0.0) <= now_s}
        if not kinds:
            return RelayResult(), False
        limit = max(1, self.settings.outbox_batch)
        with session_scope(self.engine) as session:
            query = (
                select(OutboxMessage)
                .where(OutboxMessage.sent_at.is_(None), OutboxMessage.kind.in_(sorted(kinds)))
                .order_by(OutboxMessage.id)
                .limit(limit)
            )
            if session.bind is not None and session.bind.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = list(session.scalars(query))
            if not rows:
                return RelayResult(), False
            sent, failed, discarded = self._publish(rows)
            if sent:
                crash_point(self.settings, "relay.after_publish")
            now = utcnow()
            session.flush()  # the failed rows' attempts and errors
            for ids, error in ((sent, None), (discarded, NO_EVENT_BUS)):
                if ids:  # one statement for the batch, not one per row
                    session.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id.in_(sorted(ids)))
                        .values(sent_at=now, attempts=OutboxMessage.attempts + 1, last_error=error)
                        .execution_options(synchronize_session=False)
                    )
        result = RelayResult(len(sent), failed, len(discarded))
        if result.sent or result.discarded:
            log.debug("outbox: %d sent, %d discarded, %d failed", result.sent, result.discarded, failed)
        return result, len(rows) == limit

    def _publish(self, rows: list[OutboxMessage]) -> tuple[set[int], int, set[int]]:
        sent: set[int] = set()
        discarded: set[int] = set()
        blocked: set[str] = set()
        failed = 0
        waiting: list[tuple[OutboxMessage, Waiter]] = []
        for row in rows:
            if row.kind in blocked:
                continue
            try:
                if row.kind == "event":
                    if self.events is None:
                        discarded.add(row.id)
                        continue
                    waiting.append((row, self.events.send(row.destination, row.key, row.payload)))
                else:
                    assert self.tasks is not None
                    payload = row.payload
                    self.tasks(
                        row.destination, list(payload["args"]), dict(payload["kwargs"]), payload["task_id"]
                    )
                    sent.add(row.id)
            except Exception as exc:  # the broker client's errors, whatever they are
                failed += 1
                blocked.add(row.kind)
                self._failed(row, exc)
        for row, wait in waiting:
            try:
                wait()
                sent.add(row.id)
            except Exception as exc:
                failed += 1
                self._failed(row, exc)
        return sent, failed, discarded

    def _failed(self, row: OutboxMessage, exc: Exception) -> None:
        self._paused_until[row.kind] = time.monotonic() + self.retry_after_s
        row.attempts += 1
        row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning("outbox: publishing row %d (%s to %s) failed: %s", row.id, row.kind, row.destination, exc)


__all__ = [
    "BusPublisher",
    "EventPublisher",
    "KafkaPublisher",
    "Relay",
    "RelayResult",
    "TaskSender",
    "add_event",
    "add_task",
    "pending_count",
]
