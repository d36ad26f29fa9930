"""Replica confirmation of an erasure (issue 9), through the registry API on Postgres: heartbeats
over HTTP with the replicas' own token, erasures and status reads with the compliance token.

An exclusion is confirmed only when every live replica has reported, since the exclusion, a loaded
set without the excluded versions; never with no live replica; a replica that stops heartbeating
stops counting once it leaves the live window; a heartbeat sent with the compliance token is
refused and changes nothing."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.bootstrap import bootstrap
from apa.db.session import session_scope
from apa.settings import Settings
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PARTITION,
    PSEUDO,
    fake_model_template,
    make_manifest,
    model_dir,
    pg_engine,
    pg_url,
    shard_id,
    store,
)
from services.registry.app import create_app

pytestmark = pytest.mark.integration

API_TOKEN = "compliance-token"
REPLICA_TOKEN = "replica-token"
API = {"Authorization": f"Bearer {API_TOKEN}"}
REPLICA = {"Authorization": f"Bearer {REPLICA_TOKEN}"}
BOTH_V1 = {shard_id(0): 1, shard_id(1): 1}
"""What a replica serves after bootstrap: version 1 of both shards (bob has data in both)."""


@pytest.fixture()
def registry_pg(pg_engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    with session_scope(pg_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    return pg_engine


@pytest.fixture()
def client(registry_pg: Engine) -> Iterator[FlaskClient]:
    settings = Settings(
        database_url=registry_pg.url.render_as_string(hide_password=False),
        api_token=API_TOKEN,
        replica_token=REPLICA_TOKEN,
        replica_live_seconds=60.0,
        pseudonym_key=os.environ["APA_PSEUDONYM_KEY"],
        audit_key=os.environ["APA_AUDIT_KEY"],
        signing_key=os.environ["APA_SIGNING_KEY"],
    )
    yield create_app(settings, engine=registry_pg).test_client()
    with Session(registry_pg) as session:  # whatever happened, the chain and the erasures hold
        result = audit.verify(session)
        assert result.ok, result.summary()


def _heartbeat(client: FlaskClient, replica_id: str, loaded: dict[str, int], **kwargs: Any) -> Any:
    headers = kwargs.pop("headers", REPLICA)
    response = client.post(
        f"/replicas/{replica_id}/heartbeat",
        headers=headers,
        json={"loaded": loaded, "model_id": kwargs.pop("model_id", MODEL_ID)},
    )
    return response


def _erase(client: FlaskClient, user: str, request_id: str) -> None:
    response = client.post("/erasures", headers=API, json={"user_id": user, "request_id": request_id})
    assert response.status_code == 202, response.json


def _status(client: FlaskClient, request_id: str) -> dict[str, Any]:
    response = client.get(f"/erasures/{request_id}", headers=API)
    assert response.status_code == 200, response.json
    return response.json  # type: ignore[no-any-return]


def _confirmations(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in body["timeline"] if row["event_type"] == "replicas_confirmed"]


def _age_heartbeat(engine: Engine, replica_id: str, seconds: int) -> None:
    """Time passes for one replica: its last heartbeat moves `seconds` into the past."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE replicas SET last_heartbeat = last_heartbeat - make_interval(secs => :s) WHERE id = :id"
            ),
            {"s": seconds, "id": replica_id},
        )


def test_exclusion_is_confirmed_only_after_the_slow_replica_dropped_the_excluded_versions(
    client: FlaskClient, registry_pg: Engine
) -> None:
    assert _heartbeat(client, "replica-a", BOTH_V1).status_code == 200
    assert _heartbeat(client, "replica-b", BOTH_V1).status_code == 200
    _erase(client, "bob", "r-bob")

    body = _status(client, "r-bob")
    assert body["status"] == "excluded"
    assert {s["excluded_version"]["version"] for s in body["shards"]} == {1}
    assert body["replicas"]["state"] == "waiting"
    assert body["replicas"]["live"] == ["replica-a", "replica-b"]
    assert body["replicas"]["pending"] == ["replica-a", "replica-b"]
    assert body["replicas_confirmed_at"] is None and not _confirmations(body)

    # replica-a drops both excluded versions; replica-b (slow) still serves them
    assert _heartbeat(client, "replica-a", {}).status_code == 200
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "waiting" and body["replicas"]["pending"] == ["replica-b"]
    assert body["replicas_confirmed_at"] is None and not _confirmations(body)

    # replica-b moves to the retrained version of shard 0 but still serves version 1 of shard 1
    with session_scope(registry_pg) as session:
        generation = registry.mark_retraining(session, shard_id(0))
        registry.register_adapter_version(
            session,
            shard_id(0),
            make_manifest(0, [s for s in PARTITION[0] if s != "t-b1"], version=2),
            "file:///0/2",
            started_generation=generation,
        )
    assert _heartbeat(client, "replica-b", {shard_id(0): 2, shard_id(1): 1}).status_code == 200
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "waiting" and body["replicas"]["pending"] == ["replica-b"]
    assert body["replicas_confirmed_at"] is None

    # replica-b drops shard 1's excluded version too: now every live replica has dropped them
    assert _heartbeat(client, "replica-b", {shard_id(0): 2}).status_code == 200
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "confirmed", body["replicas"]
    assert body["replicas"]["pending"] == [] and body["replicas"]["unreported"] == []
    assert body["replicas_confirmed_at"] is not None
    [row] = _confirmations(body)  # audited, once
    assert row["payload"]["live_replicas"] == ["replica-a", "replica-b"]
    assert row["payload"]["loaded"] == {"replica-a": {}, "replica-b": {shard_id(0): 2}}

    # later heartbeats and reads do not confirm it again
    assert _heartbeat(client, "replica-a", {}).status_code == 200
    assert len(_confirmations(_status(client, "r-bob"))) == 1
    user = client.get("/users/bob/erasure-status", headers=API).json
    assert (
        user["replicas_state"] == "confirmed"
        and user["replicas_confirmed_at"] == body["replicas_confirmed_at"]
    )


