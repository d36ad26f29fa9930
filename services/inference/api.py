"""The inference API's operations: request bodies, their strict parsing, and /openapi.json.

Bodies are read with the registry's strict JSON reader (`apa.validation.json_object`:
UTF-8, depth, duplicate keys, NaN, NUL characters, lone surrogates), then each field is checked
here; every failure is an `ApiError` (a 4xx `{"error", "field"}` naming the field).
"""

from __future__ import annotations

from typing import Any

from flask import Request

from apa.ids import MAX_ID_LENGTH, id_problem
from apa.validation import ID_PATTERN, MAX_JSON_DEPTH, ApiError, json_object, shown

MAX_HISTORY = 50
"""Most history entries a /recommend request may give."""
MAX_PROMPT_CHARS = 16384
"""Longest prompt /score accepts."""


def _fields(data: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    for name in data:
        if name not in allowed:
            raise ApiError(400, f"unknown field {shown(name)!r}", shown(name))
    for name in required:
        if name not in data:
            raise ApiError(400, f"{name} is required", name)


def _id(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string", where)
    problem = id_problem(value)
    if problem is not None:
        raise ApiError(400, f"{where}: {problem}", where)
    return value


def _list(value: object, where: str, high: int) -> list[Any]:
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be an array", where)
    if not value:
        raise ApiError(400, f"{where} must not be empty", where)
    if len(value) > high:
        raise ApiError(400, f"{where} holds {len(value)} entries; at most {high}", where)
    return value


def parse_recommend(request: Request, max_candidates: int) -> dict[str, Any]:
    """`{user_id, candidates, history?}` checked: ids, 1..max_candidates distinct candidates, history
    entries `{item_id, liked}`."""
    data = json_object(request)
    _fields(data, ("user_id", "candidates", "history"), ("user_id", "candidates"))
    user_id = _id(data["user_id"], "user_id")
    candidates = [
        _id(v, f"candidates[{i}]")
        for i, v in enumerate(_list(data["candidates"], "candidates", max_candidates))
    ]
    seen: set[str] = set()
    for i, item in enumerate(candidates):
        if item in seen:
            raise ApiError(400, f"candidates[{i}]: item {item!r} is listed twice", f"candidates[{i}]")
        seen.add(item)
    out: dict[str, Any] = {"user_id": user_id, "candidates": candidates}
    if "history" in data and data["history"] is not None:
        raw = data["history"]
        if not isinstance(raw, list):
            raise ApiError(400, "history must be an array", "history")
        if len(raw) > MAX_HISTORY:
            raise ApiError(400, f"history holds {len(raw)} entries; at most {MAX_HISTORY}", "history")
        history = []
        for i, entry in enumerate(raw):
            where = f"history[{i}]"
            if not isinstance(entry, dict):
                raise ApiError(400, f"{where} must be an object {{item_id, liked}}", where)
            for name in entry:
                if name not in ("item_id", "liked"):
                    raise ApiError(400, f"{where}: unknown field {shown(name)!r}", f"{where}.{shown(name)}")
            for name in ("item_id", "liked"):
                if name not in entry:
                    raise ApiError(400, f"{where}.{name} is required", f"{where}.{name}")
            if not isinstance(entry["liked"], bool):
                raise ApiError(400, f"{where}.liked must be true or false", f"{where}.liked")
            history.append({"item_id": _id(entry["item_id"], f"{where}.item_id"), "liked": entry["liked"]})
        out["history"] = history
    return out


def parse_score(request: Request, max_prompts: int) -> list[str]:
    """`{prompts: [...]}`: 1..max_prompts non-empty strings of at most MAX_PROMPT_CHARS."""
    data = json_object(request)
    _fields(data, ("prompts",), ("prompts",))
    prompts = _list(data["prompts"], "prompts", max_prompts)
    for i, prompt in enumerate(prompts):
        where = f"prompts[{i}]"
        if not isinstance(prompt, str):
            raise ApiError(400, f"{where} must be a string", where)
        if not prompt.strip():
            raise ApiError(400, f"{where} must not be empty", where)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"{where} is longer than {MAX_PROMPT_CHARS} characters", where)
    return list(prompts)


_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN}
_ERROR = {"$ref": "#/components/schemas/Error"}
_VERSIONS = {
    "type": "object",
    "description": "shard id -> the adapter version that served this answer",
    "additionalProperties": {"type": "integer"},
}
_EXCLUDED = {
    "type": "array",
    "items": {"type": "string"},
    "description": "shards that got weight 0 (stale, or without a serving adapter)",
}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input, naming the field",
        401: "Missing or wrong bearer token",
        413: "Body too large",
        415: "Body is not JSON",
        503: "Not loaded yet, every shard stale, or the registry unreachable (JSON reason)",
    }
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes
    }


