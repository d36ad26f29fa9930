"""A sharded model directory's life: build it (partition + one adapter per shard), unlearn from it
(retrain exactly the affected shards, crash-safe), evaluate it; and `apa train|unlearn|evaluate`.

Unlearning a model directory (no registry; the services use `apa.lifecycle`) runs in four steps,
each one idempotent, so that an interrupted run is finished by the next one (`apa unlearn --resume`
or the same command again):

1. intent: the erased samples' pseudonyms go into the journal (`erasures.json`, pending) before
   anything else changes;
2. scrub: the erased samples leave every split, the partition and every cache;
3. retrain: every shard whose manifest still names an erased pseudonym (or has no manifest) is
   retrained from scratch with its seed on what remains; a shard left empty loses its adapter;
4. proof: manifests, splits, partition, adapter files and caches hold no erased sample, every
   adapter file matches its manifest's sha256; only then is the journal marked done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from apa.aggregation.caches import cache_sample_ids, prune_caches
from apa.backbone import Backbone, BackboneConfig, native_bf16
from apa.data import Sample, load_splits
from apa.metrics import auc
from apa.modeldir import Journal, ModelDir, ModelInfo, ShardManifest
from apa.partition import Partition, PartitionConfig, StrategyName, partition
from apa.pseudonyms import Pseudonymizer, pseudonymizer_from_settings
from apa.training import Preset, TrainConfig, TrainResult, train_adapter

log = logging.getLogger(__name__)


def shard_manifest(
    shard: int,
    version: int,
    samples: Iterable[Sample],
    config: TrainConfig,
    backbone: Backbone,
    pseudonymizer: Pseudonymizer,
    result: TrainResult | None,
) -> ShardManifest:
    """The manifest of shard `shard`'s adapter trained on `samples` (`result` None: no samples)."""
    return ShardManifest(
        shard_index=shard,
        version=version,
        sample_pids=tuple(pseudonymizer.sample(s.sample_id) for s in samples),
        train_config=config,
        base_model=backbone.model_id,
        base_model_digest=backbone.model_digest,
        pseudonym_key_id=pseudonymizer.key_id,
        metrics=tuple(result.metrics) if result else (),
        best_epoch=result.best_epoch if result else 0,
        train_seconds=round(result.train_seconds, 3) if result else 0.0,
        samples_per_second=round(result.samples_per_second, 3) if result else 0.0,
    )


def train_shard(
    md: ModelDir,
    backbone: Backbone,
    shard: int,
    version: int,
    samples: list[Sample],
    valid: list[Sample],
    config: TrainConfig,
    pseudonymizer: Pseudonymizer,
    *,
    progress: bool = False,
    desc: str | None = None,
) -> ShardManifest:
    """Train shard k's adapter from scratch on `samples` and save it with its manifest (an empty
    shard is saved without an adapter)."""
    if not samples:
        manifest = shard_manifest(shard, version, [], config, backbone, pseudonymizer, None)
        return md.save_shard(manifest, None, None)
    result = train_adapter(backbone, samples, valid, config, progress, desc or f"shard {shard}")
    manifest = shard_manifest(shard, version, samples, config, backbone, pseudonymizer, result)
    return md.save_shard(manifest, result.adapter_state, result.adapter_config)


# -- building -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildReport:
    """What `build_model` measured."""

    model_dir: str
    shard_seconds: list[float]
    shard_sizes: list[int]
    samples_per_second: list[float]


def build_model(
    backbone: Backbone,
    splits: Mapping[str, list[Sample]],
    out: str | Path,
    partition_config: PartitionConfig,
    train_config: TrainConfig,
    *,
    pseudonymizer: Pseudonymizer | None = None,
    progress: bool = True,
    embeddings: np.ndarray | None = None,
) -> BuildReport:
    """Partition the training split and train one adapter per shard into model directory `out`."""
    pseudonymizer = pseudonymizer or pseudonymizer_from_settings()
    train = splits["train"]
    if partition_config.num_shards == 1:  # "Retraining": one shard, nothing to embed or cluster
        partition_config = replace(partition_config, strategy="random")
    if embeddings is None and partition_config.uses_embeddings:
        embeddings = backbone.embed_for_partition([s.prompt for s in train], progress=progress)
    parts = partition(
        [s.sample_id for s in train],
        partition_config,
        embeddings=embeddings,
        user_ids=[s.user_id for s in train],
        labels=[s.label for s in train],
    )
    info = ModelInfo(
        base_model=backbone.model_id,
        base_model_digest=backbone.model_digest,
        backbone_config=backbone.config,
        partition_config=partition_config,
        train_config=train_config,
        num_shards=len(parts.shards),
        pseudonym_key_id=pseudonymizer.key_id,
    )
    md = ModelDir.create(out, info, splits, parts)
    by_id = {s.sample_id: s for s in train}
    seconds, sizes, speeds = [], [], []
    for k, ids in enumerate(parts.shards):
        manifest = train_shard(
            md,
            backbone,
            k,
            1,
            [by_id[i] for i in ids],
            list(splits.get("valid", [])),
            train_config,
            pseudonymizer,
            progress=progress,
            desc=f"shard {k}/{len(parts.shards)}",
        )
        seconds.append(manifest.train_seconds)
        sizes.append(manifest.num_samples)
        speeds.append(manifest.samples_per_second)
    return BuildReport(str(out), seconds, sizes, speeds)


