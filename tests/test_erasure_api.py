"""The registry API's erasure intake and deadlines: POST /erasures never stalls on a broker that is
down (a quick JSON 503), bad ids are a 400 before any broker is asked, GET /erasure-deadlines and
`apa audit deadlines` list what is overdue or due soon, and without Kafka a posted erasure writes
its retrain tasks to the outbox."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.engine import Engine

from apa.artifacts import ArtifactStore
from apa.cli import main
from apa.db.bootstrap import bootstrap
from apa.db.models import OutboxMessage, RetrainTask
from apa.db.session import session_scope
from apa.events import ErasureRequested
from apa.retrains import erase
from apa.settings import Settings
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PSEUDO,
    fake_model_template,
    migrated_sqlite_template,
    model_dir,
    sqlite_engine,
    store,
)
from kafka_fixtures import free_port
from services.registry.app import BUS_RETRY_S, create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "erasure-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(engine: Engine, **overrides: Any) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        api_token=TOKEN,
        pseudonym_key=os.environ["APA_PSEUDONYM_KEY"],
        audit_key=os.environ["APA_AUDIT_KEY"],
        signing_key=os.environ["APA_SIGNING_KEY"],
        **overrides,
    )


@pytest.fixture()
def loaded(sqlite_engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    with session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    return sqlite_engine


@pytest.fixture()
def down_client(loaded: Engine) -> Iterator[FlaskClient]:
    """The API configured for a Kafka broker that is not running (nothing listens on the port)."""
    settings = _settings(loaded, kafka_bootstrap=f"127.0.0.1:{free_port()}", erasure_publish_timeout_s=1.0)
    yield create_app(settings, engine=loaded).test_client()


def test_post_erasure_with_the_broker_down_is_a_quick_json_503(down_client: FlaskClient) -> None:
    started = time.monotonic()
    first = down_client.post("/erasures", headers=AUTH, json={"user_id": "alice"})
    first_s = time.monotonic() - started
    assert first.status_code == 503 and first.is_json and first.json["error"]
    assert first.headers["Retry-After"] == str(int(BUS_RETRY_S))
    assert first_s < 10, f"the first 503 took {first_s:.1f} s"  # bounded by the 1 s producer timeout
    started = time.monotonic()
    second = down_client.post("/erasures", headers=AUTH, json={"user_id": "bob"})
    assert second.status_code == 503 and time.monotonic() - started < 0.5  # no second wait
    started = time.monotonic()
    assert down_client.get("/healthz").status_code == 200 and time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"user_id": "al\\u0000ice"}', "user_id"),
        ('{"user_id": "al\\ud800ice"}', "user_id"),
        ('{"user_id": "alice", "request_id": "r\\udfff"}', "request_id"),
        ('{"user_id": "alice", "request_id": "r\\u0000"}', "request_id"),
        ('{"user_id": "alice", "interactions": ["alice:1", "x\\u0000"]}', "interactions[1]"),
        ('{"user_id": "alice", "requested_at": "9999-12-31T23:59:59-23:59"}', "requested_at"),
    ],
)
def test_nul_or_lone_surrogate_ids_are_a_400_even_when_the_broker_is_down(
    down_client: FlaskClient, body: str, field: str
) -> None:
    started = time.monotonic()
    response = down_client.post("/erasures", headers={**AUTH, "Content-Type": "application/json"}, data=body)
    assert response.status_code == 400 and response.json["field"] == field
    assert time.monotonic() - started < 0.5  # validated before any broker is asked


def test_without_kafka_a_posted_erasure_queues_its_retrain_tasks_in_the_outbox(loaded: Engine) -> None:
    client = create_app(_settings(loaded), engine=loaded).test_client()
    response = client.post("/erasures", headers=AUTH, json={"user_id": "alice", "request_id": "r-a"})
    assert response.status_code == 202
    with session_scope(loaded) as session:
        rows = list(session.scalars(select(OutboxMessage)))
        assert sorted((r.kind, r.key) for r in rows) == [
            ("event", f"{MODEL_ID}/0"),
            ("event", f"{MODEL_ID}/1"),
            ("task", f"{MODEL_ID}/0"),
            ("task", f"{MODEL_ID}/1"),
        ]
        assert len(list(session.scalars(select(RetrainTask)))) == 2


def _record(engine: Engine, request_id: str, user: str, days_ago: float) -> None:
    requested = (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()
    with session_scope(engine) as session:
        erase(session, ErasureRequested(request_id, user, requested_at=requested), PSEUDO, Settings())


def test_erasure_deadlines_lists_overdue_and_soon_due_requests(loaded: Engine) -> None:
    _record(loaded, "r-late", "alice", 35)
    _record(loaded, "r-soon", "bob", 25)
    _record(loaded, "r-fresh", "carol", 2)
    _record(loaded, "r-nobody", "nobody", 40)  # no data held: completed at once, never overdue
    client = create_app(_settings(loaded), engine=loaded).test_client()
    week = client.get("/erasure-deadlines", headers=AUTH).json
    assert [d["request_id"] for d in week["overdue"]] == ["r-late"]
    assert [d["request_id"] for d in week["due_soon"]] == ["r-soon"]
    assert week["overdue"][0]["days_left"] < 0 and week["overdue"][0]["status"] == "excluded"
    month = client.get("/erasure-deadlines?within_days=30", headers=AUTH).json
    assert [d["request_id"] for d in month["due_soon"]] == ["r-soon", "r-fresh"]
    bad = client.get("/erasure-deadlines?within_days=-1", headers=AUTH)
    assert bad.status_code == 400 and bad.json["field"] == "within_days"
    status = client.get("/erasures/r-late", headers=AUTH).json
    assert status["overdue"] is True and status["due_at"] > status["requested_at"]
    nobody = client.get("/erasures/r-nobody", headers=AUTH).json
    assert nobody["status"] == "completed" and nobody["outcome"] == "no_data_held" and not nobody["overdue"]
    assert client.get("/erasure-deadlines").status_code == 401


def test_apa_audit_deadlines_prints_them_and_fails_when_one_is_overdue(
    loaded: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    url = loaded.url.render_as_string(hide_password=False)
    _record(loaded, "r-soon", "bob", 25)
    assert main(["audit", "deadlines", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "0 overdue, 1 due within 7 days" in out and "r-soon" in out
    assert PSEUDO.user("bob")[:12] in out and "bob" not in out.replace(PSEUDO.user("bob")[:12], "")
    _record(loaded, "r-late", "alice", 33)
    assert main(["audit", "deadlines", "--url", url, "--within-days", "0"]) == 1
    assert "1 overdue" in capsys.readouterr().out
    assert main(["audit", "verify", "--url", url]) == 0  # verify/show still work through the same command
