"""Content-keyed, resumable stages of the study (`apa experiment`), stored under the run directory.

Every stage's result lives in `STORE/<kind>/<key digest>/` and is final once `done.json` is in
it. The key is what the result depends on, nothing else:

* `data`: the source files' sha256s, the split sizes and the seed;
* `embeddings`: the split's sample ids and the base model's embedding key;
* `partition`: the training split's sample ids, the partition config and the embedding key;
* `adapter`: the shard's sample ids (digest), the validation split (early stopping), the train
  config (seed included) and the base model's digest; trained adapters of an existing model
  directory are adopted into the store (`adopt_model_dir`), never retrained;
* `predictions`: the adapter's sha256 (or none: zero-shot), the split's sample ids and the
  scoring settings;
* `memo`: any other measured array (aggregated passes), keyed by its caller.

Two processes may share a store: a stage is built by one process at a time (a lock file beside
it), and a process that finds another building it waits, then reuses the result. Inside
`StageStore.skipping_busy()` it does not wait: `run` raises `StageBusy`, so a caller with a list of
independent stages (`apa experiment stages`: one adapter per shard) can take the next free one and
come back to the busy one later; two processes then train different shards side by side.

A stage that is stopped keeps its work directory (`<digest>.partial/`): chunked stages (scoring,
embedding) resume there from the last finished chunk, and a stage that is done is never run again.
Running the same command again (or with `--resume`) therefore redoes only what is unfinished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np

from apa.aggregation.caches import embedding_key, prediction_key
from apa.artifacts import AdapterRef, LoadedAdapter, load_adapter_dir, write_adapter_files
from apa.atomic import replace_file
from apa.backbone import PARTITION_BF16, Backbone
from apa.data import Sample, load_splits, write_jsonl
from apa.data.samples import sample_digest
from apa.modeldir import ModelDir, ModelDirError, ShardManifest
from apa.partition import Partition, PartitionConfig, StrategyName, partition
from apa.pseudonyms import Pseudonymizer
from apa.shared_prefix import score_shared_prefix
from apa.study_rates import runner
from apa.training import EpochRecord, TrainConfig, train_adapter

log = logging.getLogger(__name__)
T = TypeVar("T")

DONE = "done.json"
KEY = "key.json"


def key_digest(key: Any) -> str:
    """sha256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def split_digest(samples: Sequence[Sample]) -> str:
    """What a split is, for a key: its sample ids (order-free) and labels."""
    return sample_digest(f"{s.sample_id}\t{s.label}" for s in samples)


class StageBusy(Exception):
    """Another process is building this stage and the caller asked not to wait for it."""


@contextmanager
def exclusive(lock_path: Path, what: str, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created with its folder) for the block: across
    processes, and across threads that open it separately. Logs when it has to wait for another;
    with `wait` False it raises `StageBusy` instead."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise StageBusy(f"{what}: another process is running it") from None
            log.info("%s: another process is running it; waiting", what)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@dataclass
