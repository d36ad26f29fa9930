"""Data for APA (docs/ARCHITECTURE.md §3): loaders, TALLRec preprocessing, the paper's sampling, JSONL I/O.

- `loaders`: MovieLens-100K (raw or recbole's copy), BookCrossing, generic CSV -> `Interaction`s
- `tallrec`: TALLRec's movie and book recipes -> `Sample`s in train/valid/test
- `samples`: the `Sample` contract (docs/ARCHITECTURE.md §4) and its JSONL files
- `pipeline`: `DataConfig`, sampling 1024/500/1000, the `apa prepare` command
"""

from apa.data.loaders import (
    DataFormatError,
    Interaction,
    load_bookcrossing,
    load_interactions_csv,
    load_ml100k,
    recbole_ml100k_dir,
)
from apa.data.pipeline import (
    DataConfig,
    Dataset,
    load_interactions,
    prepare,
    prepare_command,
    preprocess,
    sample_splits,
)
from apa.data.samples import SPLITS, InvalidSampleError, Sample, Split, load_splits, read_jsonl, write_jsonl
from apa.data.tallrec import book_samples, label_counts, movie_samples

__all__ = [
    "SPLITS",
    "DataConfig",
    "DataFormatError",
    "Dataset",
    "Interaction",
    "InvalidSampleError",
    "Sample",
    "Split",
    "book_samples",
    "label_counts",
    "load_bookcrossing",
    "load_interactions",
    "load_interactions_csv",
    "load_ml100k",
    "load_splits",
    "movie_samples",
    "prepare",
    "prepare_command",
    "preprocess",
    "read_jsonl",
    "recbole_ml100k_dir",
    "sample_splits",
    "write_jsonl",
]
