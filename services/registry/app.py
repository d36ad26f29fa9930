"""Registry service: the compliance and registry HTTP API over the registry database.

A Flask app factory (`create_app`) served by gunicorn (`apa serve-registry`). Routes are thin:
they validate input, call `apa.db.registry` / `apa.db.audit`, and return JSON. Every endpoint
except /healthz and /readyz requires `Authorization: Bearer <APA_API_TOKEN>`. Errors are JSON
`{"error": ..., "field": ...}`; bad input is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from apa.db import audit, registry
from apa.db.models import ADAPTER_STATES, SHARD_STATES, AdapterVersion, ErasureRequest, Replica, Shard
from apa.db.session import current_revision, head_revision, make_engine, make_sessionmaker
from apa.deadlines import DEFAULT_WITHIN_DAYS, MAX_WITHIN_DAYS, deadlines_view
from apa.events import (
    ErasureRequested,
    EventBus,
    EventValidationError,
    InMemoryEventBus,
    KafkaEventBus,
    build_event_bus,
    utc_now_iso,
)
from apa.ids import id_problem
from apa.pseudonyms import Pseudonymizer, pseudonymizer_from_settings
from apa.retrains import erase
from apa.settings import Settings
from services.registry.openapi import openapi_document

log = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = frozenset({"healthz", "readyz"})
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_BODY_BYTES = 1 << 20
BUS_RETRY_S = 5.0
"""After the event bus failed, POST /erasures answers 503 at once for this long (Retry-After)."""


class ApiError(Exception):
    """An error response: HTTP status, message and the offending field (if any)."""

    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field


@dataclass
class RegistryState:
    """What the routes share: settings, the database and the (lazily built) event bus."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    token: str | None
    head: str | None
    pseudonymizer: Pseudonymizer
    bus_factory: Callable[[], EventBus]
    _bus: EventBus | None = None
    _bus_lock: threading.Lock = field(default_factory=threading.Lock)
    _bus_down_until: float = 0.0

    @property
    def bus(self) -> EventBus:
        """The event bus; after a failure to reach it, fails at once for `BUS_RETRY_S` seconds (so
        a broker outage costs one short timeout, not one per request)."""
        with self._bus_lock:
            if self._bus is None:
                if time.monotonic() < self._bus_down_until:
                    raise ConnectionError("event bus unavailable (recent failure)")
                try:
                    self._bus = self.bus_factory()
                except Exception:
                    self.bus_failed()
                    raise
            return self._bus

    def bus_failed(self) -> None:
        self._bus_down_until = time.monotonic() + BUS_RETRY_S


def _state() -> RegistryState:
    from flask import current_app

    return current_app.extensions["apa_registry"]  # type: ignore[no-any-return]


def _int_arg(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer", name) from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be {bounds}", name)
    return value


def _choice_arg(name: str, choices: tuple[str, ...]) -> str | None:
    value = request.args.get(name)
    if value is not None and value not in choices:
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}", name)
    return value


def _path_id(value: str, field: str) -> str:
    problem = id_problem(value)
    if problem:
        raise ApiError(400, f"{field} {problem}", field)
    return value


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "body")
    return body


