"""The registry HTTP API through Flask's test client: auth, validation, compliance views, OpenAPI."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.db import registry
from apa.db.bootstrap import bootstrap
from apa.db.session import downgrade, make_engine, session_scope
from apa.events import ErasureRequested, InMemoryEventBus
from apa.ids import id_problem, shard_id_problem
from apa.settings import Settings
from apa.validation import ID_PATTERN, SHARD_ID_PATTERN
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PSEUDO,
    fake_model_template,
    make_manifest,
    migrated_sqlite_template,
    model_dir,
    pg_engine,
    pg_url,
    shard_id,
    sqlite_copy,
)
from services.registry.app import create_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPLICA_TOKEN = "replica-s3cret"
REPLICA_AUTH = {"Authorization": f"Bearer {REPLICA_TOKEN}"}


def _settings(engine: Engine, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": engine.url.render_as_string(hide_password=False),
        "api_token": TOKEN,
        "replica_token": REPLICA_TOKEN,
        "pseudonym_key": os.environ["APA_PSEUDONYM_KEY"],
        "audit_key": os.environ["APA_AUDIT_KEY"],
        "signing_key": os.environ["APA_SIGNING_KEY"],
    }
    return Settings(**{**values, **overrides})


@pytest.fixture()
def bus() -> InMemoryEventBus:
    return InMemoryEventBus()


@pytest.fixture(scope="module")
def registry_template(
    migrated_sqlite_template: Path,
    fake_model_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The fake model bootstrapped; alice and bob erased (alice completed, bob still pending)."""
    path = tmp_path_factory.mktemp("registry") / "registry.db"
    engine = sqlite_copy(migrated_sqlite_template, path)
    with session_scope(engine) as session:
        bootstrap(
            session,
            fake_model_template,
            PSEUDO,
            ArtifactStore(tmp_path_factory.mktemp("store")),
            model_id=MODEL_ID,
        )
        registry.record_erasure(session, ErasureRequested("req-alice", "alice", ["alice:1"]), PSEUDO)
        registry.record_erasure(session, ErasureRequested("req-bob", "bob"), PSEUDO)
    with session_scope(engine) as session:
        generation = registry.mark_retraining(session, shard_id(0))
        registry.register_adapter_version(
            session,
            shard_id(0),
            make_manifest(0, ["t-c1"], version=2),
            "file:///v2",
            started_generation=generation,
        )
    engine.dispose()
    return path


@pytest.fixture()
def registry_db(registry_template: Path, tmp_path: Path) -> Iterator[Engine]:
    """A private copy of the registry template database."""
    engine = sqlite_copy(registry_template, tmp_path / "registry.db")
    yield engine
    engine.dispose()


@pytest.fixture()
def app(registry_db: Engine, bus: InMemoryEventBus) -> Flask:
    return create_app(_settings(registry_db), engine=registry_db, event_bus=bus)


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _openapi_paths(app: Flask) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:  # type: ignore[operator]
            routes.add((path, method.lower()))
    return routes


# --- auth --------------------------------------------------------------------------------------------


def test_every_endpoint_but_health_requires_the_bearer_token(app: Flask, client: FlaskClient) -> None:
    for path, method in _openapi_paths(app):
        url = (
            path.replace("{request_id}", "req-alice")
            .replace("{user_id}", "alice")
            .replace("{replica_id}", "r1")
        )
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = client.open(url, method=method, headers=headers, json={})
            if path in ("/healthz", "/readyz"):
                assert response.status_code == 200, (path, response.json)
            else:
                assert response.status_code == 401, (method, path, headers)
                assert response.json["field"] == "Authorization" and response.json["error"]
                assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_two_tokens_are_not_interchangeable(app: Flask, client: FlaskClient) -> None:
    """The replica token posts heartbeats and nothing else; the compliance token everything else but
    heartbeats (a compliance client must not confirm an erasure in the replicas' name)."""
    for path, method in _openapi_paths(app):
        url = (
            path.replace("{request_id}", "req-alice")
            .replace("{user_id}", "alice")
            .replace("{replica_id}", "r1")
        )
        body = {"loaded": {}} if method == "post" else None
        as_replica = client.open(url, method=method, headers=REPLICA_AUTH, json=body)
        as_compliance = client.open(url, method=method, headers=AUTH, json=body)
        if path in ("/healthz", "/readyz"):
            continue
        if path == "/replicas/{replica_id}/heartbeat":
            assert as_replica.status_code == 200, as_replica.json
            assert as_compliance.status_code == 403, as_compliance.json
            assert as_compliance.json["field"] == "Authorization"
            assert "APA_REPLICA_TOKEN" in as_compliance.json["error"]
        else:
            assert as_replica.status_code == 403, (method, path, as_replica.json)
            assert as_replica.json["field"] == "Authorization"
            assert as_compliance.status_code != 403, (method, path, as_compliance.json)
    listed = client.get("/replicas", headers=AUTH).json["replicas"]
    assert [r["replica_id"] for r in listed] == ["r1"]  # the heartbeat with the replica token only


