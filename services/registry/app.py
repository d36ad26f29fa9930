"""Registry service: the compliance and registry HTTP API over the registry database.

A Flask app factory (`create_app`) served by gunicorn (`apa serve-registry`). Routes are thin:
they call `apa.db.registry` / `apa.db.audit` / `apa.receipts` and return JSON. Two tokens, never
interchangeable: `POST /replicas/<id>/heartbeat` takes only `Authorization: Bearer
<APA_REPLICA_TOKEN>` (the inference replicas' token; refused with 503 when none is configured,
unless in dev mode), every other endpoint except /healthz and /readyz takes only `Authorization:
Bearer <APA_API_TOKEN>` (the compliance clients' token). The other token gets a 403.

Input is checked before any route runs, by one layer (`validation`) driven by the operation table
that also renders /openapi.json (`openapi.OPERATIONS`): request limits (`_limits`), then the token
(`_authenticate`), then path ids, query parameters and the JSON body (`_validate_input`, which
leaves the parsed values in `flask.g.query` and `flask.g.body`). Errors are JSON
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
from functools import partial
from typing import Any

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from apa import anchors, receipts, validation
from apa.db import audit, registry
from apa.db.models import AdapterVersion, ErasureRequest, RegistryMeta, Replica, Shard
from apa.db.session import current_revision, head_revision, make_engine, make_sessionmaker
from apa.deadlines import deadlines_view
from apa.events import (
    ErasureRequested,
    EventBus,
    EventValidationError,
    InMemoryEventBus,
    KafkaEventBus,
    build_event_bus,
    utc_now_iso,
)
from apa.http_server import serve
from apa.pseudonyms import Pseudonymizer, pseudonymizer_from_settings
from apa.retrains import erase
from apa.settings import Settings
from apa.signing import SigningKey, signing_key_from_settings
from apa.validation import ApiError
from services.registry.openapi import BY_ENDPOINT, OPERATIONS, openapi_document

log = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = frozenset(op.endpoint for op in OPERATIONS if op.public)
PUBLIC_PATHS = frozenset(op.path for op in OPERATIONS if op.public)
REPLICA_ENDPOINTS = frozenset(op.endpoint for op in OPERATIONS if op.replica)
"""Endpoints for the inference replicas: the replica token, never the compliance token."""
MAX_BODY_BYTES = validation.MAX_BODY_BYTES
BUS_RETRY_S = 5.0
"""After the event bus failed, POST /erasures answers 503 at once for this long (Retry-After)."""


@dataclass
class RegistryState:
    """What the routes share: settings, the database and the (lazily built) event bus."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    token: str | None
    replica_token: str | None
    head: str | None
    pseudonymizer: Pseudonymizer
    bus_factory: Callable[[], EventBus]
    signer: SigningKey
    audit_key: audit.AuditKey
    anchor_sinks: list[anchors.AnchorSink] = field(default_factory=list)
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


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    event_bus: EventBus | None = None,
    start_anchoring: bool = False,
) -> Flask:
    """The registry API. Refuses to start (ValueError) without an API token unless the settings
    allow unauthenticated dev mode. POST /erasures publishes on `event_bus` (default: Kafka when
    APA_KAFKA_BOOTSTRAP is set, else in-process). Audit rows are keyed with the settings' audit
    key; receipts and anchors are signed with their signing key. With `start_anchoring` (the
    served app), the chain head is anchored to the configured sinks every
    `audit_anchor_interval_s` seconds."""
    settings = settings or Settings.from_env()
    token = settings.require_api_token()
    replica_token = settings.require_replica_token()
    engine = engine or make_engine(settings=settings)
    audit_key = audit.audit_key_from_settings(settings)
    sessions = make_sessionmaker(engine)
    sessions.configure(info={audit.SESSION_KEY: audit_key})
    state = RegistryState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        token=token,
        replica_token=replica_token,
        head=head_revision(),
        pseudonymizer=pseudonymizer_from_settings(settings),
        bus_factory=(lambda: event_bus) if event_bus is not None else (lambda: _erasure_bus(settings)),
        signer=signing_key_from_settings(settings),
        audit_key=audit_key,
        anchor_sinks=anchors.configured_sinks(settings),
    )
    if event_bus is None and not settings.kafka_bootstrap:
        state._bus = _local_bus(settings, state.sessions, state.pseudonymizer)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["apa_registry"] = state

    if start_anchoring and state.anchor_sinks and settings.audit_anchor_interval_s > 0:
        app.extensions["apa_anchors"] = anchors.AnchorScheduler(
            engine,
            state.anchor_sinks,
            state.signer,
            audit_key,
            settings.audit_anchor_interval_s,
            legacy_rows=settings.audit_legacy_rows,
        ).start()

    @app.before_request
    def _limits() -> None:
        validation.check_limits(request)

    @app.before_request
    def _authenticate() -> Response | None:
        if request.endpoint in PUBLIC_ENDPOINTS or (
            request.endpoint is None and request.path in PUBLIC_PATHS  # a 405 on a public path
        ):
            return None
        presented = _bearer()
        if request.endpoint in REPLICA_ENDPOINTS:
            return _authenticate_replica(state, presented)
        if state.token is None:  # dev mode
            return None
        if presented is not None and _same(presented, state.token):
            return None
        if presented is not None and state.replica_token and _same(presented, state.replica_token):
            return _auth_error(
                403,
                "the replica token only posts heartbeats; this endpoint takes the API token (APA_API_TOKEN)",
            )
        return _auth_error(401, "missing or wrong bearer token")

    @app.before_request
    def _validate_input() -> None:
        """Path ids, query parameters and the JSON body of the matched operation, before the route."""
        op = BY_ENDPOINT.get(request.endpoint or "")
        if op is None:  # no route matched: the 404/405 follows
            return
        for name, value in (request.view_args or {}).items():
            validation.path_id(value, name)
        g.query = validation.query(request, op.query)
        g.body = op.body.parse(request) if op.body is not None else None

    validation.json_errors(app, log)

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
        with state.sessions() as session:
            recorded = session.get(RegistryMeta, audit.AUDIT_KEY_ID)
        if recorded is not None and recorded.value != state.audit_key.key_id:
            reason = (
                f"the audit chain is keyed with {recorded.value}, this process holds {state.audit_key.key_id}"
            )
            return jsonify(status="not ready", reason=reason), 503
        return jsonify(status="ready", revision=current), 200

    # --- compliance ------------------------------------------------------------------------------

    @app.get("/erasures/<request_id>")
    def get_erasure(request_id: str) -> Response:
        _confirm_due(state, [request_id])
        with state.sessions() as session:
            try:
                return jsonify(
                    registry.erasure_status(
                        session, request_id, replica_live_seconds=state.settings.replica_live_seconds
                    )
                )
            except registry.NotFoundError:
                raise ApiError(404, f"no erasure request {request_id!r}", "request_id") from None

    @app.get("/erasures/<request_id>/receipt")
    def get_erasure_receipt(request_id: str) -> Response:
        return jsonify(_receipt(state, request_id))

    @app.get("/users/<user_id>/erasure-status")
    def get_user_erasure_status(user_id: str) -> Response:
        _confirm_due(state, user_pid=state.pseudonymizer.user(user_id))
        with state.sessions() as session:
            try:
                return jsonify(
                    registry.user_erasure_status(
                        session,
                        user_id,
                        state.pseudonymizer,
                        replica_live_seconds=state.settings.replica_live_seconds,
                    )
                )
            except registry.NotFoundError:
                raise ApiError(404, f"no user {user_id!r}", "user_id") from None

    @app.get("/audit")
    def get_audit() -> Response:
        since, limit = g.query["since"], g.query["limit"]
        with state.sessions() as session:
            rows = audit.page(session, since=since, limit=limit)
            return jsonify(
                rows=[audit.row_view(r) for r in rows],
                next_since=rows[-1].id if rows else since,
                has_more=len(rows) == limit,
            )

    @app.get("/audit/public-key")
    def get_public_key() -> Response:
        public = state.signer.public
        return jsonify(alg="Ed25519", key_id=public.key_id, public_key=public.b64, pem=public.pem())

    @app.get("/shards")
    def get_shards() -> Response:
        model_id, shard_state = g.query["model_id"], g.query["state"]
        with state.sessions() as session:
            query = select(Shard).order_by(Shard.model_id, Shard.index)
            if model_id is not None:
                query = query.where(Shard.model_id == model_id)
            if shard_state is not None:
                query = query.where(Shard.state == shard_state)
            serving = {
                v.shard_id: v
                for v in session.scalars(select(AdapterVersion).where(AdapterVersion.state == "serving"))
            }
            return jsonify(shards=[registry.shard_view(s, serving.get(s.id)) for s in session.scalars(query)])

    @app.get("/adapters")
    def get_adapters() -> Response:
        shard_id, adapter_state = g.query["shard_id"], g.query["state"]
        with state.sessions() as session:
            query = select(AdapterVersion).order_by(AdapterVersion.shard_id, AdapterVersion.version)
            if shard_id is not None:
                query = query.where(AdapterVersion.shard_id == shard_id)
            if adapter_state is not None:
                query = query.where(AdapterVersion.state == adapter_state)
            return jsonify(adapters=[registry.adapter_view(v) for v in session.scalars(query)])

    @app.post("/erasures")
    def post_erasure() -> tuple[Response, int]:
        body = g.body
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
        within = g.query["within_days"]
        with state.sessions() as session:
            return jsonify(deadlines_view(session, within_days=within))

    # --- replicas --------------------------------------------------------------------------------

    @app.post("/replicas/<replica_id>/heartbeat")
    def post_heartbeat(replica_id: str) -> Response:
        loaded, model_id = g.body["loaded"], g.body.get("model_id")
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


