"""Membership inference through the serving path (`apa experiment mia`): does the served APA model
still recognise the samples of erased users?

Three sets of samples are scored by the served model (`AggregatedScorer.from_model_dir`, APA(D)
with the study's weights), before and after erasure:

* members: training samples of users who stay;
* erased: the training samples of the users erased through the real erasure path for a model
  directory (`apa.sharded.unlearn`: journal, scrub, retrain of exactly the affected shards, proof);
* non-members: held-out test samples of users who stay.

The attack score of a sample is the probability the model gives its true label (a loss attack:
higher means "member"). For each pair of sets the attack AUC (with a bootstrap 95% CI) and the TPR
at 1% FPR are reported, before erasure, after it, and for a reference model built from scratch on
the remaining data only (same partition strategy, configs and seeds). After exact unlearning the
erased samples should look like non-members, as they do for the reference.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apa.aggregation import AggregatedScorer, WeightConfig
from apa.data import Sample
from apa.metrics import auc
from apa.modeldir import ModelDir
from apa.sharded import UnlearnReport, build_model, unlearn
from apa.stages import chunked, exclusive, partition_config, split_digest

if TYPE_CHECKING:
    from apa.experiments import Study


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """TPR of the attack "member if score > t" at the threshold where at most `fpr` of `neg` pass."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    t = float(np.quantile(neg, 1 - fpr, method="higher"))
    return float(np.mean(pos > t))


def attack(pos: np.ndarray, neg: np.ndarray, draws: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Attack AUC (positives: `pos`) with a bootstrap 95% CI, and TPR at 1% FPR."""
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(draws):
        bp = rng.choice(pos, len(pos))
        bn = rng.choice(neg, len(neg))
        boot.append(auc(y, np.r_[bp, bn]))
    return {
        "auc": auc(y, s),
        "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg),
        "n_pos": len(pos),
        "n_neg": len(neg),
    }


def p_true(p_yes: np.ndarray, samples: list[Sample]) -> np.ndarray:
    y = np.array([s.label for s in samples], dtype=np.float64)
    return np.where(y == 1, p_yes, 1 - p_yes)


def served_scores(
    study: Study, md: ModelDir, samples: list[Sample], label: str
) -> tuple[np.ndarray, np.ndarray]:
    """(P(Yes), ω) of `samples` from the served model of `md` (APA(D), the study's weights), memoised;
    a set stopped midway resumes at its first unfinished chunk."""
    prompts = [s.prompt for s in samples]

    def compute(work: Path) -> np.ndarray:
        with AggregatedScorer.from_model_dir(study.backbone, md) as scorer:
            p, omega = score_in_chunks(
                scorer, prompts, study.config.weights, progress=study.progress, desc=label, work=work
            )
        return np.column_stack([p, omega])  # one array for the memo: P(Yes), then ω's K columns

    key = {
        "what": "mia-served",
        "columns": "p_yes, omega",
        "label": label,
        "adapters": study._adapter_key(md),
        "samples": split_digest(samples),
        "valid": split_digest(md.splits()["valid"]),
        "weights": asdict(study.config.weights),
    }
    value = study.memo(key, compute)[0].reshape(len(samples), 1 + md.num_shards)
    return value[:, 0], value[:, 1:]


def own_shard_weight(md: ModelDir, samples: list[Sample], omega: np.ndarray) -> dict[str, Any] | None:
    """How much of ω the served model gives a training sample's own shard adapter (None: no sample
    of `samples` is in `md`'s training partition). With one-hot ω, a sample served by another
    shard's adapter is scored by a model that never saw it."""
    shard_of = {i: k for k, ids in enumerate(md.partition().shards) for i in ids}
    rows = [(i, shard_of[s.sample_id]) for i, s in enumerate(samples) if s.sample_id in shard_of]
    if not rows:
        return None
    own = np.array([omega[i, k] for i, k in rows])
    top = np.array([int(np.argmax(omega[i])) == k for i, k in rows])
    return {
        "n": len(rows),
        "mean_own_omega": float(own.mean()),
        "own_is_argmax": float(top.mean()),
        "mean_max_omega": float(np.mean([omega[i].max() for i, _ in rows])),
    }


def score_in_chunks(
    scorer: AggregatedScorer,
    prompts: list[str],
    weights: WeightConfig,
    chunks_of: int = 4,
    progress: bool = False,
    desc: str = "",
    work: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """APA(D)'s (P(Yes), ω) of `prompts`, the same as one `scorer.score` call, computed in chunks of
    `chunks_of` batches behind a progress bar (`stages.chunked`). The scorer batches a call's prompts
    after a stable sort by length; chunking that sorted order into whole batches keeps every batch
    as it was. With `work`, each chunk is saved there as it finishes and a stopped run resumes at
    the first unfinished chunk."""
    if not prompts:
        return np.zeros(0), np.zeros((0, scorer.num_shards))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    step = chunks_of * scorer.batch_size

    def compute(start: int, stop: int) -> np.ndarray:
        p, omega = scorer.score([prompts[i] for i in order[start:stop]], "decomposition", weights)
        return np.column_stack([p, omega])

    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="apa-served-")))
        parts = work / f"served-chunks-of-{step}"  # a chunk's rows depend on the chunk size
        parts.mkdir(parents=True, exist_ok=True)
        rows = chunked(
            parts, len(prompts), compute, chunk=step, desc=f"serve {desc}".strip(), progress=progress
        )
    value = np.zeros_like(rows)
    value[order] = rows
    return value[:, 0], value[:, 1:]


