"""The model directory: typed `ModelInfo` and `ShardManifest`, and `ModelDir`, the one reader/writer.

```
MODEL_DIR/
  model.json                     ModelInfo: base model + digest, configs, K, pseudonym key id
  partition.json                 Partition: the clear sample ids of each shard (live samples only)
  data/{train,valid,test}.jsonl  the samples the model was built from (live samples only)
  shards/<k>/adapter/            peft format: adapter_config.json + adapter_model.safetensors
  shards/<k>/manifest.json       ShardManifest
  cache/                         derived data (embeddings, validation predictions), pruned on erasure
  erasures.json                  the unlearning journal: erased sample pseudonyms, pending or done
```

A manifest names its training samples by keyed pseudonym (`sample_pids`, `apa.pseudonyms`), never
in clear: manifests are copied into the registry and the artifact store, which must hold no
trace of an erased user, and an auditor checks them against the pseudonymised erased set.
Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from apa.artifacts import (
    ADAPTER_WEIGHTS,
    AdapterRef,
    LoadedAdapter,
    file_sha256,
    load_adapter_dir,
    write_adapter_files,
)
from apa.atomic import replace_text
from apa.backbone import PARTITION_BF16, BackboneConfig
from apa.data import Sample, load_splits, write_jsonl
from apa.data.samples import sample_digest
from apa.partition import Partition, PartitionConfig
from apa.pseudonyms import Pseudonymizer
from apa.training import EpochRecord, TrainConfig

FORMAT = 2
"""Version of the model-directory format (2: manifests name samples by pseudonym)."""
MODEL_FILE = "model.json"
PARTITION_FILE = "partition.json"
MANIFEST_FILE = "manifest.json"
JOURNAL_FILE = "erasures.json"
CACHE_DIR = "cache"
_TRASH = ".trash"


class ModelDirError(ValueError):
    """A model directory file that is missing or breaks the format; the message names the file."""


def now_iso() -> str:
    """The current time, ISO-8601 UTC, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a synced temporary file and a rename (readers never see half)."""
    replace_text(path, json.dumps(data, indent=2, sort_keys=True), fsync=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc})") from None


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in data:
        raise ModelDirError(f"{where}: missing field {name!r}")
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise ModelDirError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class ShardManifest:
    """What one shard's adapter was trained on and how (`shards/<k>/manifest.json`)."""

    shard_index: int
    """k: the shard's index in its model."""
    version: int
    """1 for the first adapter of a shard, +1 per retrain."""
    sample_pids: tuple[str, ...]
    """Keyed pseudonyms of every training sample, sorted (`Pseudonymizer.sample`)."""
    train_config: TrainConfig
    base_model: str
    base_model_digest: str
    pseudonym_key_id: str
    """Fingerprint of the key the pseudonyms were made with."""
    adapter_sha256: str | None = None
    """sha256 of adapter_model.safetensors; None for a shard left without samples (no adapter)."""
    metrics: tuple[EpochRecord, ...] = ()
    best_epoch: int = 0
    """The epoch whose weights were kept (best validation AUC); 0 when nothing was trained."""
    trained_at: str = field(default_factory=now_iso)
    train_seconds: float = 0.0
    """Wall time of the training call, validation scoring included."""
    samples_per_second: float = 0.0
    """Training throughput, validation scoring excluded."""

    @property
    def steps(self) -> int:
        """Optimizer steps over every epoch run (the unlearning work, independent of the machine's load)."""
        return sum(e.steps for e in self.metrics)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_pids", tuple(sorted(self.sample_pids)))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if self.shard_index < 0:
            raise ValueError(f"shard_index must be >= 0, got {self.shard_index}")
        if self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")
        if len(set(self.sample_pids)) != len(self.sample_pids):
            raise ValueError("sample_pids holds a sample twice")

    @property
    def num_samples(self) -> int:
        return len(self.sample_pids)

    @property
    def sample_digest(self) -> str:
        """sha256 of the sorted sample pseudonyms joined by newlines: what the adapter commits to."""
        return sample_digest(self.sample_pids)

    @property
    def seed(self) -> int:
        return self.train_config.seed

    def ref(self, location: str) -> AdapterRef:
        if self.adapter_sha256 is None:
            raise ValueError(f"shard {self.shard_index} v{self.version} has no adapter")
        return AdapterRef(self.shard_index, self.version, self.adapter_sha256, location)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "shard_index": self.shard_index,
            "version": self.version,
            "sample_pids": list(self.sample_pids),
            "sample_digest": self.sample_digest,
            "num_samples": self.num_samples,
            "train_config": self.train_config.to_json(),
            "seed": self.seed,
            "base_model": self.base_model,
            "base_model_digest": self.base_model_digest,
            "pseudonym_key_id": self.pseudonym_key_id,
            "adapter_sha256": self.adapter_sha256,
            "metrics": [asdict(m) for m in self.metrics],
            "best_epoch": self.best_epoch,
            "trained_at": self.trained_at,
            "train_seconds": self.train_seconds,
            "samples_per_second": self.samples_per_second,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> ShardManifest:
        """Validate and parse; ModelDirError names the field. The derived fields (digest, count)
        must agree with the sample list."""
        if not isinstance(data, Mapping):
            raise ModelDirError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise ModelDirError(
                f"{where}: format {data.get('format')!r}, expected {FORMAT} (rebuild it with `apa train`)"
            )
        pids = _field(data, "sample_pids", list, where)
        if not all(isinstance(p, str) for p in pids):
            raise ModelDirError(f"{where}: sample_pids must be strings")
        sha = data.get("adapter_sha256")
        if sha is not None and not isinstance(sha, str):
            raise ModelDirError(f"{where}: adapter_sha256 must be a string or null")
        try:
            metrics = tuple(EpochRecord(**m) for m in _field(data, "metrics", list, where))
            manifest = cls(
                shard_index=_field(data, "shard_index", int, where),
                version=_field(data, "version", int, where),
                sample_pids=tuple(pids),
                train_config=TrainConfig.from_json(_field(data, "train_config", dict, where)),
                base_model=_field(data, "base_model", str, where),
                base_model_digest=_field(data, "base_model_digest", str, where),
                pseudonym_key_id=_field(data, "pseudonym_key_id", str, where),
                adapter_sha256=sha,
                metrics=metrics,
                best_epoch=_field(data, "best_epoch", int, where),
                trained_at=_field(data, "trained_at", str, where),
                train_seconds=float(_field(data, "train_seconds", (int, float), where)),
                samples_per_second=float(_field(data, "samples_per_second", (int, float), where)),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelDirError):
                raise
            raise ModelDirError(f"{where}: {exc}") from None
        if manifest.sample_pids and manifest.adapter_sha256 is None:
            raise ModelDirError(f"{where}: a shard with samples needs adapter_sha256")
        for name, value in (("sample_digest", manifest.sample_digest), ("num_samples", manifest.num_samples)):
            if data.get(name) != value:
                raise ModelDirError(f"{where}: {name} {data.get(name)!r} does not match sample_pids")
        return manifest


