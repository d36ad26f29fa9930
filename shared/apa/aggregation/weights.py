"""Aggregation weights ω (n_requests x K) for the K shard adapters (paper §3.3, Eq. 7-8).

Every strategy turns its inputs into one row of ω per request; excluded (stale) shards get exactly
0 and the others are renormalised, so a forgotten shard can never leak into a response.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

import numpy as np

Strategy = Literal["adaptive", "average", "major", "semantic"]


class AllShardsExcludedError(RuntimeError):
    """Every shard is excluded (stale): there is no adapter left that may serve a response."""


@dataclass(frozen=True)
class WeightConfig:
    """How the aggregation weights ω are assigned (paper §3.3 and §4.4.2)."""

    strategy: Strategy = "adaptive"
    """`adaptive` (Eq. 7-8), `average` (uniform), `major` (one-hot on the adaptive argmin error) or
    `semantic` (softmax of similarity to the shard centroids)."""
    tau: float = 1000.0
    """τ in Eq. 8: ω = softmax(-τ·error); 0 gives uniform weights, `math.inf` a one-hot on the argmin."""
    top_n: int = 20
    """n = |N_v|: how many nearest validation samples measure each adapter's error (Eq. 7)."""
    semantic_tau: float = 100.0
    """Temperature of the `semantic` strategy: ω = softmax(semantic_tau·cos(request, centroid_k));
    `math.inf` gives a one-hot on the nearest centroid."""

    def __post_init__(self) -> None:
        if self.strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, got {self.strategy!r}")
        if math.isnan(self.tau) or self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if math.isnan(self.semantic_tau) or self.semantic_tau < 0:
            raise ValueError(f"semantic_tau must be >= 0, got {self.semantic_tau}")
        if isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 1:
            raise ValueError(f"top_n must be an int >= 1, got {self.top_n!r}")


