"""Aggregation of the K shard adapters (paper §3.3): weight strategies and mixture levels.

`weights` turns requests into ω (n_requests x K) — `adaptive` (Eq. 7-8), `average`, `major`,
`semantic` — and caches each adapter's validation predictions; `mixture` applies ω inside peft's
LoRA layers for a whole batch at once (`decomposition`, `non_decomposition`) or averages
predictions (`prediction`, SISA), and exports a static merged adapter; `scorer` puts them together
for serving: `AggregatedScorer` loads a model directory's adapters once and scores request batches.
"""

from apa.aggregation.mixture import LEVELS, Level, MixtureLoRA, export_merged_adapter, lora_layers
from apa.aggregation.scorer import (
    VALID_EMBEDDINGS_FILE,
    AggregatedScorer,
    base_only,
    cached_embeddings,
    embedding_key,
    prediction_key,
)
from apa.aggregation.weights import (
    VALID_PREDICTIONS_FILE,
    AllShardsExcludedError,
    ScoreFn,
    Strategy,
    WeightConfig,
    aggregation_weights,
    file_sha256,
    neighbour_errors,
    valid_prediction_matrix,
    valid_predictions,
)

__all__ = [
    "LEVELS",
    "VALID_EMBEDDINGS_FILE",
    "AggregatedScorer",
    "base_only",
    "cached_embeddings",
    "embedding_key",
    "prediction_key",
    "VALID_PREDICTIONS_FILE",
    "AllShardsExcludedError",
    "Level",
    "MixtureLoRA",
    "ScoreFn",
    "Strategy",
    "WeightConfig",
    "aggregation_weights",
    "export_merged_adapter",
    "file_sha256",
    "lora_layers",
    "neighbour_errors",
    "valid_prediction_matrix",
    "valid_predictions",
]
