"""Disk caches of derived data that aggregation needs, and how erasure prunes them.

* `valid-embeddings.npz`: base-model embeddings of validation samples, by sample id, under a key
  of the base model's digest and embedding settings (`embedding_key`).
* `valid-predictions/<adapter sha256>.json`: P_k(Yes) of one adapter on validation samples, by
  sample id. Keyed by the adapter's sha256, so a retrained or replaced adapter never reuses a
  prediction of the one it replaced.

Both hold sample ids of live samples only: `prune_caches` removes every entry of an erased sample
(unlearning and serving replicas call it when they learn of an erasure), and
`cache_sample_ids` lists what is left so that a proof can check it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apa.atomic import replace_file, replace_text

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "valid-embeddings.npz"
PREDICTIONS_DIR = "valid-predictions"
ScoreFn = Callable[[list[str]], np.ndarray]
"""`score_fn(prompts) -> P(Yes)` of shape (len(prompts),), e.g. `Backbone.score` with one adapter active."""


def embedding_key(backbone: Any, bf16: bool | None = None) -> str:
    """What base-model embeddings depend on: the weights' digest and the embedding settings
    (`bf16` overrides the configured autocast, as `Backbone.embed`'s does)."""
    cfg = backbone.config
    payload = {
        "digest": backbone.model_digest,
        "model_id": backbone.model_id,
        "pooling": cfg.pooling,
        "embed_layer": cfg.embed_layer,
        "max_length": cfg.max_length,
        "bf16": cfg.bf16_autocast if bf16 is None else bf16,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prediction_key(backbone: Any) -> str:
    """What cached predictions depend on besides the adapter: base digest and scoring precision."""
    cfg = backbone.config
    return f"{backbone.model_digest}:bf16={cfg.bf16_autocast}:max_length={cfg.max_length}"


def _replace_npz(path: Path, **arrays: np.ndarray) -> None:
    replace_file(path, lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]


def _replace_json(path: Path, payload: dict[str, Any]) -> None:
    replace_text(path, json.dumps(payload, sort_keys=True))


def _read_embeddings(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        return str(data["key"]), dict(zip(data["sample_ids"].tolist(), data["embeddings"], strict=True))


def _write_embeddings(path: Path, key: str, known: dict[str, np.ndarray]) -> None:
    ids = sorted(known)
    width = len(next(iter(known.values()))) if known else 0
    _replace_npz(
        path,
        key=np.array(key),
        sample_ids=np.array(ids, dtype=str),
        embeddings=np.stack([known[i] for i in ids]).astype(np.float32) if ids else np.zeros((0, width)),
    )


def write_valid_embeddings(cache_dir: Path | str, key: str, embeddings: dict[str, np.ndarray]) -> None:
    """Replace the cached validation embeddings (sample id -> vector) in `cache_dir`, in the format
    `cached_embeddings` reads back under the same `key` (see `embedding_key`)."""
    _write_embeddings(Path(cache_dir) / EMBEDDINGS_FILE, key, embeddings)


def cached_embeddings(
    backbone: Any,
    cache: Path | str,
    sample_ids: Sequence[str],
    prompts: Sequence[str],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Base-model embeddings of `prompts` (n x d), cached in `cache` by sample id under
    `embedding_key(backbone)`; only samples missing from the cache are embedded."""
    if len(sample_ids) != len(prompts):
        raise ValueError(f"{len(sample_ids)} sample ids but {len(prompts)} prompts")
    cache = Path(cache)
    key = embedding_key(backbone)
    known: dict[str, np.ndarray] = {}
    if cache.is_file():
        try:
            cached_key, entries = _read_embeddings(cache)
            if cached_key == key:
                known = entries
        except (OSError, KeyError, ValueError) as err:  # a corrupt cache is rebuilt, never trusted
            log.warning("ignoring unreadable embedding cache %s: %s", cache, err)
    missing = [i for i, sid in enumerate(sample_ids) if sid not in known]
    if missing:
        fresh = backbone.embed([prompts[i] for i in missing], batch_size=batch_size, progress=progress)
        known.update({sample_ids[i]: fresh[j] for j, i in enumerate(missing)})
        _write_embeddings(cache, key, known)
    if not sample_ids:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.asarray(known[sid], dtype=np.float32) for sid in sample_ids])


def predictions_file(cache_dir: Path | str, adapter_sha256: str) -> Path:
    """Where the validation predictions of the adapter with this sha256 are cached."""
    return Path(cache_dir) / PREDICTIONS_DIR / f"{adapter_sha256}.json"


def valid_predictions(
    cache_dir: Path | str,
    adapter_sha256: str,
    sample_ids: Sequence[str],
    prompts: Sequence[str],
    score_fn: ScoreFn,
    *,
    scorer_key: str = "",
) -> np.ndarray:
    """P(Yes) of the adapter with `adapter_sha256` on the given validation samples, cached in
    `cache_dir`. The cache is rebuilt when `scorer_key` (e.g. the base-model digest) changes; only
    samples missing from it are scored, so shrinking the pool (erasures) costs nothing."""
    if len(sample_ids) != len(prompts):
        raise ValueError(f"{len(sample_ids)} sample ids but {len(prompts)} prompts")
    path = predictions_file(cache_dir, adapter_sha256)
    cached: dict[str, float] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("adapter_sha256") == adapter_sha256 and data.get("scorer_key") == scorer_key:
                cached = {str(k): float(v) for k, v in data["predictions"].items()}
        except (OSError, KeyError, ValueError, AttributeError) as err:
            log.warning("ignoring unreadable prediction cache %s: %s", path, err)
    missing = [i for i, sid in enumerate(sample_ids) if sid not in cached]
    if missing:
        scores = np.asarray(score_fn([prompts[i] for i in missing]), dtype=np.float64).reshape(-1)
        if len(scores) != len(missing):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(missing)} prompts")
        cached.update({sample_ids[i]: float(s) for i, s in zip(missing, scores, strict=True)})
        write_valid_predictions(cache_dir, adapter_sha256, scorer_key, cached)
    return np.array([cached[sid] for sid in sample_ids], dtype=np.float64)


def write_valid_predictions(
    cache_dir: Path | str, adapter_sha256: str, scorer_key: str, predictions: dict[str, float]
) -> None:
    """Replace the cached validation predictions (sample id -> P(Yes)) of the adapter with this
    sha256, in the format `valid_predictions` reads back under the same `scorer_key`."""
    path = predictions_file(cache_dir, adapter_sha256)
    _replace_json(
        path, {"adapter_sha256": adapter_sha256, "scorer_key": scorer_key, "predictions": predictions}
    )


def _cache_files(cache_dir: Path) -> tuple[Path, list[Path]]:
    predictions = cache_dir / PREDICTIONS_DIR
    return cache_dir / EMBEDDINGS_FILE, sorted(predictions.glob("*.json")) if predictions.is_dir() else []


def prune_caches(cache_dir: Path | str, erased: Callable[[str], bool]) -> int:
    """Remove every entry of a sample for which `erased(sample_id)` holds from the caches in
    `cache_dir`; returns how many entries were removed. An unreadable cache file is deleted."""
    cache_dir = Path(cache_dir)
    embeddings, predictions = _cache_files(cache_dir)
    removed = 0
    if embeddings.is_file():
        try:
            key, known = _read_embeddings(embeddings)
        except (OSError, KeyError, ValueError):
            embeddings.unlink()
        else:
            keep = {sid: v for sid, v in known.items() if not erased(sid)}
            if len(keep) != len(known):
                removed += len(known) - len(keep)
                _write_embeddings(embeddings, key, keep)
    for path in predictions:
        try:
            data = json.loads(path.read_text())
            entries = data["predictions"]
        except (OSError, KeyError, ValueError, TypeError):
            path.unlink()
            continue
        keep_predictions = {sid: v for sid, v in entries.items() if not erased(sid)}
        if len(keep_predictions) != len(entries):
            removed += len(entries) - len(keep_predictions)
            _replace_json(path, {**data, "predictions": keep_predictions})
    return removed


def cache_sample_ids(cache_dir: Path | str) -> set[str]:
    """Every sample id any cache in `cache_dir` holds an entry for."""
    embeddings, predictions = _cache_files(Path(cache_dir))
    ids: set[str] = set()
    if embeddings.is_file():
        ids.update(_read_embeddings(embeddings)[1])
    for path in predictions:
        ids.update(json.loads(path.read_text()).get("predictions", {}))
    return ids


def drop_adapter_cache(cache_dir: Path | str, adapter_sha256: str) -> None:
    """Delete the predictions of an adapter that no longer serves (excluded or replaced)."""
    predictions_file(cache_dir, adapter_sha256).unlink(missing_ok=True)


__all__ = [
    "EMBEDDINGS_FILE",
    "PREDICTIONS_DIR",
    "ScoreFn",
    "cache_sample_ids",
    "cached_embeddings",
    "drop_adapter_cache",
    "embedding_key",
    "prediction_key",
    "predictions_file",
    "prune_caches",
    "valid_predictions",
]
