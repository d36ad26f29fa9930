"""The registry API's declaration: every operation with its path, query and body inputs (the
`validation` kinds the app parses them with) and its responses; `openapi_document()` renders it as
the OpenAPI 3.1 document served at /openapi.json. The app validates input from the same table, so
the document declares exactly what the code enforces (tests/test_registry_api_fuzz.py fuzzes the
app from this document and fails on any 5xx or schema mismatch)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from apa.db.models import ADAPTER_STATES, REQUEST_STATUSES, SHARD_STATES
from apa.db.registry import REPLICA_STATES
from apa.deadlines import DEFAULT_WITHIN_DAYS, MAX_WITHIN_DAYS  # noqa: E402
from apa.validation import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_INT,
    MAX_JSON_DEPTH,
    MAX_URL_BYTES,
    Body,
    Value,
)

MAX_PAGE = 1000
DEFAULT_PAGE = 100

_ERROR = {"$ref": "#/components/schemas/Error"}
_TS = {"type": ["string", "null"], "format": "date-time"}
_TS_SET = {"type": "string", "format": "date-time"}
_STR_OR_NULL = {"type": ["string", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_OBJ = {"type": "object"}


def _obj(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
    }


ERROR_TEXT = {
    400: "Bad input; `field` names it",
    401: "Missing or wrong bearer token",
    403: "The other service's token: the replica token on a compliance endpoint, the API token on a "
    "heartbeat",
    404: "Not found",
    409: "Conflicts with the registry's state",
    413: f"Body larger than {MAX_BODY_BYTES} bytes",
    414: f"URL longer than {MAX_URL_BYTES} bytes",
    415: "Body is not application/json",
    431: f"More than {MAX_HEADER_FIELDS} header fields, or one longer than {MAX_HEADER_BYTES} bytes",
    503: "Dependency unavailable",
}


@dataclass(frozen=True)
class Operation:
    """One route: `endpoint` is the Flask view function's name."""

    endpoint: str
    method: str
    path: str
    """OpenAPI path; every `{name}` is an id (`apa.ids`)."""
    summary: str
    response: dict[str, Any]
    status: int = 200
    query: dict[str, Value] = field(default_factory=dict)
    body: Body | None = None
    errors: tuple[int, ...] = ()
    """Errors beyond the common ones (400, 401, 414, 431; 404 with path ids; 413/415 with a body)."""
    public: bool = False
    replica: bool = False
    """Authenticated with the replicas' token (`replicaBearer`), not the compliance API token."""
    description: str = ""

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{([^}]+)}", self.path)


