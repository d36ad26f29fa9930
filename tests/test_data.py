"""apa.data: loaders, TALLRec preprocessing, sampling, JSONL I/O and `apa prepare`.

Fixture files under tests/fixtures/data/ are made up; the real MovieLens-100K is read from the
installed recbole package (never committed here)."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from apa.cli import main as cli_main
from apa.data import (
    DataConfig,
    DataFormatError,
    Interaction,
    Sample,
    Split,
    book_samples,
    label_counts,
    load_bookcrossing,
    load_interactions_csv,
    load_ml100k,
    load_splits,
    movie_samples,
    prepare,
    prepare_command,
    preprocess,
    read_jsonl,
    sample_splits,
    write_jsonl,
)
from apa.prompts import BOOK_INSTRUCTION, MOVIE_INSTRUCTION

FIXTURES = Path(__file__).parent / "fixtures" / "data"
ML_RAW = FIXTURES / "ml-100k-raw"
BX = FIXTURES / "bookcrossing"
CSV = FIXTURES / "interactions.csv"

needs_recbole = pytest.mark.skipif(
    importlib.util.find_spec("recbole") is None, reason="recbole (the ML-100K copy) is not installed"
)


def inter(user: str, item: str, rating: float, ts: int) -> Interaction:
    return Interaction(f"{user}:{item}", user, item, rating, ts, f"T{item}")


def make_sample(sample_id: str, split: Split = "train", label: int = 1) -> Sample:
    return Sample(
        sample_id=sample_id,
        user_id="u1",
        split=split,
        instruction=MOVIE_INSTRUCTION,
        input='User Preference: "Café (1990)"\nUser Unpreference: \nWhether the user will like the target movie "X"?',
        output="Yes." if label else "No.",
        label=label,
        interaction_ids=("u1:a", f"u1:{sample_id}"),
    )


# ---------------------------------------------------------------- loaders


def test_raw_ml100k_loader_reads_file_order_latin1_titles_and_numbers() -> None:
    rows = load_ml100k(ML_RAW)
    assert len(rows) == 26
    assert rows[0] == Interaction("7:12", "7", "12", 1.0, 210, "Lantern Fields (2001)")
    assert rows[1].user_id == "3" and rows[1].title == "Alpha Road (1990)"
    titles = {r.item_id: r.title for r in rows}
    assert titles["2"] == "Brava Café (1991)"  # latin-1 in u.item
    assert titles["8"] == "Hollow Men (Los huecos) (1997)"
    assert len({r.interaction_id for r in rows}) == len(rows)


def test_bookcrossing_loader_handles_latin1_quoted_semicolons_and_counts_skips(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="apa.data"):
        rows = load_bookcrossing(BX)
    # 20 ratings: 2 name an ISBN without a usable book row (one unknown, one on a malformed book line)
    assert len(rows) == 18
    second = rows[1]
    assert second.title == "Müller's Journey; A Novel" and second.author == "Jörg Müller"
    assert second.user_id == "276725" and second.item_id == "0000000002" and second.rating == 8.0
    # no timestamps in BookCrossing: the position in the ratings file (positions 2 and 12 were skipped)
    assert [r.timestamp for r in rows] == [i for i in range(20) if i not in (2, 12)]
    assert any(r.rating == 0.0 for r in rows)  # implicit ratings are kept, as TALLRec does
    text = caplog.text
    assert "skipped 1 malformed book rows" in text and "lines [5]" in text
    assert "skipped 2 ratings whose ISBN has no row" in text


def test_bookcrossing_book_rows_like_pandas_too_long_dropped_short_kept(tmp_path: Path) -> None:
    (tmp_path / "BX-Books.csv").write_text(
        '"ISBN";"Book-Title";"Book-Author";"Year"\n'
        '"short";"Kept";"Author"\n'  # pandas pads a short line: TALLRec keeps it
        '"long";"Dropped \\";"x";"Author";"1999"\n'  # an escaped quote adds a field: TALLRec drops it
        '"noauthor";"Title"\n'
    )
    (tmp_path / "BX-Book-Ratings.csv").write_text(
        '"User-ID";"ISBN";"Book-Rating"\n"1";"short";"7"\n"1";"long";"7"\n"1";"noauthor";"7"\n'
    )
    assert [(r.item_id, r.title, r.author) for r in load_bookcrossing(tmp_path)] == [
        ("short", "Kept", "Author")
    ]


def test_generic_csv_loader_reads_quoted_titles_and_disambiguates_repeated_pairs() -> None:
    rows = load_interactions_csv(CSV)
    assert len(rows) == 13
    assert rows[0] == Interaction("alice:m0", "alice", "m0", 5.0, 1_600_000_000, "Film 0, Part 0 (2000)")
    assert [r.interaction_id for r in rows[-2:]] == ["bob:m0", "bob:m0#2"]


def test_generic_csv_accepts_explicit_interaction_ids_and_authors(tmp_path: Path) -> None:
    path = tmp_path / "i.csv"
    path.write_text("title,author,interaction_id,user_id,item_id,rating,timestamp\nA,Ann,e1,u,i,4,10\n")
    [row] = load_interactions_csv(path)
    assert (row.interaction_id, row.author, row.title, row.rating, row.timestamp) == (
        "e1",
        "Ann",
        "A",
        4.0,
        10,
    )


@pytest.mark.parametrize(
    ("files", "loader", "bad_file", "line", "column", "fragment"),
    [
        ({"u.data": "1\t1\t4\t5\n1\t1\tfour\t6\n"}, "ml", "u.data", 2, "rating", "'four'"),
        ({"u.data": "1\t1\t4\t5.5\n"}, "ml", "u.data", 1, "timestamp", "integer"),
        ({"u.data": "1\t1\t4\n"}, "ml", "u.data", 1, None, "4 tab-separated fields"),
        ({"u.data": "1\t1\t4\t5\n1\t77\t4\t5\n"}, "ml", "u.data", 2, "item_id", "'77'"),
        (
            {"BX-Book-Ratings.csv": '"User-ID";"ISBN";"Book-Rating"\n"1";"b1";"7"\n"2";"b1";"high"\n'},
            "bx",
            "BX-Book-Ratings.csv",
            3,
            "Book-Rating",
            "'high'",
        ),
        (
            {"BX-Book-Ratings.csv": '"User";"ISBN";"Book-Rating"\n'},
            "bx",
            "BX-Book-Ratings.csv",
            1,
            "User-ID",
            "",
        ),
        ({"c.csv": "user_id,item_id,rating,title\nu,i,4,T\n"}, "csv", "c.csv", 1, "timestamp", "missing"),
        (
            {"c.csv": "user_id,item_id,rating,timestamp,title\nu,i,4,1,T\nu,j,4,yesterday,T\n"},
            "csv",
            "c.csv",
            3,
            "timestamp",
            "",
        ),
        (
            {"c.csv": "user_id,item_id,rating,timestamp,title\nu,i,4,1,\n"},
            "csv",
            "c.csv",
            2,
            "title",
            "empty",
        ),
        (
            {"c.csv": "user_id,item_id,rating,timestamp,title\nu,i,4,1\n"},
            "csv",
            "c.csv",
            2,
            None,
            "expected 5 fields",
        ),
        (
            {"c.csv": "interaction_id,user_id,item_id,rating,timestamp,title\nx,u,i,4,1,T\nx,u,j,4,1,T\n"},
            "csv",
            "c.csv",
            3,
            "interaction_id",
            "repeated",
        ),
    ],
)
def test_bad_files_raise_errors_naming_file_line_and_column(
    tmp_path: Path,
    files: dict[str, str],
    loader: str,
    bad_file: str,
    line: int,
    column: str | None,
    fragment: str,
) -> None:
    (tmp_path / "u.item").write_bytes("1|Só (1990)|x\n".encode("latin-1"))
    (tmp_path / "BX-Books.csv").write_text('"ISBN";"Book-Title";"Book-Author";"Year"\n"b1";"T";"A"\n')
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    load = {
        "ml": lambda: load_ml100k(tmp_path),
        "bx": lambda: load_bookcrossing(tmp_path),
        "csv": lambda: load_interactions_csv(tmp_path / "c.csv"),
    }[loader]
    with pytest.raises(DataFormatError) as info:
        load()
    err = info.value
    assert (Path(err.path).name, err.line, err.column) == (bad_file, line, column)
    message = str(err)
    assert bad_file in message and f"line {line}" in message and fragment in message
    if column is not None:
        assert repr(column) in message


def test_missing_files_say_which_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="u.item"):
        load_ml100k(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_bookcrossing(tmp_path / "nope")


# ---------------------------------------------------------------- TALLRec movie recipe


def test_movie_windows_labels_and_text_on_a_hand_checked_example() -> None:
    # user b appears first in the file; a's rows are out of time order and two share a timestamp
    rows = [
        inter("b", "1", 5, 1),
        inter("a", "3", 4, 30),
        inter("a", "1", 2, 10),
        inter("a", "5", 3, 20),  # tie with item 2 at ts 20: file order (5 before 2) is kept
        inter("b", "2", 1, 2),
        inter("a", "2", 5, 20),
        inter("b", "3", 4, 3),
        inter("a", "4", 1, 40),
    ]
    splits = movie_samples(rows, dataset="toy", history=2, max_windows=100)
    windows = splits["train"] + splits["valid"] + splits["test"]
    # users in order of first appearance (b, a); per user, sorted by time: b: 1,2,3  a: 1,5,2,3,4
    assert [s.interaction_ids for s in windows] == [
        ("b:1", "b:2", "b:3"),
        ("a:1", "a:5", "a:2"),
        ("a:5", "a:2", "a:3"),
        ("a:2", "a:3", "a:4"),
    ]
    assert [s.label for s in windows] == [1, 1, 1, 0]  # rating > 3: 4, 5, 4, 1
    assert [s.output for s in windows] == ["Yes.", "Yes.", "Yes.", "No."]
    # rating 3 is not liked; liked titles under Preference, others under Unpreference, quoted
    assert windows[2].input == (
        'User Preference: "T2"\nUser Unpreference: "T5"\nWhether the user will like the target movie "T3"?'
    )
    assert windows[0].input == (
        'User Preference: "T1"\nUser Unpreference: "T2"\nWhether the user will like the target movie "T3"?'
    )
    assert windows[3].input.startswith('User Preference: "T2", "T3"\nUser Unpreference: \nWhether')
    assert all(s.instruction == MOVIE_INSTRUCTION for s in windows)
    assert [s.sample_id for s in windows] == ["toy:b:3", "toy:a:2", "toy:a:3", "toy:a:4"]
    assert [s.user_id for s in windows] == ["b", "a", "a", "a"]
    # 4 windows split in order: int(3.2)=3 train, int(3.6)=3 -> 0 valid, 1 test
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [3, 0, 1]
    assert {s.split for s in splits["train"]} == {"train"} and splits["test"][0].split == "test"


def test_movie_recipe_keeps_only_the_last_windows() -> None:
    rows = [inter("a", str(i), 4, i) for i in range(6)]
    splits = movie_samples(rows, history=2, max_windows=3)
    kept = [s.target_interaction_id for k in ("train", "valid", "test") for s in splits[k]]
    assert kept == ["a:3", "a:4", "a:5"]


def test_movie_recipe_on_raw_fixture_files() -> None:
    splits = movie_samples(load_ml100k(ML_RAW))
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [2, 0, 1]
    first = splits["train"][0]
    # user 7 sorted by time; items 6 and 5 share ts 140 and keep file order (6 first)
    assert first.interaction_ids == tuple(f"7:{i}" for i in (1, 2, 3, 4, 6, 5, 7, 8, 9, 10, 11))
    assert first.input == (
        'User Preference: "Alpha Road (1990)", "Cold Harbor (1992)", "Fable, The (1995)", '
        '"Glass Lake (1996)", "Iron Kite (1998)"\n'
        'User Unpreference: "Brava Café (1991)", "Dune Walkers (1993)", "Echo Park Nights (1994)", '
        '"Hollow Men (Los huecos) (1997)", "Jade River (1999)"\n'
        'Whether the user will like the target movie "Kilo Nine (2000)"?'
    )
    assert first.label == 1
    assert splits["test"][0].sample_id == "ml-100k:3:11"


# ---------------------------------------------------------------- TALLRec book recipe


def _tallrec_book_input(rows: list[Interaction]) -> tuple[str, int]:
    """TALLRec preprocess_book.py's per-user step, transcribed: random.seed(42) before shuffling
    each list, history = the first min(n - 1, 10) items, target = the last."""
    item_id = [r.interaction_id for r in rows]
    rating = [int(r.rating > 5) for r in rows]
    book_title = [r.title for r in rows]
    book_author = [r.author for r in rows]
    for values in (item_id, rating, book_title, book_author):
        random.seed(42)
        random.shuffle(values)  # type: ignore[arg-type]
    preference: list[str] = []
    unpreference: list[str] = []
    for i in range(min(len(item_id) - 1, 10)):
        text = '"' + str(book_title[i]) + '"' + " written by " + str(book_author[i])
        (preference if rating[i] == 1 else unpreference).append(text)
    target = '"' + ('"' + str(book_title[-1]) + '"' + " written by " + str(book_author[-1])) + '"'
    text = (
        f"User Preference: {', '.join(preference)}\nUser Unpreference: {', '.join(unpreference)}\n"
        f"Whether the user will like the target book {target}?"
    )
    return text, rating[-1]


def test_book_recipe_matches_tallrec_shuffle_and_text() -> None:
    rows = [
        Interaction(f"u:{i}", "u", str(i), float(i % 11), i, f"Book {i}", f"Author {i}") for i in range(14)
    ]
    rows += [Interaction(f"v:{i}", "v", str(i), 9.0, i, f"Book {i}", "A") for i in range(3)]  # <= 3: dropped
    splits = book_samples(rows, seed=0)
    [sample] = [s for k in ("train", "valid", "test") for s in splits[k]]
    text, label = _tallrec_book_input(rows[:14])
    assert sample.input == text
    assert sample.label == label and sample.output == ("Yes." if label else "No.")
    assert sample.instruction == BOOK_INSTRUCTION
    assert len(sample.interaction_ids) == 11  # 10 history + target
    assert sample.sample_id == f"bookcrossing:{sample.target_interaction_id}"
    # the ids follow the same shuffle as the text: history in prompt order, then the target
    by_id = {r.interaction_id: r for r in rows}
    assert f'target book ""{by_id[sample.target_interaction_id].title}" written by' in sample.input


def test_book_user_split_is_seeded() -> None:
    rows = [
        Interaction(f"{u}:{i}", str(u), str(i), 7.0, i, f"B{i}", "A") for u in range(20) for i in range(4)
    ]
    first = book_samples(rows, seed=0)
    assert [len(first[k]) for k in ("train", "valid", "test")] == [16, 2, 2]
    assert book_samples(rows, seed=0) == first
    assert [s.user_id for s in book_samples(rows, seed=1)["test"]] != [s.user_id for s in first["test"]]


def test_book_recipe_on_fixture_files_splits_users_and_keeps_users_with_more_than_3_ratings() -> None:
    splits = book_samples(load_bookcrossing(BX), seed=0)
    samples = [s for k in ("train", "valid", "test") for s in splits[k]]
    # user 11 has 3 ratings (dropped); 276725 (5 kept after skips), 42 (4), 8 (6) give one sample each
    assert sorted(s.user_id for s in samples) == ["276725", "42", "8"]
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [2, 0, 1]
    for s in samples:
        assert "written by" in s.input and s.input.count("\n") == 2
        assert all(i.startswith(f"{s.user_id}:") for i in s.interaction_ids)
    assert book_samples(load_bookcrossing(BX), seed=0) == splits


# ---------------------------------------------------------------- samples and JSONL


def test_sample_checks_its_contract() -> None:
    with pytest.raises(ValueError, match="output"):
        replace(make_sample("s1"), output="No.")
    with pytest.raises(ValueError, match="split"):
        replace(make_sample("s1"), split="dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interaction_ids"):
        replace(make_sample("s1"), interaction_ids=())
    as_list = replace(make_sample("s1"), interaction_ids=["a", "b"])  # type: ignore[arg-type]
    assert as_list.interaction_ids == ("a", "b") and as_list.target_interaction_id == "b"
    assert make_sample("s1").prompt.endswith("### Response:\n") and "Café" in make_sample("s1").prompt


def test_jsonl_round_trip(tmp_path: Path) -> None:
    samples = [make_sample("s1"), make_sample("s2", label=0)]
    path = tmp_path / "deep" / "train.jsonl"
    write_jsonl(path, samples)
    assert read_jsonl(path) == samples
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "Café" in lines[0]  # one object per line, UTF-8 kept
    assert json.loads(lines[1])["interaction_ids"] == ["u1:a", "u1:s2"]
    assert list(tmp_path.joinpath("deep").iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize(
    ("mutate", "column", "fragment"),
    [
        (lambda line: line[:-3], None, "invalid JSON"),
        (
            lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "label"}),
            "label",
            "missing",
        ),
        (lambda line: json.dumps({**json.loads(line), "label": 2}), "label", "0 or 1"),
        (lambda line: json.dumps({**json.loads(line), "extra": 1}), "extra", "unknown"),
        (lambda line: json.dumps({**json.loads(line), "interaction_ids": "u1:a"}), "interaction_ids", "list"),
        (lambda line: "[1, 2]", None, "JSON object"),
    ],
)
def test_read_jsonl_names_file_line_and_field_of_a_bad_row(
    tmp_path: Path, mutate: Callable[[str], str], column: str | None, fragment: str
) -> None:
    path = tmp_path / "valid.jsonl"
    write_jsonl(path, [make_sample("s1"), make_sample("s2")])
    good, second = path.read_text(encoding="utf-8").splitlines()
    path.write_text(good + "\n" + mutate(second) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert info.value.line == 2 and info.value.column == column
    assert "valid.jsonl, line 2" in str(info.value) and fragment in str(info.value)


def test_load_splits_reads_three_files_and_rejects_ids_repeated_across_splits(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [make_sample(f"{split}-1", split)])
    splits = load_splits(tmp_path)
    assert {k: [s.sample_id for s in v] for k, v in splits.items()} == {
        "train": ["train-1"],
        "valid": ["valid-1"],
        "test": ["test-1"],
    }
    write_jsonl(tmp_path / "test.jsonl", [make_sample("train-1", "test")])
    with pytest.raises(DataFormatError, match=r"test.jsonl, line 1, column 'sample_id'.*train.jsonl, line 1"):
        load_splits(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", [make_sample("test-1", "valid")])
    with pytest.raises(DataFormatError, match="column 'split'"):
        load_splits(tmp_path)
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_splits(tmp_path)


# ---------------------------------------------------------------- sampling and config


def _toy_splits() -> dict[Split, list[Sample]]:
    sizes: dict[Split, int] = {"train": 50, "valid": 30, "test": 20}
    return {
        split: [make_sample(f"{split}-{i}", split, label=i % 2) for i in range(n)]
        for split, n in sizes.items()
    }


def test_sampling_honours_sizes_is_seeded_and_keeps_original_order(caplog: pytest.LogCaptureFixture) -> None:
    full = _toy_splits()
    sizes: dict[Split, int] = {"train": 10, "valid": 5, "test": 20}
    drawn = sample_splits(full, sizes, seed=1)
    assert {k: len(v) for k, v in drawn.items()} == sizes
    assert drawn == sample_splits(full, sizes, seed=1)
    assert drawn["train"] != sample_splits(full, sizes, seed=2)["train"]
    for split, samples in drawn.items():
        positions = [full[split].index(s) for s in samples]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # one split's size does not change another split's draw
    assert sample_splits(full, {**sizes, "train": 40}, seed=1)["valid"] == drawn["valid"]
    with caplog.at_level(logging.WARNING, logger="apa.data"):
        more = sample_splits(full, {**sizes, "test": 25}, seed=1)
    assert len(more["test"]) == 20 and "only 20 exist" in caplog.text


def test_data_config_validates_its_fields() -> None:
    assert DataConfig().sizes == {"train": 1024, "valid": 500, "test": 1000}
    with pytest.raises(ValueError, match="needs a path"):
        DataConfig(dataset="bookcrossing")
    with pytest.raises(ValueError, match="train_size"):
        DataConfig(train_size=-1)
    with pytest.raises(ValueError, match="dataset"):
        DataConfig(dataset="ml-1m")  # type: ignore[arg-type]


def test_prepare_on_csv_fixture_uses_the_movie_recipe() -> None:
    splits = prepare(DataConfig(dataset="csv", path=str(CSV), full=True))
    [only] = splits["test"] + splits["train"] + splits["valid"]
    assert only.sample_id == "csv:alice:m10" and only.label == 1
    assert '"Film 0, Part 0 (2000)"' in only.input and len(only.interaction_ids) == 11


# ---------------------------------------------------------------- real MovieLens-100K (recbole's copy)


@pytest.fixture(scope="module")
def ml100k_splits() -> dict[Split, list[Sample]]:
    return preprocess(load_ml100k(), "ml-100k")


@needs_recbole
def test_real_ml100k_reproduces_tallrec_split_sizes_and_label_balance(
    ml100k_splits: dict[Split, list[Sample]],
) -> None:
    sizes = {k: len(v) for k, v in ml100k_splits.items()}
    balance = {k: label_counts(v) for k, v in ml100k_splits.items()}
    print(f"ML-100K TALLRec splits: sizes {sizes}, (Yes, No) {balance}")
    assert sizes == {"train": 8000, "valid": 1000, "test": 1000}
    assert balance == {"train": (4457, 3543), "valid": (658, 342), "test": (528, 472)}


@needs_recbole
def test_real_ml100k_matches_tallrec_published_first_and_last_samples(
    ml100k_splits: dict[Split, list[Sample]],
) -> None:
    # from SAI990323/TALLRec data/movie/valid.json and test.json
    assert ml100k_splits["valid"][0].input == (
        'User Preference: "Silence of the Lambs, The (1991)", "Indiana Jones and the Last Crusade (1989)", '
        '"Taxi Driver (1976)", "My Favorite Year (1982)", "Titanic (1997)"\n'
        'User Unpreference: "Absolute Power (1997)", "Escape from L.A. (1996)", "Batman & Robin (1997)", '
        '"English Patient, The (1996)", "Tomorrow Never Dies (1997)"\n'
        'Whether the user will like the target movie "Scream (1996)"?'
    )
    assert ml100k_splits["valid"][0].output == "No."
    assert ml100k_splits["test"][-1].input == (
        'User Preference: "Lone Star (1996)", "Hercules (1997)", "Trainspotting (1996)", '
        '"Jackie Chan\'s First Strike (1996)", "Long Kiss Goodnight, The (1996)", "Waiting for Guffman (1996)", '
        '"Mr. Holland\'s Opus (1995)"\n'
        'User Unpreference: "Happy Gilmore (1996)", "Star Trek: First Contact (1996)", "Heat (1995)"\n'
        'Whether the user will like the target movie "Toy Story (1995)"?'
    )
    assert ml100k_splits["test"][-1].output == "Yes."
    # TALLRec dumps each split with json.dump(indent=4): the published files are exactly this long
    published: dict[Split, int] = {"valid": 628187, "test": 612555}
    for split, chars in published.items():
        rows = [
            {"instruction": s.instruction, "input": s.input, "output": s.output} for s in ml100k_splits[split]
        ]
        assert len(json.dumps(rows, indent=4)) == chars


@needs_recbole
def test_real_ml100k_samples_hold_their_interactions_and_have_unique_ids(
    ml100k_splits: dict[Split, list[Sample]],
) -> None:
    samples = [s for v in ml100k_splits.values() for s in v]
    assert len({s.sample_id for s in samples}) == len(samples) == 10_000
    for s in samples:
        assert len(s.interaction_ids) == 11 and len(set(s.interaction_ids)) == 11
        assert all(i.startswith(f"{s.user_id}:") for i in s.interaction_ids)
        assert s.sample_id == f"ml-100k:{s.interaction_ids[-1]}"
    # an erased interaction is found in every window that contains it (as history or target)
    erased = ml100k_splits["test"][-1].interaction_ids[5]
    holders = [s for s in samples if erased in s.interaction_ids]
    assert 1 <= len(holders) <= 11 and any(s.target_interaction_id == erased for s in holders)


@needs_recbole
def test_recbole_titles_are_rebuilt_as_in_u_item() -> None:
    titles = {r.item_id: r.title for r in load_ml100k()}
    assert titles["1"] == "Toy Story (1995)"
    assert titles["6"] == "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)"
    assert titles["1412"] == "Land Before Time III: The Time of the Great Giving (1995) (V)"
    assert titles["267"] == "unknown"
    assert titles["1633"] == "Á köldum klaka (Cold Fever) (1994)"


@needs_recbole
def test_loading_recboles_copy_does_not_import_recbole() -> None:
    code = "import sys; from apa.data import load_ml100k; load_ml100k(); print('recbole' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- apa prepare


@needs_recbole
def test_prepare_command_writes_sampled_splits_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ml"
    assert prepare_command(out=str(out), train_size=64, valid_size=32, test_size=16, seed=3) == 0
    splits = load_splits(out)
    assert {k: len(v) for k, v in splits.items()} == {"train": 64, "valid": 32, "test": 16}
    printed = capsys.readouterr().out
    for split, samples in splits.items():
        yes, no = label_counts(samples)
        assert f"{split:<5} {len(samples):>6} samples  Yes {yes:>5}  No {no:>5}" in printed
    assert "(drawn from 8000, seed 3)" in printed
    again = tmp_path / "again"
    assert cli_main(["prepare", "--out", str(again), "--train_size", "64", "--valid_size", "32",
                     "--test_size", "16", "--seed", "3"]) == 0  # fmt: skip
    assert load_splits(again) == splits


@needs_recbole
def test_cli_prepare_full_writes_tallrec_splits(tmp_path: Path) -> None:
    assert cli_main(["prepare", "--dataset", "ml-100k", "--out", str(tmp_path), "--full", "true"]) == 0
    splits = load_splits(tmp_path)
    assert {k: label_counts(v) for k, v in splits.items()} == {
        "train": (4457, 3543),
        "valid": (658, 342),
        "test": (528, 472),
    }


def test_cli_prepare_bookcrossing_and_csv_from_fixture_files(tmp_path: Path) -> None:
    assert (
        cli_main(["prepare", "--dataset", "bookcrossing", "--path", str(BX), "--out", str(tmp_path / "bx")])
        == 0
    )
    books = load_splits(tmp_path / "bx")
    assert Counter(len(v) for v in books.values()) == Counter([2, 0, 1])
    assert cli_main(["prepare", "--dataset", "csv", "--path", str(CSV), "--out", str(tmp_path / "csv")]) == 0
    assert sum(len(v) for v in load_splits(tmp_path / "csv").values()) == 1


def test_prepare_command_reports_bad_data_and_returns_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,rating,timestamp,title\nu,i,x,1,T\n")
    assert prepare_command(dataset="csv", path=str(bad), out=str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "bad.csv, line 2, column 'rating'" in err
    assert not (tmp_path / "out").exists()
    assert prepare_command(dataset="bookcrossing", out=str(tmp_path / "out")) == 1
    assert "needs a path" in capsys.readouterr().err
