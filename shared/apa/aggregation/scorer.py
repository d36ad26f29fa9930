"""`AggregatedScorer`: serve P(Yes) from the K shard adapters of a model directory (paper §3.3).

What the inference service holds in memory: the frozen base model with every shard adapter loaded
once, the validation split's base-model embeddings (cached in the model directory, keyed by the base
model's digest) and each adapter's validation predictions (cached per adapter sha256). A request
batch is embedded with the base model, gets its weights ω (`aggregation_weights`: stale shards get
exactly 0, validation samples of erased users leave the neighbour pool) and is scored in one forward
pass per batch (`decomposition` / `non_decomposition`) or one pass per adapter (`prediction`, SISA).

>>> with AggregatedScorer(backbone, "runs/model") as scorer:
...     p_yes, omega = scorer.score(prompts, "decomposition", WeightConfig(), excluded={2})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from apa.aggregation.mixture import Level, MixtureLoRA, _keep_requires_grad
from apa.aggregation.weights import (
    AllShardsExcludedError,
    WeightConfig,
    aggregation_weights,
    valid_predictions,
)
from apa.backbone import Backbone
from apa.data import Sample
from apa.training import ModelDir

log = logging.getLogger(__name__)

VALID_EMBEDDINGS_FILE = "valid_embeddings.npz"
"""Cache in the model directory: {key, sample_ids, embeddings} of the validation split."""

_NEEDS_VALID = ("adaptive", "major")
_NEEDS_EMBEDDINGS = ("adaptive", "major", "semantic")


def embedding_key(backbone: Backbone) -> str:
    """What base-model embeddings depend on: the weights' digest and the embedding settings."""
    cfg = backbone.config
    payload = {
        "digest": backbone.model_digest,
        "model_id": backbone.model_id,
        "pooling": cfg.pooling,
        "embed_layer": cfg.embed_layer,
        "max_length": cfg.max_length,
        "bf16": cfg.bf16_autocast,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prediction_key(backbone: Backbone) -> str:
    """`scorer_key` of the validation prediction cache: base digest plus scoring precision."""
    cfg = backbone.config
    return f"{backbone.model_digest}:bf16={cfg.bf16_autocast}:max_length={cfg.max_length}"


def cached_embeddings(
    backbone: Backbone,
    cache: Path | str,
    sample_ids: Sequence[str],
    prompts: Sequence[str],
    *,
    model: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Base-model embeddings of `prompts` (n x d), cached in `cache` by sample id under
    `embedding_key(backbone)`; only samples missing from the cache are embedded.

    `model`: a peft model wrapping `backbone.model`, whose adapters are disabled while embedding.
    """
    if len(sample_ids) != len(prompts):
        raise ValueError(f"{len(sample_ids)} sample ids but {len(prompts)} prompts")
    cache = Path(cache)
    key = embedding_key(backbone)
    known: dict[str, np.ndarray] = {}
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    known = dict(zip(data["sample_ids"].tolist(), data["embeddings"], strict=True))
        except (OSError, KeyError, ValueError) as err:  # a corrupt cache is rebuilt, never trusted
            log.warning("ignoring unreadable embedding cache %s: %s", cache, err)
    missing = [i for i, sid in enumerate(sample_ids) if sid not in known]
    if missing:
        with base_only(model):
            fresh = backbone.embed([prompts[i] for i in missing], batch_size=batch_size, progress=progress)
        known.update({sample_ids[i]: fresh[j] for j, i in enumerate(missing)})
        cache.parent.mkdir(parents=True, exist_ok=True)
        ids = sorted(known)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            key=np.array(key),
            sample_ids=np.array(ids, dtype=str),
            embeddings=np.stack([known[i] for i in ids]).astype(np.float32),
        )
        os.replace(tmp, cache)  # atomic: readers never see half a cache
    if not sample_ids:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.asarray(known[sid], dtype=np.float32) for sid in sample_ids])


@contextmanager
def base_only(model: Any) -> Iterator[None]:
    """Run the block with every adapter of a peft `model` disabled (the frozen base model)."""
    if model is None:
        yield
        return
    with _keep_requires_grad(model), model.disable_adapter():
        yield


class AggregatedScorer:
    """P(Yes) from the K shard adapters of a model directory, aggregated per request.

    Args:
        backbone: the frozen base model; its modules receive the LoRA layers until `close()`, so it
            must not be trained (`train_adapter`) while a scorer is open on it.
        model_dir: a directory written by `build_model` / `apa train`.
        batch_size: prompts per forward pass (default: the backbone's).
        embedding_cache: where the validation embeddings are cached (default
            `<model_dir>/valid_embeddings.npz`; keyed by sample id, so model directories built from the
            same validation split may share one file).
    """

    def __init__(
        self,
        backbone: Backbone,
        model_dir: ModelDir | str | Path,
        *,
        batch_size: int | None = None,
        embedding_cache: Path | str | None = None,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.model_dir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        self.batch_size = batch_size or backbone.config.batch_size
        self.progress = progress
        self.num_shards = self.model_dir.num_shards
        self.centroids = self.model_dir.partition().centroids
        valid = self.model_dir.splits().get("valid", [])
        self._valid: list[Sample] = list(valid)
        self._embedding_cache = Path(embedding_cache or self.model_dir.root / VALID_EMBEDDINGS_FILE)
        self._valid_embeddings: np.ndarray | None = None
        self._valid_columns: dict[int, np.ndarray] = {}
        self._lock = threading.RLock()
        self._adapters: dict[int, str] = {}  # shard -> adapter name in the peft model
        self._loads = 0
        self.peft_model: Any = None
        self.mixture: MixtureLoRA | None = None
        self._closed = False
        self._load_all()

    def _load_all(self) -> None:
        """Load every shard adapter on disk into a fresh peft model over the backbone."""
        available = [k for k in range(self.num_shards) if self._has_adapter(k)]
        if not available:
            raise AllShardsExcludedError(f"{self.model_dir.root} holds no adapter at all")
        peft_model = self.model_dir.load_adapters(self.backbone, available[:1])
        try:  # one by one, so that a broken adapter file leaves the backbone as it was
            for k in available[1:]:
                with _keep_requires_grad(peft_model):
                    peft_model.load_adapter(str(self.model_dir.adapter_dir(k)), adapter_name=f"shard_{k}")
            peft_model.eval()
        except BaseException:
            peft_model.unload()
            self.backbone.model.eval()
            raise
        self.peft_model = peft_model
        self._adapters = {k: f"shard_{k}" for k in available}
        self._valid_columns.clear()
        self.mixture = MixtureLoRA(self.peft_model, list(self._adapters.values()))

    def _attached(self) -> bool:
        """Whether the LoRA layers are still in the backbone: `train_adapter` on the same backbone
        (e.g. `unlearn` in one process) unloads every LoRA layer when it finishes."""
        if self.mixture is None:
            return True
        name, layer = next(iter(self.mixture.layers.items()))
        try:
            return bool(self.peft_model.get_submodule(name) is layer)
        except AttributeError:
            return False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the scorer is closed")
        if not self._attached():
            log.warning(
                "the shard adapters were unloaded from the backbone (trained on meanwhile?): reloading"
            )
            self._load_all()

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> AggregatedScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unload every adapter: the backbone is the plain frozen base model again."""
        with self._lock:
            if self._closed:
                return
            self.peft_model.unload()
            self.backbone.model.eval()
            self._adapters.clear()
            self._valid_columns.clear()
            self._closed = True

    def _mix(self) -> MixtureLoRA:
        if self.mixture is None:
            raise AllShardsExcludedError("no shard adapter is loaded")
        return self.mixture

    def _has_adapter(self, shard: int) -> bool:
        return (self.model_dir.adapter_dir(shard) / "adapter_model.safetensors").is_file()

    @property
    def adapters(self) -> dict[int, str]:
        """Shard -> name of its adapter in `peft_model` (renamed on every `reload`)."""
        return dict(self._adapters)

    @property
    def loaded_shards(self) -> list[int]:
        """Shards whose adapter is loaded (a shard emptied by unlearning has none)."""
        return sorted(self._adapters)

    def reload(self, shard: int) -> None:
        """Load shard `shard`'s adapter again from disk (after a retrain); drops the old weights, the
        mixture's stacked A/B and that shard's cached validation predictions."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range [0, {self.num_shards})")
        with self._lock:
            self._check_open()
            old = self._adapters.pop(shard, None)
            self._valid_columns.pop(shard, None)
            try:
                if self._has_adapter(shard):
                    self._loads += 1
                    name = f"shard_{shard}_r{self._loads}"  # a fresh name: the old one goes afterwards
                    try:
                        with _keep_requires_grad(self.peft_model):
                            self.peft_model.load_adapter(
                                str(self.model_dir.adapter_dir(shard)), adapter_name=name
                            )
                    except BaseException:
                        self._delete_adapter(name)  # whatever a failed load left behind
                        raise
                    self._adapters[shard] = name
            finally:  # even if the new file is broken: the superseded weights leave memory, never served
                if old is not None:
                    self._delete_adapter(old)
                self.peft_model.eval()
                names = [self._adapters[k] for k in self.loaded_shards]
                self.mixture = MixtureLoRA(self.peft_model, names) if names else None

    def _delete_adapter(self, name: str) -> None:
        if name not in self.peft_model.peft_config:
            return
        with _keep_requires_grad(self.peft_model):
            if name in self.peft_model.active_adapters and self._adapters:
                self.peft_model.set_adapter(next(iter(self._adapters.values())), inference_mode=True)
            self.peft_model.delete_adapter(name)

    def drop_valid(self, user_ids: Collection[str] = (), sample_ids: Collection[str] = ()) -> int:
        """Remove validation samples of erased users / erased samples from memory for good (masking
        per call with `erased_users` is enough for exactness; this frees them). Returns how many."""
        users, ids = set(user_ids), set(sample_ids)
        with self._lock:
            keep = [i for i, s in enumerate(self._valid) if s.user_id not in users and s.sample_id not in ids]
            dropped = len(self._valid) - len(keep)
            if dropped:
                self._valid = [self._valid[i] for i in keep]
                if self._valid_embeddings is not None:
                    self._valid_embeddings = self._valid_embeddings[keep]
                self._valid_columns = {k: col[keep] for k, col in self._valid_columns.items()}
            return dropped

    # -- the pieces of ω ------------------------------------------------------------------------

    def _check_excluded(self, excluded: Collection[int]) -> set[int]:
        bad = [k for k in excluded if not 0 <= int(k) < self.num_shards]
        if bad:
            raise ValueError(f"excluded shard ids out of range [0, {self.num_shards}): {sorted(bad)}")
        return {int(k) for k in excluded}

    def _score_fn(self, prompts: list[str]) -> np.ndarray:
        """P(Yes) of the peft model as it stands, all `prompts` in ONE forward batch (row-aligned)."""
        return self.backbone.score(prompts, model=self.peft_model, batch_size=max(1, len(prompts)))

    def _batched_score_fn(self, prompts: list[str]) -> np.ndarray:
        return self.backbone.score(prompts, model=self.peft_model, batch_size=self.batch_size)

    def embed(self, prompts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Base-model embeddings of request prompts (adapters disabled)."""
        with self._lock:
            self._check_open()
            with base_only(self.peft_model):
                return self.backbone.embed(list(prompts), batch_size=batch_size or self.batch_size)

    def valid_embeddings(self) -> np.ndarray:
        """(n_valid x d) base-model embeddings of the validation pool (cached on disk)."""
        with self._lock:
            if self._valid_embeddings is None:
                self._check_open()
                self._valid_embeddings = cached_embeddings(
                    self.backbone,
                    self._embedding_cache,
                    [s.sample_id for s in self._valid],
                    [s.prompt for s in self._valid],
                    model=self.peft_model,
                    batch_size=self.batch_size,
                    progress=self.progress,
                )
            return self._valid_embeddings

    def valid_prediction_matrix(self, shards: Collection[int] | None = None) -> np.ndarray:
        """(n_valid x K) P_k(Yes) on the validation pool for `shards` (default: every loaded one),
        from the per-adapter cache; columns of other shards are NaN."""
        with self._lock:
            self._check_open()
            wanted = self.loaded_shards if shards is None else sorted(shards)
            out = np.full((len(self._valid), self.num_shards), np.nan)
            ids = [s.sample_id for s in self._valid]
            prompts = [s.prompt for s in self._valid]
            for k in wanted:
                if k not in self._adapters:
                    continue
                if k not in self._valid_columns:
                    with self._mix().only(self._adapters[k]):
                        self._valid_columns[k] = valid_predictions(
                            self.model_dir.shard_dir(k),
                            ids,
                            prompts,
                            self._batched_score_fn,
                            scorer_key=prediction_key(self.backbone),
                        )
                out[:, k] = self._valid_columns[k]
            return out

    def weights(
        self,
        prompts: Sequence[str],
        config: WeightConfig,
        excluded: Collection[int] = frozenset(),
        erased_users: Collection[str] = frozenset(),
        erased_samples: Collection[str] = frozenset(),
        request_embeddings: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """ω (n x K): `config`'s strategy; `excluded` shards and shards without an adapter get 0.
        Raises `AllShardsExcludedError` when no shard may serve."""
        with self._lock:
            self._check_open()
            stale = self._check_excluded(excluded) | (set(range(self.num_shards)) - set(self._adapters))
            allowed = [k for k in range(self.num_shards) if k not in stale]
            if not allowed:
                raise AllShardsExcludedError(f"all {self.num_shards} shards are excluded (stale)")
            kwargs: dict[str, Any] = {"num_shards": self.num_shards, "excluded": stale}
            if config.strategy in _NEEDS_EMBEDDINGS:
                if request_embeddings is None:
                    request_embeddings = self.embed(prompts, batch_size)
                if len(request_embeddings) != len(prompts):
                    raise ValueError(
                        f"{len(request_embeddings)} request embeddings for {len(prompts)} prompts"
                    )
            else:
                request_embeddings = np.zeros((len(prompts), 1))
            if config.strategy in _NEEDS_VALID:
                users, ids = set(erased_users), set(erased_samples)
                mask = np.array(
                    [s.user_id not in users and s.sample_id not in ids for s in self._valid], bool
                )
                preds = self.valid_prediction_matrix(allowed)
                kwargs.update(
                    valid_embeddings=self.valid_embeddings(),
                    valid_labels=np.array([s.label for s in self._valid], dtype=np.float64),
                    valid_predictions=np.nan_to_num(preds, nan=0.5),  # NaN only in excluded columns
                    valid_mask=mask,
                )
            if config.strategy == "semantic":
                kwargs["centroids"] = self.centroids
            return aggregation_weights(config, request_embeddings, **kwargs)

    # -- scoring ----------------------------------------------------------------------------------

    def score(
        self,
        prompts: Sequence[str],
        level: Level = "decomposition",
        weights: WeightConfig | None = None,
        excluded: Collection[int] = frozenset(),
        erased_users: Collection[str] = frozenset(),
        erased_samples: Collection[str] = frozenset(),
        *,
        request_embeddings: np.ndarray | None = None,
        omega: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(P(Yes) per prompt, ω (n x K)) under the aggregated adapter at `level`.

        `decomposition` / `non_decomposition`: one forward pass per batch of `batch_size` prompts;
        `prediction`: one pass per adapter with weight > 0 (SISA's cost). `request_embeddings` skips
        embedding the prompts; `omega` (n x K) skips the weights altogether (excluded shards must be 0).
        """
        prompts = list(prompts)
        size = batch_size or self.batch_size
        with self._lock:
            self._check_open()
            if not prompts and omega is None:
                self._check_excluded(excluded)
                return np.zeros(0), np.zeros((0, self.num_shards))
            if omega is None:
                omega = self.weights(
                    prompts,
                    weights or WeightConfig(),
                    excluded,
                    erased_users,
                    erased_samples,
                    request_embeddings,
                    size,
                )
            omega = np.asarray(omega, dtype=np.float64)
            if omega.shape != (len(prompts), self.num_shards):
                raise ValueError(f"omega must be ({len(prompts)}, {self.num_shards}), got {omega.shape}")
            leaked = [k for k in sorted(self._check_excluded(excluded)) if np.any(omega[:, k] != 0)]
            missing = [
                k for k in range(self.num_shards) if k not in self._adapters and np.any(omega[:, k] != 0)
            ]
            if leaked or missing:
                raise ValueError(
                    f"omega gives weight to excluded shards {leaked} / unloaded shards {missing}"
                )
            if not prompts:
                return np.zeros(0), omega
            columns = omega[:, self.loaded_shards]
            if level == "prediction":
                p = self._mix().predict(
                    lambda chunk: self.backbone.score(chunk, model=self.peft_model, batch_size=size),
                    prompts,
                    columns,
                )
            else:
                p = self._mix().score(self._score_fn, prompts, columns, level, batch_size=size)
            return p, omega

    def adapter_predictions(
        self, prompts: Sequence[str], shards: Collection[int] | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(n x K) P_k(Yes) of each adapter alone (one pass per shard); NaN for shards not asked/loaded."""
        prompts = list(prompts)
        with self._lock:
            self._check_open()
            wanted = self.loaded_shards if shards is None else sorted(shards)
            out = np.full((len(prompts), self.num_shards), np.nan)
            for k in wanted:
                if k in self._adapters:
                    with self._mix().only(self._adapters[k]):
                        out[:, k] = self.backbone.score(
                            prompts, model=self.peft_model, batch_size=batch_size or self.batch_size
                        )
            return out


__all__ = [
    "VALID_EMBEDDINGS_FILE",
    "AggregatedScorer",
    "base_only",
    "cached_embeddings",
    "embedding_key",
    "prediction_key",
]
