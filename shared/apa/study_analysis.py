"""Issue 11's analysis of a study run: Table 1 with paired bootstrap CIs, and the diagnostics that
explain APA's result (`apa experiment analysis`).

Everything here is computed from the store's stages: each adapter scores the validation and test
splits once (`predictions`), the base model embeds them once (`embeddings`); only the aggregated
passes (APA(D) / APA(ND) / uniform D) run the model again, each memoised.

* Table 1 at the run's size: zero-shot, Retraining (K=1), SISA (mean of the K semantic-shard
  adapters' predictions), uniform D, APA(D) with the paper's τ=1000, n=20, APA(D) with τ and n
  selected on validation only, APA(ND); paired bootstrap 95% CIs on the same test samples, and the
  differences APA(D) − Retraining, APA(D) − SISA, adaptive − uniform.
* τ/n selection: the validation pool is split in two halves (seeded); neighbours come from half A,
  the selection AUC is measured on half B with the prediction-level mixture Σ_k ω_k P_k (no model
  pass), and the chosen (τ, n) is then used with the full pool on test, as the paper's method is.
* Diagnostics: each shard adapter's test and validation AUC, a per-sample oracle (the adapter
  closest to the true label: a bound, not a method), entropy and mean max of ω, label balance per
  shard, the effect of the validation pool size, each adapter's epochs/steps/validation AUC from its
  manifest, and the unlearning speed-up from the measured training times.
* Label prior: does the paper's error (mean |y − P_k(Yes)| over the n nearest validation samples)
  pick the adapter whose mean prediction matches the neighbourhood's Yes rate, rather than the one
  that ranks best? Measured on validation, and alternative errors that stay exact (they use only the
  current adapters' validation predictions) are reported beside the paper's, never in its place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from apa.aggregation import WeightConfig, aggregation_weights, nearest_neighbours
from apa.atomic import replace_text
from apa.metrics import auc, auc_rows
from apa.stages import AdapterStage, MissingStageError, run_free_first
from apa.study_partitions import shard_rows

if TYPE_CHECKING:
    from apa.experiments import Study

SERVED_PASSES = ("uniform", "paper", "selected", "nd", "nd_selected", "centred", "rank")
"""The served test passes of `analysis`, in their default order: uniform D, APA(D) τ=1000 n=20,
APA(D) with the valid-selected τ/n, APA(ND) with each of the two, and the centred / rank error variants."""


def served_passes(names: Sequence[str] | None) -> tuple[str, ...]:
    """`--served`'s value as pass names: None is all of them, `none` is no pass; an unknown name is a
    ValueError naming the field."""
    if names is None:
        return SERVED_PASSES
    if list(names) == ["none"]:
        return ()
    unknown = [n for n in names if n not in SERVED_PASSES]
    if unknown:
        raise ValueError(f"served: unknown pass {unknown}; expected some of {list(SERVED_PASSES)} or none")
    return tuple(names)


PAPER_SPEEDUP = 3.96
"""The paper's unlearning speed-up of APA at K=4 (Retraining's time over the affected shard's)."""
PAPER = {"Retraining": 0.7428, "SISA": 0.7035, "APA(D)": 0.7259, "APA(ND)": 0.7256}
"""Table 1 of the paper, ML-100K (1024 train / 500 valid / 1000 test, K=4, LLaMA-7B)."""
TAUS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
TOP_NS = (5, 10, 20, 50, 100)
ERRORS = ("paper", "centred", "rank")


# -- statistics ---------------------------------------------------------------------------------------


def paired_bootstrap(
    labels: np.ndarray,
    scores: dict[str, np.ndarray],
    diffs: list[tuple[str, str]],
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC with a 95% percentile CI for every method, and for each (a, b) in `diffs` AUC(a) − AUC(b),
    all on the same bootstrap resamples of the test samples."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    idx = rng.integers(0, n, size=(draws, n))
    y = labels[idx]
    boot = {name: auc_rows(y, s[idx]) for name, s in scores.items()}
    out: dict[str, Any] = {"draws": draws, "methods": {}, "differences": {}}
    for name, s in scores.items():
        b = boot[name][np.isfinite(boot[name])]
        out["methods"][name] = {
            "auc": auc(labels, s),
            "ci": [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))],
        }
    for a, b_name in diffs:
        if a not in scores or b_name not in scores:
            continue
        d = boot[a] - boot[b_name]
        d = d[np.isfinite(d)]
        out["differences"][f"{a} - {b_name}"] = {
            "diff": auc(labels, scores[a]) - auc(labels, scores[b_name]),
            "ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
        }
    return out