# -- unlearning ---------------------------------------------------------------------------------


class UnlearningError(RuntimeError):
    """Unlearning could not prove that nothing in the model directory still holds an erased sample."""


@dataclass(frozen=True)
class UnlearnReport:
    """What an `unlearn` call did and what it cost."""

    erased_samples: int
    """Samples this call removed from the splits (0 when it only finished an earlier run)."""
    affected_shards: list[int]
    retrain_seconds: float
    estimated_full_retrain_seconds: float
    """An ESTIMATE of retraining everything: the sum of every shard's last training time."""
    versions: dict[int, int] = field(default_factory=dict)
    resumed: bool = False
    """True when an interrupted run was pending and this call finished it."""
    measured_full_retrain_seconds: float | None = None
    """A real K=1 retrain on the remaining training data, when asked for (`--measure-full-retrain`)."""

    @property
    def estimated_speedup(self) -> float:
        return self.estimated_full_retrain_seconds / max(self.retrain_seconds, 1e-9)

    @property
    def measured_speedup(self) -> float | None:
        if self.measured_full_retrain_seconds is None:
            return None
        return self.measured_full_retrain_seconds / max(self.retrain_seconds, 1e-9)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "estimated_speedup": round(self.estimated_speedup, 2),
            "measured_speedup": None if self.measured_speedup is None else round(self.measured_speedup, 2),
        }


def erased_sample_ids(
    samples: Iterable[Sample], user_ids: Iterable[str] = (), interaction_ids: Iterable[str] = ()
) -> set[str]:
    """Every sample of the given users, and every sample holding a given interaction (history or target)."""
    users, inter = set(user_ids), set(interaction_ids)
    return {s.sample_id for s in samples if s.user_id in users or inter.intersection(s.interaction_ids)}


def scrub(md: ModelDir, erased_pids: frozenset[str], pseudonymizer: Pseudonymizer) -> int:
    """Remove every erased sample from the splits, the partition and the caches; returns how many
    samples left the splits. Idempotent."""
    gone = 0
    for name, samples in md.splits().items():
        keep = [s for s in samples if pseudonymizer.sample(s.sample_id) not in erased_pids]
        if len(keep) != len(samples):
            gone += len(samples) - len(keep)
            md.write_split(name, keep)
    parts = md.partition()
    shards = [[i for i in shard if pseudonymizer.sample(i) not in erased_pids] for shard in parts.shards]
    if shards != parts.shards:
        md.write_partition(Partition(shards=shards, centroids=parts.centroids, config=parts.config))
    prune_caches(md.cache_dir(), lambda sid: pseudonymizer.sample(sid) in erased_pids)
    return gone


def erasure_problems(md: ModelDir, erased_pids: frozenset[str], pseudonymizer: Pseudonymizer) -> list[str]:
    """Everything in the model directory that still holds an erased sample or disagrees with its
    manifest: manifests, splits, partition, adapter files, caches, replaced shard directories."""
    problems: list[str] = []
    parts = md.partition()
    for k in range(md.num_shards):
        manifest = md.manifest(k)
        if manifest is None:
            if parts.shards[k]:
                problems.append(f"shard {k} has samples but no manifest (its retrain did not finish)")
            continue
        leaked = erased_pids.intersection(manifest.sample_pids)
        if leaked:
            problems.append(f"shard {k} v{manifest.version}: manifest holds {len(leaked)} erased samples")
        problem = md.verify_adapter_file(manifest)
        if problem:
            problems.append(f"shard {k}: {problem}")
        if {pseudonymizer.sample(i) for i in parts.shards[k]} != set(manifest.sample_pids):
            problems.append(f"shard {k}: manifest and partition name different samples")
    for name, samples in md.splits().items():
        held = [s for s in samples if pseudonymizer.sample(s.sample_id) in erased_pids]
        if held:
            problems.append(f"split {name} still holds {len(held)} erased samples")
    in_partition = [i for shard in parts.shards for i in shard if pseudonymizer.sample(i) in erased_pids]
    if in_partition:
        problems.append(f"partition.json still holds {len(in_partition)} erased samples")
    in_cache = [i for i in cache_sample_ids(md.cache_dir()) if pseudonymizer.sample(i) in erased_pids]
    if in_cache:
        problems.append(f"caches still hold {len(in_cache)} erased samples")
    if md.trash_entries():
        problems.append(f"replaced shard directories were not deleted: {md.trash_entries()[:3]}")
    return problems


