"""Service settings from `APA_*` environment variables: the one place that reads the environment.

Every field of `Settings` is read from the variable `APA_<FIELD NAME IN UPPER CASE>`
(`database_url` <- `APA_DATABASE_URL`). Services, the CLI and the migrations take a `Settings`
object; nothing else in the code base looks at `os.environ`.

`python -m apa.settings` prints the configuration table of README.md (`markdown_table`), made from
the fields, their defaults and their docstrings, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "APA_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Configuration shared by the registry, erasure, trainer and inference services."""

    database_url: str = "sqlite:///./apa.db"
    """SQLAlchemy URL of the registry database (Postgres in production, SQLite embedded)."""
    api_token: str | None = None
    """Bearer token every HTTP API requires (except health probes)."""
    allow_unauthenticated: bool = False
    """Dev mode only: let the HTTP APIs start without `api_token` and skip authentication."""
    replica_token: str | None = None
    """Bearer token inference replicas send heartbeats with (never the compliance `api_token`)."""
    kafka_bootstrap: str | None = None
    """Kafka bootstrap servers (`host:port,...`); unset means the in-process event bus."""
    erasure_topic: str = "apa.erasure-requests"
    """Topic of `ErasureRequested` events, keyed by user id."""
    shard_events_topic: str = "apa.shard-events"
    """Topic of shard state changes (stale / ready)."""
    dead_letter_topic: str = "apa.erasure-requests.dlq"
    """Where malformed erasure events go, with the reason."""
    erasure_consumer_group: str = "apa-erasure"
    """Kafka consumer group of the erasure service."""
    kafka_session_timeout_ms: int = 10000
    """Consumer-group session timeout: a crashed consumer's partitions move on after this (Kafka: >= 6000)."""
    kafka_heartbeat_interval_ms: int = 3000
    """Consumer-group heartbeat interval (well under `kafka_session_timeout_ms`)."""
    kafka_max_poll_interval_ms: int = 60000
    """Longest gap between polls (handling one batch) before the group drops the consumer."""
    kafka_timeout_s: float = 30.0
    """Bound on one Kafka producer send, commit or broker-readiness wait, in seconds."""
    celery_broker_url: str | None = None
    """Celery broker of the retrain tasks: `amqp://...` (RabbitMQ) or `redis://...` in production;
    unset: the embedded broker that needs no server, kombu's SQLAlchemy transport on the SQLite
    file `celery_embedded_broker`."""
    celery_embedded_broker: str = "./apa-broker.db"
    """SQLite file of the embedded Celery broker (used when `celery_broker_url` is unset)."""
    celery_result_backend: str | None = None
    """Celery result backend URL; unset means none (task outcomes live in the registry)."""
    retrain_queue: str = "apa.retrain"
    """Celery queue of the retrain tasks (the trainer workers consume it)."""
    retrain_coalesce: bool = True
    """A shard with a retrain task queued and not yet started gets no second task (off: one task per
    erasure and shard, for comparison in `apa bench erasure`)."""
    worker_pool: str = "solo"
    """Celery pool of a trainer worker: `solo` (one task at a time in the worker process: safe with
    torch and CUDA; run one worker process per GPU), or `prefork` / `threads`."""
    worker_concurrency: int = 1
    """Tasks a trainer worker runs at once (1 with the solo pool)."""
    worker_device: str = "auto"
    """Device the worker trains on: `auto`, `cpu`, `cuda`, `cuda:N` (one worker per GPU)."""
    worker_model: str | None = None
    """Backbone a worker trains with, overriding the registered model's (`tiny`: the random test
    model, for smoke tests of a deployment without weights); unset: the model's own backbone."""
    task_heartbeat_s: float = 10.0
    """A training worker moves its task's heartbeat this often."""
    task_lost_after_s: float = 120.0
    """A started task whose heartbeat is older than this is lost: `apa resume` queues it again."""
    outbox_batch: int = 200
    """Most outbox rows one relay pass publishes."""
    erasure_max_event_bytes: int = 262144
    """Erasure messages larger than this go to the dead-letter topic (reason: too large)."""
    erasure_publish_timeout_s: float = 2.0
    """Bound on `POST /erasures` publishing to Kafka; past it the API answers 503 at once."""
    liveness_file: str | None = None
    """A file the erasure consumer (every poll pass) and trainer workers (every 10 s once ready) touch;
    health checks read its age. Unset: none."""
    crash_at: str | None = None
    """Testing only: SIGKILL this process at the named point (`apa.failpoints`) to test recovery."""
    artifact_store: str = "./artifacts"
    """Root directory of the adapter artifact store (a shared volume in production)."""
    pseudonym_key: str | None = None
    """Secret key of the HMAC pseudonyms that replace stored ids; unset: a generated development key."""
    audit_key: str | None = None
    """Secret key of the audit chain's HMAC-SHA256 (keep it outside the database, like
    `pseudonym_key`); unset: a generated development key. `apa audit verify` needs it."""
    audit_legacy_rows: int = 0
    """Audit rows 1..N written before migration 0005 keyed the chain (plain sha256); 0 for a
    registry created at 0005 or later. Kept outside the database, so an attacker cannot widen it."""
    signing_key: str | None = None
    """Ed25519 private key (64 hex digits of its seed, or PEM) that signs erasure receipts and audit
    anchors; unset: a generated development key. Publish its public key (`apa audit public-key`)."""
    audit_anchor_file: str | None = None
    """Append-only JSON Lines file the audit anchors are written to (outside the database)."""
    audit_anchor_topic: str = "apa.audit-anchors"
    """Kafka topic the audit anchors are published on (when `kafka_bootstrap` is set)."""
    audit_anchor_interval_s: float = 300.0
    """Seconds between the registry service's anchors of the chain head (0: on demand only)."""
    model_dir: str | None = None
    """Model directory (docs/ARCHITECTURE.md §4) the services serve and retrain."""
    model_id: str | None = None
    """Registry id of the served model; default: the model directory's name."""
    registry_url: str = "http://127.0.0.1:8000"
    """Base URL of the registry HTTP API (replicas report their loaded adapters there)."""
    replica_id: str | None = None
    """This inference replica's id; default: host name and process id."""
    replica_live_seconds: float = 60.0
    """A replica whose last heartbeat is older than this no longer counts as serving."""
    inference_level: str = "decomposition"
    """Mixture level an inference replica serves: `decomposition` (D), `non_decomposition`, `prediction`."""
    inference_strategy: str = "adaptive"
    """Weight strategy of an inference replica: `adaptive` (Eq. 7-8), `average`, `major`, `semantic`."""
    inference_registry_max_age_s: float = 1.0
    """Safety net: each batch checks the registry's shard generations and serving versions through a
    cached query at most this old (seconds), even if a `stale` event was lost."""
    inference_batch_wait_ms: float = 5.0
    """Longest wait (ms) for more concurrent requests to join a micro-batch."""
    inference_max_batch: int = 64
    """Most prompts one micro-batch scores (one forward pass per `batch_size` of the backbone)."""
    inference_max_candidates: int = 100
    """Most candidate items of one POST /recommend (and prompts of one POST /score)."""
    inference_omega: str = "per_candidate"
    """ω of POST /recommend: `per_candidate` (the paper's: each candidate prompt embedded) or
    `per_request` (one ω from the request prefix, the user's history without a target, shared by the
    request's candidates, whose shared prefix tokens then run once)."""
    inference_embed_layer: int | None = None
    """Layer whose hidden state ω's embeddings read: empty keeps the model's (-1, the last); l >= 0
    is an early exit that runs only the first l decoder layers (adaptive and major ω only)."""
    inference_heartbeat_s: float = 5.0
    """Seconds between a replica's heartbeats to the registry (also sent at once when its loaded set changes)."""
    migrations_dir: str | None = None
    """Alembic `migrations/` directory; default: the one installed as the package `apa.migrations`."""
    log_level: str = "INFO"
    """Python logging level of the services."""
    runs_dir: str = "~/.cache/apa/runs"
    """Run directory of `apa experiment`: its content-keyed stage store and results, outside the work tree so a new clone keeps them."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `APA_*` variables of `environ` (default: the process environment).

        Keyword `overrides` win over the environment. Raises ValueError naming the variable
        when a value cannot be parsed.
        """
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            var = ENV_PREFIX + field.name.upper()
            if var in env:
                values[field.name] = _parse(var, env[var], hints[field.name])
        values.update(overrides)
        return cls(**values)

    def require_api_token(self) -> str | None:
        """The API token; raises ValueError when there is none and dev mode is not allowed."""
        if self.api_token:
            return self.api_token
        if self.allow_unauthenticated:
            return None
        raise ValueError(
            f"{ENV_PREFIX}API_TOKEN is not set; set it, or set {ENV_PREFIX}ALLOW_UNAUTHENTICATED=1 "
            "for local development"
        )

    def require_replica_token(self) -> str | None:
        """The replica token (None when unset: heartbeats are then refused, except in dev mode);
        raises ValueError when it equals the API token, which would let compliance clients post
        heartbeats in the replicas' name."""
        if self.replica_token and self.api_token and self.replica_token == self.api_token:
            raise ValueError(
                f"{ENV_PREFIX}REPLICA_TOKEN must differ from {ENV_PREFIX}API_TOKEN: the compliance "
                "clients' token must not confirm what the replicas serve"
            )
        return self.replica_token or None


def _parse(var: str, raw: str, hint: Any) -> Any:
    """Convert the text of variable `var` to the field type `hint`."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if optional and raw.strip() == "":
        return None
    try:
        if hint is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r}: {exc}") from exc


def field_docs(cls: type = Settings) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), from the source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def markdown_table() -> str:
    """The configuration table of README.md: each setting's variable, default and meaning."""
    docs = field_docs()
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(Settings):
        default = _shown_default(field.default)
        meaning = docs.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{field.name.upper()}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _shown_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(computed)"
    if value is None:
        return "unset"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


if __name__ == "__main__":
    print(markdown_table(), end="")