def entropy_stats(omega: np.ndarray) -> dict[str, Any]:
    """Mean entropy (nats; log K for uniform) and mean largest weight of ω's rows."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(omega > 0, omega * np.log(omega), 0.0), axis=1)
    return {
        "mean_entropy": float(ent.mean()),
        "max_entropy": float(math.log(omega.shape[1])),
        "mean_max_weight": float(omega.max(axis=1).mean()),
        "argmax_share": [
            float(x) for x in np.bincount(omega.argmax(axis=1), minlength=omega.shape[1]) / len(omega)
        ],
    }


# -- weights with the paper's error and with alternatives -----------------------------------------


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def centred(pool_preds: np.ndarray, pool_labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Each adapter's predictions shifted in logit space so that its mean on the pool equals the pool's
    Yes rate: the label prior taken out (an exact transform: it uses validation data only)."""
    out = np.empty_like(preds)
    rate = float(pool_labels.mean())
    for k in range(preds.shape[1]):
        z = _logit(pool_preds[:, k])
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection on the shift b: mean sigmoid(z + b) = rate
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(z + mid)))).mean() < rate:
                lo = mid
            else:
                hi = mid
        out[:, k] = 1 / (1 + np.exp(-(_logit(preds[:, k]) + (lo + hi) / 2)))
    return out


def neighbour_error(
    kind: str,
    requests: np.ndarray,
    pool_emb: np.ndarray,
    pool_labels: np.ndarray,
    pool_preds: np.ndarray,
    top_n: int,
) -> np.ndarray:
    """(n_requests x K) error of each adapter over each request's n nearest pool samples:
    `paper` mean |y − P_k|; `centred` the same on prior-centred predictions; `rank` 1 − AUC of P_k
    over the neighbours (0.5 where the neighbours hold one class only)."""
    nearest = nearest_neighbours(requests, pool_emb, top_n)  # the serving library's neighbours
    preds = centred(pool_preds, pool_labels, pool_preds) if kind == "centred" else pool_preds
    if kind in ("paper", "centred"):
        return np.abs(pool_labels[:, None] - preds)[nearest].mean(axis=1)
    if kind == "rank":
        out = np.empty((len(requests), preds.shape[1]))
        y = pool_labels[nearest]
        for k in range(preds.shape[1]):
            a_k = auc_rows(y, preds[nearest, k])
            out[:, k] = 1 - np.where(np.isfinite(a_k), a_k, 0.5)
        return out
    raise ValueError(f"unknown error {kind!r}")


