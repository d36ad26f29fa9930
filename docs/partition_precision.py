"""How much APA(D) depends on the embedding's precision through the semantic partition.

A one-off study check (docs/RESULTS.md, fourteenth session), run from the directory the study ran
in, after `apa experiment --what stages` of the medium-256-t1000 study has filled the stage store:

    OMP_NUM_THREADS=1 python docs/partition_precision.py 0,1 &    # trains fp32-partition shards 0, 1
    OMP_NUM_THREADS=1 python docs/partition_precision.py 2,3      # and 2, 3 (store stages, reused)
    python docs/partition_precision.py report

It embeds the training prompts in fp32 (the study's embeddings are bf16-autocast where bf16 is
native), partitions them with the study's semantic K=4 config, trains those shards' adapters with the
study's settings and compares APA(D) (τ=1000, n=20) at the prediction level (Σ_k ω_k P_k) on both
partitions; `report` also moves the bf16 embeddings by Gaussian noise to show the partition's scale.

Since this finding the study and `apa train` partition fp32 embeddings on every machine
(`Backbone.embed_for_partition`), so the fp32 partition here is the study's own, and the bf16 one
is rebuilt from the bf16 training embeddings (the configured autocast where bf16 is native).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

from apa.aggregation import aggregation_weights
from apa.backbone import Backbone, BackboneConfig
from apa.experiments import ExperimentConfig, Study, runs_dir, study_splits
from apa.metrics import auc
from apa.partition import Partition, partition
from apa.stages import StageStore, partition_config
from apa.study_analysis import entropy_stats

SIZES = {"train": 256, "valid": 250, "test": 1000}
CONFIG = ExperimentConfig.from_preset(
    "cpu", "ml-100k", train_size=256, valid_size=250, test_size=1000, epochs=4, lr=1e-3, early_stopping=False
)
FP32_CACHE = Path("/tmp/apa-fp32-train-embeddings.npy")


def moved(a: Partition, b: Partition) -> int:
    """Samples in a different shard, under the best matching of shard labels."""
    where = {i: k for k, shard in enumerate(a.shards) for i in shard}
    return min(
        sum(where[i] != perm[k] for k, shard in enumerate(b.shards) for i in shard)
        for perm in itertools.permutations(range(len(a.shards)))
    )


def main(which: str) -> None:
    store = StageStore(runs_dir() / "store", progress=False)
    splits = study_splits(store, "data/ml-100k", "ml-100k", SIZES, 0)
    train = splits["train"]
    if not FP32_CACHE.exists():
        fp32 = Backbone.load(BackboneConfig(bf16_autocast=False))
        np.save(FP32_CACHE, fp32.embed([s.prompt for s in train]).astype(np.float32))
        del fp32
    study = Study(
        Backbone.load(BackboneConfig()), splits, CONFIG, Path("/tmp/apa-partition-precision"), store=store
    )
    ids, by_id = [s.sample_id for s in train], {s.sample_id: s for s in train}
    config = partition_config("semantic", 4, 0)
    # bf16: the configured autocast where bf16 is native (the study's partition before it moved to
    # fp32 embeddings, `Backbone.embed_for_partition`); the same embeddings and partition function
    e16 = study.embeddings("train")
    p32, p16 = partition(ids, config, np.load(FP32_CACHE)), partition(ids, config, e16)
    print(f"fp32 against bf16 embeddings: {moved(p16, p32)} of {len(ids)} samples change shard")

    def adapters(p: Partition, shards: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for k in shards:
            adapter = study.adapter(
                [by_id[i] for i in p.shards[k]], CONFIG.train_for(4), f"semantic K4 shard {k}"
            )
            out.append((study.predictions(adapter, "valid"), study.predictions(adapter, "test")))
        return out

    if which != "report":
        adapters(p32, [int(k) for k in which.split(",")])
        return
    rng = np.random.default_rng(0)
    for rel in (1e-4, 1e-3, 4e-3):
        draws = [
            moved(
                p16, partition(ids, config, e16 + rng.standard_normal(e16.shape) * rel * np.abs(e16).mean())
            )
            for _ in range(3)
        ]
        print(f"Gaussian noise {rel:g} x mean |e| on the bf16 embeddings: {draws} of {len(ids)} change shard")
    valid_labels = np.array([s.label for s in splits["valid"]])
    valid_emb, test_emb = study.embeddings("valid"), study.embeddings("test")
    report = {}
    for name, p in (
        ("bf16 embeddings (the fourteenth session's Table 1 partition)", p16),
        ("fp32 embeddings", p32),
    ):
        preds = adapters(p, list(range(4)))
        pv, pt = np.stack([v for v, _ in preds], 1), np.stack([t for _, t in preds], 1)
        w = aggregation_weights(
            CONFIG.weights,
            test_emb,
            valid_embeddings=valid_emb,
            valid_labels=valid_labels,
            valid_predictions=pv,
        )
        omega = entropy_stats(w)
        report[name] = {
            "shard Yes rate": [round(float(np.mean([by_id[i].label for i in s])), 3) for s in p.shards],
            "shard mean P(Yes) on valid": [round(float(pv[:, k].mean()), 3) for k in range(4)],
            "shard test AUC": [round(auc(study.labels, pt[:, k]), 4) for k in range(4)],
            "share of test requests whose largest ω is this shard's": [
                round(x, 3) for x in omega["argmax_share"]
            ],
            "mean max ω": round(omega["mean_max_weight"], 3),
            "APA(D) test AUC, prediction level": round(auc(study.labels, (w * pt).sum(1)), 4),
            "SISA over these shards (mean prediction)": round(auc(study.labels, pt.mean(1)), 4),
        }
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "report")
