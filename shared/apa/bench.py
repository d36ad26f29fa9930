"""`apa bench`: how fast APA serves and unlearns, as JSON + PNG (timings live here, never in tests).

* `inference`: throughput (samples/s) and per-request latency (p50/p95) of scoring with one LoRA
  adapter merged into the base model, the same adapter unmerged, APA's batched per-request mixture
  at the decomposition / non-decomposition level (with given ω, and end to end: base-model
  embedding + adaptive ω + mixture, the embedding at the last layer or an early exit), and SISA's
  prediction averaging (K passes), for each K and batch size; and one ranking request (50
  candidates of one user): every full prompt scored with per-candidate ω, vs per-request ω with
  the shared prefix computed once. The adapters are random LoRA weights (r=8, alpha=16, q_proj/v_proj, as trained):
  the bench measures speed only and needs no training.
* `train`: seconds to train one of K shards vs the whole training set (K=1), same settings.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from apa.aggregation import (
    MixtureLoRA,
    WeightConfig,
    aggregation_weights,
    common_prefix_length,
    score_shared_prefix,
)
from apa.backbone import Backbone, BackboneConfig, unwrap_causal_lm
from apa.data import Sample, read_jsonl
from apa.experiments import machine_info, write_json
from apa.metrics import auc
from apa.partition import PartitionConfig, partition
from apa.prompts import MOVIE_INSTRUCTION, answer_text
from apa.training import TrainConfig, lora_config, quiet_peft, seeded, train_adapter

log = logging.getLogger(__name__)

RANDOM_ADAPTERS_NOTE = (
    "adapters are random LoRA weights (r=8, alpha=16, q_proj/v_proj): the bench measures speed, not quality"
)
MIXTURE_VS_SINGLE_TARGET = 0.9
"""APA's throughput (end to end: weights included) / one merged adapter's, at K=4 and batch 16."""
RECOMMEND_TARGET = 5.0
"""A /recommend of 50 candidates with the shared prefix / scoring 50 full prompts (speed-up)."""
MIXTURE_VS_SISA_TARGET = 3.4
"""Mixture throughput / SISA's, at K=4."""


# ------------------------------------------------------------------------------------------------
# inputs


def synthetic_samples(n: int, split: str = "test", seed: int = 0) -> list[Sample]:
    """TALLRec-shaped movie samples with made-up titles (when no prepared data is at hand)."""
    rng = random.Random(seed)
    titles = [f"Movie {i} ({1980 + i % 20})" for i in range(200)]
    out = []
    for i in range(n):
        history = rng.sample(titles, 10)
        target = rng.choice(titles)
        label = rng.randint(0, 1)
        text = (
            "User Preference: "
            + ", ".join(f'"{t}"' for t in history[:6])
            + "\nUser Unpreference: "
            + ", ".join(f'"{t}"' for t in history[6:])
            + f'\nWhether the user will like the target movie "{target}"?'
        )
        out.append(
            Sample(
                sample_id=f"bench:{split}:{seed}:{i}",
                user_id=f"u{i % 16}",
                split=split,  # type: ignore[arg-type]
                instruction=MOVIE_INSTRUCTION,
                input=text,
                output=answer_text(label),
                label=label,
                interaction_ids=tuple(f"bench:{i}:{j}" for j in range(11)),
            )
        )
    return out


def bench_samples(data: str, split: str, n: int, seed: int) -> tuple[list[Sample], str]:
    """`n` samples of `split` from a prepared data directory (cycled if fewer), or synthetic ones."""
    root = Path(data)
    if (root / f"{split}.jsonl").is_file():
        samples = read_jsonl(root / f"{split}.jsonl")
        if samples:
            return [samples[i % len(samples)] for i in range(n)], str(root / f"{split}.jsonl")
    return synthetic_samples(n, split, seed), "synthetic"


def _as_list(value: int | list[int] | None, default: list[int]) -> list[int]:
    values = default if value is None else [value] if isinstance(value, int) else list(value)
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {value!r}")
    return sorted(set(values))


