"""The Celery side of retraining, shared by who enqueues (the outbox relay) and who runs (workers).

One configuration for both ends, from `Settings`:

* broker: `APA_CELERY_BROKER_URL` (`amqp://` RabbitMQ or `redis://` in production); unset, the
  embedded broker that needs no server: kombu's SQLAlchemy transport on a SQLite file
  (`APA_CELERY_EMBEDDED_BROKER`);
* at least once, one task at a time: `task_acks_late` (a task is acknowledged when it finished, so
  a worker that dies mid-training gets it redelivered), `task_reject_on_worker_lost`, prefetch 1;
* the worker pool (`APA_WORKER_POOL`, default `solo`: the task runs in the worker process itself,
  safe with torch and CUDA; one worker process per GPU);
* no AMQP heartbeats: a solo worker training for minutes cannot answer them, and RabbitMQ would
  then close its connection and hand the running task to another worker.

Tasks are sent by name (`RETRAIN_TASK`), so nothing here imports the trainer service.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apa.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

RETRAIN_TASK = "apa.retrain_shard"
"""Celery task name of `retrain_shard(shard_id, generation)` (services/trainer)."""
TASK_ID_PREFIX = "apa-retrain-"
"""Celery task id of ledger row n: `apa-retrain-<n>` (`apa.retrains`)."""
POOLS = ("solo", "prefork", "threads")
REDIS_VISIBILITY_TIMEOUT_S = 12 * 3600
"""Redis redelivers an unacknowledged task after this long; a retrain must finish within it."""


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded SQLite broker (an absolute path, so every process of
    the deployment that shares the working directory finds the same file)."""
    if settings.celery_broker_url:
        return settings.celery_broker_url
    path = Path(settings.celery_embedded_broker).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # kombu's SQLAlchemy transport maps its tables with `noload`, which SQLAlchemy 2.1 deprecates; a
    # warning about kombu's internals that the user can do nothing about (its first publish or poll)
    warnings.filterwarnings(
        "ignore", message=r"The ``noload`` loader strategy is deprecated", category=DeprecationWarning
    )
    return f"sqla+sqlite:///{path}"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration of the retrain queue (see the module docstring)."""
    if settings.worker_pool not in POOLS:
        raise ValueError(f"APA_WORKER_POOL={settings.worker_pool!r}: expected one of {', '.join(POOLS)}")
    if settings.worker_concurrency < 1:
        raise ValueError(f"APA_WORKER_CONCURRENCY must be >= 1, got {settings.worker_concurrency}")
    url = broker_url(settings)
    config: dict[str, Any] = {
        "broker_url": url,
        "result_backend": settings.celery_result_backend,
        "task_ignore_result": settings.celery_result_backend is None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": settings.worker_pool,
        "worker_concurrency": 1 if settings.worker_pool == "solo" else settings.worker_concurrency,
        "task_default_queue": settings.retrain_queue,
        "task_routes": {RETRAIN_TASK: {"queue": settings.retrain_queue}},
        "broker_connection_retry_on_startup": True,
        "broker_heartbeat": 0,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }
    if url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    return config


def make_celery(settings: Settings, main: str = "apa") -> Celery:
    """A Celery app configured for the retrain queue (not set as the process's current app)."""
    from celery import Celery

    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class CelerySender:
    """Enqueues outbox task rows on the retrain queue (an `apa.outbox.TaskSender`)."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def __call__(self, name: str, args: list[Any], kwargs: dict[str, Any], task_id: str) -> None:
        self.app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, queue=self.queue)


def task_id(ledger_id: int) -> str:
    """The Celery task id of retrain-ledger row `ledger_id`."""
    return f"{TASK_ID_PREFIX}{ledger_id}"


def ledger_id(celery_task_id: str | None) -> int | None:
    """The ledger row of a Celery task id (None when it is not one of ours)."""
    if not celery_task_id or not celery_task_id.startswith(TASK_ID_PREFIX):
        return None
    rest = celery_task_id[len(TASK_ID_PREFIX) :]
    return int(rest) if rest.isdigit() else None


__all__ = [
    "POOLS",
    "RETRAIN_TASK",
    "CelerySender",
    "broker_url",
    "celery_config",
    "ledger_id",
    "make_celery",
    "task_id",
]