def test_heartbeats_are_refused_without_a_replica_token_unless_dev_mode(registry_db: Engine) -> None:
    settings = _settings(registry_db, replica_token=None)
    plain = create_app(settings, engine=registry_db).test_client()
    for headers in (AUTH, REPLICA_AUTH, {}):
        refused = plain.post("/replicas/r1/heartbeat", headers=headers, json={"loaded": {}})
        assert refused.status_code == 503 and "APA_REPLICA_TOKEN" in refused.json["error"], refused.json
    assert plain.get("/replicas", headers=AUTH).json["replicas"] == []
    dev_settings = _settings(registry_db, api_token=None, replica_token=None, allow_unauthenticated=True)
    dev = create_app(dev_settings, engine=registry_db).test_client()
    assert dev.post("/replicas/r1/heartbeat", json={"loaded": {}}).status_code == 200
    with pytest.raises(ValueError, match="APA_REPLICA_TOKEN must differ"):
        create_app(_settings(registry_db, replica_token=TOKEN), engine=registry_db)


def test_app_refuses_to_start_without_a_token_unless_dev_mode(registry_db: Engine) -> None:
    with pytest.raises(ValueError, match="APA_API_TOKEN"):
        create_app(Settings(database_url="sqlite://"), engine=registry_db)
    dev = create_app(Settings(allow_unauthenticated=True), engine=registry_db)
    assert dev.test_client().get("/shards").status_code == 200


# --- health ------------------------------------------------------------------------------------------


def test_readyz_reports_ready_at_head_and_503_when_migrations_are_missing(
    client: FlaskClient, tmp_path: Path
) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["status"] == "ready"

    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    unmigrated = create_app(_settings(empty), engine=empty).test_client()
    response = unmigrated.get("/readyz")
    assert response.status_code == 503 and "head is" in response.json["reason"]
    assert unmigrated.get("/healthz").status_code == 200
    empty.dispose()


# --- compliance views --------------------------------------------------------------------------------


def test_erasure_status_returns_status_and_audit_timeline(client: FlaskClient) -> None:
    body = client.get("/erasures/req-alice", headers=AUTH).json
    assert body["status"] == "completed" and body["user_pid"] == PSEUDO.user("alice")
    assert "alice:1" not in json.dumps(body)  # the registry keeps the interaction's pseudonym only
    assert [s["shard_id"] for s in body["shards"]] == [shard_id(0)]
    assert body["shards"][0]["excluded_version"]["version"] == 1
    assert body["shards"][0]["retrained_version"]["version"] == 2
    events = [row["event_type"] for row in body["timeline"]]
    assert events[0] == "erasure_received" and events[-1] == "erasure_completed"
    assert all(len(row["hash"]) == 64 and row["request_id"] == "req-alice" for row in body["timeline"])


def test_unknown_erasure_is_a_404_naming_the_field(client: FlaskClient) -> None:
    response = client.get("/erasures/nope", headers=AUTH)
    assert response.status_code == 404 and response.json["field"] == "request_id"


def test_user_erasure_status_answers_the_compliance_questions(client: FlaskClient) -> None:
    alice = client.get("/users/alice/erasure-status", headers=AUTH).json
    assert alice["erased"] is False  # an interaction erasure, not the whole user
    assert alice["samples_erased"] == 1 and alice["samples_held"] == 3
    assert alice["excluded_from_serving_at"] is not None
    assert alice["all_shards_retrained_at"] is not None
    assert alice["adapter_versions"]["excluded"][0]["version"] == 1
    assert alice["adapter_versions"]["retrained"][0]["version"] == 2

    bob = client.get("/users/bob/erasure-status", headers=AUTH).json
    assert bob["erased"] is True and bob["erased_at"] is not None
    assert bob["excluded_from_serving_at"] is not None
    assert bob["all_shards_retrained_at"] is None  # shard 1 still stale
    assert client.get("/users/nobody/erasure-status", headers=AUTH).status_code == 404


