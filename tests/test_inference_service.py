"""The inference replica and its HTTP API (issue 9), on the tiny model with a SQLite registry; the
exclusion race and the hot reload over real HTTP with a real Kafka-protocol broker (tansu)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from apa.aggregation import AggregatedScorer, WeightConfig
from apa.artifacts import ArtifactStore
from apa.backbone import Backbone, BackboneConfig
from apa.catalogue import latest_history, recommend_prompt
from apa.data import Sample as DataSample
from apa.db import registry
from apa.db.models import AdapterVersion, CatalogueItem, Shard
from apa.db.session import session_scope
from apa.events import ErasureRequested, ShardEvent
from apa.kafka import ensure_topic, make_producer
from apa.lifecycle import ShardRef, retrain_shard, serving_refs
from apa.prompts import request_prefix
from apa.pseudonyms import pseudonymizer_from_settings
from apa.retrains import erase
from apa.serving import Replica, ServingConfig
from apa.settings import Settings
from db_fixtures import migrated_sqlite_template, sqlite_copy  # noqa: F401
from erasure_fixtures import bootstrapped, build_tiny_model, wait_until
from kafka_fixtures import broker_settings, kafka_bootstrap  # noqa: F401
from services.inference.app import create_app

MODEL_ID = "tiny-model"
TOKEN = "inference-test-token"


@pytest.fixture(scope="module")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / MODEL_ID, shards=3)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.load(BackboneConfig(model="tiny", bf16_autocast=False))


@pytest.fixture()
def deployment(
    model_template: Path,
    migrated_sqlite_template: Path,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[Engine, ArtifactStore, Path]]:
    model_dir = Path(shutil.copytree(model_template, tmp_path / MODEL_ID))
    engine = sqlite_copy(migrated_sqlite_template, tmp_path / "registry.db")
    store = ArtifactStore(tmp_path / "artifacts")
    bootstrapped(engine, model_dir, store, pseudonymizer_from_settings(), MODEL_ID)
    yield engine, store, model_dir
    engine.dispose()


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'registry.db'}",
        "artifact_store": str(tmp_path / "artifacts"),
        "api_token": TOKEN,
        "model_id": MODEL_ID,
        "inference_heartbeat_s": 60.0,
        **overrides,
    }
    return Settings.from_env(**values)


def _kafka_settings(tmp_path: Path, bootstrap: str, topic: str) -> Settings:
    kafka = broker_settings(bootstrap)
    return _settings(
        tmp_path,
        kafka_bootstrap=bootstrap,
        shard_events_topic=topic,
        kafka_timeout_s=kafka.kafka_timeout_s,
    )


def _replica(
    engine: Engine, store: ArtifactStore, backbone: Backbone, settings: Settings, **config: Any
) -> Replica:
    serving = ServingConfig(**{"batch_wait_s": 0.002, **config})
    replica = Replica(settings, engine=engine, backbone=backbone, store=store, config=serving)
    replica.start(load_in_background=False)
    return replica


def _valid(engine: Engine) -> list[DataSample]:
    with session_scope(engine) as session:
        return [
            DataSample.from_dict(json.loads(r.text))
            for r in registry.live_samples(session, MODEL_ID, "valid")
        ]


def _users(engine: Engine) -> list[str]:
    return sorted({s.user_id for s in _valid(engine)})


def _erase(engine: Engine, settings: Settings, user: str) -> dict[ShardRef, int]:
    with session_scope(engine) as session:
        outcome = erase(
            session,
            ErasureRequested(request_id=f"r-{uuid.uuid4().hex[:8]}", user_id=user),
            pseudonymizer_from_settings(),
            settings,
        )
    return dict(outcome.stale)


# --- the library and the service agree ---------------------------------------------------------------


def test_replica_serves_exactly_the_registry_versions_and_scores_like_the_library(
    deployment: tuple[Engine, ArtifactStore, Path], backbone: Backbone, tmp_path: Path
) -> None:
    engine, store, _ = deployment
    with session_scope(engine) as session:
        refs = serving_refs(session, MODEL_ID)
        # the registry withdraws shard 1: a scorer opened on the directory would still serve it
        session.execute(update(Shard).where(Shard.id == f"{MODEL_ID}/1").values(state="stale"))
        session.execute(
            update(AdapterVersion).where(AdapterVersion.shard_id == f"{MODEL_ID}/1").values(state="excluded")
        )
    replica = _replica(engine, store, backbone, _settings(tmp_path))
    try:
        assert sorted(replica.scorer.serving) == [0, 2]  # type: ignore[union-attr]
        prompts = [s.prompt for s in _valid(engine)][:5]
        scored = replica.score(prompts)
        assert scored.adapter_versions == {f"{MODEL_ID}/0": refs[0].version, f"{MODEL_ID}/2": refs[2].version}
        assert scored.excluded_shards == [f"{MODEL_ID}/1"]
        library = AggregatedScorer(
            backbone, num_shards=3, source=store, adapters={0: refs[0], 2: refs[2]}, valid=_valid(engine)
        )
        p_lib, omega_lib = library.score(prompts, "decomposition", WeightConfig())
        np.testing.assert_allclose(scored.p_yes, p_lib, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scored.omega, omega_lib, atol=1e-9)
        assert np.all(scored.omega[:, 1] == 0)

        client = create_app(_settings(tmp_path), replica=replica).test_client()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        response = client.post("/score", json={"prompts": prompts}, headers=auth)
        assert response.status_code == 200, response.json
        np.testing.assert_allclose(response.json["p_yes"], p_lib, rtol=1e-5, atol=1e-6)
        assert response.json["adapter_versions"] == scored.adapter_versions
    finally:
        replica.close()


def test_recommend_builds_prompts_from_the_registry_history_and_an_erased_user_is_new(
    deployment: tuple[Engine, ArtifactStore, Path], backbone: Backbone, tmp_path: Path
) -> None:
    engine, store, _ = deployment
    settings = _settings(tmp_path)
    replica = _replica(engine, store, backbone, settings)
    try:
        with session_scope(engine) as session:
            items = dict(session.execute(select(CatalogueItem.item_id, CatalogueItem.title)).all())
        assert items, "apa bootstrap fills the item catalogue"
        user = _users(engine)[0]
        candidates = sorted(items)[:4]
        history = replica.user_history(user)
        assert history and all(h.title for h in history)
        prompts = replica.recommend_prompts(user, candidates)
        assert prompts == [recommend_prompt(history, items[c], replica.instruction) for c in candidates]
        client = create_app(settings, replica=replica).test_client()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        body = client.post("/recommend", json={"user_id": user, "candidates": candidates}, headers=auth).json
        assert sorted(r["item_id"] for r in body["ranked"]) == candidates
        ps = [r["p_yes"] for r in body["ranked"]]
        assert ps == sorted(ps, reverse=True)
        np.testing.assert_allclose(sorted(ps), sorted(replica.score(prompts).p_yes), rtol=1e-5)

        pool_before = {s.user_id for s in replica.scorer.valid_pool}  # type: ignore[union-attr]
        assert user in pool_before
        _erase(engine, settings, user)
        assert replica.user_history(user) == []
        time.sleep(replica.config.registry_max_age_s + 0.1)
        replica.score(prompts[:1])  # this batch checks the registry: erased samples leave the pool
        assert user not in {s.user_id for s in replica.scorer.valid_pool}  # type: ignore[union-attr]
        assert latest_history([], items) == []
        after = replica.recommend_prompts(user, candidates)
        assert all("User Preference: \nUser Unpreference: \n" in p for p in after)
        given = client.post(
            "/recommend",
            json={
                "user_id": user,
                "candidates": candidates,
                "history": [{"item_id": candidates[0], "liked": True}],
            },
            headers=auth,
        )
        assert given.status_code == 200, given.json
    finally:
        replica.close()


# --- bad input -----------------------------------------------------------------------------------------


BAD_RECOMMEND = [
    ({"candidates": ["x"]}, "user_id"),
    ({"user_id": "u", "candidates": []}, "candidates"),
    ({"user_id": "u", "candidates": "abc"}, "candidates"),
    ({"user_id": 5, "candidates": ["a"]}, "user_id"),
    ({"user_id": "u\x00", "candidates": ["a"]}, "user_id"),
    ({"user_id": "u", "candidates": ["no-such-item"]}, "candidates[0]"),
    ({"user_id": "u", "candidates": [["nested"]]}, "candidates[0]"),
    ({"user_id": "u", "candidates": ["a/b"]}, "candidates[0]"),
    ({"user_id": "u", "candidates": ["x"] * 2}, "candidates[1]"),
    ({"user_id": "u", "candidates": [f"i{i}" for i in range(101)]}, "candidates"),
    ({"user_id": "u", "candidates": ["a"], "extra": 1}, "extra"),
    ({"user_id": "u", "candidates": ["a"], "history": [{"item_id": "a"}]}, "history[0].liked"),
    (
        {"user_id": "u", "candidates": ["a"], "history": [{"item_id": "a", "liked": "yes"}]},
        "history[0].liked",
    ),
    ({"user_id": "u", "candidates": ["a"], "history": {"a": True}}, "history"),
]


def test_bad_input_is_a_4xx_naming_the_field_never_a_500(
    deployment: tuple[Engine, ArtifactStore, Path], backbone: Backbone, tmp_path: Path
) -> None:
    engine, store, _ = deployment
    replica = _replica(engine, store, backbone, _settings(tmp_path))
    try:
        client = create_app(_settings(tmp_path), replica=replica).test_client()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with session_scope(engine) as session:
            item = session.scalars(select(CatalogueItem.item_id)).first()
        for body, field in BAD_RECOMMEND:
            body = json.loads(json.dumps(body).replace('"a"', json.dumps(item)))
            response = client.post("/recommend", json=body, headers=auth)
            assert 400 <= response.status_code < 500, (body, response.json)
            assert response.json["field"] == field, (body, response.json)
        raw = [
            (b"[" * 40 + b"]" * 40, "body"),
            (b'{"user_id": "u", "user_id": "v", "candidates": ["a"]}', "user_id"),
            (b'{"prompts": [NaN]}', "body"),
            (b"\xff\xfe", "body"),
            (b'{"user_id": "u\\u0000", "candidates": ["a"]}', "user_id"),
        ]
        for data, field in raw:
            response = client.post(
                "/recommend", data=data, headers={**auth, "Content-Type": "application/json"}
            )
            assert 400 <= response.status_code < 500 and response.json["field"] == field, (
                data,
                response.json,
            )
        assert (
            client.post("/recommend", data="x", headers={**auth, "Content-Type": "text/plain"}).status_code
            == 415
        )
        assert client.post("/recommend", json={"user_id": "u", "candidates": [item]}).status_code == 401
        bad_scores = [
            ({"prompts": []}, "prompts"),
            ({"prompts": [1]}, "prompts[0]"),
            ({"prompts": [" "]}, "prompts[0]"),
        ]
        for body, field in bad_scores:
            response = client.post("/score", json=body, headers=auth)
            assert response.status_code == 400 and response.json["field"] == field
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert client.get(path).status_code == 200
        assert "/recommend" in client.get("/openapi.json").json["paths"]
    finally:
        replica.close()


def test_every_shard_stale_is_a_503_with_a_reason_never_a_stale_adapter(
    deployment: tuple[Engine, ArtifactStore, Path], backbone: Backbone, tmp_path: Path
) -> None:
    engine, store, _ = deployment
    replica = _replica(engine, store, backbone, _settings(tmp_path), registry_max_age_s=0.2)
    try:
        client = create_app(_settings(tmp_path), replica=replica).test_client()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        prompts = [s.prompt for s in _valid(engine)][:2]
        assert client.post("/score", json={"prompts": prompts}, headers=auth).status_code == 200
        with session_scope(engine) as session:  # no event at all: the registry check must see it
            session.execute(update(Shard).values(state="stale", generation=Shard.generation + 1))
            session.execute(update(AdapterVersion).values(state="excluded"))
        time.sleep(0.3)
        response = client.post("/score", json={"prompts": prompts}, headers=auth)
        assert response.status_code == 503
        assert "stale" in response.json["reason"]
        assert replica.loaded_versions() == {}
    finally:
        replica.close()


# --- over HTTP with Kafka: the exclusion race and the hot reload ----------------------------------------


class Server:
    """The app on a real HTTP server (werkzeug, threaded) in this process."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Client(threading.Thread):
    """POST /recommend in a loop; records (sent, received, status, body) of every response."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.log: list[tuple[float, float, int, dict[str, Any]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            status, body = _post(self.url + "/recommend", self.body)
            self.log.append((sent, time.monotonic(), status, body))


@pytest.mark.integration
@pytest.mark.parametrize("omega", ["per_candidate", "per_request"])  # per_request: the shared-prefix path
def test_no_response_lists_an_excluded_version_after_the_stale_event(
    deployment: tuple[Engine, ArtifactStore, Path],
    backbone: Backbone,
    tmp_path: Path,
    kafka_bootstrap: str,  # noqa: F811
    omega: str,
) -> None:
    engine, store, _ = deployment
    topic = f"apa.shard-events.{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_bootstrap, topic, 1)
    settings = _kafka_settings(tmp_path, kafka_bootstrap, topic)
    replica = _replica(engine, store, backbone, settings, omega=omega)
    server = Server(create_app(settings, replica=replica))
    try:
        wait_until(replica.consumer_ready.is_set, 30, "the shard-events consumer")
        user = _users(engine)[0]
        with session_scope(engine) as session:
            candidates = list(session.scalars(select(CatalogueItem.item_id).limit(5)))
        before = replica.loaded_versions()
        client = Client(server.url, {"user_id": user, "candidates": candidates})
        client.start()
        wait_until(lambda: len(client.log) >= 3, 30, "first responses")
        stale = _erase(engine, settings, user)
        committed = time.monotonic()
        assert stale
        producer = make_producer(settings)
        for shard, generation in stale.items():  # what the outbox relay publishes
            event = ShardEvent(shard_id=shard.key, state="stale", generation=generation)
            producer.send(topic, key=shard.key, value=event.to_dict()).get(timeout=10)
        published = time.monotonic()
        producer.close()
        old = {shard.key: before[shard.key] for shard in stale if shard.key in before}
        assert old

        def excluded_after() -> bool:
            return any(sent > published and status == 200 for sent, _, status, _ in client.log[-3:])

        wait_until(excluded_after, 30, "responses after the stale event")
        time.sleep(replica.config.registry_max_age_s + 0.5)
        client.stop.set()
        client.join(60)
        assert all(status == 200 for _, _, status, _ in client.log), [s for *_, s, _ in client.log]
        first_without = None
        for sent, received, _, body in client.log:
            uses_old = any(body["adapter_versions"].get(k) == v for k, v in old.items())
            if sent > committed + replica.config.registry_max_age_s or sent > published + 0.5:
                assert not uses_old, (sent - published, body)
            if not uses_old and first_without is None and received > committed:
                first_without = received
            if not uses_old:
                assert set(old) <= set(body["excluded_shards"])
        assert first_without is not None
        assert replica.events_seen >= len(stale)
        assert set(old) & set(replica.loaded_versions()) == set()
    finally:
        server.close()
        replica.close()


@pytest.mark.integration
def test_hot_reload_under_load_fails_no_request_and_changes_the_cache_keys(
    deployment: tuple[Engine, ArtifactStore, Path],
    backbone: Backbone,
    tmp_path: Path,
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    engine, store, _ = deployment
    topic = f"apa.shard-events.{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_bootstrap, topic, 1)
    settings = _kafka_settings(tmp_path, kafka_bootstrap, topic)
    replica = _replica(engine, store, backbone, settings)
    server = Server(create_app(settings, replica=replica))
    try:
        wait_until(replica.consumer_ready.is_set, 30, "the shard-events consumer")
        user = _users(engine)[-1]
        with session_scope(engine) as session:
            candidates = list(session.scalars(select(CatalogueItem.item_id).limit(5)))
        keys_before = set(replica.cache_keys())
        stale = _erase(engine, settings, _users(engine)[0])
        shard = sorted(stale)[0]
        old_sha = {r.sha256 for k, r in replica.scorer.serving.items() if k == shard.index}  # type: ignore[union-attr]
        client = Client(server.url, {"user_id": user, "candidates": candidates})
        client.start()
        outcome = retrain_shard(
            engine, shard, backbone=backbone, store=store, pseudonymizer=pseudonymizer_from_settings()
        )
        assert outcome.promoted
        producer = make_producer(settings)
        with session_scope(engine) as session:
            generation = session.get(Shard, shard.key).generation  # type: ignore[union-attr]
        event = ShardEvent(shard.key, "serving", generation, outcome.manifest.version)
        producer.send(topic, key=shard.key, value=event.to_dict()).get(timeout=10)
        producer.close()
        wait_until(
            lambda: replica.loaded_versions().get(shard.key) == outcome.manifest.version, 60, "the hot reload"
        )
        n = len(client.log)
        wait_until(lambda: len(client.log) >= n + 3, 30, "responses after the reload")
        client.stop.set()
        client.join(60)
        assert client.log and all(status == 200 for _, _, status, _ in client.log)
        assert any(b["adapter_versions"].get(shard.key) == outcome.manifest.version for *_, b in client.log)
        keys_after = set(replica.cache_keys())
        serving_after = {r.sha256 for r in replica.scorer.serving.values()}  # type: ignore[union-attr]
        assert keys_after == serving_after  # the caches hold exactly the serving adapters' columns
        assert outcome.manifest.adapter_sha256 in keys_after and old_sha <= keys_before
        if old_sha != {outcome.manifest.adapter_sha256}:  # (a retrain can give the very same weights)
            assert not (old_sha & keys_after)
        assert replica.reloads >= 1
    finally:
        server.close()
        replica.close()


# --- the served command -------------------------------------------------------------------------------


class FakeRegistry:
    """Records the heartbeats a replica posts (the registry's side is tested with the registry)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                outer.requests.append((self.path, dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.mark.integration
def test_apa_serve_inference_serves_over_gunicorn_and_heartbeats_with_the_replica_token(
    deployment: tuple[Engine, ArtifactStore, Path], tmp_path: Path
) -> None:
    import urllib.request

    from erasure_fixtures import ServiceProcess
    from kafka_fixtures import free_port

    engine, _, _ = deployment
    port = free_port()
    fake = FakeRegistry()
    liveness = tmp_path / "inference.alive"
    env = {
        "APA_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "APA_ARTIFACT_STORE": str(tmp_path / "artifacts"),
        "APA_API_TOKEN": TOKEN,
        "APA_REPLICA_TOKEN": "replica-secret",
        "APA_REGISTRY_URL": fake.url,
        "APA_REPLICA_ID": "replica-a",
        "APA_WORKER_MODEL": "tiny",
        "APA_LIVENESS_FILE": str(liveness),
        "APA_INFERENCE_HEARTBEAT_S": "1",
    }
    service = ServiceProcess(
        "services.inference", env, tmp_path / "inference.log", "--host", "127.0.0.1", "--port", str(port)
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            assert service.running(), service.tail()
            return False

    try:
        wait_until(ready, 120, "the replica to load")
        with session_scope(engine) as session:
            candidates = list(session.scalars(select(CatalogueItem.item_id).limit(3)))
        status, body = _post(url + "/recommend", {"user_id": _users(engine)[0], "candidates": candidates})
        assert status == 200, body
        assert len(body["ranked"]) == 3 and len(body["adapter_versions"]) == 3
        wait_until(lambda: fake.requests, 30, "a heartbeat")
        path, headers, sent = fake.requests[-1]
        assert path == "/replicas/replica-a/heartbeat"
        assert headers["Authorization"] == "Bearer replica-secret"
        assert sent == {"loaded": body["adapter_versions"], "model_id": MODEL_ID}
        assert liveness.exists()
    finally:
        service.stop()
        fake.close()


@pytest.mark.integration
def test_apa_bench_serve_measures_the_running_service(tmp_path: Path) -> None:
    from apa.bench_serve import ServeBenchConfig, run_serve_bench

    config = ServeBenchConfig(model="tiny", num_shards=3, requests=1, concurrency=(1, 2), erasures=1)
    report = run_serve_bench(config, tmp_path / "out", say=lambda _m: None)
    assert json.loads((tmp_path / "out" / "serve.json").read_text()) == json.loads(json.dumps(report))
    assert [r["concurrency"] for r in report["throughput"]] == [1, 2]
    assert all(r["failed"] == 0 and r["requests_per_s"] > 0 for r in report["throughput"])
    [round_] = report["exclusion_and_reload"]["rounds"]
    assert round_["stale_event_to_first_excluding_response_ms"] is not None
    assert round_["serving_event_to_first_response_with_new_version_ms"] is not None
    assert report["exclusion_and_reload"]["failed_requests"] == 0


def test_per_request_omega_gives_every_candidate_the_omega_of_the_request_prefix(
    deployment: tuple[Engine, ArtifactStore, Path], backbone: Backbone, tmp_path: Path
) -> None:
    engine, store, _ = deployment
    replica = _replica(engine, store, backbone, _settings(tmp_path), omega="per_request")
    try:
        with session_scope(engine) as session:
            candidates = list(session.scalars(select(CatalogueItem.item_id).limit(4)))
        user = _users(engine)[0]
        prompts = replica.recommend_prompts(user, candidates)
        prefix = request_prefix(prompts[0])
        assert prefix.endswith("the target movie") and all(p.startswith(prefix) for p in prompts)
        body = replica.recommend(user, candidates)
        scorer = replica.scorer
        assert scorer is not None
        # the library's answer: ω from the prefix against the pool's prefixes, every full prompt scored
        row = scorer.weights([prefix], WeightConfig(), view="prefix")
        p_lib, _ = scorer.score(prompts, "decomposition", omega=np.repeat(row, len(prompts), axis=0))
        got = {r["item_id"]: r["p_yes"] for r in body["ranked"]}
        np.testing.assert_allclose([got[c] for c in candidates], p_lib, rtol=1e-5, atol=1e-6)
        scored = replica.score(prompts, request=True)
        assert np.allclose(scored.omega, row)
    finally:
        replica.close()
