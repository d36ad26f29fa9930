"""`apa experiment partitions`: which samples each shard of the study's partitions holds, by digest.

The partition clusters fp32 embeddings of the training prompts on every machine
(`apa.backbone.PARTITION_BF16`), so two runs of the same split on different CPUs should hold the same
shards. Each shard is named by its `sample_digest` (sha256 of its sorted sample ids), which compares
runs without moving data; its size and Yes rate say how label-skewed it is. Builds (or reads back)
the partitions that `--stages_for` needs, embedding the training split for those that cluster it;
trains and scores nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from apa.atomic import replace_text
from apa.backbone import PARTITION_BF16
from apa.data.samples import Sample, sample_digest

if TYPE_CHECKING:
    from apa.experiments import Study

DIGEST_CHARS = 12
"""Hex characters of a digest shown in `partitions.md` (the JSON keeps all 64)."""


def shard_rows(shards: Sequence[Sequence[str]], train: Sequence[Sample]) -> list[dict[str, Any]]:
    """Each shard's index, size, Yes rate (None when empty), users and `sample_digest` (sha256 of
    its sorted sample ids, comparable across runs and machines: the partition is fp32 everywhere)."""
    by_id = {s.sample_id: s for s in train}
    return [
        {
            "shard": index,
            "size": len(ids),
            "yes_rate": float(np.mean([by_id[i].label for i in ids])) if ids else None,
            "users": len({by_id[i].user_id for i in ids}),
            "sample_digest": sample_digest(ids),
        }
        for index, ids in enumerate(shards)
    ]


def run_partitions(study: Study, figures: Sequence[str] = ("analysis",)) -> dict[str, Any]:
    """Each partition of `figures` (`stage_models`), shard by shard; writes `partitions.json` and
    `partitions.md` to the study's output directory."""
    from apa.experiments import stage_models, write_json

    rows = []
    for strategy, k in stage_models(study.config, figures):
        shards = shard_rows(study.partition(strategy, k).shards, study.splits["train"])
        rows.append({"strategy": strategy, "num_shards": k, "shards": shards})
    result = {
        "sizes": {name: len(samples) for name, samples in study.splits.items()},
        "seed": study.config.seed,
        "train_digest": study.digests["train"],
        "embeddings_bf16": PARTITION_BF16,
        "partitions": rows,
    }
    write_json(study.out / "partitions.json", result)
    replace_text(study.out / "partitions.md", partitions_markdown(result))
    return result


def partitions_markdown(r: dict[str, Any]) -> str:
    """The partitions as a markdown table, digests cut to `DIGEST_CHARS`."""
    sizes = " / ".join(str(r["sizes"][name]) for name in ("train", "valid", "test"))
    precision = "bf16" if r["embeddings_bf16"] else "fp32"
    lines = [
        f"Split {sizes} (train / valid / test), seed {r['seed']}; training split "
        f"{r['train_digest'][:DIGEST_CHARS]}; partitions cluster {precision} embeddings.",
        "",
        "| partition | shard | samples | Yes rate | samples (sha256, first 12) |",
        "|---|---|---|---|---|",
    ]
    for row in r["partitions"]:
        name = f"{row['strategy']} K={row['num_shards']}"
        for shard in row["shards"]:
            yes = "-" if shard["yes_rate"] is None else f"{shard['yes_rate']:.3f}"
            lines.append(
                f"| {name} | {shard['shard']} | {shard['size']} | {yes} | "
                f"{shard['sample_digest'][:DIGEST_CHARS]} |"
            )
            name = ""
    return "\n".join(lines) + "\n"


__all__ = ["DIGEST_CHARS", "partitions_markdown", "run_partitions", "shard_rows"]