def softmax_weights(errors: np.ndarray, tau: float) -> np.ndarray:
    z = -tau * errors
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def halves(
    n: int, rng: np.random.Generator, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of range(n): random samples, or (with `groups`, e.g. user ids) random groups, so
    that no group is on both sides (test users never appear in the validation pool)."""
    if groups is None or len(set(groups.tolist())) < 2:
        order = rng.permutation(n)
        return order[: n // 2], order[n // 2 :]
    names = rng.permutation(sorted(set(groups.tolist())))
    sizes = np.array([np.sum(groups == g) for g in names])
    first = set(names[: max(1, int(np.searchsorted(np.cumsum(sizes), n / 2)) + 1)].tolist())
    if len(first) == len(names):
        first = set(names[:-1].tolist())
    mask = np.array([g in first for g in groups.tolist()])
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def select_tau_n(
    emb: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    seed: int,
    kind: str = "paper",
    splits: int = 5,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """(τ, n) chosen on validation only: the pool is split in two halves (seeded, `splits` times,
    each half in turn the neighbour pool; by user when `groups` holds the user ids); neighbours come
    from one half, the prediction-level mixture's AUC is measured on the other. Returns the grid and
    the best cell."""
    rng = np.random.default_rng(seed)
    grid: dict[tuple[float, int], list[float]] = {}
    for _ in range(splits):
        split = halves(len(labels), rng, groups)
        for pool, held in (split, split[::-1]):
            for top_n in TOP_NS:
                err = neighbour_error(kind, emb[held], emb[pool], labels[pool], preds[pool], top_n)
                for tau in TAUS:
                    w = softmax_weights(err, tau)
                    grid.setdefault((tau, top_n), []).append(auc(labels[held], (w * preds[held]).sum(axis=1)))
    cells = [
        {"tau": t, "top_n": n, "valid_auc": float(np.mean(v)), "valid_auc_sd": float(np.std(v))}
        for (t, n), v in sorted(grid.items())
    ]
    best = max(cells, key=lambda c: (c["valid_auc"], -c["tau"]))
    return {"error": kind, "grid": cells, "best": best}


# -- the analysis -----------------------------------------------------------------------------------


def _adapters(study: Study, strategy: str, k: int) -> tuple[list[AdapterStage | None], list[list[str]]]:
    try:
        parts = study.partition(strategy, k)  # type: ignore[arg-type]
    except MissingStageError:
        return [None] * k, [[] for _ in range(k)]
    by_id = {s.sample_id: s for s in study.splits["train"]}
    out: list[AdapterStage | None] = []
    for j, ids in enumerate(parts.shards):
        try:
            out.append(
                study.adapter(
                    [by_id[i] for i in ids],
                    study.config.train_for(k),
                    f"{study.dir_name(strategy, k)} shard {j}",
                )
            )
        except MissingStageError:
            out.append(None)
    return out, [list(ids) for ids in parts.shards]


def _analysis_adapters(
    study: Study,
) -> tuple[AdapterStage | None, list[AdapterStage | None], list[list[str]], dict[str, Any]]:
    """Retraining's adapter, the K semantic shards' adapters (None where not in the store), the
    shards' sample ids, and the training records of both sides (`_training`)."""
    retrain, _ = _adapters(study, "random", 1)
    shards, shard_ids = _adapters(study, study.config.apa_partition, study.config.num_shards)
    training = {"Retraining": _training(retrain[0]), "shards": [_training(a) for a in shards]}
    return retrain[0], shards, shard_ids, training


def _training(adapter: AdapterStage | None) -> dict[str, Any] | None:
    if adapter is None:
        return None
    r = adapter.result
    metrics = r["metrics"]
    return {
        "num_samples": r["num_samples"],
        "epochs_run": len(metrics),
        "epoch_cap": r["train_config"]["epochs"],
        "patience": r["train_config"]["patience"],
        "best_epoch": r["best_epoch"],
        "early_stopped": len(metrics) < r["train_config"]["epochs"],
        # patience exhausted: the epochs after the best one did not improve on it (even at the cap)
        "converged": len(metrics) - r["best_epoch"] >= r["train_config"]["patience"],
        "steps": int(sum(m["steps"] for m in metrics)),
        "steps_to_best": int(sum(m["steps"] for m in metrics if m["epoch"] <= r["best_epoch"])),
        "valid_auc_per_epoch": [m["valid_auc"] for m in metrics],
        "loss_per_epoch": [m["loss"] for m in metrics],
        "best_valid_auc": max((m["valid_auc"] for m in metrics if m["valid_auc"] is not None), default=None),
        "train_seconds": r["train_seconds"],
        "samples_per_second": r["samples_per_second"],
        "source": r.get("source", "trained"),
        "adapter_sha256": adapter.sha256,
    }


def run_analysis(study: Study, draws: int = 2000, served: Sequence[str] | None = None) -> dict[str, Any]:
    """Compute everything (see the module docstring) and write analysis.json / analysis.md.
    `served` (see `served_passes`) chooses which aggregated test passes run the model, in that
    order; the others are left out of the table and listed under `served_skipped`."""
    chosen = served_passes(served)
    k = study.config.num_shards
    seed = study.config.seed
    valid, test = study.splits["valid"], study.splits["test"]
    yv = np.array([s.label for s in valid], dtype=np.float64)
    yt = np.array([s.label for s in test], dtype=np.float64)
    ev, et = study.embeddings("valid"), study.embeddings("test")
    result: dict[str, Any] = {
        "sizes": {name: len(s) for name, s in study.splits.items()},
        "num_shards": k,
        "train_config": study.config.train.to_json(),
        "retrain_epochs": study.config.retrain_epochs,
        "retrain_lr": study.config.retrain_lr,
        "paper": PAPER,
        "label_rate": {name: float(np.mean([x.label for x in s])) for name, s in study.splits.items()},
    }
    scores: dict[str, np.ndarray] = {"zero-shot": study.predictions(None, "test")}
    result["zero_shot_valid_auc"] = auc(yv, study.predictions(None, "valid"))

    retrain, shards, shard_ids, result["training"] = _analysis_adapters(study)
    if retrain is not None:
        scores["Retraining"] = study.predictions(retrain, "test")
        result["retraining_valid_auc"] = auc(yv, study.predictions(retrain, "valid"))
    result["shards"] = [
        {**row, "trained": shards[row["shard"]] is not None}
        for row in shard_rows(shard_ids, study.splits["train"])
    ]
    ready = [j for j, a in enumerate(shards) if a is not None]
    pt = pv = None
    if ready:
        pt = np.stack([study.predictions(shards[j], "test") for j in ready], axis=1)
        pv = np.stack([study.predictions(shards[j], "valid") for j in ready], axis=1)
        for col, j in enumerate(ready):
            result["shards"][j]["test_auc"] = auc(yt, pt[:, col])
            result["shards"][j]["valid_auc"] = auc(yv, pv[:, col])
            result["shards"][j]["mean_p_yes_valid"] = float(pv[:, col].mean())
    complete = len(ready) == k
    result["complete"] = complete and retrain is not None
    if pt is not None and pv is not None:
        label = "SISA" if complete else f"SISA (shards {ready} only)"
        scores[label] = pt.mean(axis=1)
        # per-sample oracle: the adapter whose P(Yes) is closest to the true label (a bound, uses labels)
        oracle = pt[np.arange(len(yt)), np.abs(yt[:, None] - pt).argmin(axis=1)]
        result["oracle_auc"] = auc(yt, oracle)
        result["best_single_shard_test_auc"] = max(result["shards"][j]["test_auc"] for j in ready)
        # weights: the paper's (τ=1000, n=20) on test with the full validation pool
        paper_w = study.config.weights
        diag: dict[str, Any] = {}
        for kind in ERRORS:
            err = neighbour_error(kind, et, ev, yv, pv, paper_w.top_n)
            w = softmax_weights(err, paper_w.tau)
            diag[kind] = {"tau": paper_w.tau, "top_n": paper_w.top_n, **entropy_stats(w)}
            diag[kind]["prediction_level_test_auc"] = auc(yt, (w * pt).sum(axis=1))
        # check: our paper-error weights are the library's (aggregation_weights)
        lib = aggregation_weights(paper_w, et, valid_embeddings=ev, valid_labels=yv, valid_predictions=pv)
        diag["paper"]["matches_library"] = bool(
            np.allclose(
                lib, softmax_weights(neighbour_error("paper", et, ev, yv, pv, paper_w.top_n), paper_w.tau)
            )
        )
        result["weights_tau1000_n20"] = diag
        # selection on validation only, for each error
        users = np.array([s.user_id for s in valid])
        result["selection"] = {kind: select_tau_n(ev, yv, pv, seed, kind, groups=users) for kind in ERRORS}
        result["selection_random_halves"] = {
            kind: select_tau_n(ev, yv, pv, seed, kind)["best"] for kind in ERRORS
        }
        for kind in ERRORS:
            best = result["selection"][kind]["best"]
            w = softmax_weights(neighbour_error(kind, et, ev, yv, pv, best["top_n"]), best["tau"])
            result["selection"][kind]["test_prediction_level_auc"] = auc(yt, (w * pt).sum(axis=1))
            result["selection"][kind]["test_weights"] = entropy_stats(w)
        result["label_prior"] = label_prior_diagnostic(ev, yv, pv, seed, paper_w.top_n, users)
        result["neighbours"] = neighbour_users(et, ev, users, paper_w.top_n)
        result["pool_size"] = pool_size_effect(et, yt, pt, ev, yv, pv, paper_w, seed)
    if complete and pt is not None and pv is not None:
        md = study.model_dir(study.config.apa_partition, k)
        paper_w = study.config.weights
        best = result["selection"]["paper"]["best"]
        selected = replace(paper_w, tau=float(best["tau"]), top_n=int(best["top_n"]))
        passes: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
            "uniform": (
                "uniform D",
                lambda: study.aggregated(md, "decomposition", WeightConfig(strategy="average"))[0],
            ),
            "paper": ("APA(D)", lambda: study.aggregated(md, "decomposition", paper_w)[0]),
            "selected": (
                f"APA(D) τ={best['tau']:g}, n={best['top_n']} (valid-selected)",
                lambda: study.aggregated(md, "decomposition", selected)[0],
            ),
            "nd": ("APA(ND)", lambda: study.aggregated(md, "non_decomposition", paper_w)[0]),
            "nd_selected": (
                f"APA(ND) τ={best['tau']:g}, n={best['top_n']} (valid-selected)",
                lambda: study.aggregated(md, "non_decomposition", selected)[0],
            ),
        }
        for kind in ("centred", "rank"):
            alt = result["selection"][kind]["best"]
            w = softmax_weights(neighbour_error(kind, et, ev, yv, pv, alt["top_n"]), alt["tau"])
            passes[kind] = (
                f"APA(D) {kind} error τ={alt['tau']:g}, n={alt['top_n']} (variant)",
                partial(
                    study.aggregated_omega, md, "decomposition", w, f"{kind}-{alt['tau']}-{alt['top_n']}"
                ),
            )
        jobs = dict(passes[key] for key in chosen)  # in the order asked for
        result["served_skipped"] = [label for key, (label, _) in passes.items() if key not in chosen]
        # one pass over the test split each: a second `analysis` process on the store takes the others
        scores.update(run_free_first(study.store, jobs))
    diffs = [
        ("APA(D)", "Retraining"),
        ("APA(D)", "SISA"),
        ("APA(D)", "uniform D"),
        ("Retraining", "SISA"),
        ("APA(ND)", "Retraining"),
    ]
    names = list(scores)
    for name in names:
        if name.startswith(("APA(D) ", "APA(ND) ")) and "Retraining" in scores:
            diffs += [(name, "Retraining"), (name, "SISA")]
    result["table"] = paired_bootstrap(yt, scores, diffs, draws=draws, seed=seed)
    result["speedup"] = speedup(result["training"])
    from apa.experiments import write_json

    write_json(study.out / "analysis.json", result)
    replace_text(study.out / "analysis.md", analysis_markdown(result))
    plot_analysis(result, study.out / "analysis.png")
    print(analysis_markdown(result))
    return result