def test_user_erasure_status_never_contains_another_users_data(client: FlaskClient) -> None:
    for user, others in (("alice", ("bob", "carol", "req-bob")), ("bob", ("alice", "carol", "req-alice"))):
        text = client.get(f"/users/{user}/erasure-status", headers=AUTH).get_data(as_text=True)
        for other in others:
            assert other not in text, f"{user}'s status mentions {other}"
        body = json.loads(text)
        assert {row["user_pid"] for row in body["timeline"]} == {PSEUDO.user(user)}


def test_audit_is_paged_by_id_with_hashes(client: FlaskClient) -> None:
    first = client.get("/audit?limit=3", headers=AUTH).json
    assert [r["id"] for r in first["rows"]] == [1, 2, 3] and first["has_more"] is True
    second = client.get(f"/audit?since={first['next_since']}&limit=2", headers=AUTH).json
    assert [r["id"] for r in second["rows"]] == [4, 5]
    assert second["rows"][0]["prev_hash"] == first["rows"][-1]["hash"]
    everything = client.get("/audit?limit=1000", headers=AUTH).json
    assert everything["has_more"] is False and everything["next_since"] == everything["rows"][-1]["id"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=-1", "since"),
        ("since=abc", "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=2.5", "limit"),
    ],
)
def test_bad_audit_paging_is_a_400_naming_the_field(client: FlaskClient, query: str, field: str) -> None:
    response = client.get(f"/audit?{query}", headers=AUTH)
    assert response.status_code == 400 and response.json["field"] == field


def test_shards_and_adapters_are_listed_and_filtered(client: FlaskClient) -> None:
    shards = client.get("/shards", headers=AUTH).json["shards"]
    assert [(s["shard_id"], s["state"], s["serving_version"]) for s in shards] == [
        (shard_id(0), "serving", 2),
        (shard_id(1), "stale", None),
    ]
    stale = client.get("/shards?state=stale", headers=AUTH).json["shards"]
    assert [s["shard_id"] for s in stale] == [shard_id(1)]
    adapters = client.get(f"/adapters?shard_id={shard_id(0)}", headers=AUTH).json["adapters"]
    assert [(a["version"], a["state"]) for a in adapters] == [(1, "excluded"), (2, "serving")]
    assert all(len(a["adapter_sha256"]) == 64 and len(a["manifest_digest"]) == 64 for a in adapters)
    assert client.get("/adapters?state=bogus", headers=AUTH).json["field"] == "state"
    assert client.get("/shards?state=bogus", headers=AUTH).status_code == 400


# --- POST /erasures ----------------------------------------------------------------------------------


def test_post_erasure_publishes_the_event_keyed_by_user(client: FlaskClient, bus: InMemoryEventBus) -> None:
    response = client.post("/erasures", headers=AUTH, json={"user_id": "carol", "interactions": ["carol:2"]})
    assert response.status_code == 202
    request_id = response.json["request_id"]
    assert response.headers["Location"] == f"/erasures/{request_id}"
    [message] = bus.messages("apa.erasure-requests")
    assert message.key == "carol"
    event = ErasureRequested.from_dict(message.value)
    assert (event.request_id, event.user_id, event.interactions) == (request_id, "carol", ["carol:2"])


def test_post_erasure_reusing_another_users_request_id_is_a_409(
    client: FlaskClient, bus: InMemoryEventBus
) -> None:
    response = client.post("/erasures", headers=AUTH, json={"user_id": "carol", "request_id": "req-bob"})
    assert response.status_code == 409 and response.json["field"] == "request_id"
    assert bus.messages() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": 7}, "user_id"),
        ({"user_id": "u", "interactions": "i1"}, "interactions"),
        ({"user_id": "u", "interactions": []}, "interactions"),
        ({"user_id": "u", "interactions": ["ok", 3]}, "interactions[1]"),
        ({"user_id": "u", "requested_at": "yesterday"}, "requested_at"),
        ({"user_id": "u", "request_id": "x" * 200}, "request_id"),
        ({"user_id": "u", "colour": "red"}, "colour"),
        ([1, 2], "body"),
    ],
)
def test_bad_erasure_input_is_a_400_naming_the_field(
    client: FlaskClient, bus: InMemoryEventBus, body: Any, field: str
) -> None:
    response = client.post("/erasures", headers=AUTH, json=body)
    assert response.status_code == 400, response.json
    assert response.json["field"] == field and response.json["error"]
    assert bus.messages() == []


def test_non_json_or_oversized_body_is_a_4xx(client: FlaskClient) -> None:
    response = client.post("/erasures", headers={**AUTH, "Content-Type": "text/plain"}, data="user_id=u")
    assert response.status_code == 415 and response.json["field"] == "Content-Type"
    huge = client.post("/erasures", headers=AUTH, json={"user_id": "u", "interactions": ["i" * 100] * 20000})
    assert huge.status_code == 413 and huge.is_json


