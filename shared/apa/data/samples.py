"""`Sample` (the contract in docs/ARCHITECTURE.md §4) and its JSONL files: one JSON object per line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

from apa.atomic import replace_file
from apa.data.loaders import DataFormatError
from apa.ids import id_problem
from apa.prompts import answer_text, format_prompt

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
"""The split names, in order; `load_splits` reads `<split>.jsonl` for each."""


class InvalidSampleError(ValueError):
    """A sample that breaks the contract; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"field {field!r}: {message}")


@dataclass(frozen=True)
class Sample:
    """One TALLRec prompt/answer pair and the interactions it was built from."""

    sample_id: str
    """Unique across all splits and stable: `<dataset>:<target interaction id>`."""
    user_id: str
    split: Split
    instruction: str
    input: str
    """TALLRec's `User Preference: ...\\nUser Unpreference: ...\\nWhether the user will like ...?`."""
    output: str
    """`Yes.` or `No.` (agrees with `label`)."""
    label: int
    """1: the user likes the target item, 0: not."""
    interaction_ids: tuple[str, ...]
    """Every interaction the sample contains: the history in prompt order, then the target (last).
    A list passed in is stored as a tuple."""

    def __post_init__(self) -> None:
        if isinstance(self.interaction_ids, list):
            object.__setattr__(self, "interaction_ids", tuple(self.interaction_ids))
        for name in ("sample_id", "user_id", "instruction", "input", "output"):
            if not isinstance(getattr(self, name), str):
                raise InvalidSampleError(name, f"expected a string, got {getattr(self, name)!r}")
        for name in ("sample_id", "user_id"):
            problem = id_problem(getattr(self, name))
            if problem:
                raise InvalidSampleError(name, problem)
        if self.split not in SPLITS:
            raise InvalidSampleError("split", f"expected one of {list(SPLITS)}, got {self.split!r}")
        if isinstance(self.label, bool) or self.label not in (0, 1):
            raise InvalidSampleError("label", f"expected 0 or 1, got {self.label!r}")
        if self.output != answer_text(self.label):
            raise InvalidSampleError("output", f"{self.output!r} disagrees with label {self.label}")
        ids = self.interaction_ids
        if not isinstance(ids, tuple) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise InvalidSampleError("interaction_ids", f"expected a non-empty list of ids, got {ids!r}")
        for interaction_id in ids:
            problem = id_problem(interaction_id)
            if problem:
                raise InvalidSampleError("interaction_ids", f"{interaction_id!r}: {problem}")

    @property
    def prompt(self) -> str:
        """The full alpaca/TALLRec prompt, up to and including `### Response:\\n`."""
        return format_prompt(self.instruction, self.input)

    @property
    def target_interaction_id(self) -> str:
        """The interaction whose rating is the label."""
        return self.interaction_ids[-1]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one JSONL line (`interaction_ids` as a list)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Sample:
        """Inverse of `to_dict`; raises `InvalidSampleError` on a missing, unknown or mistyped field."""
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in row:
                raise InvalidSampleError(name, "missing")
        for name in row:
            if name not in names:
                raise InvalidSampleError(name, "unknown field")
        ids = row["interaction_ids"]
        if not isinstance(ids, list):
            raise InvalidSampleError("interaction_ids", f"expected a list, got {ids!r}")
        return cls(**{**row, "interaction_ids": tuple(ids)})


def write_jsonl(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write one JSON object per sample (UTF-8); the file is replaced atomically."""

    def write(handle: BinaryIO) -> None:
        for sample in samples:
            handle.write((json.dumps(sample.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))

    replace_file(Path(path), write)


def read_jsonl(path: str | Path) -> list[Sample]:
    """The samples of a JSONL file; a bad row raises `DataFormatError` naming the file and line."""
    return _read_jsonl(Path(path), expect_split=None, seen={})


def _read_jsonl(path: Path, expect_split: Split | None, seen: dict[str, str]) -> list[Sample]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    path, number, None, f"invalid JSON: {err.msg} (char {err.pos})"
                ) from None
            if not isinstance(row, dict):
                raise DataFormatError(path, number, None, f"expected a JSON object, got {type(row).__name__}")
            try:
                sample = Sample.from_dict(row)
            except InvalidSampleError as err:
                raise DataFormatError(path, number, err.field, str(err)) from None
            except TypeError as err:
                raise DataFormatError(path, number, None, str(err)) from None
            if expect_split is not None and sample.split != expect_split:
                raise DataFormatError(path, number, "split", f"{sample.split!r} in the {expect_split} file")
            if sample.sample_id in seen:
                raise DataFormatError(
                    path, number, "sample_id", f"{sample.sample_id!r} repeats one at {seen[sample.sample_id]}"
                )
            seen[sample.sample_id] = f"{path}, line {number}"
            samples.append(sample)
    return samples


def load_splits(directory: str | Path) -> dict[str, list[Sample]]:
    """`{"train": [...], "valid": [...], "test": [...]}` from `<directory>/<split>.jsonl`;
    checks that each row's `split` matches its file and that sample ids are unique across files."""
    root = Path(directory)
    seen: dict[str, str] = {}
    return {split: _read_jsonl(root / f"{split}.jsonl", split, seen) for split in SPLITS}


def sample_digest(sample_ids: Iterable[str]) -> str:
    """sha256 of the sorted sample ids joined by newlines: what an adapter manifest commits to
    (docs/ARCHITECTURE.md §4 `sample_digest`)."""
    return hashlib.sha256("\n".join(sorted(sample_ids)).encode("utf-8")).hexdigest()
