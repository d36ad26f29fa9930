"""Fuzz the registry API from its own /openapi.json with schemathesis, on Postgres: valid and
invalid inputs for every operation (coverage phase: boundaries, duplicate query parameters,
unexpected methods; fuzzing phase: random positive and negative cases), failing on any 5xx, any
status code the document does not declare, and any response that does not match its schema.

A bounded number of examples per operation keeps it well under a minute on two busy cores;
`APA_FUZZ_EXAMPLES` raises it for a longer run. The tally of cases and statuses is written to
the file named by `APA_FUZZ_REPORT` (JSON) when set.
"""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from flask import Flask
from sqlalchemy import text

from apa.artifacts import ArtifactStore
from apa.db import registry
from apa.db.bootstrap import bootstrap
from apa.db.session import make_engine, session_scope, upgrade
from apa.events import ErasureRequested
from apa.settings import Settings
from db_fixtures import MODEL_ID, PG_SERVER, PSEUDO, _admin_engine, fake_model_template  # noqa: F401
from services.registry.app import create_app

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
REPLICA_TOKEN = "fuzz-replica-token"
EXAMPLES = int(os.environ.get("APA_FUZZ_EXAMPLES", "50"))
TALLY: Counter[str] = Counter()
"""`<METHOD> <path> -> <status>`: every case sent."""


@pytest.fixture(scope="module")
def fuzz_app(fake_model_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """The registry API on a fresh Postgres registry holding the fake model and two erasures."""
    admin = _admin_engine()
    name = f"apa_fuzz_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(f"{PG_SERVER}/{name}")
    try:
        upgrade(engine)
        with session_scope(engine) as session:
            store = ArtifactStore(tmp_path_factory.mktemp("fuzz-store"))
            bootstrap(session, fake_model_template, PSEUDO, store, model_id=MODEL_ID)
            registry.record_erasure(session, ErasureRequested("req-alice", "alice", ["alice:1"]), PSEUDO)
            registry.record_erasure(session, ErasureRequested("req-bob", "bob"), PSEUDO)
        settings = Settings(
            database_url=engine.url.render_as_string(hide_password=False),
            api_token=TOKEN,
            replica_token=REPLICA_TOKEN,
            pseudonym_key=os.environ["APA_PSEUDONYM_KEY"],
            audit_key=os.environ["APA_AUDIT_KEY"],
            signing_key=os.environ["APA_SIGNING_KEY"],
            audit_anchor_file=str(tmp_path_factory.mktemp("anchors") / "anchors.jsonl"),
        )
        yield create_app(settings, engine=engine)  # POST /erasures records into the registry
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        report = os.environ.get("APA_FUZZ_REPORT")
        if report:
            Path(report).write_text(
                json.dumps(
                    {"cases": sum(TALLY.values()), "by_outcome": dict(sorted(TALLY.items()))}, indent=1
                )
            )


@pytest.fixture(scope="module")
def api_schema(fuzz_app: Flask) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": 12,
            "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": False},
            "phases": {
                "examples": {"enabled": False},
                "coverage": {"enabled": True, "unexpected-methods": ["DELETE", "PUT", "PATCH"]},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "checks": {
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
                "response_headers_conformance": {"enabled": True},
                "negative_data_rejection": {"enabled": True},
                "unsupported_method": {"enabled": True},
                "positive_data_acceptance": {"enabled": False},
                "ignored_auth": {"enabled": False},
                "use_after_free": {"enabled": False},
                "ensure_resource_availability": {"enabled": False},
                "missing_required_header": {"enabled": False},
            },
            # each operation with the token of its security scheme: the compliance token, and the
            # replicas' token for heartbeats
            "auth": {"openapi": {"bearer": {"bearer": TOKEN}, "replicaBearer": {"bearer": REPLICA_TOKEN}}},
        }
    )
    return schemathesis.openapi.from_wsgi(
        "/openapi.json", fuzz_app, config=config, headers={"Authorization": f"Bearer {TOKEN}"}
    )


def test_registry_api_answers_every_generated_request_as_its_openapi_document_says(
    api_schema: schemathesis.BaseSchema,
) -> None:
    """schemathesis' own engine (as its CLI runs it; its pytest plugin's lazy loading does not work
    with pytest 9): every case's checks must pass."""
    from schemathesis.engine import Status, events, from_schema

    failures: list[str] = []
    problems: list[str] = []
    for event in from_schema(api_schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                case = recorder.cases[case_id].value
                status = interaction.response.status_code if interaction.response is not None else "none"
                TALLY[f"{case.method} {case.operation.path} -> {status}"] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        case = recorder.cases[case_id].value
                        failure = check.failure_info.failure
                        failures.append(
                            f"{check.name}: {case.method} {case.formatted_path}: {failure.title} {failure.message}"[
                                :600
                            ]
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(str(getattr(event, "value", None) or getattr(event, "exception", event))[:600])
        elif isinstance(event, events.EngineFinished):
            failures.extend(str(f)[:600] for f in event.failures)
    cases = sum(TALLY.values())
    assert not problems, "\n".join(problems)
    assert not failures, f"{len(failures)} failed checks in {cases} cases:\n" + "\n".join(
        sorted(set(failures))[:40]
    )
    assert cases > 100 and not any(key.endswith("-> 500") for key in TALLY)