@dataclass(frozen=True)
class ModelInfo:
    """`model.json`: what a model directory was built from."""

    base_model: str
    base_model_digest: str
    backbone_config: BackboneConfig
    partition_config: PartitionConfig
    train_config: TrainConfig
    num_shards: int
    """K."""
    pseudonym_key_id: str
    created_at: str = field(default_factory=now_iso)
    partition_bf16: bool = PARTITION_BF16
    """Whether the partition's embeddings ran under bf16 autocast: False since partitions cluster
    fp32 embeddings (`Backbone.embed_for_partition`); an older model.json reads back as its
    backbone's `bf16_autocast`, which its partition used."""

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "base_model_digest": self.base_model_digest,
            "backbone_config": asdict(self.backbone_config),
            "partition_config": asdict(self.partition_config),
            "train_config": self.train_config.to_json(),
            "num_shards": self.num_shards,
            "pseudonym_key_id": self.pseudonym_key_id,
            "created_at": self.created_at,
            "partition_bf16": self.partition_bf16,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = MODEL_FILE) -> ModelInfo:
        if not isinstance(data, Mapping):
            raise ModelDirError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise ModelDirError(
                f"{where}: format {data.get('format')!r}, expected {FORMAT} (rebuild it with `apa train`)"
            )
        try:
            backbone = _field(data, "backbone_config", dict, where)
            partition = _field(data, "partition_config", dict, where)
            backbone_config = BackboneConfig(
                **{k: v for k, v in backbone.items() if k in {f.name for f in fields(BackboneConfig)}}
            )
            partition_bf16 = (
                _field(data, "partition_bf16", bool, where)
                if "partition_bf16" in data
                else backbone_config.bf16_autocast  # written before partitions were fp32 everywhere
            )
            return cls(
                base_model=_field(data, "base_model", str, where),
                base_model_digest=_field(data, "base_model_digest", str, where),
                backbone_config=backbone_config,
                partition_config=PartitionConfig(**partition),
                train_config=TrainConfig.from_json(_field(data, "train_config", dict, where)),
                num_shards=_field(data, "num_shards", int, where),
                pseudonym_key_id=_field(data, "pseudonym_key_id", str, where),
                created_at=_field(data, "created_at", str, where),
                partition_bf16=partition_bf16,
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelDirError):
                raise
            raise ModelDirError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Journal:
    """`erasures.json`: every sample pseudonym ever erased from the directory, and whether an
    unlearning run is still pending. Written before any data changes (the intent), so an
    interrupted run is finished by the next one."""

    erased_pids: frozenset[str] = frozenset()
    pending: bool = False
    updated_at: str = field(default_factory=now_iso)

    def to_json(self) -> dict[str, Any]:
        return {
            "erased_pids": sorted(self.erased_pids),
            "pending": self.pending,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = JOURNAL_FILE) -> Journal:
        if not isinstance(data, Mapping):
            raise ModelDirError(f"{where}: expected a JSON object")
        pids = _field(data, "erased_pids", list, where)
        return cls(
            frozenset(str(p) for p in pids), bool(data.get("pending")), str(data.get("updated_at", ""))
        )


