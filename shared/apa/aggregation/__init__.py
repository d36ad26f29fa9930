"""Aggregation of the K shard adapters (paper §3.3): weight strategies and mixture levels.

`weights` turns requests into ω (n_requests x K) — `adaptive` (Eq. 7-8), `average`, `major`,
`semantic`; `mixture` applies ω inside peft's LoRA layers for a whole batch at once
(`decomposition`, `non_decomposition`) or averages predictions (`prediction`, SISA), and exports a
static merged adapter; `caches` keeps validation embeddings and per-adapter predictions (and
prunes erased samples from them); `scorer` puts them together for serving.
"""

from apa.aggregation.caches import (
    cache_sample_ids,
    cached_embeddings,
    embedding_key,
    prediction_key,
    prune_caches,
    valid_predictions,
)
from apa.aggregation.mixture import LEVELS, Level, MixtureLoRA, export_merged_adapter, lora_layers
from apa.aggregation.scorer import AggregatedScorer
from apa.aggregation.weights import (
    AllShardsExcludedError,
    Strategy,
    WeightConfig,
    aggregation_weights,
    neighbour_errors,
)

__all__ = [
    "LEVELS",
    "AggregatedScorer",
    "AllShardsExcludedError",
    "Level",
    "MixtureLoRA",
    "Strategy",
    "WeightConfig",
    "aggregation_weights",
    "cache_sample_ids",
    "cached_embeddings",
    "embedding_key",
    "export_merged_adapter",
    "lora_layers",
    "neighbour_errors",
    "prediction_key",
    "prune_caches",
    "valid_predictions",
]
