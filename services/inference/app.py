"""Inference service: the recommend API over an `apa.serving.Replica` (`apa serve-inference`).

A Flask app factory (`create_app`) served by gunicorn. Routes are thin: they parse the body
(`services.inference.api`) and call the replica. Every route except /healthz, /readyz and
/openapi.json requires `Authorization: Bearer <APA_API_TOKEN>`. Bad input is a 4xx JSON
`{"error", "field"}` naming the field; a replica that cannot answer (loading, every shard stale,
registry unreachable) is a 503 with the reason; never a 500 for input.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, jsonify, request

from apa import validation
from apa.http_server import serve
from apa.logs import configure_logging
from apa.serving import Replica, ServiceUnavailable, UnknownItem
from apa.settings import Settings
from services.inference.api import openapi_document, parse_recommend, parse_score

log = logging.getLogger("apa.inference")

PUBLIC_ENDPOINTS = frozenset({"healthz", "readyz", "openapi"})


def _unavailable(reason: str) -> Response:
    response = jsonify(error=reason, field=None, reason=reason)
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


def create_app(settings: Settings | None = None, *, replica: Replica | None = None) -> Flask:
    """The inference API over `replica` (default: a new replica of the settings, started: it loads
    in the background; /readyz says when it is done). Refuses to start without an API token unless
    the settings allow unauthenticated dev mode."""
    settings = settings or Settings.from_env()
    token = settings.require_api_token()
    if replica is None:
        replica = Replica(settings).start()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = validation.MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["apa_replica"] = replica
    max_candidates = replica.config.max_candidates

    @app.before_request
    def _limits() -> None:
        validation.check_limits(request)

    @app.before_request
    def _authenticate() -> Response | None:
        if request.endpoint in PUBLIC_ENDPOINTS or token is None:
            return None
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            response = jsonify(error="missing or wrong bearer token", field="Authorization")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="apa-inference"'
            return response
        return None

    validation.json_errors(app, log)

    @app.errorhandler(ServiceUnavailable)
    def _service_unavailable(exc: ServiceUnavailable) -> Response:
        return _unavailable(exc.reason)

    @app.errorhandler(UnknownItem)
    def _unknown_item(exc: UnknownItem) -> tuple[Response, int]:
        return jsonify(error=f"{exc.field}: unknown item {exc.item_id!r}", field=exc.field), 400

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        if replica.ready.is_set():
            return jsonify(
                status="ready", model_id=replica.model_id, adapter_versions=replica.loaded_versions()
            )
        response = jsonify(status="not ready", reason=replica.load_error or "loading the model and adapters")
        response.status_code = 503
        return response

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document(max_candidates))

    @app.get("/status")
    def status() -> Response:
        return jsonify(
            replica_id=replica.replica_id,
            model_id=replica.model_id,
            ready=replica.ready.is_set(),
            adapter_versions=replica.loaded_versions(),
            blocked={replica.shard_id(k): g for k, g in sorted(replica.blocked.items())},
            cache_keys=replica.cache_keys(),
            events_seen=replica.events_seen,
            reloads=replica.reloads,
            last_heartbeat=replica.last_heartbeat,
        )

    @app.post("/recommend")
    def recommend() -> Response:
        body = parse_recommend(request, max_candidates)
        return jsonify(replica.recommend(body["user_id"], body["candidates"], body.get("history")))

    @app.post("/score")
    def score() -> Response:
        prompts = parse_score(request, max_candidates)
        scored = replica.score(prompts)
        return jsonify(
            p_yes=[float(p) for p in scored.p_yes],
            adapter_versions=scored.adapter_versions,
            excluded_shards=scored.excluded_shards,
        )

    return app


def serve_command(host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> int:
    """Serve the inference API with gunicorn (settings from APA_* environment variables).

    Each worker process is one replica: it loads the base model and the serving adapters once,
    follows apa.shard-events and the registry, and sends heartbeats (replica id: APA_REPLICA_ID, or
    host name and process id).

    Args:
        host: interface to bind.
        port: TCP port.
        workers: gunicorn worker processes (each loads its own copy of the model).
    """
    settings = Settings.from_env()
    settings.require_api_token()  # fail here, not in every worker
    configure_logging(settings.log_level)
    # create_app runs in each worker: its own replica
    serve(create_app, host, port, workers, worker_class="gthread", threads=16, timeout=300)
    return 0
