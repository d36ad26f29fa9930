"""The one validation layer of the registry API: every route reads its input through it, and the
OpenAPI document (`openapi.py`) is built from the same declarations, so the two cannot drift.

Everything a client sends is checked before any of it reaches the registry or the database:

* request limits: URL (414), headers (431), body (413), as gunicorn is configured (`serve_command`);
* the query string is decoded as strict UTF-8; unknown and repeated parameters are refused;
* a JSON body must be `application/json` (415), strict UTF-8, at most `MAX_JSON_DEPTH` deep, without
  duplicate keys, NaN/Infinity, lone surrogates or NUL characters, and an object whose fields are
  the declared ones;
* ids follow `apa.ids` (the OpenAPI `pattern` below is the same rule); integers are ASCII digits
  only (not `٣`, `1_0` or `+5`) within their bounds; timestamps are RFC 3339 and representable.

Each failure is an `ApiError`: a 4xx JSON `{"error": ..., "field": ...}` naming the field.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from flask import Flask, Request, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from apa.ids import MAX_ID_LENGTH, id_problem, shard_id_problem

MAX_URL_BYTES = 4094
"""Longest request line target (path + query) accepted; 414 beyond (gunicorn `limit_request_line`)."""
MAX_HEADER_FIELDS = 100
"""Most header fields accepted; 431 beyond (gunicorn `limit_request_fields`)."""
MAX_HEADER_BYTES = 8190
"""Longest header field (name + value) accepted; 431 beyond (gunicorn `limit_request_field_size`)."""
MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted; 413 beyond."""
MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays and objects accepted in a JSON body."""
MAX_ITEMS = 10_000
"""Most items in a list or object field (interactions, loaded adapters)."""
MAX_INT = 2**31 - 1
"""Largest integer accepted in a query parameter or an adapter version (an SQL INTEGER)."""

_WS = "\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""Whitespace that `str.strip` removes and that is not a control character."""
_INNER = "[^/\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff]"
_EDGE = f"[^/\\x00-\\x20\\x7f-\\x9f{_WS}\\ud800-\\udfff]"
_ID = f"(?:{_EDGE}|{_EDGE}{_INNER}{{0,{MAX_ID_LENGTH - 2}}}{_EDGE})"
ID_PATTERN = f"^(?!\\.\\.?$){_ID}$(?!\\n)"
"""The `apa.ids` rule as a regular expression (ECMA and Python alike): 1..MAX_ID_LENGTH characters,
no '/', no control characters or lone surrogates, no surrounding whitespace, not '.' or '..'.
tests/test_registry_api.py checks that it accepts exactly what `apa.ids.id_problem` accepts."""
SHARD_ID_PATTERN = f"^(?!\\.\\.?/){_ID}/(?:0|[1-9][0-9]{{0,8}})$(?!\\n)"
"""`<model_id>/<k>`: a model id and a shard index."""
_SHARD_INDEX = re.compile(r"(?:0|[1-9][0-9]{0,8})")
_DIGITS = re.compile(r"[0-9]{1,10}")
_RFC3339 = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?P<frac>\.[0-9]{1,9})?(?P<tz>[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class ApiError(Exception):
    """An error response: HTTP status, message and the offending field (if any)."""

    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field


# --- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """One kind of input value: its JSON schema and its parser (which raises ApiError naming `field`)."""

    kind: str
    """id | shard_id | integer | choice | datetime | id_list | loaded"""
    description: str = ""
    low: int = 0
    high: int = MAX_INT
    choices: tuple[str, ...] = ()
    default: Any = None

    def schema(self) -> dict[str, Any]:
        """The OpenAPI (JSON Schema 2020-12) schema of the value."""
        if self.kind == "id":
            out: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
            out["pattern"] = ID_PATTERN
        elif self.kind == "shard_id":
            out = {
                "type": "string",
                "minLength": 3,
                "maxLength": MAX_ID_LENGTH + 10,
                "pattern": SHARD_ID_PATTERN,
            }
        elif self.kind == "integer":
            out = {"type": "integer", "minimum": self.low, "maximum": self.high}
        elif self.kind == "choice":
            out = {"type": "string", "enum": list(self.choices)}
        elif self.kind == "datetime":
            out = {"type": "string", "format": "date-time", "maxLength": 40}
        elif self.kind == "id_list":
            out = {"type": "array", "items": Value("id").schema(), "minItems": 1, "maxItems": MAX_ITEMS}
        elif self.kind == "loaded":
            out = {
                "type": "object",
                "propertyNames": Value("shard_id").schema(),
                "additionalProperties": Value("integer", low=1).schema(),
                "maxProperties": MAX_ITEMS,
            }
        else:  # pragma: no cover - declarations are static
            raise ValueError(self.kind)
        if self.default is not None:
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        return out

    def parse_text(self, text: str, name: str) -> Any:
        """The checked value of a path or query parameter (text; an integer in ASCII digits)."""
        if self.kind == "integer":
            if not _DIGITS.fullmatch(text):
                raise ApiError(400, f"{name} must be an integer written with the digits 0-9", name)
            return self.parse(int(text), name)
        return self.parse(text, name)

    def parse(self, value: object, name: str) -> Any:
        """The checked value of a JSON field."""
        if self.kind == "id":
            problem = id_problem(value)
            if problem:
                raise ApiError(400, f"{name} {problem}", name)
            return value
        if self.kind == "shard_id":
            return _shard_id(value, name)
        if self.kind == "integer":
            return _integer(value, name, self.low, self.high)
        if self.kind == "choice":
            if value not in self.choices:
                raise ApiError(400, f"{name} must be one of {', '.join(self.choices)}", name)
            return value
        if self.kind == "datetime":
            return _datetime(value, name)
        if self.kind == "id_list":
            if not isinstance(value, list) or not value or len(value) > MAX_ITEMS:
                raise ApiError(400, f"{name} must be a list of 1 to {MAX_ITEMS} ids", name)
            return [Value("id").parse(item, f"{name}[{i}]") for i, item in enumerate(value)]
        if self.kind == "loaded":
            if not isinstance(value, dict) or len(value) > MAX_ITEMS:
                raise ApiError(400, f"{name} must be an object mapping shard id to adapter version", name)
            return {
                _shard_id(shard, f"{name}[{json.dumps(shard)}]"): _integer(
                    version, f"{name}[{json.dumps(shard)}]", 1, MAX_INT
                )
                for shard, version in value.items()
            }
        raise ValueError(self.kind)  # pragma: no cover


def _shard_id(value: object, name: str) -> str:
    if isinstance(value, str):
        _model, sep, index = value.rpartition("/")
        if sep and not _SHARD_INDEX.fullmatch(index):
            raise ApiError(400, f"{name} must be <model_id>/<k> with k a shard index", name)
    problem = shard_id_problem(value)
    if problem:
        raise ApiError(400, f"{name} {problem}", name)
    assert isinstance(value, str)
    return value


def _integer(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}", name)
    return value


def _datetime(value: object, name: str) -> str:
    """An RFC 3339 timestamp that a datetime can hold, returned as ISO-8601 UTC."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, f"{name} must be an RFC 3339 timestamp like 2026-01-31T12:00:00Z", name)
    frac = (match["frac"] or "")[:7]
    tz = "+00:00" if match["tz"] in ("Z", "z") else match["tz"]
    try:
        parsed = datetime.fromisoformat(f"{match['date']}T{match['time']}{frac}{tz}").astimezone(UTC)
    except (ValueError, OverflowError):
        raise ApiError(400, f"{name} is not a representable date and time: {value!r}", name) from None
    return parsed.isoformat()


# --- query, path, body -------------------------------------------------------------------------------


def path_id(value: str, name: str) -> str:
    """A path segment that must be an id."""
    return Value("id").parse_text(value, name)  # type: ignore[no-any-return]


def query(request: Request, spec: Mapping[str, Value]) -> dict[str, Any]:
    """The declared query parameters, parsed; unknown, repeated or undecodable ones are a 400."""
    try:
        raw = request.query_string.decode("ascii")
        pairs = parse_qsl(raw, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "the query string is not valid UTF-8", "query") from None
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in spec:
            raise ApiError(400, f"unknown query parameter {shown(name)}", shown(name))
        if name in seen:
            raise ApiError(400, f"query parameter {name} is repeated", name)
        seen[name] = value
    return {
        name: (spec[name].parse_text(seen[name], name) if name in seen else spec[name].default)
        for name in spec
    }


@dataclass(frozen=True)
class Body:
    """A JSON object body: its fields (name -> value kind) and which are required."""

    fields: dict[str, Value]
    required: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra JSON schema keywords per field (documentation only)."""

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "required": list(self.required),
            "additionalProperties": False,
            "properties": {
                name: {**value.schema(), **self.extra.get(name, {})} for name, value in self.fields.items()
            },
        }

    def parse(self, request: Request) -> dict[str, Any]:
        """The body's fields, checked; absent optional fields are left out."""
        data = json_object(request)
        for name in data:
            if name not in self.fields:
                raise ApiError(400, f"unknown field {shown(name)!r}", shown(name))
        for name in self.required:
            if name not in data:
                raise ApiError(400, f"{name} is required", name)
        return {name: self.fields[name].parse(value, name) for name, value in data.items()}


def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, strictly parsed (see the module docstring)."""
    if request.mimetype != "application/json":
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)", "Content-Type")
    raw = request.get_data(cache=True)  # 413 beyond MAX_CONTENT_LENGTH
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", "body") from None
    depth_problem = _too_deep(text)
    if depth_problem:
        raise ApiError(400, depth_problem, "body")
    try:
        data = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite
        )
    except _DuplicateKey as exc:
        raise ApiError(400, f"duplicate key {exc.key} in the JSON body", exc.key) from None
    except ValueError as exc:  # JSONDecodeError, NaN, huge numbers
        raise ApiError(400, f"the body is not valid JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    _check_text(data, "body")
    return data


def shown(name: str) -> str:
    """A client-supplied name as an error may echo it: as it is when it is plain text, else repr."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return repr(name)[:40]
    plain = len(name) <= MAX_ID_LENGTH and not any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in name)
    return name if plain else repr(name)[:40]


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = shown(key)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