def test_without_kafka_posted_erasures_are_recorded_in_the_registry(registry_db: Engine) -> None:
    client = create_app(_settings(registry_db), engine=registry_db).test_client()
    response = client.post("/erasures", headers=AUTH, json={"user_id": "carol", "request_id": "req-carol"})
    assert response.status_code == 202
    status = client.get("/erasures/req-carol", headers=AUTH).json
    assert status["status"] == "excluded" and status["samples_erased"] == 3
    again = client.post("/erasures", headers=AUTH, json={"user_id": "carol", "request_id": "req-carol"})
    assert again.status_code == 202  # idempotent redelivery


def test_unreachable_event_bus_is_a_503(registry_db: Engine) -> None:
    class Down:
        def publish(self, topic: str, key: str, value: dict[str, Any]) -> None:
            raise ConnectionError("broker down")

    client = create_app(_settings(registry_db), engine=registry_db, event_bus=Down()).test_client()
    response = client.post("/erasures", headers=AUTH, json={"user_id": "u"})
    assert response.status_code == 503 and response.is_json


# --- replicas ----------------------------------------------------------------------------------------


def test_replica_heartbeat_is_recorded_and_listed(client: FlaskClient) -> None:
    response = client.post(
        "/replicas/replica-1/heartbeat",
        headers=REPLICA_AUTH,
        json={"loaded": {shard_id(0): 2}, "model_id": MODEL_ID},
    )
    assert response.status_code == 200 and response.json["loaded"] == {shard_id(0): 2}
    listed = client.get("/replicas", headers=AUTH).json["replicas"]
    assert [r["replica_id"] for r in listed] == ["replica-1"]
    bad = client.post(
        "/replicas/replica-1/heartbeat", headers=REPLICA_AUTH, json={"loaded": {shard_id(0): "2"}}
    )
    assert bad.status_code == 400 and bad.json["field"] == f'loaded["{shard_id(0)}"]'


# --- OpenAPI and errors ------------------------------------------------------------------------------


def test_openapi_document_lists_every_route(app: Flask, client: FlaskClient) -> None:
    doc = client.get("/openapi.json", headers=AUTH).json
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _openapi_paths(app)
    for path in ("/healthz", "/readyz"):
        assert doc["paths"][path]["get"]["security"] == []
    heartbeat = doc["paths"]["/replicas/{replica_id}/heartbeat"]["post"]
    assert heartbeat["security"] == [{"replicaBearer": []}] and {"401", "403", "503"} <= set(
        heartbeat["responses"]
    )
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "replicaBearer"}
    assert doc["security"] == [{"bearer": []}]


def test_unknown_route_and_method_are_json_errors(client: FlaskClient) -> None:
    missing = client.get("/nope", headers=AUTH)
    assert missing.status_code == 404 and missing.is_json and "error" in missing.json
    wrong = client.delete("/shards", headers=AUTH)
    assert wrong.status_code == 405 and wrong.is_json


# --- Postgres ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_api_on_postgres_reports_an_erasure_and_readiness(
    pg_engine: Engine, model_dir: Path, tmp_path: Path
) -> None:
    with session_scope(pg_engine) as session:
        bootstrap(session, model_dir, PSEUDO, ArtifactStore(tmp_path / "store"), model_id=MODEL_ID)
        registry.record_erasure(session, ErasureRequested("r1", "carol"), PSEUDO)
    client = create_app(_settings(pg_engine), engine=pg_engine, event_bus=InMemoryEventBus()).test_client()
    assert client.get("/readyz").status_code == 200
    body = client.get("/erasures/r1", headers=AUTH).json
    assert body["status"] == "excluded" and body["samples_erased"] == 3
    downgrade(pg_engine, "base")
    assert client.get("/readyz").status_code == 503


# --- the OpenAPI document declares what the code enforces ---------------------------------------------


_id_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from([" ", "/", ".", "\x00", "\n", "\x85", "\u3000", "\ufeff", "\ud800", "\udfff"]),
    ),
    max_size=140,
)


@hyp_settings(max_examples=400, deadline=None)
@given(_id_text)
def test_openapi_id_pattern_accepts_exactly_what_apa_ids_accepts(value: str) -> None:
    declared = 1 <= len(value) <= 128 and re.search(ID_PATTERN, value) is not None
    assert declared == (id_problem(value) is None), (value, id_problem(value))
    shard = f"{value}/3"
    declared_shard = len(shard) <= 138 and re.search(SHARD_ID_PATTERN, shard) is not None
    assert declared_shard == (shard_id_problem(shard) is None), shard