AUDIT_ROW = _obj(
    {
        "id": {"type": "integer", "minimum": 1},
        "ts": _TS_SET,
        "event_type": {"type": "string"},
        "request_id": _STR_OR_NULL,
        "user_pid": _STR_OR_NULL,
        "shard_id": _STR_OR_NULL,
        "adapter_version_id": _INT_OR_NULL,
        "payload": _OBJ,
        "prev_hash": _SHA,
        "hash": _SHA,
    }
)
VERSION_REF = {
    "type": ["object", "null"],
    "required": ["id", "shard_id", "version", "state"],
    "properties": {
        "id": {"type": "integer"},
        "shard_id": {"type": "string"},
        "version": {"type": "integer"},
        "state": {"enum": list(ADAPTER_STATES)},
    },
}
REQUEST = _obj(
    {
        "request_id": {"type": "string"},
        "user_pid": {"type": "string"},
        "scope": {"enum": ["user", "interactions"]},
        "interaction_pids": {"type": ["array", "null"], "items": {"type": "string"}},
        "status": {"enum": list(REQUEST_STATUSES)},
        "samples_erased": {"type": "integer"},
        "outcome": {"enum": ["erased", "no_data_held"]},
        "no_data_held": {"type": "boolean"},
        "due_at": _TS,
        "overdue": {"type": "boolean"},
        "requested_at": _TS,
        "received_at": _TS,
        "excluded_at": _TS,
        "retraining_at": _TS,
        "completed_at": _TS,
        "replicas_confirmed_at": _TS,
        "replicas": _obj(
            {
                "state": {"enum": list(REPLICA_STATES)},
                "confirmed_at": _TS,
                "live": {"type": "array", "items": {"type": "string"}},
                "pending": {"type": "array", "items": {"type": "string"}},
                "unreported": {"type": "array", "items": {"type": "string"}},
                "live_seconds": {"type": "number"},
            }
        ),
        "shards": {
            "type": "array",
            "items": _obj(
                {
                    "shard_id": {"type": "string"},
                    "excluded_version": VERSION_REF,
                    "retrained_version": VERSION_REF,
                    "retrained_at": _TS,
                }
            ),
        },
    }
)
ERASURE_STATUS = {
    **REQUEST,
    "required": [*REQUEST["required"], "timeline"],
    "properties": {
        **REQUEST["properties"],
        "timeline": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRow"}},
    },
}
USER_STATUS = _obj(
    {
        "user_id": {"type": "string"},
        "user_pid": {"type": "string"},
        "erased": {"type": "boolean"},
        "erased_at": _TS,
        "samples_held": {"type": "integer"},
        "samples_erased": {"type": "integer"},
        "excluded_from_serving_at": _TS,
        "replicas_confirmed_at": _TS,
        "replicas_state": {"enum": [*REPLICA_STATES, None]},
        "all_shards_retrained_at": _TS,
        "adapter_versions": _obj(
            {
                "excluded": {"type": "array", "items": VERSION_REF},
                "retrained": {"type": "array", "items": VERSION_REF},
            }
        ),
        "requests": {"type": "array", "items": REQUEST},
        "timeline": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRow"}},
    }
)
SHARD = _obj(
    {
        "shard_id": {"type": "string"},
        "model_id": {"type": "string"},
        "index": {"type": "integer"},
        "state": {"enum": list(SHARD_STATES)},
        "generation": {"type": "integer"},
        "retrain_generation": _INT_OR_NULL,
        "serving_version": _INT_OR_NULL,
        "updated_at": _TS,
    }
)
ADAPTER = _obj(
    {
        "id": {"type": "integer"},
        "shard_id": {"type": "string"},
        "version": {"type": "integer"},
        "state": {"enum": list(ADAPTER_STATES)},
        "artifact_uri": {"type": "string"},
        "adapter_sha256": {"type": ["string", "null"]},
        "manifest_digest": _SHA,
        "sample_digest": _SHA,
        "num_samples": {"type": "integer"},
        "started_generation": {"type": "integer"},
        "trained_at": _TS,
        "registered_at": _TS,
        "promoted_at": _TS,
        "excluded_at": _TS,
        "retired_at": _TS,
    }
)
REPLICA = _obj(
    {
        "replica_id": {"type": "string"},
        "model_id": _STR_OR_NULL,
        "loaded": {"type": "object", "additionalProperties": {"type": "integer"}},
        "first_seen": _TS_SET,
        "last_heartbeat": _TS_SET,
        "loaded_changed_at": _TS_SET,
    }
)
SIGNED_ANCHOR = {
    "type": ["object", "null"],
    "required": ["format", "registry_id", "sequence", "hash", "anchored_at", "audit_key_id", "signature"],
    "properties": {
        "format": {"const": "apa.audit-anchor/1"},
        "registry_id": {"type": "string"},
        "sequence": {"type": "integer", "minimum": 0},
        "hash": _SHA,
        "anchored_at": _TS_SET,
        "audit_key_id": {"type": "string"},
        "signature": _OBJ,
    },
}
RECEIPT = _obj(
    {
        "receipt": _obj(
            {
                "format": {"const": "apa.erasure-receipt/1"},
                "issued_at": _TS_SET,
                "issuer": _obj({"registry_id": {"type": "string"}, "signing_key_id": {"type": "string"}}),
                "request": _obj(
                    {
                        "request_id": {"type": "string"},
                        "user_pid": {"type": "string"},
                        "scope": {"enum": ["user", "interactions"]},
                        "interaction_pids": {"type": ["array", "null"], "items": {"type": "string"}},
                        "status": {"enum": list(REQUEST_STATUSES)},
                        "samples_erased": {"type": "integer"},
                    }
                ),
                "times": {"type": "object", "additionalProperties": _TS},
                "adapters": {"type": "array", "items": _OBJ},
                "audit": _obj(
                    {
                        "audit_key_id": _STR_OR_NULL,
                        "pseudonym_key_id": _STR_OR_NULL,
                        "first_row": _INT_OR_NULL,
                        "last_row": _INT_OR_NULL,
                        "rows": {"type": "array", "items": _OBJ},
                    }
                ),
                "anchor": SIGNED_ANCHOR,
            }
        ),
        "signature": _obj(
            {
                "alg": {"const": "Ed25519"},
                "key_id": {"type": "string"},
                "public_key": {"type": "string"},
                "value": {"type": "string"},
            }
        ),
    }
)