def neighbour_users(et: np.ndarray, ev: np.ndarray, users: np.ndarray, top_n: int) -> dict[str, Any]:
    """How many distinct validation users a test sample's n nearest validation neighbours come from."""
    near = nearest_neighbours(et, ev, top_n)
    distinct = np.array([len(set(users[row].tolist())) for row in near])
    top_share = np.array([np.max(np.unique(users[row], return_counts=True)[1]) / len(row) for row in near])
    return {
        "validation_users": len(set(users.tolist())),
        "top_n": top_n,
        "mean_distinct_users": float(distinct.mean()),
        "mean_share_of_the_most_frequent_user": float(top_share.mean()),
    }


def label_prior_diagnostic(
    emb: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    seed: int,
    top_n: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """On validation (neighbours from half A, requests from half B): how often the paper's argmin
    error is the adapter whose mean P(Yes) over the neighbours is closest to their Yes rate (prior
    match), and how often it is the adapter that ranks the neighbours best (over 50 neighbours);
    and how much of the error's spread across adapters the prior mismatch explains (R²)."""
    rng = np.random.default_rng(seed)
    pool, held = halves(len(labels), rng, groups)
    ranked = nearest_neighbours(emb[held], emb[pool], max(top_n, 50))  # one sort, two prefixes
    near, near50 = ranked[:, :top_n], ranked[:, :50]
    y, p = labels[pool], preds[pool]
    err = np.abs(y[near][:, :, None] - p[near]).mean(axis=1)  # (h x K)
    prior_gap = np.abs(y[near].mean(axis=1)[:, None] - p[near].mean(axis=1))  # (h x K)
    rank = np.stack([auc_rows(y[near50], p[near50, j]) for j in range(p.shape[1])], axis=1)
    rank = np.where(np.isfinite(rank), rank, 0.5)
    chosen = err.argmin(axis=1)
    x = (prior_gap - prior_gap.mean(axis=1, keepdims=True)).ravel()
    e = (err - err.mean(axis=1, keepdims=True)).ravel()
    r2 = float(np.corrcoef(x, e)[0, 1] ** 2) if x.std() > 0 and e.std() > 0 else float("nan")
    rank_c = (rank - rank.mean(axis=1, keepdims=True)).ravel()
    r2_rank = float(np.corrcoef(rank_c, e)[0, 1] ** 2) if rank_c.std() > 0 and e.std() > 0 else float("nan")
    return {
        "requests": len(held),
        "pool": len(pool),
        "top_n": top_n,
        "argmin_error_is_best_prior_match": float(np.mean(chosen == prior_gap.argmin(axis=1))),
        "argmin_error_is_best_local_ranker": float(np.mean(chosen == rank.argmax(axis=1))),
        "chance": 1.0 / p.shape[1],
        "r2_error_vs_prior_gap_within_request": r2,
        "r2_error_vs_local_auc_within_request": r2_rank,
    }


def pool_size_effect(
    et: np.ndarray,
    yt: np.ndarray,
    pt: np.ndarray,
    ev: np.ndarray,
    yv: np.ndarray,
    pv: np.ndarray,
    weights: WeightConfig,
    seed: int,
    repeats: int = 10,
) -> list[dict[str, Any]]:
    """Prediction-level adaptive AUC on test (the paper's τ, n) with random subsets of the
    validation pool of each size (mean and sd over `repeats` draws)."""
    rng = np.random.default_rng(seed)
    out = []
    for size in sorted({s for s in (25, 50, 100, 150, 200, len(yv)) if s <= len(yv)}):
        values, maxw = [], []
        for _ in range(repeats if size < len(yv) else 1):
            sub = rng.choice(len(yv), size, replace=False)
            err = neighbour_error("paper", et, ev[sub], yv[sub], pv[sub], weights.top_n)
            w = softmax_weights(err, weights.tau)
            values.append(auc(yt, (w * pt).sum(axis=1)))
            maxw.append(float(w.max(axis=1).mean()))
        out.append(
            {
                "pool_size": size,
                "auc_mean": float(np.mean(values)),
                "auc_sd": float(np.std(values)),
                "mean_max_weight": float(np.mean(maxw)),
            }
        )
    return out


def speedup(training: dict[str, Any]) -> dict[str, Any] | None:
    """The unlearning speed-up measured on this run: the K=1 adapter's training time against each
    shard's (retraining the affected shard is training it from scratch on its remainder)."""
    full = training.get("Retraining")
    shards = [s for s in training.get("shards", []) if s is not None]
    if full is None or not shards:
        return None
    secs = [s["train_seconds"] for s in shards]

    def fit(t: dict[str, Any]) -> float:  # optimisation only: samples seen / training throughput
        return float(t["num_samples"] * t["epochs_run"] / max(t["samples_per_second"], 1e-9))

    fits = [fit(s) for s in shards]
    steps = [s["steps"] for s in shards]
    return {
        # optimizer steps (batch 8 on both sides): the work ratio, independent of the machine's load
        "retraining_steps": full["steps"],
        "shard_steps": steps,
        "steps_speedup_vs_mean_shard": full["steps"] / float(np.mean(steps)),
        "steps_speedup_vs_slowest_shard": full["steps"] / float(np.max(steps)),
        "retraining_fit_seconds": fit(full),
        "shard_fit_seconds": fits,
        "fit_speedup_vs_mean_shard": fit(full) / float(np.mean(fits)),
        "retraining_seconds": full["train_seconds"],
        "retraining_epochs_run": full["epochs_run"],
        "retraining_early_stopped": full["early_stopped"],
        "retraining_converged": full["converged"],
        "shards_converged": [s["converged"] for s in shards],
        "shard_seconds": secs,
        "shards_early_stopped": [s["early_stopped"] for s in shards],
        "speedup_vs_mean_shard": full["train_seconds"] / float(np.mean(secs)),
        "speedup_vs_slowest_shard": full["train_seconds"] / float(np.max(secs)),
        "speedup_per_shard": [full["train_seconds"] / s for s in secs],
        "note": "train_seconds include the per-epoch validation scoring (200 samples) on both sides; "
        "measured while other jobs shared the 2 CPU cores (niced, 1 thread).",
    }


def plot_analysis(r: dict[str, Any], path: Any) -> None:
    """Test AUC of every method with its 95% bootstrap CI, the paper's values as crosses."""
    from apa.experiments import _pyplot

    plt = _pyplot()
    methods = r["table"]["methods"]
    names = list(methods)
    y = np.arange(len(names))[::-1]
    aucs = np.array([np.nan if methods[n]["auc"] is None else methods[n]["auc"] for n in names], dtype=float)
    lo = np.array([methods[n]["ci"][0] for n in names], dtype=float)
    hi = np.array([methods[n]["ci"][1] for n in names], dtype=float)
    height = 0.45 * len(names) + 1.8
    fig, ax = plt.subplots(figsize=(8, height))
    ax.errorbar(aucs, y, xerr=[aucs - lo, hi - aucs], fmt="o", color="#3070b0", capsize=3, label="this run")
    for i, n in enumerate(names):
        if n in PAPER:
            ax.plot(
                PAPER[n],
                y[i],
                "x",
                color="k",
                label="paper (LLaMA-7B, N=1024)" if n == "Retraining" else None,
            )
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("test AUC (95% paired bootstrap CI)")
    ax.set_title(
        f"Table 1 at {r['sizes']['train']}/{r['sizes']['valid']}/{r['sizes']['test']}, K={r['num_shards']}"
    )
    fig.legend(fontsize=8, loc="lower center", ncol=2)  # below the axes: inside, it hid the last row
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- markdown ---------------------------------------------------------------------------------------


def training_lines(training: dict[str, Any]) -> list[str]:
    """Each adapter's training record as a markdown table (Retraining first, then the shards)."""
    lines = [
        "",
        "| adapter | samples | epochs run / cap | best epoch | converged | steps (to best) | valid AUC per epoch | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("Retraining (K=1)", training["Retraining"])] + [
        (f"shard {j}", t) for j, t in enumerate(training["shards"])
    ]
    for name, t in rows:
        if t is None:
            lines.append(f"| {name} | - | not trained yet | | | | | |")
            continue
        per = ", ".join(_f(v) for v in t["valid_auc_per_epoch"])
        converged = {True: "yes", False: "no (cap)", None: "-"}[t.get("converged")]
        lines.append(
            f"| {name} | {t['num_samples']} | {t['epochs_run']} / {t['epoch_cap']} | {t['best_epoch']} | "
            f"{converged} | {t['steps']} ({t['steps_to_best']}) | {per} | {t['train_seconds']:.0f} |"
        )
    return lines


def speedup_lines(s: dict[str, Any] | None) -> list[str]:
    """The unlearning speed-up as two sentences (wall time, optimizer steps) and whether both sides
    were trained to convergence."""
    if not s:
        return []
    both = s.get("retraining_converged") and all(s.get("shards_converged") or [False])
    return [
        "",
        f"Unlearning speed-up: K=1 {s['retraining_seconds']:.0f} s vs shards "
        f"{', '.join(f'{x:.0f}' for x in s['shard_seconds'])} s: {s['speedup_vs_mean_shard']:.2f}x vs the mean "
        f"shard, {s['speedup_vs_slowest_shard']:.2f}x vs the slowest (wall time, validation scoring "
        f"included); optimisation only (samples seen / throughput): {s['fit_speedup_vs_mean_shard']:.2f}x "
        "vs the mean shard.",
        f"In optimizer steps (batch 8 both sides, independent of the machine's load): K=1 "
        f"{s['retraining_steps']} vs shards {', '.join(str(x) for x in s['shard_steps'])}: "
        f"{s['steps_speedup_vs_mean_shard']:.2f}x vs the mean shard, "
        f"{s['steps_speedup_vs_slowest_shard']:.2f}x vs the slowest.",
        "Both sides trained to convergence (patience exhausted): "
        + (
            "yes."
            if both
            else "no: an adapter reached its epoch cap before its patience ran out, or is missing."
        ),
    ]


def run_training_summary(study: Study) -> dict[str, Any]:
    """Retraining's and the K semantic shards' training records and the unlearning speed-up, read
    from the adapter stages alone: nothing is trained or scored, so it answers in seconds while the
    predictions of a long run are still to come (adapters not in the store yet show as missing).
    Writes training.json / training.md."""
    from apa.experiments import write_json

    k = study.config.num_shards
    *_, training = _analysis_adapters(study)
    missing = ["Retraining"] if training["Retraining"] is None else []
    missing += [f"shard {j}" for j, t in enumerate(training["shards"]) if t is None]
    result = {
        "sizes": {name: len(s) for name, s in study.splits.items()},
        "num_shards": k,
        "train_config": study.config.train.to_json(),
        "retrain_epochs": study.config.retrain_epochs,
        "retrain_lr": study.config.retrain_lr,
        "training": training,
        "missing": missing,
        "speedup": speedup(training),
        "paper_speedup": PAPER_SPEEDUP,
    }
    write_json(study.out / "training.json", result)
    text = training_markdown(result)
    replace_text(study.out / "training.md", text)
    print(text)
    return result


def training_markdown(r: dict[str, Any]) -> str:
    lines = [f"Sizes {r['sizes']}, K={r['num_shards']}; paper's speed-up at K=4: {r['paper_speedup']}x."]
    lines += training_lines(r["training"]) + speedup_lines(r["speedup"])
    if r["missing"]:
        lines += ["", f"Not in the store yet: {', '.join(r['missing'])}."]
    return "\n".join(lines) + "\n"


def _f(x: Any, d: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def analysis_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Sizes {r['sizes']}, K={r['num_shards']}; Yes rate {json.dumps({k: round(v, 3) for k, v in r['label_rate'].items()})}.",
        "",
        "| method | test AUC [95% CI] | paper |",
        "|---|---|---|",
    ]
    for name, m in r["table"]["methods"].items():
        lines.append(
            f"| {name} | {_f(m['auc'])} [{_f(m['ci'][0])}, {_f(m['ci'][1])}] | {_f(PAPER.get(name))} |"
        )
    if r.get("served_skipped"):
        lines += ["", f"Served passes not run (`--served`): {', '.join(r['served_skipped'])}."]
    lines += ["", "| difference | Δ AUC [95% CI] |", "|---|---|"]
    for name, d in r["table"]["differences"].items():
        lines.append(f"| {name} | {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    lines += [
        "",
        "| shard | size | samples (sha256, first 12) | Yes rate | users | test AUC | valid AUC | mean P(Yes) valid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["shards"]:
        lines.append(
            f"| {s['shard']} | {s['size']} | {s['sample_digest'][:12]} | {_f(s['yes_rate'])} | {s['users']} | "
            f"{_f(s.get('test_auc'))} | "
            f"{_f(s.get('valid_auc'))} | {_f(s.get('mean_p_yes_valid'))} |"
        )
    lines += training_lines(r["training"])
    if "oracle_auc" in r:
        lines += [
            "",
            f"Per-sample oracle (bound): {_f(r['oracle_auc'])}; best single shard: {_f(r['best_single_shard_test_auc'])}.",
        ]
        lines += [
            "",
            "| error | τ | n | mean max ω | mean entropy (max) | prediction-level test AUC |",
            "|---|---|---|---|---|---|",
        ]
        for kind, d in r["weights_tau1000_n20"].items():
            lines.append(
                f"| {kind} | {d['tau']:g} | {d['top_n']} | {_f(d['mean_max_weight'])} | "
                f"{_f(d['mean_entropy'])} ({_f(d['max_entropy'])}) | {_f(d['prediction_level_test_auc'])} |"
            )
        lines += [
            "",
            "| error | selected τ | selected n | valid AUC (half-split) | test AUC (prediction level) | mean max ω |",
            "|---|---|---|---|---|---|",
        ]
        for kind, sel in r["selection"].items():
            b = sel["best"]
            lines.append(
                f"| {kind} | {b['tau']:g} | {b['top_n']} | {_f(b['valid_auc'])} | "
                f"{_f(sel['test_prediction_level_auc'])} | {_f(sel['test_weights']['mean_max_weight'])} |"
            )
        rh = r.get("selection_random_halves", {})
        if rh:
            lines.append(
                "Selection with random (not user-disjoint) halves: "
                + "; ".join(
                    f"{k}: τ={v['tau']:g}, n={v['top_n']}, valid AUC {_f(v['valid_auc'])}"
                    for k, v in rh.items()
                )
                + "."
            )
        nb = r.get("neighbours")
        if nb:
            lines += [
                "",
                f"A test sample's {nb['top_n']} nearest validation neighbours come from "
                f"{nb['mean_distinct_users']:.1f} of the {nb['validation_users']} validation users on average; the "
                f"most frequent one holds {nb['mean_share_of_the_most_frequent_user']:.2f} of them.",
            ]
        lp = r["label_prior"]
        lines += [
            "",
            f"Label prior (validation, {lp['requests']} requests, pool {lp['pool']}, n={lp['top_n']}): the paper's "
            f"argmin-error adapter is the best prior match {lp['argmin_error_is_best_prior_match']:.2f} of the time "
            f"and the best local ranker {lp['argmin_error_is_best_local_ranker']:.2f} (chance {lp['chance']:.2f}); "
            f"R² of error vs prior gap {_f(lp['r2_error_vs_prior_gap_within_request'])}, "
            f"vs local AUC {_f(lp['r2_error_vs_local_auc_within_request'])}.",
            "",
            "| validation pool | prediction-level adaptive test AUC (sd) | mean max ω |",
            "|---|---|---|",
        ]
        for p in r["pool_size"]:
            lines.append(
                f"| {p['pool_size']} | {_f(p['auc_mean'])} ({_f(p['auc_sd'])}) | {_f(p['mean_max_weight'])} |"
            )
    lines += speedup_lines(r.get("speedup"))
    return "\n".join(lines) + "\n"


__all__ = [
    "PAPER",
    "analysis_markdown",
    "entropy_stats",
    "halves",
    "neighbour_users",
    "label_prior_diagnostic",
    "neighbour_error",
    "paired_bootstrap",
    "plot_analysis",
    "pool_size_effect",
    "run_analysis",
    "run_training_summary",
    "select_tau_n",
    "speedup",
    "speedup_lines",
    "training_lines",
    "training_markdown",
]