def test_with_no_live_replica_the_exclusion_is_not_confirmed_and_the_status_says_so(
    client: FlaskClient, registry_pg: Engine
) -> None:
    # replica-a heartbeated long ago (holding nothing): it is not live; "other" serves another model
    assert _heartbeat(client, "replica-a", {}).status_code == 200
    _age_heartbeat(registry_pg, "replica-a", 3600)
    assert _heartbeat(client, "other", {"other-model/0": 1}, model_id="other-model").status_code == 200
    _erase(client, "bob", "r-bob")

    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "no_live_replica", body["replicas"]
    assert body["replicas"]["live"] == [] and body["replicas_confirmed_at"] is None
    assert not _confirmations(body)
    user = client.get("/users/bob/erasure-status", headers=API).json
    assert user["replicas_state"] == "no_live_replica" and user["replicas_confirmed_at"] is None
    receipt = client.get("/erasures/r-bob/receipt", headers=API).json
    assert receipt["receipt"]["times"]["replicas_confirmed_at"] is None

    # heartbeats of the other model's replica do not confirm it either
    assert _heartbeat(client, "other", {"other-model/0": 1}, model_id="other-model").status_code == 200
    assert _status(client, "r-bob")["replicas"]["state"] == "no_live_replica"

    # the first live replica of the model that reports without the excluded versions confirms it
    assert _heartbeat(client, "replica-a", {}).status_code == 200
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "confirmed" and body["replicas"]["live"] == ["replica-a"]
    assert len(_confirmations(body)) == 1


def test_a_replica_not_heard_from_since_the_exclusion_blocks_until_it_reports(
    client: FlaskClient, registry_pg: Engine
) -> None:
    assert _heartbeat(client, "replica-a", {}).status_code == 200  # before the erasure
    _erase(client, "bob", "r-bob")
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "waiting"
    assert body["replicas"]["pending"] == [] and body["replicas"]["unreported"] == ["replica-a"]
    assert body["replicas_confirmed_at"] is None
    assert _heartbeat(client, "replica-a", {}).status_code == 200
    assert _status(client, "r-bob")["replicas"]["state"] == "confirmed"


def test_an_expired_replica_stops_blocking_and_stops_counting(
    client: FlaskClient, registry_pg: Engine
) -> None:
    assert _heartbeat(client, "replica-a", BOTH_V1).status_code == 200
    assert _heartbeat(client, "replica-b", BOTH_V1).status_code == 200
    _erase(client, "bob", "r-bob")
    assert _heartbeat(client, "replica-a", {}).status_code == 200
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "waiting" and body["replicas"]["pending"] == ["replica-b"]

    # replica-b dies still holding the excluded versions; once out of the live window it no longer
    # blocks, and the next status read confirms (no heartbeat needed)
    _age_heartbeat(registry_pg, "replica-b", 61)
    user = client.get("/users/bob/erasure-status", headers=API).json  # a read of the user's status
    assert user["replicas_state"] == "confirmed" and user["replicas_confirmed_at"] is not None
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "confirmed", body["replicas"]
    assert body["replicas"]["live"] == ["replica-a"]
    [row] = _confirmations(body)
    assert row["payload"]["live_replicas"] == ["replica-a"]


def test_a_forged_heartbeat_with_the_compliance_token_is_rejected_and_changes_nothing(
    client: FlaskClient, registry_pg: Engine
) -> None:
    assert _heartbeat(client, "replica-a", BOTH_V1).status_code == 200
    _erase(client, "bob", "r-bob")
    before = client.get("/replicas", headers=API).json

    forged = [
        _heartbeat(client, "replica-a", {}, headers=API),  # the compliance token
        _heartbeat(client, "replica-a", {}, headers={}),
        _heartbeat(client, "replica-a", {}, headers={"Authorization": "Bearer wrong"}),
        _heartbeat(client, "replica-a", {}, headers={"Authorization": REPLICA_TOKEN}),  # no scheme
        _heartbeat(client, "replica-a", {}, headers={"Authorization": f"Basic {REPLICA_TOKEN}"}),
        _heartbeat(client, "replica-a", {}, headers={"Authorization": f"Bearer {REPLICA_TOKEN}x"}),
        _heartbeat(client, "ghost", {}, headers=API),
    ]
    assert [r.status_code for r in forged] == [403, 401, 401, 401, 401, 401, 403]
    for response in forged:
        assert response.is_json and response.json["field"] == "Authorization", response.json
    assert "APA_REPLICA_TOKEN" in forged[0].json["error"]

    assert client.get("/replicas", headers=API).json == before  # nothing recorded, no ghost replica
    body = _status(client, "r-bob")
    assert body["replicas"]["state"] == "waiting" and body["replicas"]["pending"] == ["replica-a"]
    assert body["replicas_confirmed_at"] is None and not _confirmations(body)