def create_app(
    settings: Settings | None = None, *, engine: Engine | None = None, event_bus: EventBus | None = None
) -> Flask:
    """The registry API. Refuses to start (ValueError) without an API token unless the settings
    allow unauthenticated dev mode. POST /erasures publishes on `event_bus` (default: Kafka when
    APA_KAFKA_BOOTSTRAP is set, else in-process)."""
    settings = settings or Settings.from_env()
    token = settings.require_api_token()
    engine = engine or make_engine(settings=settings)
    state = RegistryState(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        token=token,
        head=head_revision(),
        pseudonymizer=pseudonymizer_from_settings(settings),
        bus_factory=(lambda: event_bus) if event_bus is not None else (lambda: _erasure_bus(settings)),
    )
    if event_bus is None and not settings.kafka_bootstrap:
        state._bus = _local_bus(settings, state.sessions, state.pseudonymizer)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["apa_registry"] = state

    @app.before_request
    def _authenticate() -> Response | None:
        if request.endpoint in PUBLIC_ENDPOINTS or state.token is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), state.token.encode()
        ):
            response = jsonify(error="missing or wrong bearer token", field="Authorization")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="apa-registry"'
            return response
        return None

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return jsonify(error=exc.error, field=exc.field), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=(exc.description or exc.name), field=None), exc.code or 500

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="internal error", field=None), 500

    # --- health ------------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> Response:
        """The process is up."""
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        """The database is reachable and migrated to head."""
        try:
            with state.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            current = current_revision(state.engine)
        except SQLAlchemyError as exc:
            return jsonify(status="not ready", reason=f"database unreachable: {type(exc).__name__}"), 503
        if current != state.head:
            return jsonify(
                status="not ready", reason=f"database at revision {current}, head is {state.head}"
            ), 503
        return jsonify(status="ready", revision=current), 200

    # --- compliance ------------------------------------------------------------------------------

    @app.get("/erasures/<request_id>")
    def get_erasure(request_id: str) -> Response:
        _path_id(request_id, "request_id")
        with state.sessions() as session:
            try:
                return jsonify(registry.erasure_status(session, request_id))
            except registry.NotFoundError:
                raise ApiError(404, f"no erasure request {request_id!r}", "request_id") from None

    @app.get("/users/<user_id>/erasure-status")
    def get_user_erasure_status(user_id: str) -> Response:
        _path_id(user_id, "user_id")
        with state.sessions() as session:
            try:
                return jsonify(registry.user_erasure_status(session, user_id, state.pseudonymizer))
            except registry.NotFoundError:
                raise ApiError(404, f"no user {user_id!r}", "user_id") from None

    @app.get("/audit")
    def get_audit() -> Response:
        since = _int_arg("since", 0, 0)
        limit = _int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE)
        with state.sessions() as session:
            rows = audit.page(session, since=since, limit=limit)
            return jsonify(
                rows=[audit.row_view(r) for r in rows],
                next_since=rows[-1].id if rows else since,
                has_more=len(rows) == limit,
            )

    @app.get("/shards")
    def get_shards() -> Response:
        model_id = request.args.get("model_id")
        shard_state = _choice_arg("state", SHARD_STATES)
        with state.sessions() as session:
            query = select(Shard).order_by(Shard.model_id, Shard.index)
            if model_id:
                query = query.where(Shard.model_id == model_id)
            if shard_state:
                query = query.where(Shard.state == shard_state)
            serving = {
                v.shard_id: v
                for v in session.scalars(select(AdapterVersion).where(AdapterVersion.state == "serving"))
            }
            return jsonify(shards=[registry.shard_view(s, serving.get(s.id)) for s in session.scalars(query)])

    @app.get("/adapters")
    def get_adapters() -> Response:
        shard_id = request.args.get("shard_id")
        adapter_state = _choice_arg("state", ADAPTER_STATES)
        with state.sessions() as session:
            query = select(AdapterVersion).order_by(AdapterVersion.shard_id, AdapterVersion.version)
            if shard_id:
                query = query.where(AdapterVersion.shard_id == shard_id)
            if adapter_state:
                query = query.where(AdapterVersion.state == adapter_state)
            return jsonify(adapters=[registry.adapter_view(v) for v in session.scalars(query)])

    @app.post("/erasures")
    def post_erasure() -> tuple[Response, int]:
        body = _json_body()
        unknown = sorted(set(body) - {"request_id", "user_id", "interactions", "requested_at"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0])
        try:
            event = ErasureRequested.from_dict(
                {"request_id": str(uuid.uuid4()), "requested_at": utc_now_iso(), **body}
            )
        except EventValidationError as exc:
            raise ApiError(400, exc.message, exc.field) from None
        with state.sessions() as session:
            known = session.get(ErasureRequest, event.request_id)
            if known is not None and known.user_pid != state.pseudonymizer.user(event.user_id):
                raise ApiError(409, "request_id already used by another request", "request_id")
        try:
            state.bus.publish(state.settings.erasure_topic, event.user_id, event.to_dict())
        except registry.ConflictError:
            raise ApiError(409, "request_id already used by another request", "request_id") from None
        except Exception as exc:  # the broker, whatever its client raises
            state.bus_failed()
            log.warning("publishing erasure %s failed: %s", event.request_id, type(exc).__name__)
            unavailable = jsonify(error="event bus unavailable; retry later", field=None)
            unavailable.headers["Retry-After"] = str(int(BUS_RETRY_S))
            return unavailable, 503
        response = jsonify(
            request_id=event.request_id, status="accepted", status_url=f"/erasures/{event.request_id}"
        )
        response.headers["Location"] = f"/erasures/{event.request_id}"
        return response, 202

    @app.get("/erasure-deadlines")
    def get_erasure_deadlines() -> Response:
        """Open erasure requests that are overdue or due within `within_days` days (GDPR Art. 12(3))."""
        within = _int_arg("within_days", DEFAULT_WITHIN_DAYS, 0, MAX_WITHIN_DAYS)
        with state.sessions() as session:
            return jsonify(deadlines_view(session, within_days=within))

    # --- replicas --------------------------------------------------------------------------------

    @app.post("/replicas/<replica_id>/heartbeat")
    def post_heartbeat(replica_id: str) -> Response:
        _path_id(replica_id, "replica_id")
        body = _json_body()
        loaded = body.get("loaded")
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in loaded.items()
        ):
            raise ApiError(400, "loaded must be an object mapping shard id to adapter version", "loaded")
        model_id = body.get("model_id")
        if model_id is not None and not isinstance(model_id, str):
            raise ApiError(400, "model_id must be a string", "model_id")
        with state.sessions() as session, session.begin():
            replica = registry.record_replica_heartbeat(
                session,
                replica_id,
                loaded,
                model_id=model_id,
                live_seconds=state.settings.replica_live_seconds,
            )
            return jsonify(_replica_view(replica))

    @app.get("/replicas")
    def get_replicas() -> Response:
        with state.sessions() as session:
            return jsonify(
                replicas=[_replica_view(r) for r in session.scalars(select(Replica).order_by(Replica.id))]
            )

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document())

    return app