ERASURE_SUBMIT = Body(
    fields={
        "request_id": Value("id", "Idempotency key (default: a new UUID)"),
        "user_id": Value("id", "Whose data to erase"),
        "interactions": Value("id_list", "Only these interactions of the user; absent: the whole user"),
        "requested_at": Value("datetime", "When the account system received the request (RFC 3339)"),
    },
    required=("user_id",),
)
HEARTBEAT = Body(
    fields={
        "loaded": Value("loaded", "shard id -> adapter version loaded"),
        "model_id": Value("id", "The model the replica serves"),
    },
    required=("loaded",),
)
_SINCE = Value("integer", "Return rows with id > since", low=0, high=MAX_INT, default=0)
_LIMIT = Value("integer", "Page size", low=1, high=MAX_PAGE, default=DEFAULT_PAGE)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "healthz",
        "get",
        "/healthz",
        "Liveness: the process is up",
        _obj({"status": {"const": "ok"}}),
        public=True,
    ),
    Operation(
        "readyz",
        "get",
        "/readyz",
        "Readiness: database reachable and migrations at head",
        _obj({"status": {"const": "ready"}, "revision": {"type": "string"}}),
        errors=(503,),
        public=True,
    ),
    Operation(
        "post_erasure",
        "post",
        "/erasures",
        "Submit an erasure request (published on the erasure topic like a Kafka event)",
        _obj(
            {
                "request_id": {"type": "string"},
                "status": {"const": "accepted"},
                "status_url": {"type": "string"},
            }
        ),
        status=202,
        body=ERASURE_SUBMIT,
        errors=(409, 503),
    ),
    Operation(
        "get_erasure",
        "get",
        "/erasures/{request_id}",
        "An erasure request's status and the timeline of its audit events",
        {"$ref": "#/components/schemas/ErasureStatus"},
    ),
    Operation(
        "get_erasure_receipt",
        "get",
        "/erasures/{request_id}/receipt",
        "A signed receipt of the erasure, for a regulator to check offline (`apa audit check-receipt`)",
        {"$ref": "#/components/schemas/Receipt"},
        description="Ed25519-signed: the request by pseudonym, its times, the excluded and retrained adapter "
        "versions with their sha256, its audit rows and the signed anchor of the chain that covers them "
        "(null until one is written).",
    ),
    Operation(
        "get_user_erasure_status",
        "get",
        "/users/{user_id}/erasure-status",
        "For compliance: is the user erased, when was their data excluded from serving, when was every "
        "affected shard retrained, which adapter versions were involved",
        {"$ref": "#/components/schemas/UserErasureStatus"},
    ),
    Operation(
        "get_audit",
        "get",
        "/audit",
        "Audit rows with their hashes, oldest first, paged by id",
        _obj(
            {
                "rows": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRow"}},
                "next_since": {"type": "integer"},
                "has_more": {"type": "boolean"},
            }
        ),
        query={"since": _SINCE, "limit": _LIMIT},
    ),
    Operation(
        "get_public_key",
        "get",
        "/audit/public-key",
        "The Ed25519 public key that checks receipts and anchors",
        _obj(
            {
                "alg": {"const": "Ed25519"},
                "key_id": {"type": "string"},
                "public_key": {"type": "string"},
                "pem": {"type": "string"},
            }
        ),
    ),
    Operation(
        "get_shards",
        "get",
        "/shards",
        "Shards with their state, generation and serving adapter version",
        _obj({"shards": {"type": "array", "items": SHARD}}),
        query={
            "model_id": Value("id", "Only this model's shards"),
            "state": Value("choice", "Only shards in this state", choices=SHARD_STATES),
        },
    ),
    Operation(
        "get_adapters",
        "get",
        "/adapters",
        "Adapter versions with artifact URI, weights sha256, manifest digest and state",
        _obj({"adapters": {"type": "array", "items": ADAPTER}}),
        query={
            "shard_id": Value("shard_id", "Only this shard's versions (<model_id>/<k>)"),
            "state": Value("choice", "Only versions in this state", choices=ADAPTER_STATES),
        },
    ),
    Operation(
        "get_replicas",
        "get",
        "/replicas",
        "Inference replicas and the adapter versions they reported loaded",
        _obj({"replicas": {"type": "array", "items": REPLICA}}),
    ),
    Operation(
        "post_heartbeat",
        "post",
        "/replicas/{replica_id}/heartbeat",
        "An inference replica reports its loaded adapter versions",
        REPLICA,
        body=HEARTBEAT,
        errors=(503,),
        replica=True,
        description="Takes the replicas' token (APA_REPLICA_TOKEN), never the compliance API token (403). "
        "503 when the registry has no replica token configured. Each heartbeat re-evaluates the replica "
        "confirmation of every excluded erasure request.",
    ),
    Operation(
        "get_erasure_deadlines",
        "get",
        "/erasure-deadlines",
        "Open erasure requests that are overdue or due within `within_days` days (GDPR Art. 12(3): "
        "one month from the request)",
        _obj(
            {
                "as_of": _TS_SET,
                "within_days": {"type": "number"},
                "overdue": {"type": "array", "items": _OBJ},
                "due_soon": {"type": "array", "items": _OBJ},
            }
        ),
        query={
            "within_days": Value(
                "integer",
                "Also list requests due within this many days",
                low=0,
                high=MAX_WITHIN_DAYS,
                default=DEFAULT_WITHIN_DAYS,
            )
        },
    ),
    Operation("openapi", "get", "/openapi.json", "This document", _OBJ),
)
BY_ENDPOINT = {op.endpoint: op for op in OPERATIONS}