def unlearn(
    model_dir: str | Path,
    sample_ids: Iterable[str] = (),
    *,
    pseudonymizer: Pseudonymizer | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
    on_shard: Callable[[int, ShardManifest], None] | None = None,
    measure_full_retrain: bool = False,
) -> UnlearnReport:
    """Erase `sample_ids` from `model_dir` and retrain, from scratch with the same config and seed,
    exactly the shards whose adapters were trained on one of them. Finishes any interrupted
    earlier run first. Raises `UnlearningError` if the final proof finds anything left."""
    pseudonymizer = pseudonymizer or pseudonymizer_from_settings()
    md = ModelDir(model_dir)
    md.check_key(pseudonymizer)
    info = md.info
    journal = md.journal()
    resumed = journal.pending
    new = {pseudonymizer.sample(i) for i in sample_ids} - journal.erased_pids
    erased = frozenset(journal.erased_pids | new)
    if new or not journal.pending:
        md.write_journal(Journal(erased, pending=True))  # 1. the intent, before anything changes
    md.recover()
    found = scrub(md, erased, pseudonymizer)  # 2.
    manifests = md.manifests()
    parts = md.partition()
    affected = [
        k
        for k, m in enumerate(manifests)
        if (m is None and parts.shards[k]) or (m is not None and erased.intersection(m.sample_pids))
    ]
    estimated = float(sum(m.train_seconds for m in manifests if m is not None))
    started = time.perf_counter()
    versions: dict[int, int] = {}
    splits = md.splits()
    if affected:  # 3.
        backbone = backbone or Backbone.load(info.backbone_config)
        by_id = {s.sample_id: s for s in splits["train"]}
        for k in affected:
            old = manifests[k]
            manifest = train_shard(
                md,
                backbone,
                k,
                (old.version if old else 0) + 1,
                [by_id[i] for i in parts.shards[k]],
                splits.get("valid", []),
                old.train_config if old else info.train_config,
                pseudonymizer,
                progress=progress,
                desc=f"retrain shard {k}",
            )
            versions[k] = manifest.version
            if on_shard:
                on_shard(k, manifest)
    retrain_seconds = time.perf_counter() - started
    problems = erasure_problems(md, erased, pseudonymizer)  # 4.
    if problems:
        raise UnlearningError("; ".join(problems))
    md.write_journal(Journal(erased, pending=False))
    measured = None
    if measure_full_retrain and splits["train"]:
        backbone = backbone or Backbone.load(info.backbone_config)
        full = train_adapter(
            backbone,
            splits["train"],
            splits.get("valid", []),
            info.train_config,
            progress,
            "full retrain (K=1)",
        )
        measured = full.train_seconds
    return UnlearnReport(found, affected, retrain_seconds, estimated, versions, resumed, measured)


# -- evaluation ------------------------------------------------------------------------------------


