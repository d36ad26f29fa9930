"""`apa bench serve`: the inference service measured over HTTP, as a client sees it.

Builds a K-shard model on the chosen backbone (random LoRA adapters: throughput does not depend on
what they learned), imports it into a fresh SQLite registry, starts a tansu Kafka broker and
`apa serve-inference` (gunicorn, one worker) as processes, then with a bounded client of its own
(threads, urllib):

1. `POST /recommend` at each concurrency level: requests/s, p50 and p99 latency;
2. with a client loop running, `erasures` times: an erasure (the erasure service's transaction)
   whose `stale` events are published as the outbox relay would; the time from the publish to the
   first response that no longer lists the shard's old version; then a new version of that shard
   is registered and its `serving` event published; the time until responses list it;
3. failed (non-200) responses during phase 2 (target: 0).

Results: `<out>/serve.json`. Nothing is asserted: timings live here, not in tests.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ID = "bench-serve"
TOKEN = "bench-serve-token"


@dataclass(frozen=True)
class ServeBenchConfig:
    """What `apa bench serve` runs."""

    model: str = "embedded"
    """Backbone: `embedded` (SmolLM2-135M), `tiny`, a model directory."""
    num_shards: int = 4
    """K."""
    candidates: int = 5
    """Candidate items per /recommend."""
    requests: int = 4
    """Requests per client thread at each concurrency level."""
    concurrency: tuple[int, ...] = (1, 8)
    """Client threads of the throughput phase."""
    erasures: int = 2
    """Stale-event / hot-reload rounds (each excludes one shard, then serves a new version of it)."""
    users_per_shard: int = 1
    """Users whose train samples all sit in one shard (so an erasure stales exactly one)."""
    omega: str = "per_candidate"
    """The service's APA_INFERENCE_OMEGA: per_candidate (the paper's) or per_request."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.erasures >= self.num_shards * self.users_per_shard:
            raise ValueError("erasures must be fewer than the users")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _samples(config: ServeBenchConfig) -> tuple[dict[str, list[Any]], list[list[str]]]:
    """TALLRec-shaped samples with interaction ids `<user>:<item>`; user u's train samples in shard u % K."""
    from apa.data import Sample
    from apa.data.tallrec import tallrec_input
    from apa.prompts import MOVIE_INSTRUCTION, answer_text

    rng = random.Random(config.seed)
    titles = {f"m{j}": f"Movie {j} ({1980 + j % 20})" for j in range(60)}
    items = sorted(titles)
    splits: dict[str, list[Sample]] = {"train": [], "valid": [], "test": []}
    shards: list[list[str]] = [[] for _ in range(config.num_shards)]
    users = [f"user{u}" for u in range(config.num_shards * config.users_per_shard)]
    for u, user in enumerate(users):
        for split, count in (("train", 3), ("valid", 1)):
            for i in range(count):
                chosen = rng.sample(items, 11)
                liked = [f'"{titles[x]}"' for x in chosen[:6]]
                disliked = [f'"{titles[x]}"' for x in chosen[6:10]]
                label = rng.randint(0, 1)
                sample = Sample(
                    sample_id=f"{user}:{split}:{i}",
                    user_id=user,
                    split=split,  # type: ignore[arg-type]
                    instruction=MOVIE_INSTRUCTION,
                    input=tallrec_input(liked, disliked, "movie", f'"{titles[chosen[10]]}"'),
                    output=answer_text(label),
                    label=label,
                    interaction_ids=tuple(f"{user}:{x}#{split}{i}" for x in chosen),
                )
                splits[split].append(sample)
                if split == "train":
                    shards[u % config.num_shards].append(sample.sample_id)
    return splits, shards


