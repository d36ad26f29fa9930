"""Aggregation of the K shard adapters (paper §3.3): weight strategies and mixture levels.

`weights` turns requests into ω (n_requests x K) — `adaptive` (Eq. 7-8), `average`, `major`,
`semantic`; `mixture` applies ω inside peft's LoRA layers for a whole batch at once
(`decomposition`, `non_decomposition`) or averages predictions (`prediction`, SISA), and exports a
static merged adapter; `caches` keeps validation embeddings and per-adapter predictions (and
prunes erased samples from them); `scorer` puts them together for serving, running the prompts'
shared prefix tokens once where one ω serves them all (`apa.shared_prefix`).
"""

from apa.aggregation.caches import (
    cache_sample_ids,
    cached_embeddings,
    embedding_key,
    prediction_key,
    prune_caches,
    valid_predictions,
    write_valid_embeddings,
    write_valid_predictions,
)
from apa.aggregation.mixture import LEVELS, Level, MixtureLoRA, export_merged_adapter, lora_layers
from apa.aggregation.scorer import AggregatedScorer, EmbeddingView
from apa.aggregation.weights import (
    AllShardsExcludedError,
    Strategy,
    WeightConfig,
    aggregation_weights,
    nearest_neighbours,
    neighbour_errors,
)
from apa.shared_prefix import common_prefix_length, score_shared_prefix

__all__ = [
    "LEVELS",
    "AggregatedScorer",
    "AllShardsExcludedError",
    "EmbeddingView",
    "Level",
    "MixtureLoRA",
    "Strategy",
    "WeightConfig",
    "aggregation_weights",
    "cache_sample_ids",
    "cached_embeddings",
    "common_prefix_length",
    "embedding_key",
    "export_merged_adapter",
    "lora_layers",
    "nearest_neighbours",
    "neighbour_errors",
    "prediction_key",
    "prune_caches",
    "score_shared_prefix",
    "valid_predictions",
    "write_valid_embeddings",
    "write_valid_predictions",
]