def evaluate_model_dir(
    backbone: Backbone,
    model_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """AUC of the zero-shot base model, of each shard adapter, and (K > 1) of averaging their predictions."""
    from apa.aggregation import AggregatedScorer

    md = ModelDir(model_dir)
    samples = md.splits()[split][:limit] if limit else md.splits()[split]
    prompts = [s.prompt for s in samples]
    labels = [s.label for s in samples]
    report: dict[str, Any] = {"split": split, "num_samples": len(samples)}
    report["zero_shot_auc"] = auc(labels, backbone.score(prompts, progress=progress))
    with AggregatedScorer.from_model_dir(backbone, md) as scorer:
        each = scorer.adapter_predictions(prompts)
        shards = scorer.loaded_shards
    report["shard_auc"] = {k: auc(labels, each[:, k]) for k in shards}
    if len(shards) > 1:
        report["prediction_average_auc"] = auc(labels, np.mean(each[:, shards], axis=1))
    return report


# -- CLI -----------------------------------------------------------------------------------------


def train_command(
    data: str = "data/ml-100k",
    out: str = "runs/model",
    num_shards: int = 1,
    strategy: StrategyName = "semantic",
    preset: Preset = "cpu",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    patience: int | None = None,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    model: str = "embedded",
    bf16: bool | None = None,
    top_layers: int | None = None,
    group_by_length: bool = False,
    evaluate: bool = True,
) -> int:
    """Partition the training split, train one LoRA adapter per shard, print test AUC.

    Args:
        data: Directory with train/valid/test.jsonl (from `apa prepare`).
        out: Model directory to write (adapters, manifests, partition); must not exist yet.
        num_shards: K. 1 is "Retraining" (one adapter on all training data).
        strategy: Partition strategy (semantic is the paper's Algorithm 1; stratified, a variant of it
            with each label spread evenly over the shards).
        preset: `cpu` (lr 5e-4, 3 epochs, batch 8) or `tallrec` (lr 1e-4, 200 epochs, early stopping).
        epochs: Override the preset's maximum epochs.
        lr: Override the preset's learning rate.
        batch_size: Override the preset's batch size.
        patience: Override the preset's early-stopping patience (epochs without a better valid AUC).
        seed: Seed for partition, LoRA init, data order and dropout.
        train_limit: Use only the first N training samples.
        test_limit: Evaluate on the first N test samples only.
        model: Backbone: `embedded`, `tiny` (random, for smoke tests), a model directory, a .gguf file or a hub id.
        bf16: bf16 autocast for training and scoring (default: where the hardware has native bf16;
            emulated CPU bf16 is slower than fp32).
        top_layers: LoRA on the top N layers only (faster, lower quality).
        group_by_length: Batch samples of similar length together (less padding).
        evaluate: Print test AUC when done.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = load_splits(data)
    if train_limit:
        splits["train"] = splits["train"][:train_limit]
    if bf16 is None:
        bf16 = native_bf16()
    backbone = Backbone.load(BackboneConfig(model=model, bf16_autocast=bf16))
    tconf = TrainConfig.preset(
        preset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        micro_batch_size=batch_size,
        patience=patience,
        seed=seed,
        bf16_autocast=bf16,
        top_layers=top_layers,
        group_by_length=group_by_length,
    )
    pconf = PartitionConfig(strategy=strategy, num_shards=num_shards, seed=seed)
    report = build_model(backbone, splits, out, pconf, tconf, progress=True)
    for k, (secs, size, sps) in enumerate(
        zip(report.shard_seconds, report.shard_sizes, report.samples_per_second, strict=True)
    ):
        print(f"shard {k}: {size} samples, {secs:.1f} s, {sps:.2f} samples/s")
    if evaluate:
        _print_eval(evaluate_model_dir(backbone, out, "test", test_limit))
    return 0


def evaluate_command(model_dir: str = "runs/model", split: str = "test", limit: int | None = None) -> int:
    """Print the ROC AUC of a model directory's adapters (and the zero-shot base model) on a split.

    Args:
        model_dir: A directory written by `apa train`.
        split: test or valid.
        limit: Evaluate on the first N samples only.
    """
    md = ModelDir(model_dir)
    backbone = Backbone.load(md.info.backbone_config)
    _print_eval(evaluate_model_dir(backbone, model_dir, split, limit))
    return 0


def unlearn_command(
    model_dir: str,
    user_id: list[str] | None = None,
    interaction_id: list[str] | None = None,
    resume: bool = False,
    measure_full_retrain: bool = False,
) -> int:
    """Erase users or interactions from a model directory and retrain the affected shards.

    An interrupted run is finished by `--resume` or by running the same command again.

    Args:
        model_dir: A directory written by `apa train`.
        user_id: Users whose every sample is erased.
        interaction_id: Interactions whose every sample (history or target) is erased.
        resume: Finish an interrupted unlearning run (also done when users/interactions are given).
        measure_full_retrain: Also time a real K=1 retrain on the remaining data, for the speed-up.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    md = ModelDir(model_dir)
    pseudonymizer = pseudonymizer_from_settings()
    all_samples = [s for samples in md.splits().values() for s in samples]
    ids = erased_sample_ids(all_samples, user_id or [], interaction_id or [])
    journal = md.journal()
    if not ids and not journal.pending and not erasure_problems(md, journal.erased_pids, pseudonymizer):
        if resume:
            print("nothing to resume: no unlearning run is pending and every erasure is complete")
            return 0
        print("no sample matches; nothing to unlearn (every earlier erasure is complete)")
        return 1
    report = unlearn(model_dir, ids, pseudonymizer=pseudonymizer, measure_full_retrain=measure_full_retrain)
    print(json.dumps(report.to_json(), indent=2))
    return 0


def _print_eval(report: dict[str, Any]) -> None:
    print(f"{report['split']} samples: {report['num_samples']}")
    print(f"zero-shot base model AUC: {report['zero_shot_auc']:.4f}")
    for k, value in report["shard_auc"].items():
        print(f"shard {k} adapter AUC: {value:.4f}")
    if "prediction_average_auc" in report:
        print(f"average of shard predictions AUC: {report['prediction_average_auc']:.4f}")


__all__ = [
    "BuildReport",
    "UnlearnReport",
    "UnlearningError",
    "build_model",
    "erased_sample_ids",
    "erasure_problems",
    "evaluate_model_dir",
    "scrub",
    "shard_manifest",
    "train_shard",
    "unlearn",
]