def confined_users(
    shard_of: dict[str, int], user_of: dict[str, str], k: int, width: int
) -> tuple[list[int], list[str]]:
    """(shards, users): of every set of `width` shards, the one holding the most training samples of
    users whose samples all lie inside it, and those users (erasing them retrains only those shards)."""
    shards_of: dict[str, set[int]] = {}
    count: dict[str, int] = {}
    for sample_id, shard in shard_of.items():
        user = user_of[sample_id]
        shards_of.setdefault(user, set()).add(shard)
        count[user] = count.get(user, 0) + 1
    best: tuple[int, list[int], list[str]] = (-1, [], [])
    for combo in itertools.combinations(range(k), width):
        inside = sorted(u for u, sh in shards_of.items() if sh <= set(combo))
        total = sum(count[u] for u in inside)
        if total > best[0]:
            best = (total, list(combo), inside)
    return best[1], best[2]


def mia_sets(
    study: Study, erase_users: int, max_samples: int | None, shards_touched: int | None
) -> tuple[set[str], dict[str, list[Sample]]]:
    """The erased users (seeded: every process of one study draws the same) and the three sets."""
    k = study.config.num_shards
    seed = study.config.seed
    train, test = study.splits["train"], study.splits["test"]
    users = sorted({s.user_id for s in train})
    rng = np.random.default_rng(seed)
    chosen_from = users
    if shards_touched is not None:
        parts = study.partition(study.config.apa_partition, k)
        shard_of = {i: j for j, ids in enumerate(parts.shards) for i in ids}
        _, chosen_from = confined_users(shard_of, {s.sample_id: s.user_id for s in train}, k, shards_touched)
    erased_users = set(
        rng.choice(chosen_from, min(erase_users, len(chosen_from), len(users) - 1), replace=False).tolist()
    )
    erased = [s for s in train if s.user_id in erased_users]
    members = [s for s in train if s.user_id not in erased_users]
    non_members = [s for s in test if s.user_id not in erased_users]
    if max_samples is not None:
        pick = np.random.default_rng(seed + 1)
        members = [
            members[i]
            for i in sorted(pick.choice(len(members), min(max_samples, len(members)), replace=False))
        ]
        non_members = [
            non_members[i]
            for i in sorted(pick.choice(len(non_members), min(max_samples, len(non_members)), replace=False))
        ]
    return erased_users, {"members": members, "erased": erased, "non-members": non_members}


def erasure_from_dirs(source: ModelDir, unlearned: ModelDir) -> dict[str, Any]:
    """The report of a finished erasure, read off the model directories: the shards whose adapter
    version went up were retrained (their manifests hold the retrain times)."""
    before, after = source.manifests(), unlearned.manifests()
    versions = {
        k: a.version
        for k, (b, a) in enumerate(zip(before, after, strict=True))
        if a is not None and (b is None or a.version > b.version)
    }
    removed = len(source.splits()["train"]) - len(unlearned.splits()["train"])
    estimated = float(sum(m.train_seconds for m in before if m is not None))
    retrained = float(sum(m.train_seconds for k, m in enumerate(after) if k in versions and m is not None))
    return {
        **UnlearnReport(removed, sorted(versions), retrained, estimated, versions).to_json(),
        "read_off_model_dirs": True,
    }


