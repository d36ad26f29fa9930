"""Crash points for recovery tests: `APA_CRASH_AT=<point>` makes the process SIGKILL itself there.

A real kill -9 at a precise place (between a database commit and the Kafka offset commit, between
a publish and marking the outbox row sent) is what the recovery tests need; killing from outside
at a random moment cannot hit such a window reliably. Unset in production: `crash_point` is then
one string comparison.
"""

from __future__ import annotations

import logging
import os
import signal

from apa.settings import Settings

POINTS: dict[str, str] = {
    "consumer.mid_batch": "the erasure consumer applied the first event of a poll batch of several "
    "in the batch's transaction (its savepoint released); nothing of the batch is committed",
    "consumer.after_db_commit": "the erasure consumer committed a poll batch's transaction; the Kafka "
    "offsets are not committed and the outbox is not relayed yet",
    "consumer.after_offset_commit": "the offset is committed too; the outbox rows are not published yet",
    "relay.after_publish": "the relay published outbox rows; they are not marked sent yet",
    "worker.after_register": "a trainer registered a retrained adapter; its task is not finished in "
    "the ledger yet",
}
"""Every crash point, with where it is."""

log = logging.getLogger(__name__)


def crash_point(settings: Settings, point: str) -> None:
    """SIGKILL this process if `settings.crash_at` names `point` (no clean-up, no flush)."""
    if settings.crash_at is None or settings.crash_at != point:
        return
    log.warning("APA_CRASH_AT=%s: killing this process (pid %d) with SIGKILL", point, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def check_point(name: str | None) -> None:
    """ValueError unless `name` is None or a known crash point."""
    if name is not None and name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(sorted(POINTS))}")
