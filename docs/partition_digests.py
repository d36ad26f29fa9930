"""Which samples each semantic shard holds, as digests to compare across machines.

The study and `apa train` cluster fp32 embeddings of the training prompts on every machine
(`Backbone.embed_for_partition`). This prints each semantic K=4 shard's `sample_digest` (sha256 of
its sorted sample ids), size and Yes rate for a study split, so runs on different CPUs can be
compared without moving data (docs/RESULTS.md records them). Run from the directory the study runs
in (it shares the study's stage store, so the embeddings and the partition are reused):

    python docs/partition_digests.py 256 250 1000      # train, valid, test sizes (the medium study)
    python docs/partition_digests.py 1024 500 1000     # the paper's sizes
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from apa.backbone import Backbone, BackboneConfig
from apa.data.samples import sample_digest
from apa.experiments import ExperimentConfig, Study, runs_dir, study_splits
from apa.stages import StageStore


def main(train_size: int, valid_size: int, test_size: int) -> None:
    sizes = {"train": train_size, "valid": valid_size, "test": test_size}
    store = StageStore(runs_dir() / "store", progress=False)
    splits = study_splits(store, "data/ml-100k", "ml-100k", sizes, 0)
    config = ExperimentConfig.from_preset(
        "cpu", "ml-100k", train_size=train_size, valid_size=valid_size, test_size=test_size
    )
    backbone = Backbone.load(BackboneConfig())
    study = Study(backbone, splits, config, Path("/tmp/apa-partition-digests"), store=store)
    start = time.perf_counter()
    parts = study.partition("semantic", 4)
    seconds = time.perf_counter() - start
    by_id = {s.sample_id: s for s in splits["train"]}
    print(f"sizes {sizes}, seed 0, semantic K=4, backbone bf16 autocast {backbone.config.bf16_autocast}")
    print(f"training split: {sample_digest(by_id)[:12]}; partition built or read in {seconds:.0f} s")
    for k, shard in enumerate(parts.shards):
        yes = float(np.mean([by_id[i].label for i in shard]))
        print(f"shard {k}: {len(shard)} samples, Yes rate {yes:.3f}, samples {sample_digest(shard)[:12]}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*(int(a) for a in sys.argv[1:]))
