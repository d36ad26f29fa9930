"""`AggregatedScorer`: serve P(Yes) from a chosen set of shard adapters, aggregated per request (§3.3).

What a serving process holds in memory: its own peft model over a fork of the frozen base model
(`Backbone.fork_model`: nobody else's LoRA layers, no one else's changes), exactly the adapter
versions it was told to serve (`AdapterRef`s, each loaded through an `AdapterSource` that checks
its sha256), the validation neighbour pool with its base-model embeddings, and each adapter's
validation predictions (cached by adapter sha256). A request batch is embedded with the base
model, gets its weights ω (`aggregation_weights`: shards without a serving adapter get exactly 0)
and is scored in one forward pass per batch (`decomposition` / `non_decomposition`) or one pass
per adapter (`prediction`, SISA).

What serves is decided by the caller: `AggregatedScorer.from_model_dir` serves what a model
directory's manifests name; a replica serves what the registry lists (`apa.lifecycle`) and calls
`sync` when that changes and `forget` when samples are erased.

>>> with AggregatedScorer.from_model_dir(backbone, "runs/model") as scorer:
...     p_yes, omega = scorer.score(prompts, "decomposition", WeightConfig())
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from apa.aggregation.caches import (
    EMBEDDINGS_FILE,
    cached_embeddings,
    prediction_key,
    prune_caches,
    valid_predictions,
)
from apa.aggregation.mixture import Level, MixtureLoRA
from apa.aggregation.weights import AllShardsExcludedError, WeightConfig, aggregation_weights
from apa.artifacts import AdapterRef, AdapterSource, ArtifactError, LoadedAdapter
from apa.backbone import Backbone
from apa.data import Sample
from apa.prompts import request_prefix
from apa.pseudonyms import Pseudonymizer
from apa.shared_prefix import score_shared_prefix

log = logging.getLogger(__name__)

_NEEDS_VALID = ("adaptive", "major")
_NEEDS_EMBEDDINGS = ("adaptive", "major", "semantic")


EmbeddingView = Literal["prompt", "prefix"]
"""What ω embeds: each full prompt (the paper, per-candidate ω) or the request prefix (per-request ω)."""


class AggregatedScorer:
    """P(Yes) from the serving shard adapters, aggregated per request.

    Args:
        backbone: the frozen base model (never modified: the scorer wraps its own fork).
        num_shards: K.
        source: loads adapters by reference and verifies their sha256.
        adapters: the adapter to serve per shard index; shards without one get weight 0.
        valid: the validation neighbour pool (adaptive / major weights).
        centroids: K x d shard centroids (semantic weights).
        cache_dir: where validation embeddings and predictions are cached (None: memory only).
        batch_size: prompts per forward pass (default: the backbone's).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_shards: int,
        source: AdapterSource,
        adapters: Mapping[int, AdapterRef] | None = None,
        valid: Sequence[Sample] = (),
        centroids: np.ndarray | None = None,
        cache_dir: Path | str | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.backbone = backbone
        self.num_shards = num_shards
        self.source = source
        self.centroids = centroids
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size or backbone.config.batch_size
        self.progress = progress
        self._valid: list[Sample] = list(valid)
        self._valid_embeddings: np.ndarray | None = None
        self._valid_prefix_embeddings: np.ndarray | None = None  # per-request ω's view (memory only)
        self._valid_columns: dict[str, np.ndarray] = {}  # adapter sha256 -> P(Yes) on the pool
        self._lock = threading.RLock()
        self._refs: dict[int, AdapterRef] = {}
        self._names: dict[int, str] = {}  # shard -> adapter name in the peft model
        self._counter = itertools.count(1)
        self.peft_model: Any = None
        self.mixture: MixtureLoRA | None = None
        self._closed = False
        if adapters:
            self.sync(adapters)

    @classmethod
    def from_model_dir(
        cls,
        backbone: Backbone,
        model_dir: Any,
        *,
        cache_dir: Path | str | None = None,
        **kwargs: Any,
    ) -> AggregatedScorer:
        """Serve the adapters a model directory's manifests name (each verified against its
        manifest's sha256), with its validation split as the neighbour pool."""
        from apa.modeldir import ModelDir

        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        refs = md.adapter_refs()
        if not refs:
            raise AllShardsExcludedError(f"{md.root} holds no adapter at all")
        return cls(
            backbone,
            num_shards=md.num_shards,
            source=md,
            adapters=refs,
            valid=md.splits().get("valid", []),
            centroids=md.partition().centroids,
            cache_dir=cache_dir if cache_dir is not None else md.cache_dir(),
            **kwargs,
        )

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> AggregatedScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop every adapter and the scorer's model (the backbone was never touched)."""
        with self._lock:
            self._refs.clear()
            self._names.clear()
            self._valid_columns.clear()
            self.peft_model = None
            self.mixture = None
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the scorer is closed")

    # -- what serves -----------------------------------------------------------------------------

    @property
    def serving(self) -> dict[int, AdapterRef]:
        """Shard -> the adapter version loaded for it."""
        with self._lock:
            return dict(self._refs)

    def locked(self) -> AbstractContextManager[Any]:
        """The scorer's lock: hold it to read `serving` and score with exactly that set (a `sync`
        or `exclude` from another thread waits until it is released)."""
        return self._lock

    @property
    def loaded_shards(self) -> list[int]:
        """Shards that have an adapter loaded (the others get weight 0)."""
        return sorted(self.serving)

    @property
    def adapters(self) -> dict[int, str]:
        """Shard -> name of its adapter in `peft_model` (a fresh name for every loaded version)."""
        with self._lock:
            return dict(self._names)

    def sync(self, adapters: Mapping[int, AdapterRef]) -> None:
        """Serve exactly `adapters` from now on: every new or changed version is read and verified
        first (outside the lock, while the old set keeps serving), then the set is swapped in one
        step; shards not named are dropped. A version that fails verification raises
        `ArtifactError` and changes nothing."""
        self._check_open()
        for shard in adapters:
            if not 0 <= shard < self.num_shards:
                raise ValueError(f"shard {shard} out of range [0, {self.num_shards})")
        with self._lock:
            current = dict(self._refs)
        loaded = {
            shard: self.source.load_adapter(ref)
            for shard, ref in adapters.items()
            if current.get(shard) != ref
        }
        with self._lock:
            self._check_open()
            for shard in sorted(set(self._refs) - set(adapters)):
                self._unload(shard)
            for shard, adapter in sorted(loaded.items()):
                self._install(shard, adapter)
            self._rebuild_mixture()

    def exclude(self, shards: Collection[int]) -> None:
        """Stop serving these shards at once (stale: their training data changed)."""
        with self._lock:
            for shard in shards:
                if shard in self._refs:
                    self._unload(shard)
            self._rebuild_mixture()

    def _install(self, shard: int, adapter: LoadedAdapter) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        from apa.training import quiet_peft, seeded

        name = f"shard_{shard}_v{adapter.ref.version}_{next(self._counter)}"
        config = adapter.lora_config()
        config.inference_mode = True
        with seeded(0, self.backbone.device), quiet_peft():  # init values are overwritten below
            if self.peft_model is None:
                self.peft_model = get_peft_model(self.backbone.fork_model(), config, adapter_name=name)
            else:
                self.peft_model.add_adapter(name, config)
        result = set_peft_model_state_dict(self.peft_model, adapter.weights, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []))
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{name}." in k]
        if unexpected or missing:
            self._delete_name(name)
            bad = (unexpected or missing)[:3]
            raise ArtifactError(
                f"adapter of shard {shard} v{adapter.ref.version} does not fit the model: {bad}"
            )
        self.peft_model.eval()
        for parameter in self.peft_model.parameters():
            parameter.requires_grad_(False)
        old = self._names.pop(shard, None)
        replaced = self._refs.get(shard)
        if replaced is not None and replaced.sha256 != adapter.ref.sha256:
            self._valid_columns.pop(replaced.sha256, None)  # nothing of a replaced adapter is reused
        self._names[shard] = name
        self._refs[shard] = adapter.ref
        if old is not None:
            self._delete_name(old)

    def _unload(self, shard: int) -> None:
        ref = self._refs.pop(shard)
        self._valid_columns.pop(ref.sha256, None)
        self._delete_name(self._names.pop(shard))

    def _delete_name(self, name: str) -> None:
        if self.peft_model is None or name not in self.peft_model.peft_config:
            return
        others = [n for n in self.peft_model.peft_config if n != name]
        if not others:  # the last adapter: drop the whole fork, a later load starts a new one
            self.peft_model = None
            return
        if name in self.peft_model.active_adapters:
            self.peft_model.set_adapter(others[0])
        self.peft_model.delete_adapter(name)
        for parameter in self.peft_model.parameters():
            parameter.requires_grad_(False)

    def _rebuild_mixture(self) -> None:
        names = [self._names[k] for k in sorted(self._names)]
        self.mixture = MixtureLoRA(self.peft_model, names) if names else None
        if self.peft_model is not None:
            self.peft_model.eval()

    def _mix(self) -> MixtureLoRA:
        if self.mixture is None:
            raise AllShardsExcludedError("no shard adapter is serving")
        return self.mixture

    # -- the neighbour pool ---------------------------------------------------------------------

    @property
    def valid_pool(self) -> list[Sample]:
        with self._lock:
            return list(self._valid)

    def forget(
        self,
        sample_ids: Collection[str] = (),
        *,
        user_ids: Collection[str] = (),
        sample_pids: Collection[str] = (),
        pseudonymizer: Pseudonymizer | None = None,
    ) -> int:
        """Erased samples leave the neighbour pool, the in-memory columns and the disk caches for
        good; samples are named in clear, by user, or by pseudonym (with `pseudonymizer`).
        Returns how many pool samples were dropped."""
        ids, users, pids = set(sample_ids), set(user_ids), set(sample_pids)
        if pids and pseudonymizer is None:
            raise ValueError("forgetting by pseudonym needs the pseudonymizer")

        def erased(sample: Sample) -> bool:
            if sample.sample_id in ids or sample.user_id in users:
                return True
            return bool(pids) and pseudonymizer is not None and pseudonymizer.sample(sample.sample_id) in pids

        with self._lock:
            gone = {s.sample_id for s in self._valid if erased(s)}
            ids |= gone
            keep = [i for i, s in enumerate(self._valid) if s.sample_id not in gone]
            if gone:
                self._valid = [self._valid[i] for i in keep]
                if self._valid_embeddings is not None:
                    self._valid_embeddings = self._valid_embeddings[keep]
                if self._valid_prefix_embeddings is not None:
                    self._valid_prefix_embeddings = self._valid_prefix_embeddings[keep]
                self._valid_columns = {sha: col[keep] for sha, col in self._valid_columns.items()}
            if self.cache_dir is not None and self.cache_dir.is_dir():
                pid_of = pseudonymizer.sample if pseudonymizer is not None else None
                prune_caches(
                    self.cache_dir,
                    lambda sid: sid in ids or (pid_of is not None and bool(pids) and pid_of(sid) in pids),
                )
            return len(gone)

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
        """Base-model embeddings of request prompts."""
        return self.backbone.embed(list(prompts), batch_size=batch_size or self.batch_size)

    def valid_embeddings(self) -> np.ndarray:
        """(n_valid x d) base-model embeddings of the validation pool (cached on disk when a cache
        directory is set)."""
        with self._lock:
            if self._valid_embeddings is None:
                ids = [s.sample_id for s in self._valid]
                prompts = [s.prompt for s in self._valid]
                if self.cache_dir is not None:
                    self._valid_embeddings = cached_embeddings(
                        self.backbone,
                        self.cache_dir / EMBEDDINGS_FILE,
                        ids,
                        prompts,
                        batch_size=self.batch_size,
                        progress=self.progress,
                    )
                else:
                    self._valid_embeddings = self.embed(prompts)
            return self._valid_embeddings

    def valid_prefix_embeddings(self) -> np.ndarray:
        """(n_valid x d) embeddings of the pool's request prefixes (`request_prefix`: the prompt
        without its target item), the neighbour space of per-request ω. Kept in memory only."""
        with self._lock:
            if self._valid_prefix_embeddings is None:
                prefixes = [request_prefix(s.prompt) for s in self._valid]
                self._valid_prefix_embeddings = self.embed(prefixes)
            return self._valid_prefix_embeddings

    def _valid_column(self, shard: int) -> np.ndarray:
        ref = self._refs[shard]
        column = self._valid_columns.get(ref.sha256)
        if column is None:
            ids = [s.sample_id for s in self._valid]
            prompts = [s.prompt for s in self._valid]
            with self._mix().only(self._names[shard]):
                if self.cache_dir is not None:
                    column = valid_predictions(
                        self.cache_dir,
                        ref.sha256,
                        ids,
                        prompts,
                        self._batched_score_fn,
                        scorer_key=prediction_key(self.backbone),
                    )
                else:
                    column = self._batched_score_fn(prompts)
            self._valid_columns[ref.sha256] = column
        return column

    def valid_prediction_matrix(self, shards: Collection[int] | None = None) -> np.ndarray:
        """(n_valid x K) P_k(Yes) on the validation pool for `shards` (default: every serving one);
        columns of other shards are NaN."""
        with self._lock:
            self._check_open()
            wanted = self.loaded_shards if shards is None else sorted(shards)
            out = np.full((len(self._valid), self.num_shards), np.nan)
            for k in wanted:
                if k in self._refs:
                    out[:, k] = self._valid_column(k)
            return out

    def weights(
        self,
        prompts: Sequence[str],
        config: WeightConfig,
        excluded: Collection[int] = frozenset(),
        request_embeddings: np.ndarray | None = None,
        batch_size: int | None = None,
        *,
        view: EmbeddingView = "prompt",
    ) -> np.ndarray:
        """ω (n x K): `config`'s strategy; `excluded` shards and shards without a serving adapter get 0.
        `view="prefix"`: the prompts are request prefixes, matched against the pool's prefixes.
        Raises `AllShardsExcludedError` when no shard may serve."""
        with self._lock:
            self._check_open()
            stale = self._check_excluded(excluded) | (set(range(self.num_shards)) - set(self._refs))
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
                preds = self.valid_prediction_matrix(allowed)
                kwargs.update(
                    valid_embeddings=self.valid_prefix_embeddings()
                    if view == "prefix"
                    else self.valid_embeddings(),
                    valid_labels=np.array([s.label for s in self._valid], dtype=np.float64),
                    valid_predictions=np.nan_to_num(preds, nan=0.5),  # NaN only in excluded columns
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
        *,
        request_embeddings: np.ndarray | None = None,
        omega: np.ndarray | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(P(Yes) per prompt, ω (n x K)) under the aggregated adapter at `level`; `progress` shows a
        bar over the forward passes (for long offline passes, such as the study's served ones).

        `decomposition` / `non_decomposition`: one forward pass per batch of `batch_size` prompts;
        `prediction`: one pass per adapter with weight > 0 (SISA's cost). `request_embeddings` skips
        embedding the prompts; `omega` (n x K) skips the weights altogether (shards that are
        excluded or not serving must be 0).
        """
        prompts = list(prompts)
        size = batch_size or self.batch_size
        with self._lock:
            self._check_open()
            if not prompts and omega is None:
                self._check_excluded(excluded)
                return np.zeros(0), np.zeros((0, self.num_shards))
            if omega is None:
                omega = self.weights(prompts, weights or WeightConfig(), excluded, request_embeddings, size)
            omega = np.asarray(omega, dtype=np.float64)
            if omega.shape != (len(prompts), self.num_shards):
                raise ValueError(f"omega must be ({len(prompts)}, {self.num_shards}), got {omega.shape}")
            leaked = [k for k in sorted(self._check_excluded(excluded)) if np.any(omega[:, k] != 0)]
            missing = [k for k in range(self.num_shards) if k not in self._refs and np.any(omega[:, k] != 0)]
            if leaked or missing:
                raise ValueError(
                    f"omega gives weight to excluded shards {leaked} / shards not serving {missing}"
                )
            if not prompts:
                return np.zeros(0), omega
            columns = omega[:, self.loaded_shards]
            if level == "prediction":
                p = self._mix().predict(
                    lambda chunk: self.backbone.score(chunk, model=self.peft_model, batch_size=size),
                    prompts,
                    columns,
                    progress=progress,
                )
            else:
                p = self._mix().score(
                    self._score_fn, prompts, columns, level, batch_size=size, progress=progress
                )
            return p, omega

    def score_request(
        self,
        prompts: Sequence[str],
        level: Level = "decomposition",
        weights: WeightConfig | None = None,
        excluded: Collection[int] = frozenset(),
        *,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(P(Yes), ω (n x K), tokens shared) for ONE ranking request's candidate prompts, with
        per-request ω: one ω row from the embedding of the prompts' common `request_prefix`, one
        aggregated adapter for every candidate, and the shared prefix tokens computed once
        (`score_shared_prefix`). Equal to `score(prompts, omega=that row repeated)`.

        The prompts must share their request prefix (the candidates of one user's request)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("a ranking request needs at least one candidate prompt")
        prefixes = {request_prefix(p) for p in prompts}
        if len(prefixes) != 1:
            raise ValueError(
                f"the prompts of one request must share their prefix; got {len(prefixes)} prefixes"
            )
        size = batch_size or self.batch_size
        with self._lock:
            self._check_open()
            row = self.weights(list(prefixes), weights or WeightConfig(), excluded, view="prefix")
            omega = np.repeat(row, len(prompts), axis=0)
            if level == "prediction":
                p, _ = self.score(prompts, level, omega=omega, excluded=excluded, batch_size=size)
                return p, omega, 0
            columns = row[:, self.loaded_shards]
            mix = self._mix()

            def context(rows: int) -> Any:
                return mix.apply(np.repeat(columns, rows, axis=0), level)

            p, shared = score_shared_prefix(
                self.backbone, self.peft_model, prompts, context=context, chunk_size=size
            )
            return p, omega, shared

    def adapter_predictions(
        self, prompts: Sequence[str], shards: Collection[int] | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(n x K) P_k(Yes) of each adapter alone (one pass per shard); NaN for shards not asked/serving.
        The prompts' shared prefix tokens (the template) run once per adapter (`score_shared_prefix`)."""
        prompts = list(prompts)
        with self._lock:
            self._check_open()
            wanted = self.loaded_shards if shards is None else sorted(shards)
            out = np.full((len(prompts), self.num_shards), np.nan)
            for k in wanted:
                if k in self._names and prompts:
                    with self._mix().only(self._names[k]):
                        out[:, k], _ = score_shared_prefix(
                            self.backbone, self.peft_model, prompts, chunk_size=batch_size or self.batch_size
                        )
            return out


__all__ = ["AggregatedScorer"]
