"""Every kind of bad input issue 12 found answered with a 500 (and the loose parsing it found), sent
to the registry API on Postgres: each must be a 4xx JSON error naming the field, and the registry
must be untouched by them (its audit chain still verifies). Then the same limits behind gunicorn.

`APA_ATTACK_REPORT=FILE` writes what each request returned (JSON)."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.bootstrap import bootstrap
from apa.db.models import ErasureRequest, Replica
from apa.db.session import make_engine, session_scope, upgrade
from apa.events import ErasureRequested
from apa.settings import Settings
from db_fixtures import MODEL_ID, PG_SERVER, PSEUDO, _admin_engine, fake_model_template, shard_id  # noqa: F401
from services.registry.app import create_app

pytestmark = pytest.mark.integration

TOKEN = "attack-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "Content-Type": "application/json"}
REPLICA_TOKEN = "attack-replica-token"
REPLICA_AUTH = {"Authorization": f"Bearer {REPLICA_TOKEN}"}
HEARTBEAT = "/replicas/r1/heartbeat"
SHARD = shard_id(0)
RESULTS: list[dict[str, Any]] = []


def _json(raw: str) -> dict[str, Any]:
    return {"headers": JSON, "data": raw.encode("utf-8", "surrogatepass")}


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# (label, method, url, request kwargs, status, field)
ATTACKS: list[tuple[str, str, str, dict[str, Any], int, str | None]] = [
    # NUL in any id: path, query, JSON field, heartbeat
    ("NUL in path request_id", "GET", "/erasures/a%00b", {}, 400, "request_id"),
    ("NUL in path request_id (receipt)", "GET", "/erasures/a%00b/receipt", {}, 400, "request_id"),
    ("NUL in path user_id", "GET", "/users/a%00b/erasure-status", {}, 400, "user_id"),
    (
        "NUL in path replica_id",
        "POST",
        "/replicas/a%00b/heartbeat",
        {"json": {"loaded": {}}},
        400,
        "replica_id",
    ),
    ("NUL in query model_id", "GET", "/shards?model_id=%00", {}, 400, "model_id"),
    ("NUL in query shard_id", "GET", "/adapters?shard_id=m%00/0", {}, 400, "shard_id"),
    ("NUL in query state", "GET", "/shards?state=%00", {}, 400, "state"),
    ("NUL in query name", "GET", "/shards?%00=1", {}, 400, "'\\x00'"),
    ("NUL in JSON user_id", "POST", "/erasures", _json('{"user_id": "a\\u0000"}'), 400, "user_id"),
    (
        "NUL in JSON request_id",
        "POST",
        "/erasures",
        _json('{"user_id": "a", "request_id": "\\u0000"}'),
        400,
        "request_id",
    ),
    (
        "NUL in JSON interactions",
        "POST",
        "/erasures",
        _json('{"user_id": "a", "interactions": ["x\\u0000"]}'),
        400,
        "interactions[0]",
    ),
    (
        "NUL in heartbeat model_id",
        "POST",
        "/replicas/r1/heartbeat",
        _json('{"loaded": {}, "model_id": "m\\u0000"}'),
        400,
        "model_id",
    ),
    (
        "NUL in heartbeat shard id",
        "POST",
        "/replicas/r1/heartbeat",
        _json('{"loaded": {"m\\u0000/0": 1}}'),
        400,
        "loaded",
    ),
    # deep JSON nesting
    ("[ x 1000 as the body", "POST", "/erasures", _json(_deep(1000)), 400, "body"),
    (
        "{ x 5000 in a field",
        "POST",
        "/erasures",
        _json('{"user_id": "u", "interactions": ' + _deep(5000) + "}"),
        400,
        "body",
    ),
    (
        "deep heartbeat",
        "POST",
        "/replicas/r1/heartbeat",
        _json('{"loaded": ' + _deep(1000) + "}"),
        400,
        "body",
    ),
    # out-of-range and malformed dates
    (
        "date past year 9999",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "requested_at": "9999-12-31T23:59:59-23:59"}},
        400,
        "requested_at",
    ),
    (
        "date before year 1",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "requested_at": "0001-01-01T00:00:00+23:59"}},
        400,
        "requested_at",
    ),
    (
        "date month 13",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "requested_at": "2026-13-01T00:00:00Z"}},
        400,
        "requested_at",
    ),
    (
        "date leap second",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "requested_at": "2016-12-31T23:59:60Z"}},
        400,
        "requested_at",
    ),
    (
        "date without zone",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "requested_at": "2026-01-01T00:00:00"}},
        400,
        "requested_at",
    ),
    (
        "date in Arabic digits",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "requested_at": "٢٠٢٦-01-01T00:00:00Z"}},
        400,
        "requested_at",
    ),
    # lone surrogates
    (
        "lone surrogate request_id",
        "POST",
        "/erasures",
        _json('{"user_id": "u", "request_id": "\\ud800"}'),
        400,
        "request_id",
    ),
    ("lone surrogate user_id", "POST", "/erasures", _json('{"user_id": "\\udfff"}'), 400, "user_id"),
    (
        "lone surrogate interaction",
        "POST",
        "/erasures",
        _json('{"user_id": "u", "interactions": ["\\ud83d"]}'),
        400,
        "interactions[0]",
    ),
    (
        "lone surrogate heartbeat key",
        "POST",
        "/replicas/r1/heartbeat",
        _json('{"loaded": {"\\ud800/0": 1}}'),
        400,
        "loaded",
    ),
    ("lone surrogate unknown key", "POST", "/erasures", _json('{"user_id": "u", "\\ud800": 1}'), 400, "body"),
    ("surrogate bytes in path", "GET", "/erasures/%ED%A0%80", {}, 400, "path"),
    ("invalid UTF-8 in path", "GET", "/users/%FF/erasure-status", {}, 400, "path"),
    ("surrogate bytes in query", "GET", "/shards?model_id=%ED%A0%80", {}, 400, "query"),
    # limit accepts only ASCII digits
    ("limit in Arabic digits", "GET", "/audit?limit=%D9%A3", {}, 400, "limit"),
    ("limit with underscore", "GET", "/audit?limit=1_0", {}, 400, "limit"),
    ("limit with plus sign", "GET", "/audit?limit=%2B5", {}, 400, "limit"),
    ("limit with space (+)", "GET", "/audit?limit=+5", {}, 400, "limit"),
    ("limit negative zero", "GET", "/audit?limit=-0", {}, 400, "limit"),
    ("limit empty", "GET", "/audit?limit=", {}, 400, "limit"),
    ("limit 2.5", "GET", "/audit?limit=2.5", {}, 400, "limit"),
    ("limit 1e2", "GET", "/audit?limit=1e2", {}, 400, "limit"),
    ("since beyond bigint", "GET", "/audit?since=99999999999999999999999", {}, 400, "since"),
    ("shard index superscript", "GET", "/adapters?shard_id=m/%C2%B2", {}, 400, "shard_id"),
    ("shard index Arabic", "GET", "/adapters?shard_id=m/%D9%A3", {}, 400, "shard_id"),
    # repeated query parameters and duplicate JSON keys
    ("repeated limit", "GET", "/audit?limit=5&limit=6", {}, 400, "limit"),
    ("repeated model_id", "GET", "/shards?model_id=a&model_id=b", {}, 400, "model_id"),
    ("unknown query parameter", "GET", "/audit?limt=5", {}, 400, "limt"),
    ("query on a route without any", "GET", "/replicas?x=1", {}, 400, "x"),
    ("duplicate user_id", "POST", "/erasures", _json('{"user_id": "a", "user_id": "b"}'), 400, "user_id"),
    (
        "duplicate shard in loaded",
        "POST",
        "/replicas/r1/heartbeat",
        _json(f'{{"loaded": {{"{SHARD}": 1, "{SHARD}": 2}}}}'),
        400,
        SHARD,
    ),
    # empty ids, bad types, numbers
    ("empty model_id", "GET", "/shards?model_id=", {}, 400, "model_id"),
    ("empty user_id", "POST", "/erasures", {"json": {"user_id": ""}}, 400, "user_id"),
    ("id of 129 characters", "POST", "/erasures", {"json": {"user_id": "u" * 129}}, 400, "user_id"),
    (
        "id with a slash",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "request_id": "r/slash"}},
        400,
        "request_id",
    ),
    ("path id '..'", "GET", "/erasures/..", {}, 400, "request_id"),
    ("path id with leading space", "GET", "/erasures/%20a", {}, 400, "request_id"),
    (
        "version 10**30",
        "POST",
        "/replicas/r1/heartbeat",
        {"json": {"loaded": {SHARD: 10**30}}},
        400,
        f'loaded["{SHARD}"]',
    ),
    (
        "version 1e400",
        "POST",
        "/replicas/r1/heartbeat",
        _json(f'{{"loaded": {{"{SHARD}": 1e400}}}}'),
        400,
        "body",
    ),
    (
        "version NaN",
        "POST",
        "/replicas/r1/heartbeat",
        _json(f'{{"loaded": {{"{SHARD}": NaN}}}}'),
        400,
        "body",
    ),
    (
        "version of 5000 digits",
        "POST",
        "/replicas/r1/heartbeat",
        _json(f'{{"loaded": {{"{SHARD}": {"9" * 5000}}}}}'),
        400,
        "body",
    ),
    (
        "version true",
        "POST",
        "/replicas/r1/heartbeat",
        {"json": {"loaded": {SHARD: True}}},
        400,
        f'loaded["{SHARD}"]',
    ),
    (
        "version 1.0",
        "POST",
        "/replicas/r1/heartbeat",
        _json(f'{{"loaded": {{"{SHARD}": 1.0}}}}'),
        400,
        f'loaded["{SHARD}"]',
    ),
    (
        "shard id without index",
        "POST",
        "/replicas/r1/heartbeat",
        {"json": {"loaded": {"m": 1}}},
        400,
        'loaded["m"]',
    ),
    (
        "interactions empty",
        "POST",
        "/erasures",
        {"json": {"user_id": "u", "interactions": []}},
        400,
        "interactions",
    ),
    ("unknown field", "POST", "/erasures", {"json": {"user_id": "u", "colour": "red"}}, 400, "colour"),
    # bodies
    ("body not UTF-8", "POST", "/erasures", {"headers": JSON, "data": b'{"user_id": "\xff"}'}, 400, "body"),
    (
        "body with BOM",
        "POST",
        "/erasures",
        {"headers": JSON, "data": '\ufeff{"user_id": "u"}'.encode()},
        400,
        "body",
    ),
    ("body empty", "POST", "/erasures", {"headers": JSON, "data": b""}, 400, "body"),
    ("body a list", "POST", "/erasures", _json("[1, 2]"), 400, "body"),
    (
        "body as text/plain",
        "POST",
        "/erasures",
        {"headers": {**AUTH, "Content-Type": "text/plain"}, "data": b"user_id=u"},
        415,
        "Content-Type",
    ),
    (
        "body of 2 MiB",
        "POST",
        "/erasures",
        {"headers": JSON, "data": b"{" + b" " * (2 << 20) + b"}"},
        413,
        "body",
    ),
    # URL and headers
    ("URL of 5000 bytes", "GET", "/shards?model_id=" + "a" * 5000, {}, 414, "url"),
    ("header of 9000 bytes", "GET", "/shards", {"headers": {**AUTH, "X-Big": "a" * 9000}}, 431, "X-Big"),
    (
        "120 header fields",
        "GET",
        "/shards",
        {"headers": {**AUTH, **{f"X-H{i}": "a" for i in range(120)}}},
        431,
        "headers",
    ),
    # forged heartbeats: only the replicas' token posts them (issue 9: the compliance token once
    # flipped an erasure to "replicas confirmed" while a replica still served the excluded adapter)
    (
        "forged heartbeat: the compliance token",
        "POST",
        HEARTBEAT,
        {"json": {"loaded": {}}},
        403,
        "Authorization",
    ),
    (
        "forged heartbeat: no token",
        "POST",
        HEARTBEAT,
        {"headers": {}, "json": {"loaded": {}}},
        401,
        "Authorization",
    ),
    (
        "forged heartbeat: replica token without the Bearer scheme",
        "POST",
        HEARTBEAT,
        {"headers": {"Authorization": REPLICA_TOKEN}, "json": {"loaded": {}}},
        401,
        "Authorization",
    ),
    (
        "forged heartbeat: a prefix of the replica token",
        "POST",
        HEARTBEAT,
        {"headers": {"Authorization": f"Bearer {REPLICA_TOKEN[:-1]}"}, "json": {"loaded": {}}},
        401,
        "Authorization",
    ),
    (
        "forged heartbeat: both tokens in one header",
        "POST",
        HEARTBEAT,
        {"headers": {"Authorization": f"Bearer {TOKEN} {REPLICA_TOKEN}"}, "json": {"loaded": {}}},
        401,
        "Authorization",
    ),
    (
        "forged heartbeat: the compliance token for a new replica id",
        "POST",
        "/replicas/ghost/heartbeat",
        {"json": {"loaded": {}, "model_id": "fake-model"}},
        403,
        "Authorization",
    ),
    (
        "replica token on GET /erasures/<id>",
        "GET",
        "/erasures/req-bob",
        {"headers": REPLICA_AUTH},
        403,
        "Authorization",
    ),
    (
        "replica token on POST /erasures",
        "POST",
        "/erasures",
        {"headers": REPLICA_AUTH, "json": {"user_id": "carol"}},
        403,
        "Authorization",
    ),
    ("replica token on GET /audit", "GET", "/audit", {"headers": REPLICA_AUTH}, 403, "Authorization"),
]


@pytest.fixture(scope="module")
def client(fake_model_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    admin = _admin_engine()
    name = f"apa_attack_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(f"{PG_SERVER}/{name}")
    try:
        upgrade(engine)
        with session_scope(engine) as session:
            bootstrap(
                session,
                fake_model_template,
                PSEUDO,
                ArtifactStore(tmp_path_factory.mktemp("s")),
                model_id=MODEL_ID,
            )
            registry.record_erasure(session, ErasureRequested("req-bob", "bob"), PSEUDO)
        settings = Settings.from_env(
            database_url=engine.url.render_as_string(hide_password=False),
            api_token=TOKEN,
            replica_token=REPLICA_TOKEN,
        )
        app = create_app(settings, engine=engine)
        yield app.test_client()
        with Session(engine) as session:  # nothing of it reached the registry
            result = audit.verify(session)
            assert result.ok and result.erasures_checked == 2, result.summary()  # req-bob and r-ok
            assert session.scalars(select(Replica)).all() == []  # no heartbeat got through
            request = session.get(ErasureRequest, "req-bob")
            assert request is not None and request.replicas_confirmed_at is None
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        report = os.environ.get("APA_ATTACK_REPORT")
        if report:
            Path(report).write_text(json.dumps(RESULTS, indent=1, ensure_ascii=False))


@pytest.mark.parametrize(
    ("label", "method", "url", "kwargs", "status", "field"), ATTACKS, ids=[a[0] for a in ATTACKS]
)
def test_bad_input_is_a_4xx_json_error_naming_the_field(
    client: FlaskClient,
    label: str,
    method: str,
    url: str,
    kwargs: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    options = {"headers": AUTH, **kwargs}
    if "/heartbeat" in url and not label.startswith("forged"):
        # bad input to the heartbeat route, sent with the token it takes
        options["headers"] = {**options["headers"], **REPLICA_AUTH}
    response = client.open(url, method=method, **options)
    body = response.get_json(silent=True)
    RESULTS.append({"attack": label, "status": response.status_code, "body": body})
    assert response.status_code == status, (label, response.status_code, body)
    assert response.is_json and set(body) == {"error", "field"} and body["error"]
    if field in ("loaded",):
        assert body["field"].startswith("loaded"), body
    else:
        assert body["field"] == field, body


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
def test_405_keeps_the_allow_header(client: FlaskClient, method: str) -> None:
    response = client.open("/shards", method=method, headers=AUTH)
    RESULTS.append(
        {
            "attack": f"{method} /shards",
            "status": response.status_code,
            "allow": response.headers.get("Allow"),
        }
    )
    assert response.status_code == 405 and response.is_json
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}
    post_only = client.open("/erasures", method=method, headers=AUTH)
    assert post_only.status_code == 405 and "POST" in post_only.headers["Allow"]


def test_good_input_still_works(client: FlaskClient) -> None:
    assert client.get("/audit?limit=0005&since=0", headers=AUTH).status_code == 200
    assert client.get(f"/adapters?shard_id={SHARD}&state=serving", headers=AUTH).status_code == 200
    ok = client.post(
        "/erasures",
        headers=AUTH,
        json={"user_id": "nobody", "request_id": "r-ok", "requested_at": "2026-01-31t12:00:00.1234567z"},
    )
    assert ok.status_code == 202, ok.json
    assert (
        client.get("/erasures/r-ok", headers=AUTH).json["requested_at"] == "2026-01-31T12:00:00.123456+00:00"
    )


# --- behind gunicorn ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_limits_and_bad_input_behind_gunicorn(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "APA_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}",
        "APA_API_TOKEN": TOKEN,
        "APA_REPLICA_TOKEN": REPLICA_TOKEN,
        "APA_AUDIT_ANCHOR_INTERVAL_S": "0",
    }
    subprocess.run(
        [sys.executable, "-m", "apa.cli", "db", "upgrade"], env=env, check=True, capture_output=True
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "services.registry", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        body = b'{"loaded": {}}'
        heartbeat_body = (
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        cases = {
            "NUL in query": (b"GET /shards?model_id=%00 HTTP/1.0\r\n" + auth + b"\r\n", 400),
            "repeated limit": (b"GET /audit?limit=1&limit=2 HTTP/1.0\r\n" + auth + b"\r\n", 400),
            "URL of 5000 bytes": (
                b"GET /shards?model_id=" + b"a" * 5000 + b" HTTP/1.0\r\n" + auth + b"\r\n",
                414,
            ),
            "header of 9000 bytes": (
                b"GET /shards HTTP/1.0\r\n" + auth + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
                431,
            ),
            "invalid UTF-8 in path": (b"GET /erasures/%FF HTTP/1.0\r\n" + auth + b"\r\n", 400),
            "DELETE": (b"DELETE /shards HTTP/1.0\r\n" + auth + b"\r\n", 405),
            "forged heartbeat with the compliance token": (
                b"POST /replicas/r1/heartbeat HTTP/1.0\r\n" + auth + heartbeat_body,
                403,
            ),
            "heartbeat with the replica token": (
                b"POST /replicas/r1/heartbeat HTTP/1.0\r\n"
                + f"Authorization: Bearer {REPLICA_TOKEN}\r\n".encode()
                + heartbeat_body,
                200,
            ),
            "replica token on a compliance route": (
                f"GET /shards HTTP/1.0\r\nAuthorization: Bearer {REPLICA_TOKEN}\r\n\r\n".encode(),
                403,
            ),
        }
        for label, (raw, expected) in cases.items():
            status, body = _raw(port, raw)
            RESULTS.append({"attack": f"gunicorn: {label}", "status": status})
            assert status == expected, (label, status, body[:200])
    finally:
        server.terminate()
        server.wait(timeout=20)