def reference_model(study: Study, erased_users: set[str]) -> ModelDir:
    """The model built from scratch on the data without `erased_users` (same partition strategy, K,
    configs and seeds), under OUT/mia/scratch; reused when complete (its adapters also come from the
    stage store when their shard's samples are unchanged)."""
    k = study.config.num_shards
    ref_root = study.out / "mia" / "scratch"
    remaining = {
        name: [s for s in split if s.user_id not in erased_users] for name, split in study.splits.items()
    }
    # one builder at a time: a process that finds another building waits for it, then reuses its model
    with exclusive(ref_root.parent / "scratch.lock", "the from-scratch reference model"):
        try:
            ok = len(study.manifests(ModelDir(ref_root))) == k
        except (OSError, ValueError):
            ok = False
        if not ok:
            shutil.rmtree(ref_root, ignore_errors=True)
            build_model(
                study.backbone,
                remaining,
                ref_root,
                partition_config(study.config.apa_partition, k, study.config.seed),
                study.config.train_for(k),
                pseudonymizer=study.pseudonymizer,
                progress=study.progress,
            )
    return ModelDir(ref_root)


def run_mia(
    study: Study,
    erase_users: int = 4,
    reference: bool = True,
    max_samples: int | None = None,
    shards_touched: int | None = None,
    reference_only: bool = False,
) -> dict[str, Any]:
    """Members / erased / non-members through the serving path, before and after a real erasure;
    writes mia.json and mia.md into the study's output directory. `shards_touched`: erase (up to
    `erase_users` of) the users confined to the `shards_touched` shards holding most of such users'
    samples, so that the erasure retrains only those shards; None: `erase_users` users at random.
    `reference_only`: only build the from-scratch reference (a second process can build it while
    the first trains and unlearns the served model; the first then finds it complete)."""
    erased_users, sets = mia_sets(study, erase_users, max_samples, shards_touched)
    if reference_only:
        ref = reference_model(study, erased_users)
        print(f"reference model without the {len(erased_users)} erased users: {ref.root}")
        return {"reference": str(ref.root), "erased_users": len(erased_users)}
    seed = study.config.seed
    source = study.model_dir(study.config.apa_partition, study.config.num_shards)

    routing: dict[str, dict[str, Any]] = {}

    def scores_of(md: ModelDir, tag: str, run: str) -> dict[str, np.ndarray]:
        out = {}
        for name, samples in sets.items():
            p_yes, omega = served_scores(study, md, samples, f"{tag}-{name}")
            out[name] = p_true(p_yes, samples)
            own = own_shard_weight(md, samples, omega)
            if own is not None:
                routing.setdefault(run, {})[name] = own
        return out

    before = scores_of(source, "before", "before erasure")
    # the erasure: a copy of the served model directory, unlearned through apa.sharded.unlearn
    work = study.out / "mia" / "model"
    marker = study.out / "mia" / "source.json"
    source_key = {"adapters": study._adapter_key(source), "erased_users": sorted(erased_users)}
    saved = study.out / "mia" / "erasure.json"
    if not marker.is_file() or json.loads(marker.read_text()) != source_key:
        shutil.rmtree(work, ignore_errors=True)
        saved.unlink(missing_ok=True)
        shutil.copytree(source.root, work)
        marker.write_text(json.dumps(source_key))
    unlearned = ModelDir(work)
    journal = unlearned.journal()
    erased_pids = {study.pseudonymizer.sample(s.sample_id) for s in sets["erased"]}
    finished = not journal.pending and erased_pids <= journal.erased_pids
    if finished and saved.is_file():
        # a re-run: the erasure finished before; report what it did, not an empty second pass
        erasure = json.loads(saved.read_text())
    elif finished:
        # the process died after unlearn finished and before its report was saved
        erasure = erasure_from_dirs(source, unlearned)
        saved.write_text(json.dumps(erasure, indent=1))
    else:
        erasure = unlearn(
            work,
            [s.sample_id for s in sets["erased"]],
            pseudonymizer=study.pseudonymizer,
            backbone=study.backbone,
            progress=study.progress,
        ).to_json()
        saved.write_text(json.dumps(erasure, indent=1))
    after = scores_of(unlearned, "after", "after erasure")
    runs = {"before erasure": before, "after erasure": after}
    if reference:
        runs["from scratch without them"] = scores_of(
            reference_model(study, erased_users), "scratch", "from scratch without them"
        )
    pairs = [("members", "non-members"), ("erased", "non-members"), ("members", "erased")]
    table = {
        run: {f"{a} vs {b}": attack(s[a], s[b], seed=seed) for a, b in pairs}
        | {"mean_p_true": {name: float(np.mean(v)) for name, v in s.items()}}
        for run, s in runs.items()
    }
    result = {
        "erased_users": len(erased_users),
        "users_chosen": "at random" if shards_touched is None else f"confined to {shards_touched} shard(s)",
        "sizes": {name: len(s) for name, s in sets.items()},
        "affected_shards": erasure["affected_shards"],
        "retrain_seconds": erasure["retrain_seconds"],
        "erasure": erasure,
        "attack_score": "P(true label) from the served APA(D) model (higher: member)",
        "runs": table,
        "own_shard_weight": routing,
    }
    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    from apa.experiments import write_json

    write_json(out / "mia.json", result)
    (out / "mia.md").write_text(mia_markdown(result))
    plot_mia(runs, result, out / "mia.png")
    print(mia_markdown(result))
    return result


