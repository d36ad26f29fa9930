"""The registry API's OpenAPI 3 document (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input; `field` names it",
        401: "Missing or wrong bearer token",
        404: "Not found",
        409: "Conflicts with the registry's state",
        503: "Dependency unavailable",
    }
    return {str(code): _json(_ERROR, text[code]) for code in codes}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_OBJ = {"type": "object", "additionalProperties": True}
_TS = {"type": ["string", "null"], "format": "date-time"}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of every route of `services.registry.app.create_app`."""
    public: list[dict[str, Any]] = []
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "APA registry",
            "version": "1",
            "description": "Registry and compliance audit API: erasure requests, shards, adapter versions, "
            "replicas and the hash-chained audit trail.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process is up",
                    "security": public,
                    "responses": {"200": _json(_OBJ, "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: database reachable and migrations at head",
                    "security": public,
                    "responses": {
                        "200": _json(_OBJ, "Ready"),
                        "503": _json(_OBJ, "Not ready, with the reason"),
                    },
                }
            },
            "/erasures": {
                "post": {
                    "summary": "Submit an erasure request (published on the erasure topic like a Kafka event)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErasureSubmit"}}
                        },
                    },
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "request_id": {"type": "string"},
                                    "status": {"const": "accepted"},
                                    "status_url": {"type": "string"},
                                },
                            },
                            "Accepted; follow status_url",
                        ),
                        **_errors(400, 401, 409, 503),
                    },
                }
            },
            "/erasures/{request_id}": {
                "get": {
                    "summary": "An erasure request's status and the timeline of its audit events",
                    "parameters": [_path_param("request_id", "The request id")],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/ErasureStatus"}, "The request"),
                        **_errors(401, 404),
                    },
                }
            },
            "/erasure-deadlines": {
                "get": {
                    "summary": "Open erasure requests overdue or due within N days (due: requested_at + one "
                    "month, GDPR Art. 12(3)), soonest first",
                    "parameters": [
                        _query(
                            "within_days",
                            "Also list requests due within this many days",
                            {"type": "integer", "minimum": 0, "maximum": 3660, "default": 7},
                        )
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "as_of": {"type": "string", "format": "date-time"},
                                    "within_days": {"type": "number"},
                                    "overdue": {"type": "array", "items": _OBJ},
                                    "due_soon": {"type": "array", "items": _OBJ},
                                },
                            },
                            "Overdue and soon-due requests",
                        ),
                        **_errors(400, 401),
                    },
                }
            },
            "/users/{user_id}/erasure-status": {
                "get": {
                    "summary": "For compliance: is the user erased, when was their data excluded from serving, "
                    "when was every affected shard retrained, which adapter versions were involved",
                    "parameters": [_path_param("user_id", "The user id")],
                    "responses": {
                        "200": _json(
                            {"$ref": "#/components/schemas/UserErasureStatus"}, "Only this user's data"
                        ),
                        **_errors(401, 404),
                    },
                }
            },
            "/audit": {
                "get": {
                    "summary": "Audit rows with their hashes, oldest first, paged by id",
                    "parameters": [
                        _query(
                            "since",
                            "Return rows with id > since",
                            {"type": "integer", "minimum": 0, "default": 0},
                        ),
                        _query(
                            "limit",
                            "Page size",
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        ),
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "rows": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/AuditRow"},
                                    },
                                    "next_since": {"type": "integer"},
                                    "has_more": {"type": "boolean"},
                                },
                            },
                            "A page of rows",
                        ),
                        **_errors(400, 401),
                    },
                }
            },
            "/shards": {
                "get": {
                    "summary": "Shards with their state, generation and serving adapter version",
                    "parameters": [
                        _query("model_id", "Only this model's shards", {"type": "string"}),
                        _query(
                            "state", "Only shards in this state", {"enum": ["serving", "stale", "retraining"]}
                        ),
                    ],
                    "responses": {"200": _json(_OBJ, "The shards"), **_errors(400, 401)},
                }
            },
            "/adapters": {
                "get": {
                    "summary": "Adapter versions with artifact URI, weights sha256, manifest digest and state",
                    "parameters": [
                        _query("shard_id", "Only this shard's versions", {"type": "string"}),
                        _query(
                            "state",
                            "Only versions in this state",
                            {"enum": ["serving", "excluded", "retired", "stale"]},
                        ),
                    ],
                    "responses": {"200": _json(_OBJ, "The adapter versions"), **_errors(400, 401)},
                }
            },
            "/replicas": {
                "get": {
                    "summary": "Inference replicas and the adapter versions they reported loaded",
                    "responses": {"200": _json(_OBJ, "The replicas"), **_errors(401)},
                }
            },
            "/replicas/{replica_id}/heartbeat": {
                "post": {
                    "summary": "An inference replica reports its loaded adapter versions",
                    "parameters": [_path_param("replica_id", "The replica id")],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["loaded"],
                                    "properties": {
                                        "loaded": {
                                            "type": "object",
                                            "additionalProperties": {"type": "integer"},
                                            "description": "shard id -> adapter version",
                                        },
                                        "model_id": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {"200": _json(_OBJ, "The replica as recorded"), **_errors(400, 401)},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json(_OBJ, "OpenAPI 3.1 document"), **_errors(401)},
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "field"],
                    "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
                },
                "ErasureSubmit": {
                    "type": "object",
                    "required": ["user_id"],
                    "additionalProperties": False,
                    "properties": {
                        "request_id": {
                            "type": "string",
                            "description": "Idempotency key (default: a new UUID)",
                        },
                        "user_id": {"type": "string"},
                        "interactions": {
                            "type": "array",
                            "items": {"type": "string"},
                            "minItems": 1,
                            "description": "Only these interactions of the user; absent: the whole user",
                        },
                        "requested_at": {"type": "string", "format": "date-time"},
                    },
                },
                "AuditRow": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "ts": {"type": "string", "format": "date-time"},
                        "event_type": {"type": "string"},
                        "request_id": {"type": ["string", "null"]},
                        "user_id": {"type": ["string", "null"]},
                        "shard_id": {"type": ["string", "null"]},
                        "adapter_version_id": {"type": ["integer", "null"]},
                        "payload": {"type": "object"},
                        "prev_hash": {"type": "string"},
                        "hash": {"type": "string"},
                    },
                },
                "ErasureStatus": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "user_id": {"type": "string"},
                        "scope": {"enum": ["user", "interactions"]},
                        "interactions": {"type": ["array", "null"], "items": {"type": "string"}},
                        "status": {"enum": ["received", "excluded", "retraining", "completed"]},
                        "samples_erased": {"type": "integer"},
                        "outcome": {
                            "enum": ["erased", "no_data_held", None],
                            "description": "no_data_held: the request matched nothing the registry held",
                        },
                        "no_data_held": {"type": "boolean"},
                        "requested_at": _TS,
                        "due_at": _TS,
                        "overdue": {"type": "boolean"},
                        "received_at": _TS,
                        "excluded_at": _TS,
                        "retraining_at": _TS,
                        "completed_at": _TS,
                        "replicas_confirmed_at": _TS,
                        "shards": {"type": "array", "items": _OBJ},
                        "timeline": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRow"}},
                    },
                },
                "UserErasureStatus": {
                    "type": "object",
                    "properties": {
                        "user_id": {"type": "string"},
                        "erased": {"type": "boolean"},
                        "erased_at": _TS,
                        "samples_held": {"type": "integer"},
                        "samples_erased": {"type": "integer"},
                        "excluded_from_serving_at": _TS,
                        "replicas_confirmed_at": _TS,
                        "all_shards_retrained_at": _TS,
                        "adapter_versions": _OBJ,
                        "requests": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/ErasureStatus"},
                        },
                        "timeline": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRow"}},
                    },
                },
            },
        },
    }
