"""How fast this machine trains and scores, for the study's time estimate (`Study.plan`).

The store's own finished stages measure it best. Every stage records the host and the number of
torch threads it ran with (`StageStore`); a trained adapter records its optimisation throughput
(validation scoring excluded), and a prediction or embedding stage its seconds and its samples.
Only stages of this host and this thread count are read (an adopted adapter did not train here),
and the median of each kind is used, so one stage resumed half-way does not skew it.

With none of them, the estimate falls back to speeds measured on 2 CPU cores with the embedded
model (docs/RESULTS.md): with native bf16 (`apa.backbone.native_bf16`), 1.1 trained and 3.5
scored samples per second (measured before the shared prompt prefix ran once, so an upper bound
on the time); without it (fp32, AVX2), 0.75 and 2.4 (with the shared prefix; 0.51 and 1.53
without it in the same run). One thread measured 0.67 of two's speed on the AVX2 machine, and
that factor is applied to a single-thread process.

The partition clusters fp32 embeddings of the training split whatever the configured autocast
(`apa.backbone.PARTITION_BF16`). Under bf16 autocast those run at their own speed: measured by the
store's fp32 embedding stages (told apart by their key's `embedding`), else the scoring speed times
`FP32_OF_BF16`. Without bf16 autocast they are the scoring stages' speed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

DEFAULT_RATES: dict[bool, tuple[float, float]] = {True: (1.1, 3.5), False: (0.75, 2.4)}
"""(trained, scored) samples per second on 2 threads, by whether the CPU has native bf16."""
ONE_THREAD = 0.67
"""A single-thread process's speed as a fraction of a 2-thread one's (measured, fp32 AVX2)."""
FP32_OF_BF16 = 4.1 / 8.8
"""fp32 scoring speed as a fraction of bf16's on a CPU with native bf16 (measured, AMX machine)."""
SCORED_KINDS: tuple[tuple[str, str], ...] = (
    ("predictions", "predictions.npz"),
    ("embeddings", "embeddings.npz"),
)
"""Stage kinds that score (or embed) prompts, and the file whose `sample_ids` counts the prompts."""


@dataclass(frozen=True)
class StudyRates:
    """The speeds a time estimate assumes."""

    train_per_s: float
    """LoRA training samples per second (optimisation only)."""
    score_per_s: float
    """Prompts scored or embedded per second."""
    source: str
    """Where the speeds come from, in words."""
    partition_embed_per_s: float = 0.0
    """Training prompts embedded per second for the partition (fp32); 0 means `score_per_s`."""

    @property
    def partition_per_s(self) -> float:
        """The partition's fp32 embedding speed (the scoring speed where it is not set)."""
        return self.partition_embed_per_s or self.score_per_s

    def describe(self) -> str:
        fp32 = (
            f", {self.partition_embed_per_s:.2f} embedded in fp32 for the partition"
            if self.partition_embed_per_s
            else ""
        )
        return f"{self.train_per_s:.2f} trained / {self.score_per_s:.2f} scored samples per second{fp32} ({self.source})"


def runner() -> dict[str, Any]:
    """What a stage's speed depends on besides the work: the host and the torch threads."""
    import torch

    return {"host": socket.gethostname(), "threads": torch.get_num_threads()}


def _same_runner(done: Path, here: dict[str, Any]) -> float | None:
    """The stage's seconds when it ran on `here` (host and threads), else None."""
    try:
        info = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if info.get("host") != here["host"] or info.get("threads") != here["threads"]:
        return None
    seconds = float(info.get("seconds", 0.0))
    return seconds if seconds > 0 else None


def _train_rates(root: Path, here: dict[str, Any]) -> Iterable[float]:
    for done in sorted(root.glob("adapter/*/done.json")):
        if _same_runner(done, here) is None:
            continue
        try:
            result = json.loads((done.parent / "result.json").read_text())
        except (OSError, ValueError):
            continue
        rate = float(result.get("samples_per_second", 0.0))
        if result.get("source", "trained") == "trained" and rate > 0:
            yield rate


def _embedding_of(done: Path) -> str | None:
    """The `embedding` settings digest in a stage's key (None for a stage without one)."""
    try:
        return json.loads((done.parent / "key.json").read_text()).get("embedding")
    except (OSError, ValueError, AttributeError):
        return None


def _score_rates(
    root: Path, here: dict[str, Any], fp32: str | None = None
) -> tuple[list[float], list[float]]:
    """Prompts per second of this runner's scoring stages, in one pass: (the scoring speeds, the
    partition's fp32 embedding speeds). With `fp32` (the fp32 embedding key, under bf16 autocast)
    the embedding stages made with it go to the second list; without it that list is empty."""
    score: list[float] = []
    partition: list[float] = []
    for kind, name in SCORED_KINDS:
        for done in sorted(root.glob(f"{kind}/*/done.json")):
            seconds = _same_runner(done, here)
            if seconds is None:
                continue
            try:
                with np.load(done.parent / name, allow_pickle=False) as data:
                    n = len(data["sample_ids"])  # not the (larger) values
            except (OSError, ValueError, KeyError):
                continue
            if not n:
                continue
            of_fp32 = fp32 is not None and kind == "embeddings" and _embedding_of(done) == fp32
            (partition if of_fp32 else score).append(n / seconds)
    return score, partition


def study_rates(
    store_root: Path, native_bf16: bool, here: dict[str, Any] | None = None, fp32_embedding: str | None = None
) -> StudyRates:
    """The speeds measured by the store's stages that ran here (`runner`), each kind falling back
    to the default for this CPU (`DEFAULT_RATES`, scaled by `ONE_THREAD` for one thread).

    `native_bf16` is whether the model runs under bf16 autocast; then `fp32_embedding` (the fp32
    embedding settings' digest, `apa.aggregation.caches.embedding_key(backbone, False)`) tells the
    partition's fp32 embedding stages apart, which set `partition_embed_per_s`."""
    here = here or runner()
    fp32 = fp32_embedding if native_bf16 else None
    train = list(_train_rates(store_root, here))
    score, partition = _score_rates(store_root, here, fp32)
    factor = ONE_THREAD if here["threads"] <= 1 else 1.0
    default_train, default_score = (rate * factor for rate in DEFAULT_RATES[native_bf16])
    default = (
        f"defaults for a CPU {'with' if native_bf16 else 'without'} native bf16, {here['threads']} thread(s)"
    )
    if train and score:
        source = f"measured by {len(train)} adapter and {len(score)} scoring stages run here"
    elif train or score:
        source = f"measured by {len(train) or len(score)} {'adapter' if train else 'scoring'} stages run here; {default}"
    else:
        source = default
    score_per_s = median(score) if score else default_score
    return StudyRates(
        median(train) if train else default_train,
        score_per_s,
        source,
        (median(partition) if partition else score_per_s * FP32_OF_BF16) if native_bf16 else 0.0,
    )


__all__ = ["DEFAULT_RATES", "FP32_OF_BF16", "ONE_THREAD", "StudyRates", "runner", "study_rates"]