SET_COLOURS = {"members": "#3070b0", "erased": "#c03030", "non-members": "#909090"}


def plot_mia(runs: dict[str, dict[str, np.ndarray]], r: dict[str, Any], path: Path) -> None:
    """One panel per model: the empirical CDF of P(true label) for members, erased and non-members
    (the attack separates two sets where their curves part; erased on non-members = forgotten)."""
    from apa.experiments import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, (run, sets) in zip(axes[0], runs.items(), strict=True):
        for name, scores in sets.items():
            if len(scores) == 0:
                continue
            x = np.sort(scores)
            a = r["runs"][run].get(f"{name} vs non-members")
            label = f"{name} (n={len(x)})" + ("" if a is None else f", AUC vs non-members {a['auc']:.3f}")
            ax.step(
                x, np.arange(1, len(x) + 1) / len(x), where="post", color=SET_COLOURS.get(name), label=label
            )
        ax.set_title(run, fontsize=10)
        ax.set_xlabel("P(true label) from the served model")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("fraction of samples ≤ x")
    fig.suptitle(
        f"Membership inference: {r['erased_users']} users erased (affected shards {r['affected_shards']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mia_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Erased {r['erased_users']} users ({r['sizes']['erased']} training samples; affected shards "
        f"{r['affected_shards']}, retrained in {r['retrain_seconds']:.0f} s); members {r['sizes']['members']}, "
        f"non-members {r['sizes']['non-members']}. Attack score: {r['attack_score']}.",
        "",
        "| model | pair | attack AUC [95% CI] | TPR @ 1% FPR |",
        "|---|---|---|---|",
    ]
    for run, pairs in r["runs"].items():
        for pair, a in pairs.items():
            if pair == "mean_p_true":
                continue
            lines.append(
                f"| {run} | {pair} | {a['auc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {a['tpr_at_1pct_fpr']:.3f} |"
            )
    lines += ["", "| model | mean P(true label): " + " / ".join(r["sizes"]) + " |", "|---|---|"]
    for run, pairs in r["runs"].items():
        means = pairs["mean_p_true"]
        lines.append(f"| {run} | " + " / ".join(f"{means[name]:.3f}" for name in r["sizes"]) + " |")
    if r.get("own_shard_weight"):
        lines += [
            "",
            "ω of training samples on their own shard's adapter (with one-hot ω, a sample served by another",
            "shard's adapter is scored by a model that never saw it):",
            "",
            "| model | training samples | n | mean ω on own shard | own shard is the argmax | mean max ω |",
            "|---|---|---|---|---|---|",
        ]
        for run, by_set in r["own_shard_weight"].items():
            for name, o in by_set.items():
                lines.append(
                    f"| {run} | {name} | {o['n']} | {o['mean_own_omega']:.3f} | {o['own_is_argmax']:.3f} "
                    f"| {o['mean_max_omega']:.3f} |"
                )
    return "\n".join(lines) + "\n"


__all__ = [
    "attack",
    "erasure_from_dirs",
    "mia_markdown",
    "mia_sets",
    "own_shard_weight",
    "p_true",
    "plot_mia",
    "reference_model",
    "run_mia",
    "score_in_chunks",
    "served_scores",
    "tpr_at_fpr",
]
