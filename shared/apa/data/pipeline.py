"""From raw files to the paper's splits: load, TALLRec-preprocess, sample 1024/500/1000; `apa prepare`."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from apa.data.loaders import (
    DataFormatError,
    Interaction,
    load_bookcrossing,
    load_interactions_csv,
    load_ml100k,
)
from apa.data.samples import SPLITS, Sample, Split, write_jsonl
from apa.data.tallrec import book_samples, label_counts, movie_samples

logger = logging.getLogger(__name__)

Dataset = Literal["ml-100k", "bookcrossing", "csv"]
DATASETS: tuple[Dataset, ...] = get_args(Dataset)


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how many samples of each split the paper's experiments use."""

    dataset: Dataset = "ml-100k"
    """Loader and recipe: `ml-100k` and `csv` use TALLRec's movie recipe, `bookcrossing` its book recipe."""
    path: str | None = None
    """Raw data: ml-100k dir with u.data/u.item (None: recbole's copy), BookCrossing dir, or CSV file."""
    train_size: int = 1024
    """Training samples drawn from TALLRec's train split (paper: 1024)."""
    valid_size: int = 500
    """Validation samples drawn from TALLRec's valid split (paper: 500)."""
    test_size: int = 1000
    """Test samples drawn from TALLRec's test split (paper: 1000)."""
    seed: int = 0
    """Seed of the sampling and of BookCrossing's user split."""
    full: bool = False
    """Keep TALLRec's full splits (ml-100k: 8000/1000/1000) instead of sampling."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.dataset != "ml-100k" and self.path is None:
            raise ValueError(f"dataset {self.dataset!r} needs a path to its raw data")
        for name in ("train_size", "valid_size", "test_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def sizes(self) -> dict[Split, int]:
        return {"train": self.train_size, "valid": self.valid_size, "test": self.test_size}


def load_interactions(config: DataConfig) -> list[Interaction]:
    """The raw interactions of `config.dataset`, in file order."""
    if config.dataset == "ml-100k":
        return load_ml100k(config.path)
    assert config.path is not None  # checked by DataConfig
    if config.dataset == "bookcrossing":
        return load_bookcrossing(config.path)
    return load_interactions_csv(config.path)


def preprocess(
    interactions: Sequence[Interaction], dataset: Dataset, seed: int = 0
) -> dict[Split, list[Sample]]:
    """TALLRec's full splits for `dataset` (the seed only matters for BookCrossing's user split)."""
    if dataset == "bookcrossing":
        return book_samples(interactions, dataset=dataset, seed=seed)
    return movie_samples(interactions, dataset=dataset)


def sample_splits(
    splits: Mapping[Split, Sequence[Sample]], sizes: Mapping[Split, int], seed: int = 0
) -> dict[Split, list[Sample]]:
    """`sizes[split]` samples of each split drawn without replacement under `seed`, in their
    original order; each split has its own stream, so one size does not change another's draw.
    A split smaller than asked is kept whole (with a warning)."""
    out: dict[Split, list[Sample]] = {}
    for split, samples in splits.items():
        size = sizes[split]
        if size >= len(samples):
            if size > len(samples):
                logger.warning(
                    "%s: %d samples asked for, only %d exist; keeping all", split, size, len(samples)
                )
            out[split] = list(samples)
            continue
        keep = sorted(random.Random(f"apa.data:{seed}:{split}").sample(range(len(samples)), size))
        out[split] = [samples[i] for i in keep]
    return out


def prepare(config: DataConfig) -> dict[Split, list[Sample]]:
    """Load, preprocess as TALLRec and (unless `config.full`) sample the paper's split sizes."""
    splits = preprocess(load_interactions(config), config.dataset, config.seed)
    return splits if config.full else sample_splits(splits, config.sizes, config.seed)


def prepare_command(
    dataset: Dataset = "ml-100k",
    out: str = "data/ml-100k",
    path: str | None = None,
    full: bool = False,
    train_size: int = 1024,
    valid_size: int = 500,
    test_size: int = 1000,
    seed: int = 0,
) -> int:
    """Build TALLRec-style train/valid/test samples and write OUT/{train,valid,test}.jsonl.

    Args:
        dataset: ml-100k (TALLRec movie recipe), bookcrossing (book recipe) or csv (a generic
            interactions CSV, header user_id,item_id,rating,timestamp,title; movie recipe).
        out: Output directory for train.jsonl, valid.jsonl and test.jsonl.
        path: Raw data: for ml-100k a directory with u.data and u.item (default: the copy in the
            recbole package); for bookcrossing the directory with BX-Book-Ratings.csv and
            BX-Books.csv; for csv the CSV file.
        full: Keep TALLRec's full splits (ml-100k: 8000/1000/1000) instead of sampling.
        train_size: Training samples drawn from the train split (the paper: 1024).
        valid_size: Validation samples drawn from the valid split (the paper: 500).
        test_size: Test samples drawn from the test split (the paper: 1000).
        seed: Seed of the sampling (and of BookCrossing's user split).

    Returns:
        0 on success, 1 when the data cannot be read (the reason is printed).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = DataConfig(
            dataset=dataset,
            path=path,
            train_size=train_size,
            valid_size=valid_size,
            test_size=test_size,
            seed=seed,
            full=full,
        )
        full_splits = preprocess(load_interactions(config), config.dataset, config.seed)
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        print(f"apa prepare: error: {err}", file=sys.stderr)
        return 1
    splits = full_splits if full else sample_splits(full_splits, config.sizes, seed)
    out_dir = Path(out)
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", splits[split])
    source = path if path is not None else "recbole's copy"
    print(f"{dataset} ({source}) -> {out_dir}/")
    for split in SPLITS:
        yes, no = label_counts(splits[split])
        drawn = "" if full else f" (drawn from {len(full_splits[split])}, seed {seed})"
        print(f"  {split:<5} {len(splits[split]):>6} samples  Yes {yes:>5}  No {no:>5}{drawn}")
    return 0