def _responses(op: Operation) -> dict[str, Any]:
    def error(code: int) -> dict[str, Any]:
        return {"description": ERROR_TEXT[code], "content": {"application/json": {"schema": _ERROR}}}

    codes = {400, 414, 431, *op.errors}
    if not op.public:
        codes.update({401, 403})
    if op.path_params:
        codes.add(404)
    if op.body is not None:
        codes.update({413, 415})
    out = {
        str(op.status): {"description": op.summary, "content": {"application/json": {"schema": op.response}}}
    }
    out.update({str(code): error(code) for code in sorted(codes)})
    if op.endpoint == "readyz":
        out["503"] = {
            "description": "Not ready, with the reason",
            "content": {
                "application/json": {
                    "schema": _obj({"status": {"const": "not ready"}, "reason": {"type": "string"}})
                }
            },
        }
    return out


def _operation(op: Operation) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": Value("id").schema()}
        for name in op.path_params
    ]
    parameters += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": value.description,
            "schema": value.schema(),
        }
        for name, value in op.query.items()
    ]
    out: dict[str, Any] = {"operationId": op.endpoint, "summary": op.summary, "responses": _responses(op)}
    if op.description:
        out["description"] = op.description
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body.schema()}},
        }
    if op.public:
        out["security"] = []
    elif op.replica:
        out["security"] = [{"replicaBearer": []}]
    return out


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of every route of `services.registry.app.create_app`."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "APA registry",
            "version": "2",
            "description": "Registry and compliance audit API: erasure requests and their signed receipts, "
            "shards, adapter versions, replicas and the keyed audit chain. Every error is JSON "
            '`{"error": ..., "field": ...}` naming the field. Ids follow one rule (1-128 characters, no '
            "surrounding whitespace, no control characters, no '/'). Query parameters may appear once; "
            f"JSON bodies nest at most {MAX_JSON_DEPTH} levels and hold no duplicate keys. Behind gunicorn, "
            "414 and 431 may come from gunicorn itself as plain text.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "APA_API_TOKEN, held by compliance clients",
                },
                "replicaBearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "APA_REPLICA_TOKEN, held by the inference replicas (heartbeats only)",
                },
            },
            "schemas": {
                "Error": _obj({"error": {"type": "string"}, "field": {"type": ["string", "null"]}}),
                "ErasureSubmit": ERASURE_SUBMIT.schema(),
                "AuditRow": AUDIT_ROW,
                "ErasureStatus": ERASURE_STATUS,
                "UserErasureStatus": USER_STATUS,
                "Receipt": RECEIPT,
            },
        },
    }