def _adapter(backbone: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random LoRA weights (B not zero) in peft's state-dict form, and their config."""
    from peft import get_peft_model_state_dict

    from apa.bench import random_adapters
    from apa.training import _json_safe

    model = random_adapters(backbone, 1, seed)
    state = {
        k: v.detach().cpu().clone()
        for k, v in get_peft_model_state_dict(model, adapter_name="shard_0").items()
    }
    return state, _json_safe(model.peft_config["shard_0"].to_dict())


def build(root: Path, config: ServeBenchConfig) -> tuple[Any, Any, Path]:
    """The model directory, bootstrapped into a migrated SQLite registry and an artifact store."""
    from dataclasses import replace

    from apa.artifacts import ArtifactStore
    from apa.backbone import Backbone, BackboneConfig
    from apa.db.bootstrap import bootstrap
    from apa.db.session import make_engine, session_scope, upgrade
    from apa.modeldir import ModelDir, ModelInfo, ShardManifest
    from apa.partition import Partition, PartitionConfig
    from apa.pseudonyms import pseudonymizer_from_settings
    from apa.training import TrainConfig

    backbone = Backbone.load(BackboneConfig(model=config.model))
    pseudonymizer = pseudonymizer_from_settings()
    splits, shards = _samples(config)
    train_config = TrainConfig()
    info = ModelInfo(
        base_model=backbone.model_id,
        base_model_digest=backbone.model_digest,
        backbone_config=replace(backbone.config, model=config.model),
        partition_config=PartitionConfig(strategy="random", num_shards=config.num_shards),
        train_config=train_config,
        num_shards=config.num_shards,
        pseudonym_key_id=pseudonymizer.key_id,
    )
    md = ModelDir.create(
        root / MODEL_ID, info, splits, Partition(shards=shards, centroids=None, config=info.partition_config)
    )
    for k, ids in enumerate(shards):
        weights, adapter_config = _adapter(backbone, config.seed + k)
        manifest = ShardManifest(
            shard_index=k,
            version=1,
            sample_pids=tuple(sorted(pseudonymizer.sample(i) for i in ids)),
            train_config=train_config,
            base_model=info.base_model,
            base_model_digest=info.base_model_digest,
            pseudonym_key_id=info.pseudonym_key_id,
        )
        md.save_shard(manifest, weights, adapter_config)
    engine = make_engine(f"sqlite:///{root / 'registry.db'}")
    upgrade(engine)
    store = ArtifactStore(root / "artifacts")
    with session_scope(engine) as session:
        bootstrap(session, md.root, pseudonymizer, store, model_id=MODEL_ID)
    return engine, backbone, md.root


def _post(url: str, body: dict[str, Any], timeout: float = 600.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local service
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:
        return 0, {"error": str(exc)}


def _throughput(url: str, bodies: list[dict[str, Any]], threads: int, per_thread: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def client(t: int) -> None:
        nonlocal failures
        for i in range(per_thread):
            began = time.perf_counter()
            status, _ = _post(url + "/recommend", bodies[(t * per_thread + i) % len(bodies)])
            with lock:
                latencies.append(time.perf_counter() - began)
                failures += status != 200

    began = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - began
    return {
        "concurrency": threads,
        "requests": len(latencies),
        "failed": failures,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
    }


class _Loop(threading.Thread):
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

    def first(self, after: float, check: Any, timeout: float) -> float | None:
        """Receive time of the first response sent after `after` that satisfies `check`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for sent, received, status, body in list(self.log):
                if sent >= after and status == 200 and check(body):
                    return received
            time.sleep(0.02)
        return None


def run_serve_bench(config: ServeBenchConfig, out: Path, say: Any = print) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns the report, also written to `<out>/serve.json`."""
    import logging

    from sqlalchemy import select

    from apa.artifacts import ArtifactStore
    from apa.db import registry
    from apa.db.models import AdapterVersion, Shard
    from apa.db.session import session_scope
    from apa.events import ErasureRequested, ShardEvent
    from apa.kafka import ensure_topic, make_producer, tansu_command, wait_for_broker
    from apa.modeldir import ShardManifest
    from apa.pseudonyms import pseudonymizer_from_settings
    from apa.retrains import erase
    from apa.settings import Settings
    from apa.stack import apa_argv

    for name in ("kafka", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="apa-bench-serve-"))
    say(f"building a K={config.num_shards} model on {config.model} in {root}")
    engine, backbone, _model_dir = build(root, config)
    kafka_port, port = _free_port(), _free_port()
    bootstrap = f"127.0.0.1:{kafka_port}"
    topic = f"apa.shard-events.{uuid.uuid4().hex[:6]}"
    processes: list[subprocess.Popen[bytes]] = []
    logs = [open(root / "kafka.log", "ab"), open(root / "inference.log", "ab")]  # noqa: SIM115
    report: dict[str, Any] = {"config": asdict(config), "command": " ".join(sys.argv)}
    try:
        processes.append(
            subprocess.Popen(tansu_command(kafka_port), stdout=logs[0], stderr=subprocess.STDOUT)
        )
        wait_for_broker(bootstrap, timeout_s=60)
        ensure_topic(bootstrap, topic, 1)
        env = {
            **os.environ,
            "APA_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
            "APA_ARTIFACT_STORE": str(root / "artifacts"),
            "APA_API_TOKEN": TOKEN,
            "APA_KAFKA_BOOTSTRAP": bootstrap,
            "APA_SHARD_EVENTS_TOPIC": topic,
            "APA_WORKER_MODEL": config.model,
            "APA_MODEL_ID": MODEL_ID,
            "APA_REGISTRY_URL": "http://127.0.0.1:9",  # no registry: heartbeats fail quietly
            "APA_LOG_LEVEL": "WARNING",
            "APA_INFERENCE_OMEGA": config.omega,
        }
        began = time.monotonic()
        processes.append(
            subprocess.Popen(
                apa_argv("serve-inference", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                env=env,
                stdout=logs[1],
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as response:  # noqa: S310
                    if response.status == 200:
                        break
            except OSError:
                pass
            if processes[-1].poll() is not None:
                raise RuntimeError(f"apa serve-inference exited; see {root / 'inference.log'}")
            time.sleep(0.5)
        report["ready_s"] = round(time.monotonic() - began, 1)
        say(f"service ready in {report['ready_s']} s")

        splits, _ = _samples(config)
        items = sorted(
            {
                s.interaction_ids[-1].split(":", 1)[1].split("#", 1)[0]
                for s in splits["train"] + splits["valid"]
            }
        )
        users = sorted({s.user_id for s in splits["train"]})
        rng = random.Random(config.seed)
        bodies = [
            {
                "user_id": users[i % len(users)],
                "candidates": rng.sample(items, min(config.candidates, len(items))),
            }
            for i in range(64)
        ]
        _post(url + "/recommend", bodies[0])  # warm-up
        report["throughput"] = []
        for threads in config.concurrency:
            result = _throughput(url, bodies, threads, config.requests)
            say(f"concurrency {threads}: {result}")
            report["throughput"].append(result)

        settings = Settings.from_env(shard_events_topic=topic, kafka_bootstrap=bootstrap)
        pseudonymizer = pseudonymizer_from_settings(settings)
        store = ArtifactStore(root / "artifacts")
        producer = make_producer(settings)
        loop = _Loop(url, {"user_id": users[-1], "candidates": bodies[0]["candidates"]})
        loop.start()
        rounds = []
        for e in range(config.erasures):
            user = f"user{e}"
            with session_scope(engine) as session:
                versions = {k: v.version for k, v in registry.serving_adapters(session, MODEL_ID).items()}
                outcome = erase(
                    session,
                    ErasureRequested(request_id=f"bench-{e}-{uuid.uuid4().hex[:6]}", user_id=user),
                    pseudonymizer,
                    settings,
                )
            stale = {shard.key: generation for shard, generation in outcome.stale.items()}
            for key, generation in stale.items():
                producer.send(topic, key=key, value=ShardEvent(key, "stale", generation).to_dict()).get(
                    timeout=10
                )
            published = time.monotonic()
            old = {k: versions[k] for k in stale if k in versions}

            def without_old(body: dict[str, Any], old: dict[str, int] = old) -> bool:
                return all(body["adapter_versions"].get(k) != v for k, v in old.items())

            excluded_at = loop.first(published, without_old, 900)
            # a retrained version (random weights standing in for training), promoted and announced
            key = next(iter(stale))
            index = int(key.rsplit("/", 1)[1])
            with session_scope(engine) as session:
                shard = session.get(Shard, key)
                assert shard is not None
                remaining = sorted(s.sample_pid for s in registry.remaining_samples(session, key))
                latest = max(
                    session.scalars(select(AdapterVersion.version).where(AdapterVersion.shard_id == key))
                )
                generation = shard.generation
                previous = ShardManifest.from_json(
                    session.scalars(
                        select(AdapterVersion.manifest).where(AdapterVersion.shard_id == key)
                    ).first()
                )
            manifest = ShardManifest(
                shard_index=index,
                version=latest + 1,
                sample_pids=tuple(remaining),
                train_config=previous.train_config,
                base_model=previous.base_model,
                base_model_digest=previous.base_model_digest,
                pseudonym_key_id=previous.pseudonym_key_id,
            )
            weights, adapter_config = _adapter(backbone, config.seed + 1000 + e)
            artifact, sha = store.put_trained(
                MODEL_ID, index, manifest.version, weights, adapter_config, manifest.to_json()
            )
            with session_scope(engine) as session:
                registry.register_adapter_version(
                    session,
                    key,
                    {**manifest.to_json(), "adapter_sha256": sha},
                    artifact,
                    started_generation=generation,
                )
            producer.send(
                topic, key=key, value=ShardEvent(key, "serving", generation, manifest.version).to_dict()
            ).get(timeout=10)
            ready = time.monotonic()

            def serves_new(body: dict[str, Any], key: str = key, version: int = manifest.version) -> bool:
                return bool(body["adapter_versions"].get(key) == version)

            reloaded_at = loop.first(ready, serves_new, 900)
            late = [
                body
                for sent, _, status, body in loop.log
                if sent > published + 1.0 and status == 200 and not without_old(body)
            ]
            round_ = {
                "stale_shards": sorted(stale),
                "responses_sent_1s_after_the_stale_event_listing_the_old_version": len(late),
                "stale_event_to_first_excluding_response_ms": None
                if excluded_at is None
                else round((excluded_at - published) * 1000, 1),
                "serving_event_to_first_response_with_new_version_ms": None
                if reloaded_at is None
                else round((reloaded_at - ready) * 1000, 1),
            }
            say(f"round {e}: {round_}")
            rounds.append(round_)
        loop.stop.set()
        loop.join(600)
        producer.close()
        report["exclusion_and_reload"] = {
            "rounds": rounds,
            "requests": len(loop.log),
            "failed_requests": sum(status != 200 for _, _, status, _ in loop.log),
            "statuses": sorted({status for _, _, status, _ in loop.log}),
        }
        say(f"exclusion and hot reload: {report['exclusion_and_reload']}")
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs:
            handle.close()
        engine.dispose()
    (out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out / 'serve.json'}")
    return report


__all__ = ["ServeBenchConfig", "build", "run_serve_bench"]