def _bearer() -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None without one."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" and presented.strip() else None


def _same(presented: str, token: str) -> bool:
    return hmac.compare_digest(presented.encode(), token.encode())


def _auth_error(status: int, error: str) -> Response:
    response = jsonify(error=error, field="Authorization")
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="apa-registry"'
    return response


def _authenticate_replica(state: RegistryState, presented: str | None) -> Response | None:
    """Heartbeats: only the replica token. Without one configured they are refused (503), except in
    dev mode; the compliance API token is refused (403): holding it must not let anyone confirm an
    erasure in the replicas' name."""
    if state.replica_token is None:
        if state.settings.allow_unauthenticated:
            return None
        response = jsonify(
            error="heartbeats are refused: the registry has no replica token (set APA_REPLICA_TOKEN)",
            field=None,
        )
        response.status_code = 503
        return response
    if presented is not None and _same(presented, state.replica_token):
        return None
    if presented is not None and state.token is not None and _same(presented, state.token):
        return _auth_error(
            403, "the API token cannot post heartbeats; replicas authenticate with APA_REPLICA_TOKEN"
        )
    return _auth_error(401, "missing or wrong replica token")


def _receipt(state: RegistryState, request_id: str) -> dict[str, Any]:
    """The signed receipt; when no anchor covers its audit rows yet and sinks are configured, the
    head is anchored first (so a receipt is anchored as soon as it is asked for)."""
    with state.sessions() as session:
        try:
            receipt = receipts.build_receipt(session, request_id, state.signer)
        except receipts.ReceiptNotFound:
            raise ApiError(404, f"no erasure request {request_id!r}", "request_id") from None
    if receipt["receipt"]["anchor"] is not None or not state.anchor_sinks:
        return receipt
    try:
        anchors.anchor_now(
            state.engine,
            state.anchor_sinks,
            state.signer,
            state.audit_key,
            legacy_rows=state.settings.audit_legacy_rows,
        )
    except anchors.AnchorError as exc:  # still a signed receipt; its anchor follows later
        log.warning("anchoring for the receipt of %s failed: %s", request_id, exc)
        return receipt
    with state.sessions() as session:
        return receipts.build_receipt(session, request_id, state.signer)


def _confirm_due(
    state: RegistryState, request_ids: list[str] | None = None, *, user_pid: str | None = None
) -> None:
    """Before a status read: record the replica confirmations that time made due (a blocking
    replica left the live window). A read when none is due; the chain lock only when one is."""
    with state.sessions() as session, session.begin():
        registry.confirm_due_replicas(
            session, request_ids, user_pid=user_pid, live_seconds=state.settings.replica_live_seconds
        )


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
    settings = Settings.from_env()
    settings.require_api_token()  # fail here, not in every worker
    if settings.require_replica_token() is None and not settings.allow_unauthenticated:
        log.warning("APA_REPLICA_TOKEN is not set: heartbeats are refused, no erasure gets replica-confirmed")
    # create_app runs in each worker: its own engine and pool
    serve(partial(create_app, start_anchoring=True), host, port, workers)
    return 0