class StageStore:
    """`STORE/<kind>/<digest>/`: one directory per finished stage (see the module docstring)."""

    root: Path
    progress: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(kind, digest, "ran" | "reused") of every stage asked for, in order (for reports and tests)."""
    skip_busy: bool = False
    """Raise `StageBusy` instead of waiting for a stage another process is building (top level only)."""

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def path(self, kind: str, key: Any) -> Path:
        return self.root / kind / key_digest({"kind": kind, **key})[:24]

    def done(self, kind: str, key: Any) -> bool:
        return (self.path(kind, key) / DONE).is_file()

    def run(self, kind: str, key: dict[str, Any], build: Callable[[Path], None], label: str = "") -> Path:
        """The stage's directory: reused when done, else built now by `build(work_dir)` (the work
        directory survives a crash, so `build` may resume from what it finds there)."""
        final = self.path(kind, key)
        if (final / DONE).is_file():
            return self._reused(kind, final, label)
        # one process per stage: another asking for it waits (or, skipping busy stages, raises
        # StageBusy), then reuses what the first built
        what = f"stage {kind} {label or final.name}"
        with exclusive(final.with_name(final.name + ".lock"), what, wait=not self.skip_busy):
            if (final / DONE).is_file():
                return self._reused(kind, final, label)
            with self._busy_mode(skip=False):  # stages built inside this one wait
                return self._build(kind, key, build, label, final)

    def skipping_busy(self) -> AbstractContextManager[None]:
        """Within the block, `run` raises `StageBusy` for a stage another process is building."""
        return self._busy_mode(skip=True)

    @contextmanager
    def _busy_mode(self, skip: bool) -> Iterator[None]:
        before, self.skip_busy = self.skip_busy, skip
        try:
            yield
        finally:
            self.skip_busy = before

    def _reused(self, kind: str, final: Path, label: str) -> Path:
        self.events.append((kind, final.name, "reused"))
        log.info("stage %s %s: done, reused", kind, label or final.name)
        return final

    def _build(
        self, kind: str, key: dict[str, Any], build: Callable[[Path], None], label: str, final: Path
    ) -> Path:
        work = final.with_name(final.name + ".partial")
        work.mkdir(parents=True, exist_ok=True)
        (work / KEY).write_text(json.dumps({"kind": kind, **key}, indent=2, sort_keys=True, default=str))
        log.info("stage %s %s: running", kind, label or final.name)
        started = time.perf_counter()
        build(work)
        info = {
            "kind": kind,
            "label": label,
            "seconds": time.perf_counter() - started,
            "pid": os.getpid(),
            **runner(),  # host and threads: whose speed `seconds` measures (`apa.study_rates`)
        }
        (work / DONE).write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)
        self.events.append((kind, final.name, "ran"))
        return final

    def ran(self, kind: str | None = None) -> list[str]:
        return [d for k, d, what in self.events if what == "ran" and (kind is None or k == kind)]

    def reused(self, kind: str | None = None) -> list[str]:
        return [d for k, d, what in self.events if what == "reused" and (kind is None or k == kind)]


def run_free_first(store: StageStore, jobs: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Run independent jobs (each asking `store` for stages), taking the free ones first: a job whose
    stage another process is building is put back (`StageBusy`) and run, waiting, after the others.
    Two processes given the same jobs thus split them. Results come back in the jobs' order."""
    results: dict[str, T] = {}
    busy: list[str] = []
    with store.skipping_busy():
        for name, job in jobs.items():
            try:
                results[name] = job()
            except StageBusy as e:
                log.info("%s; taking the next one", e)
                busy.append(name)
    for name in busy:  # waits for the other process, then reuses (or finishes) its stages
        results[name] = jobs[name]()
    return {name: results[name] for name in jobs}


def chunked(
    work: Path,
    n: int,
    compute: Callable[[int, int], np.ndarray],
    *,
    chunk: int = 32,
    desc: str = "",
    progress: bool = False,
) -> np.ndarray:
    """`compute(start, stop)` over [0, n) in chunks, each saved to `work/part-<start>.npy` as it
    finishes; chunks already there (an interrupted run) are not computed again. A tqdm bar shows
    the rate and the time left."""
    parts: list[np.ndarray] = []
    starts = list(range(0, n, chunk))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="sample")
    try:
        for start in starts:
            stop = min(n, start + chunk)
            path = work / f"part-{start:07d}.npy"
            if path.is_file():
                part = np.load(path, allow_pickle=False)
            else:
                part = np.asarray(compute(start, stop))
                replace_file(path, partial(np.save, arr=part))
            parts.append(part)
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    if not parts:
        return np.zeros((0,))
    return np.concatenate(parts, axis=0)


# -- the data stage ----------------------------------------------------------------------------------


def data_stage(
    store: StageStore,
    source: str,
    sizes: dict[str, Any],
    seed: int,
    load: Callable[[], dict[str, list[Sample]]],
) -> dict[str, list[Sample]]:
    """The drawn splits, keyed by the source files' content (or the source path for raw data)."""
    root = Path(source)
    files = {}
    for name in ("train", "valid", "test"):
        path = root / f"{name}.jsonl"
        if path.is_file():
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    key = {"source": files or str(root.resolve()), "sizes": sizes, "seed": seed}

    def build(work: Path) -> None:
        for name, samples in load().items():
            write_jsonl(work / f"{name}.jsonl", samples)

    return {str(k): v for k, v in load_splits(store.run("data", key, build, "splits")).items()}


# -- model stages: embeddings, partitions, adapters, predictions --------------------------------------