@pytest.mark.parametrize(
    "value", [".", "..", "a/b", " a", "a ", "a\n", "\u3000a", "a\ufeff", "\x85", "x" * 128, "x" * 129, "é☃"]
)
def test_openapi_id_pattern_on_the_edge_cases(value: str) -> None:
    declared = 1 <= len(value) <= 128 and re.search(ID_PATTERN, value) is not None
    assert declared == (id_problem(value) is None)


def test_openapi_document_declares_id_limits_and_the_4xx_answers(client: FlaskClient) -> None:
    doc = client.get("/openapi.json", headers=AUTH).json
    ids = [
        p["schema"]
        for ops in doc["paths"].values()
        for op in ops.values()
        for p in op.get("parameters", [])
        if p["in"] == "path" or p["name"] == "model_id"
    ]
    assert ids and all(
        s["minLength"] == 1 and s["maxLength"] == 128 and s["pattern"] == ID_PATTERN for s in ids
    )
    submit = doc["components"]["schemas"]["ErasureSubmit"]["properties"]
    assert submit["user_id"]["minLength"] == 1 and submit["request_id"]["pattern"] == ID_PATTERN
    assert submit["interactions"]["items"]["maxLength"] == 128
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert {"400", "414", "431"} <= codes, (method, path)
            if "requestBody" in op:
                assert {"413", "415"} <= codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
    limit = next(p for p in doc["paths"]["/audit"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 1000,
        "default": 100,
        "description": "Page size",
    }


# --- receipts ----------------------------------------------------------------------------------------


@pytest.fixture()
def anchored_client(registry_db: Engine, tmp_path: Path) -> FlaskClient:
    settings = _settings(registry_db, audit_anchor_file=str(tmp_path / "anchors.jsonl"))
    return create_app(settings, engine=registry_db, event_bus=InMemoryEventBus()).test_client()


def test_erasure_receipt_is_signed_anchored_and_checks_offline(
    anchored_client: FlaskClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apa.db.audit import check_receipt_command

    response = anchored_client.get("/erasures/req-alice/receipt", headers=AUTH)
    assert response.status_code == 200
    document = response.json
    receipt = document["receipt"]
    assert receipt["request"]["user_pid"] == PSEUDO.user("alice")
    assert '"alice"' not in json.dumps(document) and "alice:1" not in json.dumps(document)  # pseudonyms only
    [shard] = receipt["adapters"]
    assert shard["excluded"]["version"] == 1 and shard["retrained"]["version"] == 2
    assert len(shard["excluded"]["adapter_sha256"]) == 64 and len(shard["retrained"]["adapter_sha256"]) == 64
    trail = receipt["audit"]
    assert trail["first_row"] == trail["rows"][0]["id"] and trail["last_row"] == trail["rows"][-1]["id"]
    assert receipt["anchor"]["sequence"] >= trail["last_row"]  # anchored on demand
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(document))
    key = tmp_path / "public.pem"
    key.write_text(anchored_client.get("/audit/public-key", headers=AUTH).json["pem"])
    assert check_receipt_command(str(path), public_key=str(key)) == 0
    assert "receipt VALID" in capsys.readouterr().out

    forged = json.loads(path.read_text())
    forged["receipt"]["adapters"][0]["retrained"]["adapter_sha256"] = "0" * 64
    path.write_text(json.dumps(forged))
    assert check_receipt_command(str(path), public_key=str(key)) == 1
    assert "FAIL Ed25519 signature" in capsys.readouterr().out

    other = tmp_path / "other.pem"
    from apa.signing import SigningKey

    other.write_text(SigningKey.parse("11" * 32).public.pem())
    path.write_text(json.dumps(document))
    assert check_receipt_command(str(path), public_key=str(other)) == 1
    assert "names the published key" in capsys.readouterr().out


def test_receipt_without_an_anchor_sink_is_signed_but_not_valid_until_anchored(
    client: FlaskClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apa.db.audit import check_receipt_command

    document = client.get("/erasures/req-bob/receipt", headers=AUTH).json
    assert document["receipt"]["anchor"] is None and document["receipt"]["request"]["status"] != "completed"
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(document))
    assert check_receipt_command(str(path)) == 1
    out = capsys.readouterr().out
    assert "ok   Ed25519 signature" in out and "no anchor covers audit rows" in out
    assert client.get("/erasures/nope/receipt", headers=AUTH).status_code == 404