class ModelDir:
    """Typed read/write access to a model directory (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, root: str | Path, info: ModelInfo, splits: Mapping[str, Sequence[Sample]], partition: Partition
    ) -> ModelDir:
        md = cls(root)
        if (md.root / MODEL_FILE).exists():
            raise ModelDirError(f"{md.root}: already holds a model directory")
        if len(partition.shards) != info.num_shards:
            raise ModelDirError(
                f"{md.root}: {len(partition.shards)} shards in the partition, K={info.num_shards}"
            )
        for name, samples in splits.items():
            write_jsonl(md.root / "data" / f"{name}.jsonl", samples)
        md.write_partition(partition)
        (md.root / "shards").mkdir(parents=True, exist_ok=True)
        write_json_atomic(md.root / MODEL_FILE, info.to_json())
        return md

    # -- reading -----------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_json(_read_json(self.root / MODEL_FILE), str(self.root / MODEL_FILE))

    @property
    def num_shards(self) -> int:
        return self.info.num_shards

    def check_key(self, pseudonymizer: Pseudonymizer) -> None:
        """PseudonymKeyMismatch unless the directory's pseudonyms were made with this key."""
        pseudonymizer.check_key_id(self.info.pseudonym_key_id, f"model directory {self.root}")

    def splits(self) -> dict[str, list[Sample]]:
        return load_splits(self.root / "data")

    def write_split(self, name: str, samples: Sequence[Sample]) -> None:
        write_jsonl(self.root / "data" / f"{name}.jsonl", samples)

    def partition(self) -> Partition:
        data = _read_json(self.root / PARTITION_FILE)
        try:
            return Partition.from_json(data)
        except (TypeError, ValueError) as exc:
            raise ModelDirError(f"{self.root / PARTITION_FILE}: {exc}") from None

    def write_partition(self, partition: Partition) -> None:
        write_json_atomic(self.root / PARTITION_FILE, partition.to_json())

    def shard_dir(self, shard: int) -> Path:
        return self.root / "shards" / str(int(shard))

    def adapter_dir(self, shard: int) -> Path:
        return self.shard_dir(shard) / "adapter"

    def manifest(self, shard: int) -> ShardManifest | None:
        """Shard k's manifest, or None when the shard has none yet (never trained, or mid-replace)."""
        path = self.shard_dir(shard) / MANIFEST_FILE
        if not path.is_file():
            return None
        return ShardManifest.from_json(_read_json(path), str(path))

    def manifests(self) -> list[ShardManifest | None]:
        return [self.manifest(k) for k in range(self.num_shards)]

    def adapter_refs(self) -> dict[int, AdapterRef]:
        """The shards that have an adapter, by the sha256 their manifests commit to (what a scorer
        opened on a model directory serves; each file is verified when it is loaded)."""
        return {
            m.shard_index: m.ref(str(self.adapter_dir(m.shard_index)))
            for m in self.manifests()
            if m is not None and m.adapter_sha256 is not None
        }

    def load_adapter(self, ref: AdapterRef) -> LoadedAdapter:
        """AdapterSource: the adapter at `ref.location` (a directory), verified against `ref.sha256`."""
        return load_adapter_dir(Path(ref.location), ref)

    def cache_dir(self) -> Path:
        """Derived data (embeddings, per-adapter validation predictions); pruned by unlearning."""
        return self.root / CACHE_DIR

    # -- the unlearning journal -----------------------------------------------------------------

    def journal(self) -> Journal:
        path = self.root / JOURNAL_FILE
        return Journal.from_json(_read_json(path), str(path)) if path.is_file() else Journal()

    def write_journal(self, journal: Journal) -> None:
        write_json_atomic(self.root / JOURNAL_FILE, journal.to_json())

    # -- writing adapters -------------------------------------------------------------------------

    def save_shard(
        self,
        manifest: ShardManifest,
        weights: Mapping[str, torch.Tensor] | None,
        adapter_config: Mapping[str, Any] | None,
    ) -> ShardManifest:
        """Replace shard k's adapter and manifest as one step; returns the manifest with
        `adapter_sha256` set. With `weights` None the shard is left without an adapter (emptied).

        The new shard directory is written aside and renamed into place; the old one goes to
        `shards/.trash/` first and is deleted after (a crash leaves trash that `purge_trash` removes,
        and a shard without manifest, which unlearning retrains)."""
        k = manifest.shard_index
        if not 0 <= k < self.num_shards:
            raise ModelDirError(f"{self.root}: shard {k} out of range [0, {self.num_shards})")
        staging = self.root / "shards" / _TRASH / f"new-{k}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            if weights is not None:
                if adapter_config is None:
                    raise ValueError("adapter_config is required with weights")
                sha = write_adapter_files(staging / "adapter", dict(weights), dict(adapter_config))
                manifest = replace(manifest, adapter_sha256=sha)
            elif manifest.sample_pids:
                raise ValueError(f"shard {k} has samples but no weights")
            write_json_atomic(staging / MANIFEST_FILE, manifest.to_json())  # last: marks it complete
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # from here on the staged shard is complete: `recover` finishes an interrupted swap
        target = self.shard_dir(k)
        if target.exists():
            os.rename(target, self.root / "shards" / _TRASH / f"old-{k}-{uuid.uuid4().hex}")
        os.rename(staging, target)
        self.purge_trash()
        return manifest

    def recover(self) -> None:
        """Finish a `save_shard` that a crash interrupted between its two renames (the new shard
        directory is complete once its manifest exists), then delete what was replaced."""
        for entry in self.trash_entries():
            kind, _, rest = entry.name.partition("-")
            index = rest.partition("-")[0]
            target = self.shard_dir(int(index)) if index.isdigit() else None
            if (
                kind == "new"
                and target is not None
                and not target.exists()
                and (entry / MANIFEST_FILE).is_file()
            ):
                os.rename(entry, target)
        self.purge_trash()

    def purge_trash(self) -> None:
        """Delete replaced shard directories (their adapters may have been trained on erased data).
        A failed delete raises."""
        trash = self.root / "shards" / _TRASH
        if trash.is_dir():
            for entry in trash.iterdir():
                shutil.rmtree(entry)

    def trash_entries(self) -> list[Path]:
        trash = self.root / "shards" / _TRASH
        return sorted(trash.iterdir()) if trash.is_dir() else []

    def verify_adapter_file(self, manifest: ShardManifest) -> str | None:
        """Why shard k's adapter file disagrees with its manifest, or None when it agrees (an emptied
        shard must have no adapter file)."""
        weights = self.adapter_dir(manifest.shard_index) / ADAPTER_WEIGHTS
        if manifest.adapter_sha256 is None:
            return f"{weights} exists but the shard has no samples" if weights.exists() else None
        if not weights.is_file():
            return f"{weights} is missing"
        actual = file_sha256(weights)
        if actual != manifest.adapter_sha256:
            return f"{weights} has sha256 {actual}, the manifest says {manifest.adapter_sha256}"
        return None


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: a NaN validation AUC (one-class validation) is stored as None."""
    return None if value is None or not math.isfinite(value) else float(value)


__all__ = [
    "CACHE_DIR",
    "FORMAT",
    "JOURNAL_FILE",
    "EpochRecord",
    "Journal",
    "ModelDir",
    "ModelDirError",
    "ModelInfo",
    "ShardManifest",
    "finite_or_none",
    "now_iso",
    "write_json_atomic",
]