def random_adapters(backbone: Backbone, k: int, seed: int = 0) -> Any:
    """A peft model over a fork of the base model with K random LoRA adapters `shard_0..K-1` (B is not zero)."""
    from peft import get_peft_model

    cfg = lora_config(TrainConfig(), int(getattr(backbone.model.config, "num_hidden_layers", 0) or 0))
    with seeded(seed, backbone.device), quiet_peft():
        peft_model = get_peft_model(backbone.fork_model(), cfg, adapter_name="shard_0")
        for j in range(1, k):
            peft_model.add_adapter(f"shard_{j}", cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            param.requires_grad_(False)
    peft_model.eval()
    return peft_model


# ------------------------------------------------------------------------------------------------
# measuring


def measure(fn: Callable[[list[int]], Any], n: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Serve requests 0..n-1 in batches of `batch_size`, `repeats` times, after one warm-up batch.
    A request's latency is its batch's wall time (it waits for the whole batch)."""
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    fn(chunks[0])
    latencies: list[float] = []
    total = 0.0
    for _ in range(repeats):
        for chunk in chunks:
            started = time.perf_counter()
            fn(chunk)
            seconds = time.perf_counter() - started
            total += seconds
            latencies.extend([seconds] * len(chunk))
    return {
        "samples_per_second": len(latencies) / max(total, 1e-12),
        "latency_ms_p50": 1000 * float(np.percentile(latencies, 50)),
        "latency_ms_p95": 1000 * float(np.percentile(latencies, 95)),
        "seconds": total,
        "requests": len(latencies),
    }


def bench_inference(
    backbone: Backbone,
    prompts: Sequence[str],
    shard_counts: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: int,
    seed: int = 0,
    progress: bool = True,
    exit_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Every method x K x batch size, on random adapters over a fork of the base model;
    `apa_D_end_to_end_exit<l>` embeds with an early exit at each of `exit_layers` (default L/4, L/8)."""
    prompts = list(prompts)
    layers = list(exit_layers) if exit_layers is not None else default_exit_layers(backbone)
    exits = [early_exit(backbone, layer) for layer in layers]
    n = len(prompts)
    k_max = max(shard_counts)
    peft_model = random_adapters(backbone, k_max, seed)
    names = [f"shard_{j}" for j in range(k_max)]
    rng = np.random.default_rng(seed)
    results: list[dict[str, Any]] = []
    merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=["shard_0"])
    merged.eval()
    one_pass = MixtureLoRA(peft_model, names[:1])

    def score_batch(model: Any) -> Callable[[list[str]], np.ndarray]:
        return lambda p: backbone.score(p, model=model, batch_size=max(1, len(p)))

    def single_lora(idx: list[int]) -> Any:
        with one_pass.only("shard_0"):
            return backbone.score([prompts[i] for i in idx], model=peft_model, batch_size=len(idx))

    jobs: list[tuple[str, int, Callable[[list[int]], Any]]] = [
        ("single_merged", 1, lambda idx: score_batch(merged)([prompts[i] for i in idx])),
        ("single_lora", 1, single_lora),
    ]
    for k in shard_counts:
        mix = MixtureLoRA(peft_model, names[:k])
        omega = rng.dirichlet(np.ones(k), size=n)  # dense: every adapter carries weight in every row
        pool = synthetic_pool(backbone, k, rng)
        jobs += _mixture_jobs(backbone, peft_model, mix, prompts, omega, pool, k, exits)
    total = len(jobs) * len(batch_sizes)
    bar = _progress(total, progress)
    for method, k, fn in jobs:
        for batch_size in batch_sizes:
            row = {"method": method, "num_shards": k, "batch_size": batch_size}
            row.update(measure(fn, n, batch_size, repeats))
            results.append(row)
            if bar is not None:
                bar.set_postfix_str(f"{method} K={k} b={batch_size}")
                bar.update()
    if bar is not None:
        bar.close()
    return {
        "exit_layers": layers,
        "num_layers": backbone.num_layers,
        "results": results,
        "ratios": ratios(results, shard_counts, batch_sizes),
    }


def synthetic_pool(
    backbone: Backbone, k: int, rng: np.random.Generator, size: int = 256
) -> dict[str, np.ndarray]:
    """A random validation pool for adaptive ω (only its cost matters to a bench): embeddings of the
    base model's width, labels, and K adapters' predictions."""
    width = int(unwrap_causal_lm(backbone.model).get_input_embeddings().weight.shape[1])
    return {
        "valid_embeddings": rng.normal(size=(size, width)),
        "valid_labels": rng.integers(0, 2, size).astype(float),
        "valid_predictions": rng.uniform(size=(size, k)),
    }


def default_exit_layers(backbone: Backbone) -> list[int]:
    """L/4 and L/8: the early exits the bench times by default."""
    return sorted({backbone.num_layers // 4, backbone.num_layers // 8}, reverse=True)


def early_exit(backbone: Backbone, layer: int | None = None) -> Backbone:
    """The same backbone (shared model and tokenizer) embedding at `layer` (default L/4)."""
    view = copy.copy(backbone)
    view.config = replace(backbone.config, embed_layer=backbone.num_layers // 4 if layer is None else layer)
    return view


def _mixture_jobs(
    backbone: Backbone,
    peft_model: Any,
    mix: MixtureLoRA,
    prompts: list[str],
    omega: np.ndarray,
    pool: dict[str, np.ndarray],
    k: int,
    exits: Sequence[Backbone],
) -> list[tuple[str, int, Callable[[list[int]], Any]]]:
    def score_fn(p: list[str]) -> np.ndarray:  # one forward batch, row-aligned with ω
        return backbone.score(p, model=peft_model, batch_size=max(1, len(p)))

    adaptive = WeightConfig(strategy="adaptive", tau=1000.0, top_n=20)

    def mixture(level: Any) -> Callable[[list[int]], Any]:
        def run(idx: list[int]) -> Any:
            return mix.score(score_fn, [prompts[i] for i in idx], omega[idx], level, batch_size=len(idx))

        return run

    def end_to_end(level: Any, embedder: Backbone = backbone) -> Callable[[list[int]], Any]:
        def run(idx: list[int]) -> Any:
            batch = [prompts[i] for i in idx]
            emb = embedder.embed(batch, batch_size=len(batch))
            w = aggregation_weights(
                adaptive,
                emb,
                valid_embeddings=pool["valid_embeddings"],
                valid_labels=pool["valid_labels"],
                valid_predictions=pool["valid_predictions"],
            )
            return mix.score(score_fn, batch, w, level, batch_size=len(idx))

        return run

    def sisa(idx: list[int]) -> Any:
        return mix.predict(score_fn, [prompts[i] for i in idx])

    return [
        ("mixture_D", k, mixture("decomposition")),
        ("mixture_ND", k, mixture("non_decomposition")),
        ("apa_D_end_to_end", k, end_to_end("decomposition")),
        ("apa_ND_end_to_end", k, end_to_end("non_decomposition")),
        *[(f"apa_D_end_to_end_exit{e.config.embed_layer}", k, end_to_end("decomposition", e)) for e in exits],
        ("sisa", k, sisa),
    ]


def recommend_request(samples: Sequence[Sample], candidates: int, history: int = 10) -> list[str]:
    """One user's ranking request: a TALLRec history of `history` items (the targets of the first
    samples, with their labels) and `candidates` other target titles, as `apa.catalogue` builds it."""
    from apa.catalogue import HistoryItem, recommend_prompt, target_title

    titles = list(dict.fromkeys(t for t in (target_title(s) for s in samples) if t))
    labels = {target_title(s): s.label for s in samples}
    if len(titles) < history + candidates:
        titles = titles + [f"Synthetic Movie {i} ({1950 + i % 50})" for i in range(history + candidates)]
    past = [HistoryItem(t, bool(labels.get(t, i % 2))) for i, t in enumerate(titles[:history])]
    return [recommend_prompt(past, t) for t in titles[history : history + candidates]]


def bench_recommend(
    backbone: Backbone,
    samples: Sequence[Sample],
    num_shards: int = 4,
    candidates: int = 50,
    repeats: int = 2,
    seed: int = 0,
    exit_layer: int | None = None,
) -> dict[str, Any]:
    """Seconds to rank `candidates` items for one user, APA(D) with K random adapters: every full
    prompt with per-candidate ω (the paper's: embed each full prompt, one mixture row each), the
    same with the candidates' embeddings sharing their prefix (`Backbone.embed`; the mixture still
    scores full prompts, one ω row each), per-request ω on full prompts, and per-request ω with the
    shared prefix run once (`score_shared_prefix`), the last also with an early-exit embedding.
    The speed-ups are full prompts / shared prefix (`speedup`, `speedup_exit`) and, for the
    paper's per-candidate ω, full-row / shared-prefix embeddings (`speedup_per_candidate`)."""
    from apa.prompts import request_prefix

    prompts = recommend_request(samples, candidates)
    peft_model = random_adapters(backbone, num_shards, seed)
    mix = MixtureLoRA(peft_model, [f"shard_{j}" for j in range(num_shards)])
    rng = np.random.default_rng(seed)
    pool = synthetic_pool(backbone, num_shards, rng)
    adaptive = WeightConfig(strategy="adaptive", tau=1000.0, top_n=20)
    size = 16
    exit_backbone = early_exit(backbone, exit_layer)

    def omega(texts: list[str], embedder: Backbone = backbone, full_rows: bool = False) -> np.ndarray:
        embed = embedder.embed_full_rows if full_rows else embedder.embed
        return aggregation_weights(
            adaptive,
            embed(texts, batch_size=size),
            valid_embeddings=pool["valid_embeddings"],
            valid_labels=pool["valid_labels"],
            valid_predictions=pool["valid_predictions"],
        )

    def score_fn(p: list[str]) -> np.ndarray:
        return backbone.score(p, model=peft_model, batch_size=max(1, len(p)))

    def full(per_request: bool, full_rows: bool = True) -> Callable[[], Any]:
        def run() -> Any:
            if per_request:
                w = omega([request_prefix(prompts[0])]).repeat(len(prompts), 0)
            else:
                w = omega(prompts, full_rows=full_rows)
            return mix.score(score_fn, prompts, w, "decomposition", batch_size=size)

        return run

    def shared(embedder: Backbone) -> Callable[[], Any]:
        def run() -> Any:
            row = omega([request_prefix(prompts[0])], embedder)
            return score_shared_prefix(
                backbone,
                peft_model,
                prompts,
                context=lambda rows: mix.apply(row.repeat(rows, 0), "decomposition"),
                chunk_size=size,
            )

        return run

    jobs = [
        ("full_prompts_per_candidate_omega", full(False)),
        ("per_candidate_omega_shared_prefix_embedding", full(False, full_rows=False)),
        ("full_prompts_per_request_omega", full(True)),
        ("shared_prefix_per_request_omega", shared(backbone)),
        ("shared_prefix_per_request_omega_exit", shared(exit_backbone)),
    ]
    results: list[dict[str, Any]] = []
    by: dict[str, float] = {}
    for method, fn in jobs:
        fn()  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        by[method] = float(np.median(seconds))
        results.append({"method": method, "seconds_p50": by[method], "seconds": seconds, "repeats": repeats})
    ids = backbone.tokenizer(prompts)["input_ids"]
    return {
        "candidates": len(prompts),
        "num_shards": num_shards,
        "exit_layer": exit_backbone.config.embed_layer,
        "prompt_tokens": int(np.mean([len(x) for x in ids])),
        "shared_tokens": common_prefix_length(ids),
        "results": results,
        "speedup": by["full_prompts_per_candidate_omega"] / by["shared_prefix_per_request_omega"],
        "speedup_exit": by["full_prompts_per_candidate_omega"] / by["shared_prefix_per_request_omega_exit"],
        "speedup_per_candidate": by["full_prompts_per_candidate_omega"]
        / by["per_candidate_omega_shared_prefix_embedding"],
        "target": RECOMMEND_TARGET,
    }


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench inference", unit="run")


def ratios(
    results: list[dict[str, Any]], shard_counts: Sequence[int], batch_sizes: Sequence[int]
) -> dict[str, Any]:
    """Throughput ratios from the same run: mixture / one merged adapter at batch 16 (or the largest
    batch), and mixture / SISA at K=4 (or the smallest K), per batch size."""
    speed = {(r["method"], r["num_shards"], r["batch_size"]): r["samples_per_second"] for r in results}
    big = 16 if 16 in batch_sizes else max(batch_sizes)
    k4 = 4 if 4 in shard_counts else min(shard_counts)
    mixtures = list(dict.fromkeys(m for m, _, _ in speed if m.startswith(("mixture_", "apa_"))))
    vs_single = {
        f"K={k}": {m: speed[(m, k, big)] / speed[("single_merged", 1, big)] for m in mixtures}
        for k in shard_counts
    }
    vs_sisa = {
        f"batch={b}": {m: speed[(m, k4, b)] / speed[("sisa", k4, b)] for m in mixtures} for b in batch_sizes
    }
    return {
        "mixture_vs_single": {
            "batch_size": big,
            "target": MIXTURE_VS_SINGLE_TARGET,
            "ratios": vs_single,
            "meets_target": {
                key: {m: v >= MIXTURE_VS_SINGLE_TARGET for m, v in row.items()}
                for key, row in vs_single.items()
            },
        },
        "mixture_vs_sisa": {
            "num_shards": k4,
            "target": MIXTURE_VS_SISA_TARGET,
            "ratios": vs_sisa,
            "meets_target": {
                key: {m: v >= MIXTURE_VS_SISA_TARGET for m, v in row.items()} for key, row in vs_sisa.items()
            },
        },
    }


def plot_inference(report: dict[str, Any], path: Path) -> None:
    from apa.experiments import _pyplot

    plt = _pyplot()
    results = report["results"]
    batch_sizes = sorted({r["batch_size"] for r in results})
    ks = sorted({r["num_shards"] for r in results if r["num_shards"] > 1})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4), squeeze=False)
    speed = {(r["method"], r["num_shards"], r["batch_size"]): r["samples_per_second"] for r in results}
    for ax, b in zip(axes[0], batch_sizes, strict=True):
        methods = dict.fromkeys(r["method"] for r in results if r["num_shards"] > 1)
        for method in methods:
            ax.plot(ks, [speed[(method, k, b)] for k in ks], "o-", label=method)
        for method, style in (("single_merged", "--"), ("single_lora", ":")):
            ax.axhline(speed[(method, 1, b)], color="k", linestyle=style, linewidth=1, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (adapters)")
        ax.set_ylabel("samples / s")
        ax.set_title(f"batch {b}")
        ax.legend(fontsize=7)
    fig.suptitle("inference throughput (random adapters)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_inference(report: dict[str, Any]) -> None:
    print(f"{'method':<20} {'K':>3} {'batch':>5} {'samples/s':>10} {'p50 ms':>9} {'p95 ms':>9}")
    for r in report["results"]:
        print(
            f"{r['method']:<20} {r['num_shards']:>3} {r['batch_size']:>5} {r['samples_per_second']:>10.2f} "
            f"{r['latency_ms_p50']:>9.1f} {r['latency_ms_p95']:>9.1f}"
        )
    single = report["ratios"]["mixture_vs_single"]
    print(
        f"\nmixture / single merged adapter at batch {single['batch_size']} (target >= {single['target']}):"
    )
    for key, row in single["ratios"].items():
        print(f"  {key:<6} " + "  ".join(f"{m} {v:.2f}" for m, v in row.items()))
    sisa = report["ratios"]["mixture_vs_sisa"]
    print(f"mixture / SISA at K={sisa['num_shards']} (target >= {sisa['target']}x):")
    for key, row in sisa["ratios"].items():
        print(f"  {key:<9} " + "  ".join(f"{m} {v:.2f}x" for m, v in row.items()))
    print(f"(apa_D_end_to_end_exit<l> embeds at layer l of {report['num_layers']})")
    rec = report.get("recommend")
    if rec:
        print(f"\none /recommend of {rec['candidates']} candidates, K={rec['num_shards']}:")
        for r in rec["results"]:
            print(f"  {r['method']:<44} {r['seconds_p50']:.3f} s (p50 of {r['repeats']})")
        print(
            f"  shared prefix vs full prompts: {rec['speedup']:.2f}x (target >= {rec['target']}x); "
            f"{rec['shared_tokens']} of {rec['prompt_tokens']} tokens shared"
        )
        print(f"  per-candidate ω, embeddings sharing the prefix: {rec['speedup_per_candidate']:.2f}x")
    print(f"\nnote: {RANDOM_ADAPTERS_NOTE}")


# ------------------------------------------------------------------------------------------------
# training


def bench_train(
    backbone: Backbone,
    samples: Sequence[Sample],
    shard_counts: Sequence[int],
    epochs: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one adapter on all `samples` (K=1) and one on shard 0 of a random K-partition, per K."""
    config = TrainConfig.preset("cpu", epochs=epochs, seed=seed, valid_eval_size=0)  # no validation
    train_adapter(backbone, list(samples[:2]), [], replace_epochs(config, 1))  # warm-up, untimed

    def timed(subset: Sequence[Sample], desc: str) -> dict[str, float]:
        started = time.perf_counter()
        result = train_adapter(backbone, list(subset), [], config, progress, desc)
        seconds = time.perf_counter() - started
        return {
            "samples": len(subset),
            "seconds": seconds,
            "samples_per_second": result.samples_per_second,
        }

    full = timed(samples, "K=1")
    shards = []
    by_id = {s.sample_id: s for s in samples}
    for k in shard_counts:
        parts = partition([s.sample_id for s in samples], PartitionConfig("random", num_shards=k, seed=seed))
        one = timed([by_id[i] for i in parts.shards[0]], f"K={k} shard 0")
        shards.append(
            {
                "num_shards": k,
                **one,
                "ratio_to_full": one["seconds"] / max(full["seconds"], 1e-12),
                "expected_ratio": 1.0 / k,
                "speedup": full["seconds"] / max(one["seconds"], 1e-12),
            }
        )
    return {"train_config": config.to_json(), "full": full, "shards": shards}


# ------------------------------------------------------------------------------------------------
# backbone: what bf16 autocast and answer-only logits buy on this machine


def _full_logits_loss(backbone: Backbone, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The naive Eq. 4: full-vocabulary logits at every position, then the answer slice."""
    span = batch["labels"].shape[1]
    with backbone.autocast():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[:, -span - 1 : -1]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100
    )


def bench_backbone(
    backbone: Backbone,
    test: Sequence[Sample],
    train: Sequence[Sample],
    model_dir: str | None = None,
    train_steps: int = 2,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Scoring samples/s and AUC with and without bf16 autocast (with the shard-0 adapter of
    `model_dir` when given, else the base model), and LoRA training samples/s for fp32, bf16, and
    bf16 with full-vocabulary logits."""
    from peft import get_peft_model

    from apa.aggregation import AggregatedScorer
    from apa.modeldir import ModelDir
    from apa.training import _num_layers, answer_batch, answer_loss

    prompts, labels = [s.prompt for s in test], [s.label for s in test]
    original = backbone.config
    scorer = None
    if model_dir:
        md = ModelDir(model_dir)
        refs = md.adapter_refs()
        scorer = AggregatedScorer(backbone, num_shards=md.num_shards, source=md, adapters={0: refs[0]})
    peft_model = scorer.peft_model if scorer is not None else None
    scoring: dict[str, Any] = {}
    try:
        for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
            backbone.config = replace(original, bf16_autocast=bf16)
            backbone.score(prompts[:batch_size], model=peft_model)  # warm-up
            started = time.perf_counter()
            scores = backbone.score(prompts, model=peft_model, progress=True)
            seconds = time.perf_counter() - started
            scoring[name] = {
                "samples_per_second": len(prompts) / seconds,
                "auc": auc(labels, scores),
                "scores": scores,
            }
        diff = np.abs(scoring["fp32"].pop("scores") - scoring["bf16_autocast"].pop("scores"))
        scoring["max_abs_p_yes_difference"] = float(diff.max())
        scoring["speedup_bf16"] = (
            scoring["bf16_autocast"]["samples_per_second"] / scoring["fp32"]["samples_per_second"]
        )
    finally:
        if scorer is not None:
            scorer.close()
    training: dict[str, Any] = {}
    config = TrainConfig.preset("cpu")
    for name, bf16, loss_fn in (
        ("fp32_answer_logits", False, answer_loss),
        ("bf16_answer_logits", True, answer_loss),
        ("bf16_full_logits", True, _full_logits_loss),
    ):
        backbone.config = replace(original, bf16_autocast=bf16)
        with seeded(0, backbone.device), quiet_peft():
            model = get_peft_model(backbone.fork_model(), lora_config(config, _num_layers(backbone.model)))
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
            model.train()
            seconds = 0.0
            for step in range(train_steps + 1):  # step 0 warms up, untimed
                chunk = [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]
                started = time.perf_counter()
                loss = loss_fn(backbone, model, answer_batch(backbone, chunk))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:
                    seconds += time.perf_counter() - started
        del model
        training[name] = {"samples_per_second": train_steps * batch_size / seconds}
    backbone.config = original
    base = training["fp32_answer_logits"]["samples_per_second"]
    for row in training.values():
        row["speedup_vs_fp32"] = row["samples_per_second"] / base
    return {"scoring": scoring, "training": training, "score_samples": len(prompts), "adapter": model_dir}


def _interleaved(
    prompts: Sequence[str], batch_size: int, runs: dict[str, Callable[[list[str]], np.ndarray]]
) -> tuple[dict[str, Any], float]:
    """Two ways of computing the same thing, run on the same batches of `prompts`, alternating
    batch by batch (load on the machine hits both alike): ({way: samples/s, "speedup": first's
    time / second's}, the largest absolute difference of their outputs)."""
    timed = dict.fromkeys(runs, 0.0)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    for start in range(0, len(prompts), batch_size):
        part = list(prompts[start : start + batch_size])
        for name, run in runs.items():
            began = time.perf_counter()
            parts[name].append(np.asarray(run(part)))
            timed[name] += time.perf_counter() - began
    first, second = runs
    report: dict[str, Any] = {name: {"samples_per_second": len(prompts) / timed[name]} for name in runs}
    report["speedup"] = timed[first] / timed[second]
    gap = float(np.max(np.abs(np.concatenate(parts[first]) - np.concatenate(parts[second]))))
    return report, gap


def bench_prefix(
    backbone: Backbone,
    test: Sequence[Sample],
    train: Sequence[Sample],
    train_steps: int = 3,
    batch_size: int = 8,
) -> dict[str, Any]:
    """What running the prompts' shared prefix once buys (`apa.shared_prefix`): LoRA training
    steps, scoring and ω's embeddings, full rows against shared prefix, interleaved batch by batch in one run (so
    load on the machine hits both alike), in the backbone's precision. LoRA dropout is off, so
    the two trainings take the same steps: |Δloss| and |ΔP(Yes)| show they compute the same."""
    from peft import get_peft_model

    from apa.training import _num_layers, answer_batch, answer_loss

    config = replace(TrainConfig.preset("cpu"), lora_dropout=0.0)
    layouts = ("full_rows", "shared_prefix")
    models, optimizers = {}, {}
    for name in layouts:
        with seeded(0, backbone.device), quiet_peft():
            models[name] = get_peft_model(
                backbone.fork_model(), lora_config(config, _num_layers(backbone.model))
            )
        optimizers[name] = torch.optim.AdamW(
            [p for p in models[name].parameters() if p.requires_grad], lr=config.lr
        )
        models[name].train()
    seconds = dict.fromkeys(layouts, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in layouts}
    prefix_tokens: list[int] = []
    for step in range(train_steps + 1):  # step 0 warms up, untimed
        chunk = [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]
        for name in layouts:
            started = time.perf_counter()
            batch = answer_batch(backbone, chunk, shared_prefix=name == "shared_prefix")
            loss = answer_loss(backbone, models[name], batch)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                seconds[name] += time.perf_counter() - started
            losses[name].append(float(loss.detach()))
            if "prefix_ids" in batch:
                prefix_tokens.append(int(batch["prefix_ids"].shape[1]))
    training: dict[str, Any] = {
        name: {"samples_per_second": train_steps * batch_size / seconds[name]} for name in layouts
    }
    training["speedup"] = seconds["full_rows"] / seconds["shared_prefix"]
    gaps = np.abs(np.array(losses["full_rows"]) - np.array(losses["shared_prefix"]))
    training["max_abs_loss_difference"] = float(gaps.max())
    training["prefix_tokens"] = prefix_tokens
    del optimizers
    model = models["full_rows"]
    model.eval()
    prompts = [s.prompt for s in test]
    backbone.score(prompts[:batch_size], model=model)  # warm-up
    scoring, scoring_gap = _interleaved(
        prompts,
        batch_size,
        {
            "full_rows": lambda part: backbone.score(part, model=model, batch_size=len(part)),
            "shared_prefix": lambda part: score_shared_prefix(backbone, model, part, chunk_size=len(part))[0],
        },
    )
    scoring["max_abs_p_yes_difference"] = scoring_gap
    embedding, embedding_gap = _interleaved(
        prompts,
        batch_size,
        {
            "full_rows": lambda part: backbone.embed_full_rows(part, batch_size=len(part)),
            "shared_prefix": lambda part: backbone.embed(part, batch_size=len(part)),
        },
    )
    embedding["max_abs_difference"] = embedding_gap
    embedding["embed_layer"] = backbone.config.embed_layer
    token_counts = [len(x) for x in backbone.tokenizer(prompts)["input_ids"]]
    return {
        "training": training,
        "scoring": scoring,
        "embedding": embedding,
        "train_steps": train_steps,
        "batch_size": batch_size,
        "score_samples": len(prompts),
        "mean_prompt_tokens": float(np.mean(token_counts)),
        "bf16_autocast": backbone.config.bf16_autocast,
        "torch_threads": torch.get_num_threads(),
    }


def print_prefix(report: dict[str, Any]) -> None:
    """The prefix bench's lines: samples/s per layout, the speed-ups and the exactness checks."""
    tokens = report["training"]["prefix_tokens"]
    print(
        f"prompts: {report['mean_prompt_tokens']:.0f} tokens on average, "
        f"{min(tokens) if tokens else 0}-{max(tokens) if tokens else 0} of them shared per batch of {report['batch_size']}"
    )
    for part in ("training", "scoring", "embedding"):
        row = report[part]
        print(
            f"{part:<9} full rows {row['full_rows']['samples_per_second']:.2f} samples/s, "
            f"shared prefix {row['shared_prefix']['samples_per_second']:.2f} samples/s: {row['speedup']:.2f}x"
        )
    print(
        f"same computation: max |dloss| {report['training']['max_abs_loss_difference']:.2e} over "
        f"{report['train_steps'] + 1} steps, max |dP(Yes)| {report['scoring']['max_abs_p_yes_difference']:.2e}, "
        f"max |d embedding| {report['embedding']['max_abs_difference']:.2e}"
    )


def replace_epochs(config: TrainConfig, epochs: int) -> TrainConfig:
    return TrainConfig.from_json({**config.to_json(), "epochs": epochs})


# ------------------------------------------------------------------------------------------------
# CLI


def bench_command(
    what: Literal["inference", "train", "backbone", "prefix", "erasure", "serve"],
    model: str = "embedded",
    out: str = "runs/bench",
    data: str = "data/ml-100k",
    num_shards: int | list[int] | None = None,
    batch_sizes: int | list[int] | None = None,
    num_requests: int = 32,
    repeats: int = 2,
    train_size: int = 64,
    epochs: int = 1,
    seed: int = 0,
    model_dir: str | None = None,
    events: int = 1000,
    candidates: int = 5,
    concurrency: int | list[int] | None = None,
    erasures: int = 2,
    omega: str = "per_candidate",
    recommend_candidates: int = 50,
    exit_layer: int | None = None,
) -> int:
    """Benchmark APA: inference throughput and latency, training, the backbone, erasure or the inference service.

    `inference` (throughput, latency), `train` (one shard vs everything), `backbone` (what bf16
    autocast and answer-only logits buy: speed and AUC) or `prefix` (what running the prompts'
    shared template tokens once buys in training, scoring and embedding).

    Args:
        what: inference, train, backbone, prefix, erasure or serve (the inference service over HTTP).
        model: Backbone: embedded, a local model directory, a .gguf file or a hub id.
        out: Directory for inference.json / inference.png or train.json.
        data: Prepared data directory (test prompts for inference, training samples for train);
            synthetic TALLRec-shaped samples when it holds none.
        num_shards: K values, e.g. 4 or [4,8,16] (inference default [4,8,16]; train default 4).
        batch_sizes: inference batch sizes, e.g. [1,16] (default).
        num_requests: inference: requests served per repeat; backbone, prefix: test prompts scored.
        repeats: inference: passes over the requests (after one warm-up batch).
        train_size: train: samples in the full training set (K=1); prefix: training steps timed
            (batches of 8) is train_size / 8.
        epochs: train: epochs for both runs.
        seed: Seed of the random adapters, weights, partition and training.
        model_dir: backbone: score with shard 0's adapter of this model directory (AUC with a
            trained adapter); the base model when not given. num_requests test prompts are scored.
        events: erasure: events of the throughput burst (tansu + Postgres; see apa.bench_erasure).
        candidates: serve: candidate items per POST /recommend.
        concurrency: serve: client threads, e.g. [1,8] (default); num_requests is per thread.
        erasures: serve: stale-event / hot-reload rounds against the running service.
        omega: serve: the service's ω of /recommend, per_candidate (the paper's) or per_request.
        recommend_candidates: inference: candidates of the one ranking request timed (0: skip it).
        exit_layer: inference: the early-exit embedding layer timed (default: L/4 and L/8; the
            /recommend request: L/4).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if what == "erasure":  # the erasure service's bench: no model, its own module
        from apa.bench_erasure import ErasureBenchConfig, print_report, run_erasure_bench

        k = _as_list(num_shards, [8])[0]
        print_report(
            run_erasure_bench(Path(out), ErasureBenchConfig(num_shards=k, burst_events=events, seed=seed))
        )
        return 0
    if what == "serve":  # the inference service over HTTP (apa.bench_serve)
        from apa.bench_serve import ServeBenchConfig, run_serve_bench

        run_serve_bench(
            ServeBenchConfig(
                model=model,
                num_shards=_as_list(num_shards, [4])[0],
                candidates=candidates,
                requests=num_requests,
                concurrency=tuple(_as_list(concurrency, [1, 8])),
                erasures=erasures,
                omega=omega,
                seed=seed,
            ),
            Path(out),
        )
        return 0
    try:
        default_ks = [4, 8, 16] if what == "inference" else [4]
        ks = _as_list(num_shards, default_ks)
        sizes = _as_list(batch_sizes, [1, 16])
        for name, value in (("num_requests", num_requests), ("repeats", repeats), ("train_size", train_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if what == "train" and max(ks) > train_size:
            raise ValueError(f"num_shards {max(ks)} exceeds train_size {train_size}")
    except ValueError as err:
        print(f"apa bench: error: {err}", file=sys.stderr)
        return 2
    backbone = Backbone.load(BackboneConfig(model=model))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"model": {**backbone.describe(), "source": model}, "machine": machine_info(backbone)}
    if what == "inference":
        samples, source = bench_samples(data, "test", num_requests, seed)
        report = bench_inference(
            backbone,
            [s.prompt for s in samples],
            ks,
            sizes,
            repeats,
            seed,
            exit_layers=None if exit_layer is None else [exit_layer],
        )
        if recommend_candidates > 0:
            pool, _ = bench_samples(data, "test", max(200, recommend_candidates + 10), seed)
            report["recommend"] = bench_recommend(
                backbone, pool, 4 if 4 in ks else min(ks), recommend_candidates, repeats, seed, exit_layer
            )
        report = {
            "note": RANDOM_ADAPTERS_NOTE,
            **header,
            "prompts": source,
            "num_requests": num_requests,
            "repeats": repeats,
            "num_shards": ks,
            "batch_sizes": sizes,
            **report,
        }
        write_json(out_dir / "inference.json", report)
        plot_inference(report, out_dir / "inference.png")
        print_inference(report)
        print(f"results in {out_dir / 'inference.json'} and {out_dir / 'inference.png'}")
    elif what == "backbone":
        test, source = bench_samples(data, "test", num_requests, seed)
        train, _ = bench_samples(data, "train", max(train_size, 24), seed)
        report = {**header, "prompts": source, **bench_backbone(backbone, test, train, model_dir)}
        write_json(out_dir / "backbone.json", report)
        for name, row in report["scoring"].items():
            if isinstance(row, dict):
                print(f"score {name:<15} {row['samples_per_second']:.2f} samples/s  AUC {row['auc']:.4f}")
        print(
            f"bf16 speed-up {report['scoring']['speedup_bf16']:.2f}x, max |dP(Yes)| {report['scoring']['max_abs_p_yes_difference']:.4f}"
        )
        for name, row in report["training"].items():
            print(
                f"train {name:<20} {row['samples_per_second']:.2f} samples/s ({row['speedup_vs_fp32']:.2f}x fp32)"
            )
        print(f"results in {out_dir / 'backbone.json'}")
    elif what == "prefix":
        test, source = bench_samples(data, "test", num_requests, seed)
        train, _ = bench_samples(data, "train", max(train_size, 16), seed)
        steps = max(1, train_size // 8)
        report = {**header, "prompts": source, **bench_prefix(backbone, test, train, train_steps=steps)}
        write_json(out_dir / "prefix.json", report)
        print_prefix(report)
        print(f"results in {out_dir / 'prefix.json'}")
    else:
        samples, source = bench_samples(data, "train", train_size, seed)
        report = {**header, "samples": source, "train_size": train_size, "epochs": epochs}
        report.update(bench_train(backbone, samples, ks, epochs, seed))
        write_json(out_dir / "train.json", report)
        full = report["full"]
        print(f"K=1: {full['samples']} samples in {full['seconds']:.1f} s")
        for row in report["shards"]:
            print(
                f"K={row['num_shards']}: one shard ({row['samples']} samples) in {row['seconds']:.1f} s = "
                f"{row['ratio_to_full']:.3f} of K=1 (expected ~{row['expected_ratio']:.3f}), "
                f"{row['speedup']:.2f}x faster"
            )
        print(f"results in {out_dir / 'train.json'}")
    return 0


__all__ = [
    "MIXTURE_VS_SINGLE_TARGET",
    "MIXTURE_VS_SISA_TARGET",
    "bench_command",
    "bench_inference",
    "bench_recommend",
    "early_exit",
    "recommend_request",
    "bench_train",
    "measure",
    "random_adapters",
    "ratios",
    "synthetic_samples",
]
