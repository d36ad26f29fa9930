"""The paper's study (§4): Table 1 and Figures 3-6, written as JSON + PNG (Table 1 also as markdown).

* Table 1: Retraining (K=1), SISA (random partition), GraphEraser (bekm), RecEraser (user), all three
  with prediction averaging, and APA(D) / APA(ND) (semantic partition, adaptive weights; D and ND
  share the same adapters): test AUC, mean sub-model AUC before aggregation, Δ = AUC - Retraining.
* Fig. 3: unlearning time (retraining one shard without an erased user's samples, measured now, vs
  training the K=1 model) and inference time on the test samples at batch 1 and batched.
* Fig. 4: APA(D) with each partition strategy; Fig. 5: each weight strategy; Fig. 6: shard size
  (K ∈ {K/2, K, 2K}, the paper's 512/256/128 of N=1024) vs AUC and unlearning time.

Every stage is content-keyed in the stage store (`apa.stages`, default `APA_RUNS_DIR/store`): the
data, each partition, each adapter (its shard's samples, the validation split, the train config
and seed, the base model), each adapter's predictions on valid and test, the embeddings and every
aggregated pass. Model directories under `OUT/models/` are assembled from the store, so `all`
trains each adapter once, a later figure reuses what an earlier run computed, and a stopped run
resumes where it stopped (`--resume`, or the same command again). `analysis` (issue 11: Table 1
with paired bootstrap CIs and diagnostics, `apa.study_analysis`) and `mia` (membership inference
through the serving path, `apa.mia`) build on the same stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from apa.aggregation import (
    AggregatedScorer,
    Level,
    WeightConfig,
    embedding_key,
    prediction_key,
    write_valid_embeddings,
    write_valid_predictions,
)
from apa.atomic import replace_text
from apa.backbone import PARTITION_BF16, Backbone, BackboneConfig, progress_bar
from apa.data import DataConfig, Sample, load_splits, prepare, sample_splits
from apa.data.pipeline import Dataset
from apa.data.samples import sample_digest
from apa.metrics import auc
from apa.modeldir import ModelDir, ModelDirError, ModelInfo, ShardManifest
from apa.partition import Partition, StrategyName
from apa.pseudonyms import Pseudonymizer
from apa.settings import Settings
from apa.stages import (
    AdapterStage,
    MissingStageError,
    StageStore,
    adapter_key,
    adapter_stage,
    adopt_model_dir,
    assembled,
    data_stage,
    embeddings_key,
    exclusive,
    partition_config,
    partition_key,
    partition_stage,
    prediction_stage,
    predictions_key,
    run_free_first,
    split_embeddings,
    stage_seconds,
)
from apa.training import TrainConfig, train_adapter

log = logging.getLogger(__name__)

Preset = Literal["quick", "cpu", "paper"]
What = Literal[
    "table1",
    "fig3",
    "fig4",
    "fig5",
    "fig6",
    "all",
    "stages",
    "analysis",
    "training",
    "mia",
    "embedding",
    "plan",
    "partitions",
]
FIGURES: tuple[str, ...] = ("table1", "fig3", "fig4", "fig5", "fig6")

PRESETS: dict[str, dict[str, Any]] = {
    # quick: 2 CPU cores, embedded SmolLM2-135M, < 30 min (budget in `quick_budget`)
    "quick": {"train_size": 96, "valid_size": 32, "test_size": 64, "num_shards": 4, "epochs": 1},
    # cpu: a reduced study that converges on 2 CPU cores in a few hours (patience 2, up to 10 epochs)
    "cpu": {"train_size": 256, "valid_size": 250, "test_size": 500, "num_shards": 4, "epochs": 10},
    # paper: §4.1 sizes, shard size 256 -> K = 4, TALLRec training settings (a GPU)
    "paper": {"train_size": 1024, "valid_size": 500, "test_size": 1000, "num_shards": 4, "epochs": None},
}
ApaPartition = Literal["semantic", "stratified"]
"""What APA's partition may be: the paper's Algorithm 1, or its label-stratified variant."""
APA_PARTITIONS: tuple[str, ...] = get_args(ApaPartition)
TIMING_SAMPLES = {"quick": 8, "cpu": 50, "paper": 500}
"""Test samples timed one at a time for Fig. 3 (the paper: 500 random test samples)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a study run depends on (recorded in results.json)."""

    preset: str
    dataset: str
    train_size: int
    valid_size: int
    test_size: int
    num_shards: int
    """K of Table 1 and Fig. 3-5."""
    shard_counts: tuple[int, ...]
    """The K values of Fig. 6."""
    train: TrainConfig
    weights: WeightConfig
    """APA's adaptive weights: τ = 1000, n = 20 (movie) / 100 (book) as in §4.1.4, n capped for small pools."""
    timing_samples: int
    seed: int
    retrain_epochs: int | None = None
    """Epoch cap of the K=1 Retraining adapter when it differs from the shards' (None: the same)."""
    retrain_lr: float | None = None
    """Learning rate of the K=1 Retraining adapter when it differs from the shards' (None: the same)."""
    apa_partition: StrategyName = "semantic"
    """APA's partition: `semantic` (the paper's Algorithm 1) or a variant such as `stratified`."""

    def train_for(self, k: int) -> TrainConfig:
        """The train config of a K-shard model's adapters."""
        train = self.train
        if k == 1 and self.retrain_epochs is not None:
            train = replace(train, epochs=self.retrain_epochs)
        if k == 1 and self.retrain_lr is not None:
            train = replace(train, lr=self.retrain_lr)
        return train

    @classmethod
    def from_preset(
        cls,
        preset: Preset,
        dataset: str = "ml-100k",
        *,
        num_shards: int | None = None,
        train_size: int | None = None,
        valid_size: int | None = None,
        test_size: int | None = None,
        epochs: int | None = None,
        seed: int = 0,
        patience: int | None = None,
        retrain_epochs: int | None = None,
        lr: float | None = None,
        retrain_lr: float | None = None,
        early_stopping: bool = True,
        apa_partition: ApaPartition = "semantic",
        bf16: bool | None = None,
    ) -> ExperimentConfig:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        base = PRESETS[preset]
        n = train_size if train_size is not None else base["train_size"]
        nv = valid_size if valid_size is not None else base["valid_size"]
        nt = test_size if test_size is not None else base["test_size"]
        k = num_shards if num_shards is not None else base["num_shards"]
        for name, value in (("train_size", n), ("valid_size", nv), ("test_size", nt), ("num_shards", k)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if k < 2 or k > n:
            raise ValueError(f"num_shards must be in [2, train_size={n}], got {k}")
        if apa_partition not in APA_PARTITIONS:
            raise ValueError(f"apa_partition must be one of {list(APA_PARTITIONS)}, got {apa_partition!r}")
        e = epochs if epochs is not None else base["epochs"]
        if preset == "quick":
            # one epoch has nothing to early-stop on: skip validation scoring during training
            train = TrainConfig.preset(
                "cpu", epochs=e, seed=seed, valid_eval_size=0 if e == 1 else 200, patience=patience
            )
        elif preset == "cpu":
            train = TrainConfig.preset(
                "cpu", epochs=e, seed=seed, patience=2 if patience is None else patience
            )
        else:
            train = TrainConfig.preset("tallrec", epochs=e, seed=seed)
        if lr is not None:
            train = replace(train, lr=lr)
        if not early_stopping:
            # no validation scoring: every adapter trains all its epochs and keeps the last one
            train = replace(train, valid_eval_size=0)
        if bf16 is not None:  # part of every adapter's stage key (`TrainConfig.to_json`)
            train = replace(train, bf16_autocast=bf16)
        top_n = 100 if dataset == "bookcrossing" else 20
        if preset == "quick":
            top_n = min(top_n, max(1, nv // 4))
        counts = tuple(sorted({c for c in (max(2, k // 2), k, 2 * k) if c <= n}))
        return cls(
            preset=preset,
            dataset=dataset,
            train_size=n,
            valid_size=nv,
            test_size=nt,
            num_shards=k,
            shard_counts=counts,
            train=train,
            weights=WeightConfig(strategy="adaptive", tau=1000.0, top_n=top_n),
            timing_samples=min(TIMING_SAMPLES[preset], nt),
            seed=seed,
            retrain_epochs=retrain_epochs,
            retrain_lr=retrain_lr,
            apa_partition=apa_partition,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["train"] = self.train.to_json()
        data["shard_counts"] = list(self.shard_counts)
        return data


def quick_budget(
    config: ExperimentConfig, score_per_s: float = 3.5, train_per_s: float = 1.1
) -> dict[str, float]:
    """Estimated seconds of a full `all` run (prompts scored, samples trained) at the given speeds;
    the defaults are the embedded model's measured speeds on 2 CPU cores with bf16 autocast."""
    n, nv, nt, k = config.train_size, config.valid_size, config.test_size, config.num_shards
    epochs = config.train.epochs
    extra = [c for c in config.shard_counts if c != k]
    trained = n * (1 + 4 + len(extra)) + n / k  # K=1, four K-shard partitions, Fig. 6, Fig. 3 retrain
    adapters = 4 * k + sum(extra)  # validation predictions for adaptive weights
    passes = 1 + 4 * k + 2 + 3 + 3 + len(extra)  # test passes: Table 1, Fig. 4, Fig. 5, Fig. 6
    scored = n + nv + nt + adapters * nv + passes * nt
    timed = config.timing_samples * (1 + k + 4) * 1.5  # batch 1 is ~1.5x slower per prompt
    estimate = {
        "train_seconds": trained * epochs / train_per_s,
        "score_seconds": (scored + timed) / score_per_s,
    }
    estimate["total_seconds"] = estimate["train_seconds"] + estimate["score_seconds"]
    return estimate


@dataclass(frozen=True)
class Method:
    """One column of Table 1."""

    name: str
    strategy: StrategyName
    num_shards: int
    level: Literal["single", "prediction", "decomposition", "non_decomposition"]


STAGE_FIGURES: tuple[str, ...] = ("analysis", "table1", "fig4", "fig5", "fig6", "training")
"""What `--what stages --stages_for ...` can build the adapters of (Fig. 3 uses Table 1's;
`training`: the analysis's adapters without their predictions, all `apa experiment training` reads)."""


def stages_score(figures: Sequence[str]) -> bool:
    """Whether the stages of `figures` include the adapters' predictions (only `training` needs none)."""
    return any(f != "training" for f in figures)


def stage_models(
    config: ExperimentConfig, figures: Sequence[str] = ("analysis",)
) -> list[tuple[StrategyName, int]]:
    """The (partition strategy, K) shard sets whose adapters `figures` need, in the issue's order:
    Retraining, APA's K shards (`apa_partition`: semantic, or a variant, then Fig. 4's semantic),
    SISA's random ones, GraphEraser's (bekm), RecEraser's (user), then Fig. 6's other K (APA's
    partition). An unknown figure is a ValueError naming the field."""
    unknown = [f for f in figures if f not in STAGE_FIGURES]
    if unknown:
        raise ValueError(f"stages_for: unknown figure {unknown}; expected some of {list(STAGE_FIGURES)}")
    k, apa = config.num_shards, config.apa_partition
    Model = tuple[StrategyName, int]
    retraining: Model = ("random", 1)
    shards: Model = (apa, k)
    baselines: list[Model] = [("random", k), ("bekm", k), ("user", k)]
    others: list[Model] = [(apa, c) for c in config.shard_counts if c != k]
    # Fig. 4 compares the paper's semantic partition, also when APA runs on a variant
    paper: list[Model] = [("semantic", k)] if apa != "semantic" else []
    order: list[Model] = [retraining, shards, *paper, *baselines, *others]
    need_by: dict[str, set[Model]] = {
        "analysis": {retraining, shards},
        "table1": {retraining, shards, *baselines},
        "fig4": {("semantic", k), *baselines},
        "fig5": {shards},
        "fig6": {retraining, shards, *others},
        "training": {retraining, shards},
    }
    need: set[Model] = set().union(*(need_by[f] for f in figures))
    return [model for model in order if model in need]


def plan_line(plan: dict[str, Any]) -> str:
    """`Study.plan` in one line: stages done of all, and the time left at the rates it assumed."""
    left = plan["seconds_left"] / 60
    return (
        f"plan: {plan['done']} of {plan['stages']} stages done; about "
        f"{f'{left / 60:.1f} h' if left >= 120 else f'{left:.0f} min'} left at {plan['rates']}"
        + ("; every adapter counted at its epoch cap (early stopping ends sooner)" if plan["capped"] else "")
    )


def table1_methods(k: int, apa: StrategyName = "semantic") -> list[Method]:
    """Table 1's columns; `apa` is APA's partition (the paper's `semantic`, or a variant)."""
    return [
        Method("Retraining", "random", 1, "single"),
        Method("SISA", "random", k, "prediction"),
        Method("GraphEraser", "bekm", k, "prediction"),
        Method("RecEraser", "user", k, "prediction"),
        Method("APA(D)", apa, k, "decomposition"),
        Method("APA(ND)", apa, k, "non_decomposition"),
    ]


# ------------------------------------------------------------------------------------------------
# small helpers


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON (NaN/inf as null, numpy as Python), written by `apa.atomic.replace_text`."""
    replace_text(path, json.dumps(_clean(data), indent=2, sort_keys=False))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_info(backbone: Backbone) -> dict[str, Any]:
    device = next(backbone.model.parameters()).device
    return {
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "bf16_autocast": backbone.config.bf16_autocast,
    }


def load_data(data: str, dataset: Dataset, sizes: dict[str, int], seed: int) -> dict[str, list[Sample]]:
    """`data/{train,valid,test}.jsonl` (from `apa prepare`), or else raw data of `dataset` prepared
    on the fly (ml-100k without files: recbole's copy); then `sizes` drawn under `seed`."""
    root = Path(data)
    if (root / "train.jsonl").is_file():
        splits: dict[str, list[Sample]] = load_splits(root)
    else:
        path = str(root) if root.exists() else None
        log.info("%s holds no train.jsonl: preparing %s from %s", root, dataset, path or "recbole's copy")
        config = DataConfig(
            dataset=dataset,
            path=path,
            seed=seed,
            train_size=sizes["train"],
            valid_size=sizes["valid"],
            test_size=sizes["test"],
        )
        splits = {str(k): v for k, v in prepare(config).items()}
    drawn = sample_splits(splits, sizes, seed)  # type: ignore[arg-type]
    return {str(k): v for k, v in drawn.items()}


def study_splits(
    store: StageStore, data: str, dataset: Dataset, sizes: dict[str, int], seed: int
) -> dict[str, list[Sample]]:
    """The study's splits (`load_data`) through the store's `data` stage: drawn once, then read."""
    return data_stage(
        store, data, {**sizes, "dataset": dataset}, seed, lambda: load_data(data, dataset, sizes, seed)
    )


# ------------------------------------------------------------------------------------------------
# the study


class Study:
    """Builds (or re-uses) every stage in the content-keyed store and computes each table/figure into `out`."""

    def __init__(
        self,
        backbone: Backbone,
        splits: dict[str, list[Sample]],
        config: ExperimentConfig,
        out: str | Path,
        progress: bool = True,
        store: StageStore | None = None,
        train: bool = True,
    ) -> None:
        self.backbone = backbone
        self.splits = splits
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.store = store or StageStore(self.out / "store", progress=progress)
        self.allow_training = train
        """False: adapters missing from the store raise `MissingStageError` instead of being trained."""
        self.test = splits["test"]
        self.labels = np.array([s.label for s in self.test])
        self.prompts = [s.prompt for s in self.test]
        self.digests = {name: sample_digest(s.sample_id for s in samples) for name, samples in splits.items()}
        # the study's own key: its model directories never leave the run directory
        self.pseudonymizer = Pseudonymizer(b"apa-experiments-pseudonym-key-v1", source="experiments")
        self.built: dict[str, dict[str, Any]] = {}

    # -- stages: embeddings, partitions, adapters, predictions -------------------------------------

    def embeddings(self, split: str, bf16: bool | None = None) -> np.ndarray:
        """Base-model embeddings of a split (stage `embeddings`); `bf16` overrides the configured
        autocast (the partition's embeddings are fp32, as `Backbone.embed_for_partition`'s)."""
        return split_embeddings(self.store, self.backbone, self.splits[split], split, self.progress, bf16)

    def partition(self, strategy: StrategyName, k: int) -> Partition:
        """The partition of the training split for (strategy, K) (stage `partition`)."""
        config = partition_config(strategy, k, self.config.seed)
        train = self.splits["train"]
        embeddings = None
        built = self.store.done("partition", partition_key(self.backbone, train, config))
        if config.uses_embeddings and not built:
            # only a partition still to build needs the embeddings: one in the store (or adopted from
            # a model directory) is read back without embedding the training split again
            if not self.allow_training:
                raise MissingStageError(f"the {strategy} K={k} partition is not in the store yet")
            embeddings = self.embeddings("train", bf16=PARTITION_BF16)
        return partition_stage(self.store, self.backbone, train, config, embeddings)

    def adapter(self, samples: list[Sample], train_config: TrainConfig, label: str) -> AdapterStage:
        """One shard's adapter, keyed by its samples, the validation split, the config and seed."""
        return adapter_stage(
            self.store,
            self.backbone,
            samples,
            self.splits["valid"],
            train_config,
            label,
            self.progress,
            train=self.allow_training,
        )

    def predictions(self, adapter: AdapterStage | None, split: str) -> np.ndarray:
        """P(Yes) of one adapter (None: the zero-shot base model) on a split (stage `predictions`)."""
        return prediction_stage(self.store, self.backbone, adapter, self.splits[split], split, self.progress)

    def stages(self, only: str = "both", figures: Sequence[str] = ("analysis",)) -> dict[str, Any]:
        """Every adapter stage `figures` need (default: the analysis's Retraining and semantic K
        shards; `stage_models` gives the order), each adapter's predictions right after it; adapters
        not in the store and not trainable (`--train false`) are reported as pending. A shard that
        another process is training is skipped and taken up again at the end, so two processes
        sharing the store train different shards side by side. `only`: retraining keeps the K=1
        model, shards every other one."""
        done: dict[str, list[int]] = {}
        pending: dict[str, list[int]] = {}
        models = stage_models(self.config, figures)
        models = {
            "both": models,
            "retraining": [m for m in models if m[1] == 1],
            "shards": [m for m in models if m[1] > 1],
        }[only]
        shard_jobs: dict[tuple[str, int], Callable[[], bool]] = {}
        scoring = stages_score(figures)
        for strategy, k in models:
            name = self.dir_name(strategy, k)
            try:
                parts = self.partition(strategy, k)  # type: ignore[arg-type]
            except MissingStageError:
                pending[name] = list(range(k))
                continue
            by_id = {s.sample_id: s for s in self.splits["train"]}
            done[name], pending[name] = [], []
            for j, ids in enumerate(parts.shards):
                samples, config = [by_id[i] for i in ids], self.config.train_for(k)
                shard_jobs[(name, j)] = partial(
                    self._shard_stages,
                    samples,
                    config,
                    f"{name} shard {j}",
                    self.scored_splits(k) if scoring else (),
                )
        jobs: dict[str, Callable[[], Any]] = {
            f"{name} shard {j}": job for (name, j), job in shard_jobs.items()
        }
        if only != "retraining" and scoring:  # two processes may share the store: one of them embeds
            for split in ("valid", "test"):
                jobs[f"embeddings {split}"] = partial(self.embeddings, split)
                jobs[f"zero-shot {split}"] = partial(self.predictions, None, split)

        shown = self.plan(figures)["done"]

        def reporting(job: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:  # the whole plan again after each job that finished stages
                nonlocal shown
                value = job()
                plan = self.plan(figures)
                if plan["done"] != shown:
                    shown = plan["done"]
                    print(plan_line(plan), flush=True)
                return value

            return run

        trained = run_free_first(self.store, {name: reporting(job) for name, job in jobs.items()})
        for name, j in shard_jobs:  # in shard order, whichever order they ran in
            (done if trained[f"{name} shard {j}"] else pending)[name].append(j)
        result = {"adapters_done": done, "adapters_pending": pending}
        print(json.dumps(result))
        return result

    def scored_splits(self, k: int) -> tuple[str, ...]:
        """The splits a K-shard set's adapters are scored on as stages: valid (APA's ω) and test
        (their own AUC, SISA's average, the analysis). Fig. 6's other K serve only APA(D), which
        scores the test samples once through the merged adapter, so they get no per-adapter test pass."""
        return ("valid", "test") if k in (1, self.config.num_shards) else ("valid",)

    def _shard_stages(
        self,
        samples: list[Sample],
        config: TrainConfig,
        label: str,
        splits: Sequence[str] = ("valid", "test"),
    ) -> bool:
        """A shard's adapter and its predictions on `splits`; False when the adapter is not in the
        store and may not be trained (`--train false`)."""
        try:
            adapter = self.adapter(samples, config, label)
        except MissingStageError:
            return False
        for split in splits:
            self.predictions(adapter, split)
        return True

    def plan(self, figures: Sequence[str] = ("analysis",)) -> dict[str, Any]:
        """How many of `stages(figures=...)`'s stages are done, and an estimate of the time the rest
        takes at this machine's speeds (`apa.study_rates`): samples trained (epoch cap x shard) and
        prompts scored, the validation scoring of each training epoch included."""
        from apa.study_rates import study_rates

        rates = study_rates(
            self.store.root,
            self.backbone.config.bf16_autocast,
            fp32_embedding=embedding_key(self.backbone, PARTITION_BF16),
        )
        total = finished = 0
        seconds = 0.0
        valid, test = self.splits["valid"], self.splits["test"]

        left: dict[str, int] = {}

        def count(kind: str, key: dict[str, Any], cost: float) -> bool:
            nonlocal total, finished, seconds
            total += 1
            if self.store.done(kind, key):
                finished += 1
                return True
            seconds += cost
            left[kind] = left.get(kind, 0) + 1
            return False

        def unknown(kind: str, n: int, cost: float) -> None:  # stages behind an unfinished one
            nonlocal total, seconds
            total += n
            seconds += cost
            if n:
                left[kind] = left.get(kind, 0) + n

        capped = False  # an adapter left to train may stop before its cap (the time is a bound)

        def stops_early(config: TrainConfig) -> bool:
            return config.valid_eval_size != 0 and config.epochs > 1 and len(valid) > 0

        def train_cost(n: int, config: TrainConfig) -> float:
            eval_size = (
                len(valid) if config.valid_eval_size is None else min(len(valid), config.valid_eval_size)
            )
            return config.epochs * (n / rates.train_per_s + eval_size / rates.score_per_s)

        scoring = stages_score(figures)
        for samples in (valid, test) if scoring else ():
            count("embeddings", embeddings_key(self.backbone, samples), len(samples) / rates.score_per_s)
            count(
                "predictions", predictions_key(self.backbone, None, samples), len(samples) / rates.score_per_s
            )
        by_id = {s.sample_id: s for s in self.splits["train"]}
        # the training split's fp32 embeddings: one stage for every partition that clusters them, needed
        # only while one of those is still to build (`Study.partition`), counted once done
        embedded = False
        ekey = embeddings_key(self.backbone, self.splits["train"], PARTITION_BF16)
        for strategy, k in stage_models(self.config, figures):
            pconfig = partition_config(strategy, k, self.config.seed)
            pkey = partition_key(self.backbone, self.splits["train"], pconfig)
            scored = [self.splits[split] for split in self.scored_splits(k)] if scoring else []
            train_config = self.config.train_for(k)
            needed = not self.store.done("partition", pkey) or self.store.done("embeddings", ekey)
            if pconfig.uses_embeddings and needed and not embedded:
                embedded = True
                count("embeddings", ekey, len(by_id) / rates.partition_per_s)
            if not count("partition", pkey, 0.0):  # clustering: seconds beside the embedding
                capped = capped or stops_early(train_config)
                unknown("adapter", k, k * train_cost(math.ceil(len(by_id) / k), train_config))
                unknown("predictions", k * len(scored), k * sum(map(len, scored)) / rates.score_per_s)
                continue
            parts = Partition.from_json(
                json.loads((self.store.path("partition", pkey) / "partition.json").read_text())
            )
            for ids in parts.shards:
                samples = [by_id[i] for i in ids]
                key = adapter_key(self.backbone, samples, valid, train_config)
                if count("adapter", key, train_cost(len(samples), train_config)):
                    adapter = AdapterStage.from_dir(self.store.path("adapter", key))
                    for split in scored:
                        cost = len(split) / rates.score_per_s
                        count("predictions", predictions_key(self.backbone, adapter, split), cost)
                else:
                    capped = capped or stops_early(train_config)
                    unknown("predictions", len(scored), sum(map(len, scored)) / rates.score_per_s)
        return {
            "stages": total,
            "done": finished,
            "seconds_left": seconds,
            "rates": rates.describe(),
            "score_per_s": rates.score_per_s,
            "capped": capped,
            "left": left,  # stages still to run, by kind
        }

    # -- model directories ------------------------------------------------------------------------

    def dir_name(self, strategy: str, k: int) -> str:
        label = "retraining" if k == 1 else strategy
        return f"{label}-K{k}-N{len(self.splits['train'])}-s{self.config.seed}"

    def adapters(self, strategy: StrategyName, k: int) -> list[AdapterStage]:
        """The K adapters of (strategy, K): from the store, or trained now (one stage each)."""
        parts = self.partition(strategy, k)
        by_id = {s.sample_id: s for s in self.splits["train"]}
        train_config = self.config.train_for(k)
        return [
            self.adapter([by_id[i] for i in ids], train_config, f"{self.dir_name(strategy, k)} shard {j}")
            for j, ids in enumerate(parts.shards)
        ]

    def model_dir(self, strategy: StrategyName, k: int) -> ModelDir:
        """The shard set for (strategy, K) as a model directory, assembled from the store's stages
        (only adapters missing from the store are trained)."""
        name = self.dir_name(strategy, k)
        root = self.out / "models" / name
        adapters = self.adapters(strategy, k)
        parts = self.partition(strategy, k)
        pconfig = partition_config(strategy, k, self.config.seed)
        # two processes (say, table1 and fig4) may assemble the same directory: one at a time
        with exclusive(self.out / ".locks" / f"{name}.lock", f"model directory {name}"):
            if not assembled(root, adapters, parts):
                shutil.rmtree(root, ignore_errors=True)
                info = ModelInfo(
                    base_model=self.backbone.model_id,
                    base_model_digest=self.backbone.model_digest,
                    backbone_config=self.backbone.config,
                    partition_config=pconfig,
                    train_config=self.config.train_for(k),
                    num_shards=k,
                    pseudonym_key_id=self.pseudonymizer.key_id,
                )
                md = ModelDir.create(root, info, self.splits, parts)
                for j, adapter in enumerate(adapters):
                    adapter.save_into(md, j, self.backbone, self.pseudonymizer)
            md = ModelDir(root)
            self.seed_caches(md, adapters)
        manifests = self.manifests(md)
        self.built[name] = {
            "strategy": strategy if k > 1 else "all-data",
            "num_shards": k,
            "shard_sizes": [m.num_samples for m in manifests],
            "shard_train_seconds": [m.train_seconds for m in manifests],
            "best_epochs": [m.best_epoch for m in manifests],
        }
        return md

    def seed_caches(self, md: ModelDir, adapters: Sequence[AdapterStage]) -> None:
        """Put the store's validation predictions and embeddings into the model directory's caches,
        so that serving it (adaptive weights) scores nothing twice."""
        valid = self.splits["valid"]
        ids = [s.sample_id for s in valid]
        for adapter in adapters:
            column = self.predictions(adapter, "valid")
            predictions = {i: float(p) for i, p in zip(ids, column, strict=True)}
            write_valid_predictions(
                md.cache_dir(), adapter.sha256, prediction_key(self.backbone), predictions
            )
        emb = self.embeddings("valid")
        write_valid_embeddings(md.cache_dir(), embedding_key(self.backbone), dict(zip(ids, emb, strict=True)))

    @staticmethod
    def manifests(md: ModelDir) -> list[ShardManifest]:
        """Every shard's manifest (a study's model directory is complete: each shard has one)."""
        out = md.manifests()
        missing = [k for k, m in enumerate(out) if m is None]
        if missing:
            raise ModelDirError(f"{md.root}: shards {missing} have no manifest")
        return [m for m in out if m is not None]

    @contextmanager
    def scorer(self, md: ModelDir) -> Iterator[AggregatedScorer]:
        with AggregatedScorer.from_model_dir(self.backbone, md) as scorer:
            yield scorer

    # -- cached measurements -------------------------------------------------------------------------

    def memo(self, key: dict[str, Any], compute: Callable[[Path], np.ndarray]) -> tuple[np.ndarray, float]:
        """(array, seconds it took) for `key`: from the store (stage `memo`), or computed and timed now
        by `compute(work)`, which may keep partial results in the stage's work directory `work` (it
        survives a crash, so a re-run can resume from them)."""
        full = {**key, "base": embedding_key(self.backbone), "scoring": prediction_key(self.backbone)}

        def build(work: Path) -> None:
            started = time.perf_counter()
            value = np.asarray(compute(work))
            np.savez(work / "value.npz", value=value, seconds=np.array(time.perf_counter() - started))

        path = self.store.run("memo", full, build, str(key.get("what", "")))
        with np.load(path / "value.npz", allow_pickle=False) as data:
            return np.array(data["value"]), float(data["seconds"])

    def _adapter_key(self, md: ModelDir) -> list[str]:
        return [str(m.adapter_sha256) for m in self.manifests(md)]

    def test_embeddings(self) -> tuple[np.ndarray, float]:
        """Base-model embeddings of the test prompts and the seconds they took (part of APA's cost)."""
        path = self.store.path("embeddings", embeddings_key(self.backbone, self.test))
        emb = self.embeddings("test")
        return emb, stage_seconds(path)

    def adapter_predictions(self, md: ModelDir) -> tuple[np.ndarray, float]:
        """(n_test x K) P_k(Yes) of each adapter alone: K passes (Bef. Agg. and SISA's averaging),
        one prediction stage per adapter, and the seconds they took."""
        columns, seconds = [], 0.0
        for m in self.manifests(md):
            adapter = AdapterStage.from_model_dir(md, m.shard_index)
            columns.append(self.predictions(adapter, "test"))
            seconds += stage_seconds(
                self.store.path("predictions", predictions_key(self.backbone, adapter, self.test))
            )
        return np.stack(columns, axis=1), seconds

    def aggregated(self, md: ModelDir, level: Level, weights: WeightConfig) -> tuple[np.ndarray, float]:
        """APA's P(Yes) on the test split and its inference seconds: embedding + ω + one pass per batch
        (the one-time validation predictions are a setup cost, not timed)."""
        needs_embeddings = weights.strategy != "average"
        emb, embed_seconds = self.test_embeddings() if needs_embeddings else (None, 0.0)

        def compute(_work: Path) -> np.ndarray:
            with self.scorer(md) as scorer:
                if weights.strategy in ("adaptive", "major"):
                    scorer.valid_prediction_matrix()  # warm the caches, untimed
                    scorer.valid_embeddings()
                started = time.perf_counter()
                omega = scorer.weights(self.prompts, weights, request_embeddings=emb)
                weight_seconds = time.perf_counter() - started
                started = time.perf_counter()
                p, _ = scorer.score(self.prompts, level, omega=omega, progress=self.progress)
                pass_seconds = time.perf_counter() - started
            return np.concatenate([p, [weight_seconds, pass_seconds]])

        key = {
            "what": "aggregated",
            "adapters": self._adapter_key(md),
            "test": self.digests["test"],
            "valid": self.digests["valid"],
            "level": level,
            "weights": asdict(weights),
        }
        value, _ = self.memo(key, compute)
        scores, (weight_seconds, pass_seconds) = value[:-2], value[-2:]
        return scores, embed_seconds + float(weight_seconds) + float(pass_seconds)

    def aggregated_omega(self, md: ModelDir, level: Level, omega: np.ndarray, label: str) -> np.ndarray:
        """P(Yes) on the test split under the aggregated adapter with a given ω (n_test x K), memoised
        by ω's content (weight variants computed outside the scorer)."""

        def compute(_work: Path) -> np.ndarray:
            with self.scorer(md) as scorer:
                p, _ = scorer.score(self.prompts, level, omega=omega, progress=self.progress)
            return p

        key = {
            "what": "aggregated-omega",
            "label": label,
            "adapters": self._adapter_key(md),
            "test": self.digests["test"],
            "level": level,
            "omega": hashlib.sha256(np.ascontiguousarray(omega, dtype=np.float64).tobytes()).hexdigest(),
        }
        return self.memo(key, compute)[0]

    def _auc(self, scores: np.ndarray) -> float:
        return auc(self.labels, scores)

    def _cis(self, scores: dict[str, np.ndarray], diffs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """Paired bootstrap 95% CIs (2000 resamples of the same test samples) of each AUC and of each
        difference in `diffs`."""
        from apa.study_analysis import paired_bootstrap

        return paired_bootstrap(self.labels, scores, list(diffs), seed=self.config.seed)

    def _before_aggregation(self, each: np.ndarray) -> tuple[float, list[float]]:
        per_shard = [self._auc(each[:, j]) for j in range(each.shape[1])]
        finite = [a for a in per_shard if math.isfinite(a)]
        return (float(np.mean(finite)) if finite else float("nan")), per_shard

    # -- Table 1 ----------------------------------------------------------------------------------------

    def table1(self) -> dict[str, Any]:
        k = self.config.num_shards
        methods = table1_methods(k, self.config.apa_partition)
        dirs = {(m.strategy, m.num_shards): self.model_dir(m.strategy, m.num_shards) for m in methods}
        rows: list[dict[str, Any]] = []
        scored: dict[str, np.ndarray] = {}
        for method in progress_bar(methods, self.progress, "table1", unit="step"):
            md = dirs[(method.strategy, method.num_shards)]
            each, each_seconds = self.adapter_predictions(md)
            before, per_shard = self._before_aggregation(each)
            if method.level == "single":
                scores, seconds = each[:, 0], each_seconds
            elif method.level == "prediction":
                scores, seconds = each.mean(axis=1), each_seconds  # SISA: mean of the K adapters
            else:
                scores, seconds = self.aggregated(md, method.level, self.config.weights)
            scored[method.name] = scores
            rows.append(
                {
                    "method": method.name,
                    "partition": method.strategy if method.num_shards > 1 else "none",
                    "num_shards": method.num_shards,
                    "aggregation": method.level,
                    "auc": self._auc(scores),
                    "before_aggregation_auc": None if method.num_shards == 1 else before,
                    "shard_auc": per_shard,
                    "inference_seconds": seconds,
                    "model_dir": str(md.root),
                }
            )
        reference = rows[0]["auc"]
        diffs = [(m.name, methods[0].name) for m in methods[1:]] + [("APA(D)", "SISA"), ("APA(ND)", "SISA")]
        cis = self._cis(scored, diffs)
        for row in rows:
            row["delta"] = row["auc"] - reference
            row["auc_ci"] = cis["methods"][row["method"]]["ci"]
            row["delta_ci"] = cis["differences"].get(f"{row['method']} - {methods[0].name}", {}).get("ci")
        result = {
            "dataset": self.config.dataset,
            "num_shards": k,
            "test_samples": len(self.test),
            "retraining_auc": reference,
            "weights": asdict(self.config.weights),
            "rows": rows,
            "differences": cis["differences"],
        }
        write_json(self.out / "table1.json", result)
        replace_text(self.out / "table1.md", table1_markdown(result))
        plot_table1(result, self.out / "table1.png")
        return result

    # -- Fig. 3 ------------------------------------------------------------------------------------------

    def retrain_one_shard(self, md: ModelDir) -> dict[str, Any]:
        """Unlearning a random user with APA: retrain, from scratch, the shard holding their first
        training sample on its remainder (timed now; the model directory is left untouched)."""
        train = self.splits["train"]
        rng = np.random.default_rng(self.config.seed)
        user = train[int(rng.integers(len(train)))].user_id
        parts = md.partition()
        shard = parts.shard_of(next(s.sample_id for s in train if s.user_id == user))
        members = set(parts.shards[shard])
        remainder = [s for s in train if s.sample_id in members and s.user_id != user]
        valid = [s for s in self.splits["valid"] if s.user_id != user]
        started = time.perf_counter()
        result = train_adapter(
            self.backbone, remainder, valid, self.config.train, self.progress, f"retrain shard {shard}"
        )
        seconds = time.perf_counter() - started
        return {
            "erased_user": user,
            "shard": shard,
            "shard_samples": len(members),
            "retrained_samples": len(remainder),
            "seconds": seconds,
            "train_seconds": result.train_seconds,
        }

    def fig3(self) -> dict[str, Any]:
        k = self.config.num_shards
        retrain_md = self.model_dir("random", 1)
        sisa_md = self.model_dir("random", k)
        apa_md = self.model_dir(self.config.apa_partition, k)
        full_seconds = self.manifests(retrain_md)[0].train_seconds
        unlearn = self.retrain_one_shard(apa_md)
        shard_seconds = [m.train_seconds for m in self.manifests(apa_md)]
        unlearning = {
            "retraining_seconds": full_seconds,
            "apa_seconds": unlearn["seconds"],
            "apa_retrain": unlearn,
            "apa_mean_shard_build_seconds": float(np.mean(shard_seconds)),
            "speedup": full_seconds / max(unlearn["seconds"], 1e-9),
        }
        # batched: the full test passes (measured in Table 1 and cached)
        n = len(self.test)
        _, single_s = self.adapter_predictions(retrain_md)
        _, sisa_s = self.adapter_predictions(sisa_md)
        _, apa_d_s = self.aggregated(apa_md, "decomposition", self.config.weights)
        _, apa_nd_s = self.aggregated(apa_md, "non_decomposition", self.config.weights)
        batched = {"Retraining": single_s, "SISA": sisa_s, "APA(D)": apa_d_s, "APA(ND)": apa_nd_s}
        # batch 1: a random subset, end to end per request (APA: embed + ω + one pass)
        rng = np.random.default_rng(self.config.seed)
        subset = sorted(rng.choice(n, self.config.timing_samples, replace=False).tolist())
        prompts = [self.prompts[i] for i in subset]
        one: dict[str, float] = {}
        runs: list[tuple[str, ModelDir, Level, WeightConfig]] = [
            ("Retraining", retrain_md, "prediction", WeightConfig(strategy="average")),
            ("SISA", sisa_md, "prediction", WeightConfig(strategy="average")),
            ("APA(D)", apa_md, "decomposition", self.config.weights),
            ("APA(ND)", apa_md, "non_decomposition", self.config.weights),
        ]
        for label, md, level, weights in runs:
            with self.scorer(md) as scorer:
                if weights.strategy in ("adaptive", "major"):
                    scorer.valid_prediction_matrix()  # setup, untimed
                    scorer.valid_embeddings()
                one[label] = _timed_per_request(scorer, prompts, level, weights)
        inference = {
            name: {
                "batched_ms_per_sample": 1000 * batched[name] / n,
                "batched_total_seconds": batched[name],
                "batch1_ms_per_sample": 1000 * one[name],
            }
            for name in batched
        }
        result = {
            "num_shards": k,
            "unlearning": unlearning,
            "inference": inference,
            "batched_batch_size": self.backbone.config.batch_size,
            "batched_samples": n,
            "batch1_samples": len(prompts),
            "note": "SISA = K passes (prediction averaging); APA includes embedding the request and ω.",
        }
        write_json(self.out / "fig3.json", result)
        plot_fig3(result, self.out / "fig3.png")
        return result

    # -- Fig. 4 and 5 -----------------------------------------------------------------------------------

    def fig4(self) -> dict[str, Any]:
        k = self.config.num_shards
        strategies: list[StrategyName] = ["semantic", "random", "user", "bekm"]
        dirs = {s: self.model_dir(s, k) for s in strategies}
        rows, scores = [], {}
        for strategy in progress_bar(strategies, self.progress, "fig4", unit="step"):
            scores[strategy], _ = self.aggregated(dirs[strategy], "decomposition", self.config.weights)
            before, _ = self._before_aggregation(self.adapter_predictions(dirs[strategy])[0])
            rows.append(
                {"partition": strategy, "auc": self._auc(scores[strategy]), "before_aggregation_auc": before}
            )
        cis = self._cis(scores, [(s, "semantic") for s in strategies[1:]])
        for row in rows:
            row["auc_ci"] = cis["methods"][row["partition"]]["ci"]
            row["minus_semantic"] = cis["differences"].get(f"{row['partition']} - semantic")
        result = {
            "num_shards": k,
            "level": "decomposition",
            "weights": asdict(self.config.weights),
            "rows": rows,
        }
        self._publish_bars("fig4", result, "partition", f"APA(D) by partition strategy (K={k})")
        return result

    def fig5(self) -> dict[str, Any]:
        k = self.config.num_shards
        md = self.model_dir(self.config.apa_partition, k)
        rows, scores = [], {}
        names = ["adaptive", "average", "major", "semantic"]
        for strategy in progress_bar(names, self.progress, "fig5", unit="step"):
            weights = replace(self.config.weights, strategy=strategy)
            scores[strategy], _ = self.aggregated(md, "decomposition", weights)
            rows.append({"weights": strategy, "auc": self._auc(scores[strategy])})
        cis = self._cis(scores, [("adaptive", s) for s in names[1:]])
        for row in rows:
            row["auc_ci"] = cis["methods"][row["weights"]]["ci"]
            row["adaptive_minus"] = cis["differences"].get(f"adaptive - {row['weights']}")
        partition = self.config.apa_partition
        result = {"num_shards": k, "partition": partition, "level": "decomposition", "rows": rows}
        self._publish_bars("fig5", result, "weights", f"APA(D) by weight strategy ({partition}, K={k})")
        return result

    def _publish_bars(self, name: str, result: dict[str, Any], label: str, title: str) -> None:
        """Write a bar figure's `<name>.json`, `<name>.md` and `<name>.png` (one bar per row of
        `result["rows"]`, labelled by its `label` field, with its AUC's CI)."""
        rows = result["rows"]
        write_json(self.out / f"{name}.json", result)
        replace_text(self.out / f"{name}.md", figure_markdown(name, result))
        plot_bars(
            [r[label] for r in rows],
            [r["auc"] for r in rows],
            "AUC",
            title,
            self.out / f"{name}.png",
            cis=[r["auc_ci"] for r in rows],
        )

    # -- Fig. 6 ------------------------------------------------------------------------------------------

    def fig6(self) -> dict[str, Any]:
        n = len(self.splits["train"])
        retrain_md = self.model_dir("random", 1)
        dirs = {k: self.model_dir(self.config.apa_partition, k) for k in self.config.shard_counts}
        points, scores = [], {}
        for k in progress_bar(list(self.config.shard_counts), self.progress, "fig6", unit="step"):
            md = dirs[k]
            scores[f"K={k}"], _ = self.aggregated(md, "decomposition", self.config.weights)
            manifests = self.manifests(md)
            seconds = [m.train_seconds for m in manifests]
            points.append(
                {
                    "num_shards": k,
                    "shard_size": math.ceil(n / k),
                    "auc": self._auc(scores[f"K={k}"]),
                    "unlearning_seconds": float(np.mean(seconds)),
                    "unlearning_seconds_max": float(np.max(seconds)),
                    "unlearning_steps": float(np.mean([m.steps for m in manifests])),
                }
            )
        each, _ = self.adapter_predictions(retrain_md)
        retrain = self.manifests(retrain_md)[0]
        scores["Retraining"] = each[:, 0]
        cis = self._cis(scores, [(f"K={p['num_shards']}", "Retraining") for p in points])
        for p in points:
            p["auc_ci"] = cis["methods"][f"K={p['num_shards']}"]["ci"]
            p["minus_retraining"] = cis["differences"][f"K={p['num_shards']} - Retraining"]
        result = {
            "train_size": n,
            "points": points,
            "retraining": {
                "auc": self._auc(each[:, 0]),
                "auc_ci": cis["methods"]["Retraining"]["ci"],
                "unlearning_seconds": retrain.train_seconds,
                "unlearning_steps": retrain.steps,
            },
            "note": "unlearning_seconds: mean time to train one shard from scratch (what a retrain costs).",
        }
        write_json(self.out / "fig6.json", result)
        replace_text(self.out / "fig6.md", figure_markdown("fig6", result))
        plot_fig6(result, self.out / "fig6.png")
        return result


def _timed_per_request(
    scorer: AggregatedScorer, prompts: Sequence[str], level: Level, weights: WeightConfig
) -> float:
    """Mean seconds to serve one request alone (embedding, ω and the forward pass(es) at batch 1),
    after one untimed warm-up."""
    if not prompts:
        return float("nan")
    scorer.score([prompts[0]], level, weights, batch_size=1)
    started = time.perf_counter()
    for p in prompts:
        scorer.score([p], level, weights, batch_size=1)
    return (time.perf_counter() - started) / len(prompts)


# ------------------------------------------------------------------------------------------------
# output: markdown and plots


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{-digits}f}" if digits < 0 else f"{value:.{digits}f}"  # digits < 0: signed


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    digits = -4 if signed else 4
    return "" if ci is None else f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _diff(d: dict[str, Any] | None) -> str:
    """A paired difference {diff, ci} as "+0.0123 [-0.0045, +0.0290]" ("-" when there is none)."""
    return "-" if d is None else f"{_fmt(d['diff'], -4)} {_ci(d['ci'], signed=True)}"


def table1_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    head = "| " + " | ".join([result["dataset"], *(r["method"] for r in rows)]) + " |"
    sep = "|" + "---|" * (len(rows) + 1)
    bef = "| Bef. Agg. | " + " | ".join(_fmt(r["before_aggregation_auc"]) for r in rows) + " |"
    auc_row = "| AUC | " + " | ".join(_fmt(r["auc"]) for r in rows) + " |"
    delta = "| Δ | " + " | ".join("-" if i == 0 else _fmt(r["delta"], -4) for i, r in enumerate(rows)) + " |"
    lines = [head, sep, bef, auc_row, delta]
    if all("auc_ci" in r for r in rows):  # results written before the CIs were added have none
        lines.insert(4, "| 95% CI | " + " | ".join(_ci(r["auc_ci"]) for r in rows) + " |")
        lines.append(
            "| Δ 95% CI | " + " | ".join(_ci(r.get("delta_ci"), signed=True) or "-" for r in rows) + " |"
        )
    note = (
        f"\nK = {result['num_shards']}, {result['test_samples']} test samples; "
        "Δ = AUC - Retraining's AUC; Bef. Agg. = mean AUC of the sub-models; CIs: paired bootstrap "
        "95% on the same test samples.\n"
    )
    for name, d in result.get("differences", {}).items():
        if not name.endswith(f"- {rows[0]['method']}"):
            note += f"{name}: {_diff(d)}\n"
    return "\n".join(lines) + "\n" + note


def figure_markdown(name: str, result: dict[str, Any]) -> str:
    """Fig. 4, 5 or 6 as a markdown table: each AUC with its paired bootstrap 95% CI, and the
    difference the figure is about (− semantic, adaptive −, − Retraining) with its CI."""

    if name == "fig4":
        lines = ["| partition | APA(D) AUC [95% CI] | − semantic [95% CI] | Bef. Agg. |", "|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(
                f"| {r['partition']} | {_fmt(r['auc'])} {_ci(r['auc_ci'])} | {_diff(r['minus_semantic'])} "
                f"| {_fmt(r['before_aggregation_auc'])} |"
            )
        title = f"Fig. 4: APA(D) by partition strategy, K={result['num_shards']}"
    elif name == "fig5":
        lines = ["| weights | APA(D) AUC [95% CI] | adaptive − this [95% CI] |", "|---|---|---|"]
        for r in result["rows"]:
            lines.append(
                f"| {r['weights']} | {_fmt(r['auc'])} {_ci(r['auc_ci'])} | {_diff(r['adaptive_minus'])} |"
            )
        title = (
            f"Fig. 5: APA(D) by weight strategy, {result['partition']} partition, K={result['num_shards']}"
        )
    elif name == "fig6":
        lines = [
            "| K | shard size | APA(D) AUC [95% CI] | − Retraining [95% CI] | unlearning steps (mean shard) "
            "| unlearning s (mean / slowest shard) |",
            "|---|---|---|---|---|---|",
        ]
        r = result["retraining"]
        lines.append(
            f"| 1 (Retraining) | {result['train_size']} | {_fmt(r['auc'])} {_ci(r['auc_ci'])} | - "
            f"| {r['unlearning_steps']:.0f} | {r['unlearning_seconds']:.1f} |"
        )
        for p in result["points"]:
            lines.append(
                f"| {p['num_shards']} | {p['shard_size']} | {_fmt(p['auc'])} {_ci(p['auc_ci'])} "
                f"| {_diff(p['minus_retraining'])} | {p['unlearning_steps']:.0f} "
                f"| {p['unlearning_seconds']:.1f} / {p['unlearning_seconds_max']:.1f} |"
            )
        title = f"Fig. 6: shard size against APA(D)'s AUC and the unlearning cost, N={result['train_size']}"
    else:
        raise ValueError(f"no markdown for {name!r}")
    return f"{title}\n\n" + "\n".join(lines) + "\n"


def plot_table1(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = result["rows"]
    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    after = [r["auc"] if r["auc"] is not None else np.nan for r in rows]
    before = [np.nan if r["before_aggregation_auc"] is None else r["before_aggregation_auc"] for r in rows]
    ax.bar(x - 0.2, before, 0.4, label="Bef. Agg. (mean sub-model)", color="#bbbbbb", hatch="//")
    ax.bar(x + 0.2, after, 0.4, label="AUC", color="#3070b0")
    if result["retraining_auc"] is not None and math.isfinite(result["retraining_auc"]):
        ax.axhline(result["retraining_auc"], color="k", linestyle="--", linewidth=1, label="Retraining")
    ax.set_xticks(x, names)
    ax.set_ylabel("test AUC")
    ax.set_title(f"Table 1: unlearning methods ({result['dataset']}, K={result['num_shards']})")
    _auc_limits(ax, after + before)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _auc_limits(ax: Any, values: Sequence[float]) -> None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.05))


def plot_fig3(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    u = result["unlearning"]
    a.bar(["Retraining", "APA"], [u["retraining_seconds"], u["apa_seconds"]], color=["#888888", "#3070b0"])
    a.set_ylabel("seconds")
    a.set_title(f"(a) unlearning time ({u['speedup']:.1f}x faster)")
    inf = result["inference"]
    names = list(inf)
    x = np.arange(len(names))
    b.bar(x - 0.2, [inf[n]["batch1_ms_per_sample"] for n in names], 0.4, label="batch 1")
    b.bar(
        x + 0.2,
        [inf[n]["batched_ms_per_sample"] for n in names],
        0.4,
        label=f"batch {result['batched_batch_size']}",
    )
    b.set_xticks(x, names)
    b.set_ylabel("ms per test sample")
    b.set_title("(b) inference time")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ci_errors(values: Sequence[float], cis: Sequence[Sequence[float]]) -> np.ndarray:
    """Matplotlib's (2 x n) error extents of 95% CIs around `values` (0 where a CI is undefined)."""
    low = [
        v - c[0] if math.isfinite(v) and math.isfinite(c[0]) else 0.0
        for v, c in zip(values, cis, strict=True)
    ]
    high = [
        c[1] - v if math.isfinite(v) and math.isfinite(c[1]) else 0.0
        for v, c in zip(values, cis, strict=True)
    ]
    return np.array([low, high])


def plot_bars(
    names: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    title: str,
    path: Path,
    cis: Sequence[Sequence[float]] | None = None,
) -> None:
    """Bars (the first highlighted) with their values, and 95% CIs as error bars when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ys = [np.nan if v is None else v for v in values]
    errors = _ci_errors(ys, cis) if cis is not None else None
    ax.bar(list(names), ys, yerr=errors, capsize=4, color=["#3070b0"] + ["#999999"] * (len(names) - 1))
    for i, v in enumerate(ys):
        if math.isfinite(v):
            ax.text(i, v, f"{v:.4f}", ha="left", va="bottom", fontsize=8)
    _auc_limits(ax, ys + ([c for ci in cis for c in ci] if cis is not None else []))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fig6(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    points = result["points"]
    x = np.arange(len(points))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x, [p["unlearning_seconds"] for p in points], color="#bbbbbb", label="unlearning time")
    ax.set_xticks(x, [f"{p['shard_size']}\n(K={p['num_shards']})" for p in points])
    ax.set_xlabel("shard size (samples)")
    ax.set_ylabel("unlearning seconds (one shard)")
    twin = ax.twinx()
    aucs = [np.nan if p["auc"] is None else p["auc"] for p in points]
    cis = [p.get("auc_ci", [np.nan, np.nan]) for p in points]
    twin.errorbar(
        x, aucs, yerr=_ci_errors(aucs, cis), fmt="o-", capsize=4, color="#3070b0", label="APA(D) AUC"
    )
    aucs = aucs + [c for ci in cis for c in ci if math.isfinite(c)]
    ref = result["retraining"]["auc"]
    if ref is not None and math.isfinite(ref):
        twin.axhline(ref, color="k", linestyle="--", linewidth=1, label="Retraining AUC")
    twin.set_ylabel("test AUC")
    _auc_limits(twin, aucs + ([ref] if ref is not None else []))
    ax.set_title("Fig. 6: shard size vs AUC and unlearning time")
    bars, lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    twin.legend(bars[0] + lines[0], bars[1] + lines[1], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_summary(name: str, result: dict[str, Any]) -> None:
    if name == "table1":
        print(table1_markdown(result))
    elif name == "fig3":
        u = result["unlearning"]
        print(
            f"unlearning: retraining {u['retraining_seconds']:.1f} s, APA one shard "
            f"{u['apa_seconds']:.1f} s ({u['speedup']:.2f}x)"
        )
        for method, t in result["inference"].items():
            print(
                f"  {method:<11} batch 1: {t['batch1_ms_per_sample']:8.1f} ms/sample   "
                f"batched: {t['batched_ms_per_sample']:8.1f} ms/sample"
            )
    elif name in ("fig4", "fig5", "fig6"):
        print(figure_markdown(name, result))


# ------------------------------------------------------------------------------------------------
# CLI


def runs_dir(settings: Settings | None = None) -> Path:
    """The run directory (`APA_RUNS_DIR`), user home expanded."""
    return Path((settings or Settings.from_env()).runs_dir).expanduser()


def experiment_command(
    what: What = "all",
    data: str = "data/ml-100k",
    out: str | None = None,
    preset: Preset = "quick",
    num_shards: int | None = None,
    train_size: int | None = None,
    valid_size: int | None = None,
    test_size: int | None = None,
    epochs: int | None = None,
    retrain_epochs: int | None = None,
    patience: int | None = None,
    lr: float | None = None,
    retrain_lr: float | None = None,
    early_stopping: bool = True,
    seed: int = 0,
    model: str = "embedded",
    dataset: Dataset = "ml-100k",
    adopt: list[str] | None = None,
    resume: bool = False,
    store: str | None = None,
    erase_users: int = 4,
    mia_samples: int | None = None,
    mia_reference: bool = True,
    mia_shards: int | None = None,
    mia_part: Literal["all", "reference"] = "all",
    train: bool = True,
    only: Literal["both", "retraining", "shards"] = "both",
    served: list[str] | None = None,
    stages_for: list[str] | None = None,
    apa_partition: ApaPartition = "semantic",
    bf16: bool | None = None,
) -> int:
    """Reproduce the paper's study: Table 1 and Fig. 3-6 as JSON + PNG (and markdown tables) in OUT.

    Every stage (data, partitions, adapters, per-adapter predictions, embeddings) is content-keyed in
    the store under the run directory (`APA_RUNS_DIR`): running the same command again, or with
    `--resume`, redoes only what is unfinished.

    Args:
        what: table1, fig3, fig4, fig5, fig6, all; `stages` (Retraining and the semantic K shards
            with their predictions only), `analysis` (issue 11: Table 1 with paired bootstrap CIs and
            diagnostics) or `mia` (membership inference through the serving path, before and after
            erasure), `embedding` (what an early-exit embedding and per-request ω cost in APA(D)'s
            test AUC, on the same adapters), `training` (each adapter's epochs, steps and validation
            AUC and the unlearning speed-up, read from the adapter stages alone: trains and scores
            nothing), `plan` (a dry run: the stages `--stages_for` needs, how many are done and the
            time left at this machine's speeds; trains and scores nothing, and prepares only the
            data splits when they are missing), `partitions` (each shard of the partitions
            `--stages_for` needs, by size, Yes rate and sample digest, to compare runs on different
            machines; builds the partitions, trains and scores nothing).
        data: Directory with train/valid/test.jsonl (from `apa prepare`); without them, raw data of
            `dataset` (ml-100k: recbole's copy when the directory does not exist).
        out: Output directory (default: RUNS_DIR/experiments/<preset>).
        preset: quick (2 CPU cores, < 30 min on the embedded model: N=96, 32 valid, 64 test, K=4,
            1 epoch), cpu (256/250/500, K=4, lr 5e-4, up to 10 epochs, patience 2) or paper
            (1024/500/1000, K=4, TALLRec training settings; for a GPU).
        num_shards: K for Table 1 and Fig. 3-5 (Fig. 6 uses K/2, K, 2K).
        train_size: Training samples (the paper: 1024).
        valid_size: Validation samples (the paper: 500).
        test_size: Test samples (the paper: 1000).
        epochs: Training epochs (quick: 1; cpu: 10; paper: up to 200 with early stopping).
        retrain_epochs: Epoch cap of the K=1 Retraining adapter, when it differs from the shards'.
        patience: Early-stopping patience (cpu: 2).
        lr: AdamW learning rate of every adapter (default: the preset's; cpu: 5e-4, paper: 1e-4).
        retrain_lr: Learning rate of the K=1 Retraining adapter, when it differs from the shards'
            (a shard sees K times fewer samples per epoch and may need a larger step).
        early_stopping: Select each adapter's epoch on validation AUC (false: train every epoch and
            keep the last, i.e. fit the shard; for a membership-inference stress test).
        seed: Seed of sampling, partitions, LoRA init and data order.
        model: Backbone: embedded, a local model directory, a .gguf file or a hub id.
        dataset: ml-100k or bookcrossing (sets the neighbour size n: 20 or 100, as in the paper).
        adopt: Model directories (from `apa train`) whose finished shard adapters join the store
            instead of being trained again.
        resume: Resume an interrupted run (the same as running the same command again: finished
            stages are never redone).
        store: The stage store (default: RUNS_DIR/store).
        erase_users: mia: how many training users to erase.
        mia_samples: mia: at most this many members and non-members (None: all).
        mia_reference: mia: also build the reference model from scratch without the erased users.
        mia_shards: mia: erase only users whose samples lie in this many shards (those holding most
            such samples), so the erasure retrains only them (None: users drawn at random).
        mia_part: mia: everything (all), or only the from-scratch reference model (reference: run
            in a second process while the first trains and unlearns; the first then reuses it).
        train: Train adapters missing from the store (false: use only adopted/finished ones and
            report the rest as pending; for scoring while another process trains).
        only: stages: Retraining's and the K shards' stages (both), or one of them (two processes
            can then share the store: `retraining` leaves the zero-shot and embedding stages to the other).
        served: analysis: which served (aggregated, model-running) test passes to run, some of uniform,
            paper, selected, nd, nd_selected, centred, rank, or none (default: all seven; each takes
            minutes on a CPU).
        stages_for: stages, plan and partitions: build (or count) the adapters (and their predictions) of these figures, some of
            analysis, table1, fig4, fig5, fig6 (default: analysis, i.e. Retraining and the semantic K
            shards); table1 and fig4 add SISA's, GraphEraser's and RecEraser's shards, fig6 the other K;
            training: the analysis's adapters only, without predictions (what `training` reads).
        apa_partition: APA's partition: semantic (the paper's Algorithm 1) or stratified (a variant:
            the same K-means centres, each label spread evenly over the shards). Retraining's
            stages are shared; give the variant its own --out.
        bf16: bf16 autocast for training and scoring (default: where the hardware has native bf16).
            false reproduces an fp32 study on a bf16 machine; the precision is part of every adapter's
            and prediction's stage key, so fp32 and bf16 stages never mix. The partition's
            embeddings are fp32 either way.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    base_dir = runs_dir()
    try:
        from apa.study_analysis import served_passes

        passes = served_passes(served)  # checked before any data is loaded
        config = ExperimentConfig.from_preset(
            preset,
            dataset,
            num_shards=num_shards,
            train_size=train_size,
            valid_size=valid_size,
            test_size=test_size,
            epochs=epochs,
            seed=seed,
            patience=patience,
            retrain_epochs=retrain_epochs,
            lr=lr,
            retrain_lr=retrain_lr,
            early_stopping=early_stopping,
            apa_partition=apa_partition,
            bf16=bf16,
        )
        figures_staged = tuple(stages_for or ("analysis",))
        stage_models(config, figures_staged)  # an unknown figure is an error before any work
        sizes = {"train": config.train_size, "valid": config.valid_size, "test": config.test_size}
        stage_store = StageStore(Path(store) if store else base_dir / "store", progress=True)
        splits = study_splits(stage_store, data, dataset, sizes, seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"apa experiment: error: {err}", file=sys.stderr)
        return 1
    actual = {name: len(samples) for name, samples in splits.items()}
    if actual != sizes:  # a split smaller than asked is used whole: record what was really used
        config = replace(
            config,
            train_size=actual["train"],
            valid_size=actual["valid"],
            test_size=actual["test"],
            shard_counts=tuple(c for c in config.shard_counts if c <= actual["train"]),
            timing_samples=min(config.timing_samples, actual["test"]),
        )
    if not config.shard_counts or len(splits["train"]) < config.num_shards:
        print(
            f"apa experiment: error: {len(splits['train'])} training samples for K={config.num_shards}",
            file=sys.stderr,
        )
        return 1
    out_dir = Path(out) if out else base_dir / "experiments" / preset
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = Backbone.load(BackboneConfig(model=model, bf16_autocast=config.train.bf16_autocast))
    for path in adopt or []:
        shards = adopt_model_dir(stage_store, backbone, path)
        print(f"adopted {path}: shards {shards}")
    # `training` only reads the store: a missing adapter is reported, never trained
    study = Study(backbone, splits, config, out_dir, store=stage_store, train=train and what != "training")
    if resume:
        print(f"resuming from the store {stage_store.root} (finished stages are reused)")
    if preset == "quick":
        from apa.study_rates import study_rates

        rates = study_rates(stage_store.root, backbone.config.bf16_autocast)
        estimate = quick_budget(config, rates.score_per_s, rates.train_per_s)
        print(f"quick preset: estimated {estimate['total_seconds'] / 60:.0f} min at {rates.describe()}")
    if what in ("stages", "analysis", "mia", "embedding", "plan"):
        plan = study.plan(figures_staged if what in ("stages", "plan") else ("analysis",))
        print(plan_line(plan), flush=True)
        if what == "analysis" and passes:  # served passes are memo stages the plan does not count
            each = len(splits["test"]) / plan["score_per_s"] / 60
            print(
                f"plus up to {len(passes)} served test passes ({', '.join(passes)}), about {each:.0f} min "
                "each (one already run is reused)"
            )
        if what == "plan":  # a dry run: what is left and how long it takes, nothing built
            left = ", ".join(f"{n} {kind}" for kind, n in plan["left"].items())
            print(f"left to run: {left or 'nothing'}")
            return 0
    summary_path = out_dir / "results.json"
    figures: dict[str, Any] = {}
    names = list(FIGURES) if what == "all" else [what]
    for name in names:
        print(f"== {name} ==")
        t0 = time.perf_counter()
        if name == "analysis":
            from apa.study_analysis import run_analysis

            result = run_analysis(study, served=passes)
            outputs = ["analysis.json", "analysis.md", "analysis.png"]
        elif name == "mia":
            from apa.mia import run_mia

            result = run_mia(
                study,
                erase_users=erase_users,
                reference=mia_reference,
                max_samples=mia_samples,
                shards_touched=mia_shards,
                reference_only=mia_part == "reference",
            )
            outputs = ["mia.json", "mia.md"]
        elif name == "embedding":
            from apa.study_embedding import run_embedding_study

            try:
                result = run_embedding_study(study)
            except MissingStageError as err:
                print(f"apa experiment: error: {err}", file=sys.stderr)
                return 1
            outputs = ["embedding.json", "embedding.md"]
            print((out_dir / "embedding.md").read_text())
        elif name == "partitions":
            from apa.study_partitions import run_partitions

            try:
                result = run_partitions(study, figures_staged)
            except MissingStageError as err:
                print(f"apa experiment: error: {err}", file=sys.stderr)
                return 1
            outputs = ["partitions.json", "partitions.md"]
            print((out_dir / "partitions.md").read_text())
        elif name == "training":
            from apa.study_analysis import run_training_summary

            result = run_training_summary(study)
            outputs = ["training.json", "training.md"]
        elif name == "stages":
            result = study.stages(only, figures_staged)
            outputs = []
        else:
            result = getattr(study, name)()
            _print_summary(name, result)
            outputs = [f"{name}.json", f"{name}.png"] + ([f"{name}.md"] if name != "fig3" else [])
        figures[name] = {"outputs": outputs, "seconds": time.perf_counter() - t0, "finished_at": _now()}
    # read at the end, not the start: a second process on the same OUT (another figure) may have
    # written its entries in the meantime, and they are kept
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if previous.get("config") == _clean(config.to_json()):
        figures = {**previous.get("figures", {}), **figures}
    summary = {
        "config": config.to_json(),
        "data": str(data),
        "store": str(stage_store.root),
        "sizes": {name: len(samples) for name, samples in splits.items()},
        "model": {**backbone.describe(), "source": model},
        "machine": machine_info(backbone),
        "models": {**previous.get("models", {}), **study.built},
        "figures": figures,
        "ran": names,
        "stages_ran": len(stage_store.ran()),
        "stages_reused": len(stage_store.reused()),
        "seconds": time.perf_counter() - started,
        "finished_at": _now(),
    }
    write_json(summary_path, summary)
    print(
        f"results in {out_dir}/ ({summary['seconds']:.0f} s; stages run {summary['stages_ran']}, "
        f"reused {summary['stages_reused']})"
    )
    return 0


__all__ = [
    "FIGURES",
    "runs_dir",
    "study_splits",
    "PRESETS",
    "ExperimentConfig",
    "Method",
    "Study",
    "experiment_command",
    "load_data",
    "plan_line",
    "quick_budget",
    "table1_methods",
]