def _too_deep(text: str) -> str | None:
    """Why `text` nests arrays/objects deeper than MAX_JSON_DEPTH (None: it does not); a scan that
    skips strings, so the parser never recurses deeply."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels"
        elif ch in "]}":
            depth -= 1
    return None


def _check_text(value: object, where: str) -> None:
    """No string or key of the body holds a lone surrogate or a NUL (no field of this API may)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, f"{where} contains a lone surrogate (not valid Unicode text)", where
            ) from None
        if "\x00" in value:
            raise ApiError(400, f"{where} contains a NUL character", where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, key if where == "body" else f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


def check_limits(request: Request) -> None:
    """414 for a long URL, 431 for too many or too long header fields, 413 for a declared body too
    large, 400 for a path that is not UTF-8 (the router would see U+FFFD instead)."""
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    try:  # the raw target when the server gives it (gunicorn, werkzeug), else WSGI's latin-1 path
        if raw:
            unquote_to_bytes(raw.partition("?")[0]).decode("utf-8")
        else:
            environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ApiError(400, "the URL path is not valid UTF-8", "path") from None
    target = len(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "") or (
        len(environ.get("PATH_INFO", "")) + len(environ.get("QUERY_STRING", "")) + 1
    )
    if target > MAX_URL_BYTES:
        raise ApiError(414, f"the URL is longer than {MAX_URL_BYTES} bytes", "url")
    headers = list(request.headers.items())
    if len(headers) > MAX_HEADER_FIELDS:
        raise ApiError(431, f"more than {MAX_HEADER_FIELDS} header fields", "headers")
    for name, value in headers:
        if len(name) + len(value) + 2 > MAX_HEADER_BYTES:
            raise ApiError(
                431, f"header {shown(name[:40])} is longer than {MAX_HEADER_BYTES} bytes", shown(name[:40])
            )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", "body")


def json_errors(app: Flask, log: logging.Logger) -> None:
    """Every error of `app` as JSON `{"error", "field"}`: an ApiError with its status and field, an
    HTTP error with its code (the field for 413/414/415/431; its headers kept: Allow on a 405,
    WWW-Authenticate, Retry-After), anything else a logged 500 that shows no detail."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return jsonify(error=exc.error, field=exc.field), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        field = {413: "body", 414: "url", 415: "Content-Type", 431: "headers"}.get(exc.code or 0)
        response = jsonify(error=(exc.description or exc.name), field=field)
        response.status_code = exc.code or 500
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="internal error", field=None), 500