def _local_bus(
    settings: Settings, sessions: sessionmaker[Session], pseudonymizer: Pseudonymizer
) -> InMemoryEventBus:
    """Without Kafka, POST /erasures must not drop requests: record them in the registry directly
    (excluded at once; retraining needs the erasure service)."""
    log.warning(
        "APA_KAFKA_BOOTSTRAP is not set: POST /erasures records erasures in the registry directly "
        "(their retrain tasks go through the outbox, relayed by the trainer workers)"
    )
    bus = InMemoryEventBus()

    def record(_topic: str, _key: str, value: dict[str, Any]) -> None:
        with sessions() as session, session.begin():
            erase(session, ErasureRequested.from_dict(value), pseudonymizer, settings)

    bus.subscribe(settings.erasure_topic, record)
    return bus


def _erasure_bus(settings: Settings) -> EventBus:
    """Kafka with short timeouts (POST /erasures must never stall: a broker that is down costs
    `erasure_publish_timeout_s`, then a 503), else the in-process bus."""
    if not settings.kafka_bootstrap:
        return build_event_bus(settings)
    timeout_ms = max(100, int(settings.erasure_publish_timeout_s * 1000))
    return KafkaEventBus(
        settings.kafka_bootstrap,
        timeout_s=settings.erasure_publish_timeout_s,
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=max(timeout_ms, 1000),
    )


def _replica_view(replica: Replica) -> dict[str, Any]:
    return {
        "replica_id": replica.id,
        "model_id": replica.model_id,
        "loaded": replica.loaded,
        "first_seen": audit.format_ts(replica.first_seen),
        "last_heartbeat": audit.format_ts(replica.last_heartbeat),
        "loaded_changed_at": audit.format_ts(replica.loaded_changed_at),
    }


def serve_command(host: str = "127.0.0.1", port: int = 8000, workers: int = 2) -> int:
    """Serve the registry API with gunicorn (settings from APA_* environment variables).

    Args:
        host: interface to bind.
        port: TCP port.
        workers: gunicorn worker processes.
    """
    from gunicorn.app.base import BaseApplication

    Settings.from_env().require_api_token()  # fail here, not in every worker

    class RegistryServer(BaseApplication):  # type: ignore[misc]
        def __init__(self, options: dict[str, Any]) -> None:
            self.options = options
            super().__init__()

        def load_config(self) -> None:
            for key, value in self.options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return create_app()  # in each worker: its own engine and connection pool

    RegistryServer({"bind": f"{host}:{port}", "workers": workers, "accesslog": "-"}).run()
    return 0
