"""Erasure service: the Kafka consumer of `apa.erasure-requests` (`apa run-erasure-consumer`).

A member of the consumer group `APA_ERASURE_CONSUMER_GROUP`. For every event:

1. decode and validate it (`ErasureRequested.from_json`); a malformed one (bad JSON or UTF-8, a
   missing field, NUL or a lone surrogate in an id, nesting too deep, too large, a date out of
   range, a duplicated key) goes to the dead-letter topic with the reason in its headers and the
   original bytes as its value;
2. group commit: all events of one poll batch go into **one** registry transaction, each in a
   savepoint of its own (`apa.retrains.erase_in_savepoint`): the request, the erased samples, the
   stale shards and excluded adapters, the audit rows, and the outbox rows (a `stale` shard event
   and a coalesced retrain task per stale shard). The audit-chain lock is taken once, before the
   first savepoint. An event that fails rolls back to its savepoint alone; the others stand. A
   request id already used for another user is refused, audited (`erasure_rejected`) and
   dead-lettered; an event that keeps failing (`FAILURES_BEFORE_DLQ`) is dead-lettered; one that
   failed fewer times stops its partition there (it and what follows come again next poll);
3. commit the transaction, then the Kafka offsets of the events it holds (and of the dead-lettered
   ones);
4. relay the outbox (`apa.outbox.Relay`): publish the shard events to `apa.shard-events`, enqueue the
   Celery retrain tasks, mark the rows sent. Also at start-up, so rows a crash left unsent go out.

A crash before the commit in 3 loses the whole batch's transaction and Kafka delivers the batch again
(no offset was committed); a crash between the two commits redelivers events that change nothing
(idempotent by request id); a crash between 3 and 4 leaves unsent outbox rows, published at the next
start. A database that is down rolls the batch back and stops its partitions (every event is
retried, never skipped); a Kafka broker that is down at start-up is waited for. Logs name users by
pseudonym prefix only.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.db import audit, registry
from apa.db.session import RegistryUnavailable, SchemaNotMigrated, check_schema, make_engine, session_scope
from apa.events import ErasureRequested, EventValidationError
from apa.failpoints import check_point, crash_point
from apa.kafka import ensure_topic, make_consumer, make_producer, wait_for_broker
from apa.lifecycle import ErasureOutcome
from apa.liveness import touch
from apa.logs import configure_logging
from apa.outbox import KafkaPublisher, Relay
from apa.pseudonyms import Pseudonymizer, PseudonymKeyMismatch, pseudonymizer_from_settings
from apa.retrains import erase_in_savepoint, reject, transaction_lost
from apa.settings import Settings
from apa.taskqueue import CelerySender, make_celery

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

log = logging.getLogger("apa.erasure")

POLL_TIMEOUT_MS = 500
MAX_POLL_RECORDS = 100
RELAY_EVERY_S = 1.0
"""Relay at least this often when idle (rows trainers wrote without a Kafka producer of their own)."""
FAILURES_BEFORE_DLQ = 3
"""An event whose processing raises something other than a database outage this often is
dead-lettered (with the exception type), so one poisoned event cannot stop its partition."""
DLQ_MAX_VALUE_BYTES = 900 * 1024
"""Dead-lettered bytes beyond this are cut (headers keep the full size and sha256)."""
BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class Fatal(Exception):
    """A configuration problem no retry fixes (wrong pseudonym key, unmigrated database)."""


class DatabaseDown(Exception):
    """The registry went away during a batch: its transaction is lost, every event comes again."""


@dataclass
class Counters:
    """What the service did since it started (logged at shutdown)."""

    processed: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0


def dlq_headers(record: Any, field: str, reason: str) -> list[tuple[str, bytes]]:
    """Headers of a dead-lettered message: why, and where it came from."""
    value = record.value or b""
    return [
        ("apa-dlq-reason", f"{field}: {reason}".encode()),
        ("apa-dlq-field", field.encode()),
        ("apa-dlq-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ("apa-dlq-original-bytes", str(len(value)).encode()),
        ("apa-dlq-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


class ErasureConsumer:
    """The consumer loop; `run()` until `stop()` (SIGTERM/SIGINT under `run_command`)."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        check_point(settings.crash_at)
        if not settings.kafka_bootstrap:
            raise ValueError("APA_KAFKA_BOOTSTRAP is not set: the erasure consumer reads Kafka")
        self.settings = settings
        self.engine = engine or make_engine(settings=settings)
        self.pseudonymizer: Pseudonymizer = pseudonymizer_from_settings(settings)
        self.stopping = threading.Event()
        self.counters = Counters()
        self._failures: dict[tuple[str, int, int], int] = defaultdict(int)
        self.consumer: KafkaConsumer | None = None
        self.dlq: KafkaProducer | None = None
        self.publisher: KafkaPublisher | None = None
        self.relay: Relay | None = None
        self._recorded: list[tuple[ErasureRequested, ErasureOutcome]] = []

    def stop(self) -> None:
        self.stopping.set()

    # --- start-up -----------------------------------------------------------------------------------

    def _sleep(self, attempt: int) -> None:
        self.stopping.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])

    def _wait_for_database(self) -> bool:
        attempt = 0
        while not self.stopping.is_set():
            try:
                check_schema(self.engine)
                return True
            except SchemaNotMigrated as exc:
                raise Fatal(str(exc)) from exc
            except RegistryUnavailable as exc:
                log.warning("registry database not reachable, retrying: %s", exc)
                self._sleep(attempt)
                attempt += 1
        return False

    def _wait_for_kafka(self) -> bool:
        assert self.settings.kafka_bootstrap
        attempt = 0
        while not self.stopping.is_set():
            try:
                wait_for_broker(self.settings.kafka_bootstrap, timeout_s=5.0)
                return True
            except TimeoutError as exc:
                log.warning("Kafka not reachable, retrying: %s", exc)
                self._sleep(attempt)
                attempt += 1
        return False

    def _connect(self) -> None:
        settings = self.settings
        assert settings.kafka_bootstrap
        for topic in (settings.dead_letter_topic, settings.shard_events_topic):
            try:
                ensure_topic(settings.kafka_bootstrap, topic, 1, timeout_s=settings.kafka_timeout_s)
            except Exception as exc:  # created by the deployment, or auto-created on first publish
                log.info("could not create topic %s (%s); relying on the deployment", topic, exc)
        self.dlq = make_producer(settings, key_serializer=None, value_serializer=None)
        self.publisher = KafkaPublisher(settings)
        self.relay = Relay(
            self.engine,
            settings,
            events=self.publisher,
            tasks=CelerySender(make_celery(settings), settings.retrain_queue),
        )
        self.consumer = make_consumer(
            settings,
            settings.erasure_topic,
            key_deserializer=None,
            max_poll_records=MAX_POLL_RECORDS,
        )

    # --- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until stopped; 0 on a clean stop, 1 on a fatal configuration problem."""
        try:
            if not self._wait_for_database() or not self._wait_for_kafka():
                return 0
            self._connect()
            started = self._relay()  # what a crash left unsent
            if started is not None and (started.sent or started.failed):
                log.info("start-up relay: %d outbox rows published, %d failed", started.sent, started.failed)
            log.info(
                "consuming %s as group %s", self.settings.erasure_topic, self.settings.erasure_consumer_group
            )
            last_relay = time.monotonic()
            failures = 0
            while not self.stopping.is_set():
                touch(self.settings.liveness_file)
                try:
                    done = self._poll_once()
                    failures = 0
                except Fatal:
                    raise
                except Exception as exc:  # Kafka client trouble: nothing was acknowledged, try again
                    log.warning("poll failed (%s: %s); retrying", type(exc).__name__, exc)
                    self._sleep(failures)
                    failures += 1
                    continue
                if done or time.monotonic() - last_relay >= RELAY_EVERY_S:
                    self._relay()
                    last_relay = time.monotonic()
            return 0
        except Fatal as exc:
            log.error("erasure consumer stopped: %s", exc)
            return 1
        finally:
            self._close()

    def _relay(self) -> Any:
        """Drain the outbox; a failure (the database, a broker) is logged and retried on the next pass."""
        assert self.relay is not None
        try:
            return self.relay.drain()
        except Exception as exc:
            log.warning("outbox relay failed (%s: %s); retrying", type(exc).__name__, exc)
            return None

    def _poll_once(self) -> int:
        """Handle one poll batch in one registry transaction (a savepoint per event), commit it, then
        commit the offsets of the handled events. Returns how many were handled."""
        from kafka import OffsetAndMetadata

        assert self.consumer is not None
        batch = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
        if not batch:
            return 0
        offsets: dict[Any, Any] = {}
        retry = False
        self._recorded = []
        try:
            with session_scope(self.engine) as session:
                decoded = self._prepare(session, batch)
                applied = 0
                for partition, records in batch.items():
                    for i, record in enumerate(records):
                        if self.stopping.is_set() or not self.handle(
                            session, record, decoded.get(id(record))
                        ):
                            retry = not self.stopping.is_set()
                            self._seek(partition, record.offset)  # again on the next poll
                            break
                        offsets[partition] = OffsetAndMetadata(record.offset + 1, "", -1)
                        applied += 1
                        if applied == 1 and (i + 1 < len(records) or len(batch) > 1):
                            crash_point(self.settings, "consumer.mid_batch")
        except Fatal:
            raise
        except Exception as exc:  # the database went away, or the commit failed: nothing committed
            what = str(exc) if isinstance(exc, DatabaseDown) else type(exc).__name__
            log.warning(
                "registry transaction lost, the batch of %d events comes again: %s", _size(batch), what
            )
            for partition, records in batch.items():  # never skipped: every partition from its start
                self._seek(partition, records[0].offset)
            self._sleep(1)
            return 0
        crash_point(self.settings, "consumer.after_db_commit")
        self._log_recorded()
        if offsets:
            try:
                self.consumer.commit(offsets)
            except Exception as exc:  # a rebalance: the events come again, and change nothing
                log.warning("offset commit failed (%s); those events will be redelivered", exc)
            else:
                crash_point(self.settings, "consumer.after_offset_commit")
        if retry:
            self._sleep(1)
        return len(offsets)

    def _seek(self, partition: Any, offset: int) -> None:
        assert self.consumer is not None
        try:
            self.consumer.seek(partition, offset)
        except Exception as exc:  # revoked meanwhile: its next owner starts there
            log.info("could not seek back on %s: %s", partition, exc)

    def _decode(self, record: Any) -> ErasureRequested | EventValidationError:
        try:
            return ErasureRequested.from_json(record.value, max_bytes=self.settings.erasure_max_event_bytes)
        except EventValidationError as exc:
            return exc

    def _prepare(
        self, session: Session, batch: dict[Any, list[Any]]
    ) -> dict[int, ErasureRequested | EventValidationError]:
        """Take the audit-chain lock for the batch's transaction (before any savepoint, so no
        rollback of one releases it), decode the records and read what their erasures will look at
        in a few queries. Returns id(record) -> its event or why it is malformed."""
        try:
            audit.lock_chain(session, keep_cache=True)
            decoded = {id(r): self._decode(r) for records in batch.values() for r in records}
            events = [e for e in decoded.values() if isinstance(e, ErasureRequested)]
            registry.prefetch_erasures(session, events, self.pseudonymizer)
        except Exception as exc:
            if transaction_lost(session, exc):
                raise DatabaseDown(type(exc).__name__) from exc
            raise
        return decoded

    def handle(
        self, session: Session, record: Any, decoded: ErasureRequested | EventValidationError | None = None
    ) -> bool:
        """Apply one record in a savepoint of the batch's transaction; False when it must be retried
        later (it changed nothing). Raises DatabaseDown when the transaction is lost."""
        settings = self.settings
        event = decoded if decoded is not None else self._decode(record)
        if isinstance(event, EventValidationError):
            return self.dead_letter(record, event.field, event.message)
        where = (record.topic, record.partition, record.offset)
        try:
            outcome = erase_in_savepoint(session, event, self.pseudonymizer, settings)
        except registry.ConflictError as exc:
            return self._reject(session, record, event, str(exc))
        except PseudonymKeyMismatch as exc:
            raise Fatal(str(exc)) from exc
        except Exception as exc:
            if transaction_lost(session, exc):
                raise DatabaseDown(type(exc).__name__) from exc
            # this event alone rolled back to its savepoint: the batch goes on without it
            self._failures[where] += 1
            log.exception(
                "request %s failed (%d of %d)", event.request_id, self._failures[where], FAILURES_BEFORE_DLQ
            )
            if self._failures[where] < FAILURES_BEFORE_DLQ:
                return False
            return self.dead_letter(record, "body", f"processing failed: {type(exc).__name__}")
        self._failures.pop(where, None)
        self._recorded.append((event, outcome))
        return True

    def _log_recorded(self) -> None:
        """After the commit: count and log the events it holds."""
        for event, outcome in self._recorded:
            user = self.pseudonymizer.user(event.user_id)[:12]
            if not outcome.created:
                self.counters.duplicates += 1
                log.info("request %s (user %s): already recorded, nothing to do", event.request_id, user)
            else:
                self.counters.processed += 1
                log.info(
                    "request %s (user %s): %d samples erased, %s -> %s",
                    event.request_id,
                    user,
                    outcome.samples_erased,
                    ", ".join(sorted(s.key for s in outcome.stale)) or "no shard stale",
                    outcome.status,
                )
        self._recorded = []

    def _reject(self, session: Session, record: Any, event: ErasureRequested, reason: str) -> bool:
        """Audit the refusal (in a savepoint) and dead-letter the event; False (nothing kept) when
        the dead-letter publish fails."""
        try:
            with session.begin_nested():
                reject(session, event, self.pseudonymizer, reason)
                if not self.dead_letter(
                    record, "request_id", "refused: already used for another user or other interactions"
                ):
                    raise _NotDeadLettered()
        except _NotDeadLettered:
            return False
        except Exception as exc:
            if transaction_lost(session, exc):
                raise DatabaseDown(type(exc).__name__) from exc
            log.warning("request %s: auditing the refusal failed (%s)", event.request_id, type(exc).__name__)
            return False
        self.counters.rejected += 1
        log.warning(
            "request %s refused: its id was already used for another user or other interactions",
            event.request_id,
        )
        return True

    def dead_letter(self, record: Any, field: str, reason: str) -> bool:
        """Publish the original bytes to the dead-letter topic with the reason (False: retry later)."""
        assert self.dlq is not None
        value = record.value or b""
        headers = dlq_headers(record, field, reason)
        if len(value) > DLQ_MAX_VALUE_BYTES:
            value = value[:DLQ_MAX_VALUE_BYTES]
            headers.append(("apa-dlq-truncated", b"true"))
        try:
            self.dlq.send(self.settings.dead_letter_topic, key=record.key, value=value, headers=headers).get(
                timeout=self.settings.kafka_timeout_s
            )
        except Exception as exc:
            log.warning("dead-letter publish failed (%s); retrying", exc)
            return False
        self.counters.dead_lettered += 1
        log.warning(
            "dead-lettered %s/%d/%d (%d bytes): %s: %s",
            record.topic,
            record.partition,
            record.offset,
            len(record.value or b""),
            field,
            reason,
        )
        return True

    def _close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except Exception:  # closing on the way out; nothing left to lose
                pass
        for producer in (self.dlq, self.publisher):
            if producer is not None:
                try:
                    producer.close()
                except Exception:
                    pass
        log.info("erasure consumer stopped: %s", self.counters)


class _NotDeadLettered(Exception):
    """The dead-letter publish failed: roll the refusal's audit row back and retry the event."""


def _size(batch: dict[Any, list[Any]]) -> int:
    return sum(len(records) for records in batch.values())


def run_command(group: str | None = None, topic: str | None = None, log_level: str | None = None) -> int:
    """Consume erasure events from Kafka: registry transaction, outbox, offset commit (runs until SIGTERM).

    Settings come from APA_* variables (APA_DATABASE_URL, APA_KAFKA_BOOTSTRAP,
    APA_CELERY_BROKER_URL, APA_PSEUDONYM_KEY, the topic names); the options override them.

    Args:
        group: Kafka consumer group (default APA_ERASURE_CONSUMER_GROUP).
        topic: erasure topic (default APA_ERASURE_TOPIC).
        log_level: logging level (default APA_LOG_LEVEL).
    """
    overrides: dict[str, Any] = {}
    if group:
        overrides["erasure_consumer_group"] = group
    if topic:
        overrides["erasure_topic"] = topic
    if log_level:
        overrides["log_level"] = log_level
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level)
    service = ErasureConsumer(settings)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current event", signum)
        service.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return service.run()