def openapi_document(max_candidates: int) -> dict[str, Any]:
    """OpenAPI 3.1 description of `services.inference.app.create_app`."""
    recommend_body = {
        "type": "object",
        "additionalProperties": False,
        "required": ["user_id", "candidates"],
        "properties": {
            "user_id": _ID,
            "candidates": {
                "type": "array",
                "items": {**_ID, "description": "the data set's item id (ML-100K item_id)"},
                "minItems": 1,
                "maxItems": max_candidates,
                "uniqueItems": True,
            },
            "history": {
                "type": "array",
                "maxItems": MAX_HISTORY,
                "description": "the user's interactions, oldest first; default: the user's last 10 from the "
                "registry (none for a new or erased user)",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["item_id", "liked"],
                    "properties": {"item_id": _ID, "liked": {"type": "boolean"}},
                },
            },
        },
    }
    recommend_response = {
        "type": "object",
        "properties": {
            "ranked": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"item_id": {"type": "string"}, "p_yes": {"type": "number"}},
                },
            },
            "adapter_versions": _VERSIONS,
            "excluded_shards": _EXCLUDED,
        },
    }
    score_body = {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompts"],
        "properties": {
            "prompts": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_candidates,
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
                "description": "full TALLRec prompts, up to and including `### Response:\\n`",
            }
        },
    }
    score_response = {
        "type": "object",
        "properties": {
            "p_yes": {"type": "array", "items": {"type": "number"}},
            "adapter_versions": _VERSIONS,
            "excluded_shards": _EXCLUDED,
        },
    }

    def post(op: str, summary: str, body: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        return {
            "post": {
                "operationId": op,
                "summary": summary,
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "200": {"description": summary, "content": {"application/json": {"schema": response}}},
                    **_errors(400, 401, 413, 415, 503),
                },
            }
        }

    def probe(op: str, summary: str) -> dict[str, Any]:
        return {
            "get": {
                "operationId": op,
                "summary": summary,
                "security": [],
                "responses": {"200": {"description": summary}, **_errors(503)},
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "APA inference",
            "version": "1",
            "description": "Recommendations from the aggregated shard adapters the registry lists as serving. "
            f"Errors are JSON {{error, field}}; JSON bodies nest at most {MAX_JSON_DEPTH} levels.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/recommend": post(
                "recommend",
                "Rank candidate items for a user (P(Yes) per item)",
                recommend_body,
                recommend_response,
            ),
            "/score": post(
                "score", "P(Yes) of raw TALLRec prompts (evaluation clients)", score_body, score_response
            ),
            "/status": {
                "get": {
                    "operationId": "status",
                    "summary": "What this replica serves: loaded versions, blocked shards, cache keys",
                    "responses": {"200": {"description": "status"}, **_errors(401)},
                }
            },
            "/healthz": probe("healthz", "The process answers"),
            "/readyz": probe("readyz", "The model and its adapters are loaded"),
            "/openapi.json": probe("openapi", "This document"),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
                }
            },
        },
    }