@dataclass(frozen=True)
class _Inputs:
    """What `aggregation_weights` was given, validated; `allowed` is the (K,) mask of servable shards."""

    requests: np.ndarray
    allowed: np.ndarray
    valid_embeddings: np.ndarray | None
    valid_labels: np.ndarray | None
    valid_predictions: np.ndarray | None
    centroids: np.ndarray | None


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _masked_softmax(logits: np.ndarray, allowed: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax(temperature·logits) over the allowed columns; 0 elsewhere, numerically stable."""
    if math.isinf(temperature):
        return _masked_one_hot(logits, allowed)
    z = np.where(allowed[None, :], temperature * np.where(allowed[None, :], logits, 0.0), -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _masked_one_hot(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One-hot on the highest allowed score per row; ties go to the lowest shard index."""
    best = np.argmax(np.where(allowed[None, :], scores, -np.inf), axis=1)
    out = np.zeros(scores.shape, dtype=np.float64)
    out[np.arange(len(best)), best] = 1.0
    return out


def nearest_neighbours(requests: np.ndarray, pool: np.ndarray, n: int) -> np.ndarray:
    """(n_requests x min(n, n_pool)) indices of each request's most cosine-similar pool rows, best
    first, computed in float64 (float32 cosines tie where float64 ones do not, and at τ=1000 a
    different neighbour set moves ω by up to 0.66). Stable sort: equally similar neighbours are
    taken in pool order, so results are deterministic."""
    a = _normalise_rows(np.asarray(requests, dtype=np.float64))
    b = _normalise_rows(np.asarray(pool, dtype=np.float64))
    return np.argsort(-(a @ b.T), axis=1, kind="stable")[:, :n]


def neighbour_errors(inputs: _Inputs, top_n: int) -> np.ndarray:
    """error_k of Eq. 7 for every request: mean |y - P_k(Yes)| over its top-n cosine neighbours."""
    if inputs.valid_embeddings is None or inputs.valid_labels is None or inputs.valid_predictions is None:
        raise ValueError("adaptive weights need valid_embeddings, valid_labels and valid_predictions")
    if len(inputs.valid_labels) == 0:
        raise ValueError("the validation neighbour pool is empty (every sample masked out)")
    nearest = nearest_neighbours(inputs.requests, inputs.valid_embeddings, top_n)  # (n_requests, n)
    preds = inputs.valid_predictions[:, inputs.allowed]
    if not np.all(np.isfinite(preds)):
        raise ValueError("valid_predictions of a non-excluded shard contain NaN/inf")
    abs_err = np.abs(inputs.valid_labels[:, None] - preds)  # (n_valid, K_allowed)
    errors = np.full((len(inputs.requests), len(inputs.allowed)), np.inf)
    errors[:, inputs.allowed] = abs_err[nearest].mean(axis=1)
    return errors


def _adaptive(config: WeightConfig, inputs: _Inputs) -> np.ndarray:
    return _masked_softmax(-neighbour_errors(inputs, config.top_n), inputs.allowed, config.tau)


def _average(config: WeightConfig, inputs: _Inputs) -> np.ndarray:
    return _masked_softmax(np.zeros((len(inputs.requests), len(inputs.allowed))), inputs.allowed, 1.0)


def _major(config: WeightConfig, inputs: _Inputs) -> np.ndarray:
    return _masked_one_hot(-neighbour_errors(inputs, config.top_n), inputs.allowed)


def _semantic(config: WeightConfig, inputs: _Inputs) -> np.ndarray:
    if inputs.centroids is None:
        raise ValueError("semantic weights need the shard centroids (K x d)")
    cos = _normalise_rows(inputs.requests) @ _normalise_rows(inputs.centroids).T
    return _masked_softmax(cos, inputs.allowed, config.semantic_tau)


_STRATEGIES: dict[str, Callable[[WeightConfig, _Inputs], np.ndarray]] = {
    "adaptive": _adaptive,
    "average": _average,
    "major": _major,
    "semantic": _semantic,
}
"""Strategy name -> function(config, inputs) -> ω; a new strategy is one function and one entry here."""


def aggregation_weights(
    config: WeightConfig,
    request_embeddings: np.ndarray,
    *,
    valid_embeddings: np.ndarray | None = None,
    valid_labels: np.ndarray | None = None,
    valid_predictions: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
    num_shards: int | None = None,
    excluded: Collection[int] = frozenset(),
    valid_mask: np.ndarray | None = None,
) -> np.ndarray:
    """ω (n_requests x K, float64): rows sum to 1 and excluded shards get exactly 0.

    `valid_predictions` (n_valid x K) holds P_k(Yes) of adapter k on each validation sample;
    `valid_mask` (n_valid, bool) False drops a validation sample (e.g. of an erased user) from the
    neighbour pool. K comes from `valid_predictions`, `centroids` or `num_shards`.
    Raises `AllShardsExcludedError` when every shard is excluded.
    """
    requests = np.atleast_2d(np.asarray(request_embeddings, dtype=np.float64))
    ks = {
        name: k
        for name, k in (
            ("valid_predictions", None if valid_predictions is None else np.shape(valid_predictions)[1]),
            ("centroids", None if centroids is None else np.shape(centroids)[0]),
            ("num_shards", num_shards),
        )
        if k is not None
    }
    if not ks:
        raise ValueError("cannot tell K: pass valid_predictions, centroids or num_shards")
    if len(set(ks.values())) != 1:
        raise ValueError(f"inconsistent number of shards: {ks}")
    k_shards = int(next(iter(ks.values())))
    bad = [k for k in excluded if not 0 <= k < k_shards]
    if bad:
        raise ValueError(f"excluded shard ids out of range [0, {k_shards}): {sorted(bad)}")
    allowed = np.ones(k_shards, dtype=bool)
    allowed[list(excluded)] = False
    if not allowed.any():
        raise AllShardsExcludedError(f"all {k_shards} shards are excluded (stale); no adapter may serve")

    v_emb = v_lab = v_pred = None
    if valid_embeddings is not None or valid_labels is not None or valid_predictions is not None:
        if valid_embeddings is None or valid_labels is None or valid_predictions is None:
            raise ValueError("pass valid_embeddings, valid_labels and valid_predictions together")
        v_emb = np.atleast_2d(np.asarray(valid_embeddings, dtype=np.float64))
        v_lab = np.asarray(valid_labels, dtype=np.float64).reshape(-1)
        v_pred = np.asarray(valid_predictions, dtype=np.float64)
        if not len(v_emb) == len(v_lab) == len(v_pred):
            raise ValueError(
                f"validation arrays disagree in length: {len(v_emb)} embeddings, {len(v_lab)} labels, "
                f"{len(v_pred)} prediction rows"
            )
        if v_emb.shape[1] != requests.shape[1]:
            raise ValueError(f"embedding width {v_emb.shape[1]} != request width {requests.shape[1]}")
        if valid_mask is not None:
            mask = np.asarray(valid_mask, dtype=bool).reshape(-1)
            if len(mask) != len(v_lab):
                raise ValueError(f"valid_mask has {len(mask)} entries for {len(v_lab)} validation samples")
            v_emb, v_lab, v_pred = v_emb[mask], v_lab[mask], v_pred[mask]
    c = None if centroids is None else np.atleast_2d(np.asarray(centroids, dtype=np.float64))
    inputs = _Inputs(requests, allowed, v_emb, v_lab, v_pred, c)
    omega = _STRATEGIES[config.strategy](config, inputs)
    omega[:, ~allowed] = 0.0  # exact zeros, whatever the strategy computed
    return omega