def stage_seconds(path: Path) -> float:
    """Seconds the stage at `path` took when it ran (0 when unknown)."""
    try:
        return float(json.loads((path / DONE).read_text()).get("seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def embeddings_key(backbone: Backbone, samples: Sequence[Sample], bf16: bool | None = None) -> dict[str, Any]:
    return {"samples": split_digest(samples), "embedding": embedding_key(backbone, bf16)}


def split_embeddings(
    store: StageStore,
    backbone: Backbone,
    samples: Sequence[Sample],
    label: str = "",
    progress: bool = False,
    bf16: bool | None = None,
) -> np.ndarray:
    """(n x d) base-model embeddings of `samples`, in their order (stage `embeddings`, chunked);
    `bf16` overrides the configured autocast (False: the partition's fp32 embeddings)."""
    ids = [s.sample_id for s in samples]
    prompts = [s.prompt for s in samples]

    def build(work: Path) -> None:
        emb = chunked(
            work,
            len(prompts),
            lambda a, b: backbone.embed(prompts[a:b], bf16=bf16),
            desc=f"embed {label}",
            progress=progress,
        )
        np.savez(
            work / "embeddings.npz", sample_ids=np.array(ids, dtype=str), embeddings=emb.astype(np.float32)
        )

    path = store.run("embeddings", embeddings_key(backbone, samples, bf16), build, label)
    with np.load(path / "embeddings.npz", allow_pickle=False) as data:
        by_id = dict(zip(data["sample_ids"].tolist(), data["embeddings"], strict=True))
    if not ids:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([by_id[i] for i in ids])


def partition_config(strategy: StrategyName, k: int, seed: int) -> PartitionConfig:
    """The study's partition config; K=1 ("Retraining") is one random shard."""
    return PartitionConfig(strategy="random" if k == 1 else strategy, num_shards=k, seed=seed)


def partition_key(backbone: Backbone, train: Sequence[Sample], config: PartitionConfig) -> dict[str, Any]:
    users = sample_digest(f"{s.sample_id}\t{s.user_id}" for s in train) if config.strategy == "user" else None
    return {
        "train": split_digest(train),
        "users": users,
        "config": asdict(config),
        "embedding": embedding_key(backbone, PARTITION_BF16) if config.uses_embeddings else None,
    }


def partition_stage(
    store: StageStore,
    backbone: Backbone,
    train: Sequence[Sample],
    config: PartitionConfig,
    embeddings: np.ndarray | None,
) -> Partition:
    """The partition of `train` under `config` (stage `partition`)."""

    def build(work: Path) -> None:
        parts = partition(
            [s.sample_id for s in train],
            config,
            embeddings=embeddings,
            user_ids=[s.user_id for s in train],
            labels=[s.label for s in train],
        )
        (work / "partition.json").write_text(json.dumps(parts.to_json()))

    label = f"{config.strategy} K={config.num_shards}"
    path = store.run("partition", partition_key(backbone, train, config), build, label)
    return Partition.from_json(json.loads((path / "partition.json").read_text()))


@dataclass(frozen=True)
class AdapterStage:
    """A trained adapter: its directory (peft files) and what training measured (`result.json`)."""

    path: Path
    """The adapter directory (adapter_config.json + adapter_model.safetensors)."""
    sha256: str
    result: dict[str, Any]

    @classmethod
    def from_dir(cls, stage: Path) -> AdapterStage:
        result = json.loads((stage / "result.json").read_text())
        return cls(stage / "adapter", str(result["adapter_sha256"]), result)

    @classmethod
    def from_model_dir(cls, md: ModelDir, shard: int) -> AdapterStage:
        manifest = md.manifest(shard)
        if manifest is None or manifest.adapter_sha256 is None:
            raise ModelDirError(f"{md.root}: shard {shard} has no adapter")
        return cls(md.adapter_dir(shard), manifest.adapter_sha256, _result_of(manifest))

    def load(self) -> LoadedAdapter:
        return load_adapter_dir(self.path, AdapterRef(0, 1, self.sha256, str(self.path)))

    def save_into(self, md: ModelDir, shard: int, backbone: Backbone, pseudonymizer: Pseudonymizer) -> None:
        """Shard `shard` of model directory `md` is this adapter (its manifest names the samples
        by `pseudonymizer`'s pseudonyms)."""
        loaded = self.load()
        r = self.result
        manifest = ShardManifest(
            shard_index=shard,
            version=1,
            sample_pids=tuple(pseudonymizer.sample(i) for i in r["sample_ids"]),
            train_config=TrainConfig.from_json(r["train_config"]),
            base_model=backbone.model_id,
            base_model_digest=backbone.model_digest,
            pseudonym_key_id=pseudonymizer.key_id,
            metrics=tuple(EpochRecord(**m) for m in r["metrics"]),
            best_epoch=int(r["best_epoch"]),
            trained_at=str(r["trained_at"]),
            train_seconds=float(r["train_seconds"]),
            samples_per_second=float(r["samples_per_second"]),
        )
        saved = md.save_shard(manifest, loaded.weights, loaded.config)
        if saved.adapter_sha256 != self.sha256:
            raise ModelDirError(
                f"{md.root}: shard {shard} saved as {saved.adapter_sha256}, not {self.sha256}"
            )


def _result_of(manifest: ShardManifest, sample_ids: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "adapter_sha256": manifest.adapter_sha256,
        "sample_ids": sorted(sample_ids),
        "num_samples": manifest.num_samples,
        "train_config": manifest.train_config.to_json(),
        "metrics": [asdict(m) for m in manifest.metrics],
        "best_epoch": manifest.best_epoch,
        "trained_at": manifest.trained_at,
        "train_seconds": manifest.train_seconds,
        "samples_per_second": manifest.samples_per_second,
    }


def adapter_key(
    backbone: Backbone, samples: Sequence[Sample], valid: Sequence[Sample], config: TrainConfig
) -> dict[str, Any]:
    """What an adapter depends on: its samples, the early-stopping split, the config (seed included)
    and the base model."""
    return {
        "samples": split_digest(samples),
        "valid": split_digest(valid),
        "train_config": config.to_json(),
        "base": backbone.model_digest,
    }


class MissingStageError(LookupError):
    """A stage is not in the store and this run may not compute it (`--train false`)."""


def adapter_stage(
    store: StageStore,
    backbone: Backbone,
    samples: Sequence[Sample],
    valid: Sequence[Sample],
    config: TrainConfig,
    label: str = "",
    progress: bool = False,
    train: bool = True,
) -> AdapterStage:
    """The adapter trained on `samples` (stage `adapter`: reused, adopted, or trained now; with
    `train` False a missing adapter raises `MissingStageError`)."""
    key = adapter_key(backbone, samples, valid, config)
    if not train and not store.done("adapter", key):
        raise MissingStageError(f"adapter {label} is not trained yet")

    def build(work: Path) -> None:
        result = train_adapter(backbone, list(samples), list(valid), config, progress, label or "adapter")
        sha = write_adapter_files(work / "adapter", result.adapter_state, result.adapter_config)
        payload = {
            "adapter_sha256": sha,
            "sample_ids": sorted(s.sample_id for s in samples),
            "num_samples": len(samples),
            "train_config": config.to_json(),
            "metrics": [asdict(m) for m in result.metrics],
            "best_epoch": result.best_epoch,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "train_seconds": round(result.train_seconds, 3),
            "samples_per_second": round(result.samples_per_second, 3),
            "source": "trained",
        }
        (work / "result.json").write_text(json.dumps(payload, indent=2))

    return AdapterStage.from_dir(store.run("adapter", key, build, label))


def adopt_model_dir(store: StageStore, backbone: Backbone, root: str | Path) -> list[int]:
    """Adopt the trained shards (and the partition) of an existing model directory into the store:
    each finished shard whose adapter file matches its manifest becomes the `adapter` stage of its
    samples, config and seed, so the study reuses it instead of training it again. Shards still
    training (no manifest yet) are skipped. Returns the adopted shard indices."""
    md = ModelDir(root)
    if not (md.root / "model.json").is_file() or not (md.root / "partition.json").is_file():
        log.warning("not adopting %s: no model directory there (yet)", root)
        return []
    info = md.info
    if info.base_model_digest != backbone.model_digest:
        log.warning("not adopting %s: built on another base model (%s)", root, info.base_model_digest[:12])
        return []
    splits = md.splits()
    train, valid = splits["train"], splits.get("valid", [])
    parts = md.partition()
    pconfig = info.partition_config
    if info.num_shards == 1:
        pconfig = replace(pconfig, strategy="random")

    def build_partition(work: Path) -> None:
        (work / "partition.json").write_text(json.dumps(parts.to_json()))

    # the partition stage's key says how its embeddings were made: adopt the recorded partition only
    # where they were made so (fp32, the same base model and embedding settings); the adapters are
    # keyed by their own samples, so they are adopted either way and reused wherever a shard matches
    built_by = SimpleNamespace(
        config=info.backbone_config, model_digest=info.base_model_digest, model_id=info.base_model
    )
    if not pconfig.uses_embeddings or (
        info.partition_bf16 == PARTITION_BF16
        and embedding_key(built_by, PARTITION_BF16) == embedding_key(backbone, PARTITION_BF16)
    ):
        store.run("partition", partition_key(backbone, train, pconfig), build_partition, f"adopt {root}")
    else:
        log.info(
            "adopting the adapters of %s but not its partition: it clustered %s embeddings; the study "
            "computes its own and reuses an adopted adapter wherever a shard holds the same samples",
            root,
            "bf16" if info.partition_bf16 else "other",
        )
    by_id = {s.sample_id: s for s in train}
    adopted = []
    for k, manifest in enumerate(md.manifests()):
        if manifest is None or manifest.adapter_sha256 is None or md.verify_adapter_file(manifest):
            continue
        shard = [by_id[i] for i in parts.shards[k]]

        def build(
            work: Path, k: int = k, manifest: ShardManifest = manifest, shard: list[Sample] = shard
        ) -> None:
            shutil.copytree(md.adapter_dir(k), work / "adapter", dirs_exist_ok=True)
            payload = {
                **_result_of(manifest, [s.sample_id for s in shard]),
                "source": f"adopted from {Path(root).resolve()} shard {k}",
            }
            (work / "result.json").write_text(json.dumps(payload, indent=2))

        store.run(
            "adapter", adapter_key(backbone, shard, valid, manifest.train_config), build, f"adopt shard {k}"
        )
        adopted.append(k)
    return adopted


def predictions_key(
    backbone: Backbone, adapter: AdapterStage | None, samples: Sequence[Sample]
) -> dict[str, Any]:
    return {
        "adapter": adapter.sha256 if adapter is not None else "zero-shot",
        "samples": split_digest(samples),
        "scoring": prediction_key(backbone),
    }


class _OneAdapter:
    def __init__(self, adapter: AdapterStage) -> None:
        self.adapter = adapter

    def load_adapter(self, ref: AdapterRef) -> LoadedAdapter:
        return load_adapter_dir(self.adapter.path, ref)


def prediction_stage(
    store: StageStore,
    backbone: Backbone,
    adapter: AdapterStage | None,
    samples: Sequence[Sample],
    label: str = "",
    progress: bool = False,
) -> np.ndarray:
    """P(Yes) of `adapter` alone (None: the zero-shot base model) on `samples`, in their order
    (stage `predictions`, scored in chunks that survive a crash)."""
    prompts = [s.prompt for s in samples]
    ids = [s.sample_id for s in samples]
    name = adapter.sha256[:12] if adapter is not None else "zero-shot"

    def build(work: Path) -> None:
        if adapter is None:
            p = chunked(
                work,
                len(prompts),
                lambda a, b: score_shared_prefix(backbone, backbone.model, prompts[a:b])[0],
                desc=f"score {label} {name}",
                progress=progress,
            )
        else:
            from apa.aggregation import AggregatedScorer

            ref = AdapterRef(0, 1, adapter.sha256, str(adapter.path))
            with AggregatedScorer(
                backbone, num_shards=1, source=_OneAdapter(adapter), adapters={0: ref}
            ) as scorer:
                p = chunked(
                    work,
                    len(prompts),
                    lambda a, b: scorer.adapter_predictions(prompts[a:b])[:, 0],
                    desc=f"score {label} {name}",
                    progress=progress,
                )
        np.savez(work / "predictions.npz", sample_ids=np.array(ids, dtype=str), p=p.astype(np.float64))

    path = store.run("predictions", predictions_key(backbone, adapter, samples), build, f"{label} {name}")
    with np.load(path / "predictions.npz", allow_pickle=False) as data:
        by_id = dict(zip(data["sample_ids"].tolist(), data["p"].tolist(), strict=True))
    return np.array([by_id[i] for i in ids], dtype=np.float64)


def assembled(root: Path, adapters: Sequence[AdapterStage], parts: Partition) -> bool:
    """True when `root` is a model directory of exactly these adapters over this partition."""
    try:
        md = ModelDir(root)
        manifests = md.manifests()
        return (
            md.partition() == parts
            and len(manifests) == len(adapters)
            and all(
                m is not None and m.adapter_sha256 == a.sha256 and md.verify_adapter_file(m) is None
                for m, a in zip(manifests, adapters, strict=True)
            )
        )
    except (OSError, KeyError, ValueError, ModelDirError):
        return False


__all__ = [
    "DONE",
    "AdapterStage",
    "MissingStageError",
    "StageStore",
    "adapter_key",
    "adapter_stage",
    "adopt_model_dir",
    "assembled",
    "chunked",
    "data_stage",
    "embeddings_key",
    "exclusive",
    "key_digest",
    "partition_config",
    "partition_key",
    "partition_stage",
    "prediction_stage",
    "predictions_key",
    "split_digest",
    "split_embeddings",
]
