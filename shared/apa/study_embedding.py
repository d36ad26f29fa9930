"""What cheaper adaptive weights cost in AUC, on the study's own adapters (`apa experiment embedding`).

APA's adaptive ω needs a base-model embedding of each request: a second pass over the prompt. Two
ways to cut that cost change what is embedded, so each is measured here against the paper's ω with
the same K semantic-shard adapters, the same validation pool and the paper's τ=1000, n=20:

* **early exit**: the embedding is the hidden state after the first l of the L decoder layers
  (l = L/4, L/2), for the pool and the requests alike, so the pass stops at layer l;
* **per-request ω**: ω comes from the request prefix (`apa.prompts.request_prefix`: the prompt
  without its target item; the pool is embedded the same way), so one ranking request's candidates
  share one ω, one aggregated adapter and therefore one prefix computation (`/recommend`).

For each variant: APA(D)'s test AUC from a real aggregated pass (`Study.aggregated_omega`), its
difference to the paper's ω with a paired bootstrap 95% CI on the same test samples, the
prediction-level AUC (Σ_k ω_k P_k, no pass), ω's entropy, and how often its argmax agrees with the
paper's ω. All embeddings of every layer come from one full pass per text set (`Backbone.embed_layers`,
each equal to a real early exit: tested), memoised in the store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apa.aggregation import WeightConfig, aggregation_weights
from apa.atomic import replace_text
from apa.metrics import auc
from apa.prompts import request_prefix
from apa.stages import MissingStageError
from apa.study_analysis import _adapters, entropy_stats, paired_bootstrap

if TYPE_CHECKING:
    from apa.experiments import Study

BASELINE = "prompt@L"
"""The paper's ω: each full prompt embedded at the last layer."""


def variants(num_layers: int) -> list[tuple[str, str, int]]:
    """(name, view, layer) of every ω measured; layer -1 is the last (L)."""
    quarter, half = num_layers // 4, num_layers // 2
    return [
        (BASELINE, "prompt", -1),
        (f"prompt@L/2 ({half})", "prompt", half),
        (f"prompt@L/4 ({quarter})", "prompt", quarter),
        ("prefix@L (per-request)", "prefix", -1),
    ]


def _embeddings(study: Study, texts: list[str], layers: list[int], what: str) -> dict[int, np.ndarray]:
    """Embeddings of `texts` at every layer in `layers` (one pass, memoised as one stage)."""
    digest = hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()

    def compute(_work: Path) -> np.ndarray:
        by_layer = study.backbone.embed_layers(texts, layers, progress=study.progress)
        return np.stack([by_layer[layer] for layer in layers])

    stacked, _ = study.memo({"what": f"embed-layers {what}", "texts": digest, "layers": layers}, compute)
    return {layer: stacked[i] for i, layer in enumerate(layers)}


def run_embedding_study(study: Study, draws: int = 2000) -> dict[str, Any]:
    """Measure every variant (module docstring) and write embedding.json / embedding.md."""
    k = study.config.num_shards
    valid, test = study.splits["valid"], study.splits["test"]
    shards, _ = _adapters(study, study.config.apa_partition, k)
    missing = [j for j, a in enumerate(shards) if a is None]
    if missing:
        raise MissingStageError(f"semantic K={k} shards {missing} are not trained yet (run `--what stages`)")
    yv = np.array([s.label for s in valid], dtype=np.float64)
    yt = np.array([s.label for s in test], dtype=np.float64)
    pv = np.stack([study.predictions(a, "valid") for a in shards], axis=1)
    pt = np.stack([study.predictions(a, "test") for a in shards], axis=1)
    num_layers = study.backbone.num_layers
    chosen = variants(num_layers)
    # one pass gives every layer: L/8 is kept in the store too (the bench's second exit)
    layers = sorted({layer for _, _, layer in chosen} | {num_layers // 8})
    texts = {
        ("prompt", "valid"): [s.prompt for s in valid],
        ("prompt", "test"): [s.prompt for s in test],
        ("prefix", "valid"): [request_prefix(s.prompt) for s in valid],
        ("prefix", "test"): [request_prefix(s.prompt) for s in test],
    }
    emb = {key: _embeddings(study, t, layers, f"{key[0]} {key[1]}") for key, t in texts.items()}
    paper = study.config.weights
    weights = WeightConfig(strategy="adaptive", tau=paper.tau, top_n=min(paper.top_n, len(valid)))
    md = study.model_dir(study.config.apa_partition, k)
    scores: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    omegas: dict[str, np.ndarray] = {}
    for name, view, layer in chosen:
        omega = aggregation_weights(
            weights,
            emb[(view, "test")][layer],
            num_shards=k,
            valid_embeddings=emb[(view, "valid")][layer],
            valid_labels=yv,
            valid_predictions=pv,
        )
        omegas[name] = omega
        if name == BASELINE and weights == paper:  # Table 1's APA(D) pass (memoised by the analysis)
            scores[name] = study.aggregated(md, "decomposition", weights)[0]
        else:
            scores[name] = study.aggregated_omega(md, "decomposition", omega, f"embedding {name}")
        rows.append(
            {
                "variant": name,
                "view": view,
                "layer": layer if layer >= 0 else num_layers,
                "test_auc": auc(yt, scores[name]),
                "prediction_level_test_auc": auc(yt, (omega * pt).sum(axis=1)),
                **entropy_stats(omega),
            }
        )
    base = omegas[BASELINE].argmax(axis=1)
    for row in rows:
        row["argmax_agrees_with_paper"] = float(np.mean(omegas[row["variant"]].argmax(axis=1) == base))
    boot = paired_bootstrap(
        yt, scores, [(name, BASELINE) for name, _, _ in chosen[1:]], draws, study.config.seed
    )
    result = {
        "num_layers": num_layers,
        "num_shards": k,
        "weights": {"tau": weights.tau, "top_n": weights.top_n},
        "sizes": {"valid": len(valid), "test": len(test)},
        "distinct_test_prefixes": len(set(texts[("prefix", "test")])),
        "variants": rows,
        "bootstrap": boot,
    }

    replace_text(study.out / "embedding.json", json.dumps(result, indent=2, default=float))
    replace_text(study.out / "embedding.md", embedding_markdown(result))
    return result


def embedding_markdown(r: dict[str, Any]) -> str:
    """The variants as a markdown table with CIs."""
    boot = r["bootstrap"]
    lines = [
        f"ω variants, APA(D), K={r['num_shards']}, τ={r['weights']['tau']:g}, n={r['weights']['top_n']}, "
        f"{r['sizes']['valid']} valid / {r['sizes']['test']} test, L={r['num_layers']} layers",
        "",
        "| ω from | layer | test AUC [95% CI] | − paper's ω [95% CI] | Σω·P AUC | mean max ω | argmax = paper's |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["variants"]:
        m = boot["methods"][row["variant"]]
        d = boot["differences"].get(f"{row['variant']} - {BASELINE}")
        diff = f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d else "(baseline)"
        lines.append(
            f"| {row['variant']} | {row['layer']} | {m['auc']:.4f} [{m['ci'][0]:.4f}, {m['ci'][1]:.4f}] | {diff} | "
            f"{row['prediction_level_test_auc']:.4f} | {row['mean_max_weight']:.3f} | {row['argmax_agrees_with_paper']:.2f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["BASELINE", "embedding_markdown", "run_embedding_study", "variants"]
