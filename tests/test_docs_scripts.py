"""The scripts under docs/ that draw RESULTS.md's figures or re-run its one-off checks.

`docs/issue11_overview.py` reads RESULTS.md's "At a glance" table and plots it; these tests check
that it reads every row's figures as written, names each run by its session, refuses a table it
cannot read, and draws the plot. `docs/partition_precision.py` counts samples that change shard
between two partitions; its count must not depend on how the shards happen to be numbered.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from apa.partition import Partition, PartitionConfig

REPO = Path(__file__).resolve().parents[1]
HEADER = (
    "| run (section) | Retraining | SISA | APA(D), τ=1000, n=20 | − Retraining | − SISA "
    "| APA(D), τ/n selected on validation | − Retraining | − SISA |\n|---|---|---|---|---|---|---|---|---|\n"
)
TABLE = (
    "# Results\n\n### At a glance (figures)\nSome prose.\n\n" + HEADER
    + "| twenty-first: 1024, as the nineteenth, seed 1 (other train and valid samples) | 0.708 | 0.658 | 0.649 "
    "| −0.058 [−0.083, −0.032] | −0.009 [−0.036, +0.018] | 0.665 (τ=10, n=10) | **−0.042** [−0.061, −0.022] "
    "| +0.007 [−0.012, +0.027] |\n"
    "| fourteenth: 256 train (bf16 partition) | 0.690 | 0.681¹ | 0.544 | −0.146 [−0.177, −0.113] "
    "| −0.137 [−0.169, −0.104]¹ | not served | | |\n"
    "\n¹ The fourteenth session's SISA is over random shards; more detail. And more.\n"
    "\n### Next section\n| not | a | run |\n"
)  # fmt: skip


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def overview() -> ModuleType:
    return load_script("issue11_overview")


@pytest.mark.parametrize(
    ("word", "n", "numeral"),
    [
        ("first", 1, "1st"),
        ("second", 2, "2nd"),
        ("third", 3, "3rd"),
        ("ninth", 9, "9th"),
        ("eleventh", 11, "11th"),
        ("twelfth", 12, "12th"),
        ("thirteenth", 13, "13th"),
        ("nineteenth", 19, "19th"),
        ("twentieth", 20, "20th"),
        ("twenty-first", 21, "21st"),
        ("twenty-second", 22, "22nd"),
        ("twenty-third", 23, "23rd"),
        ("twenty-fifth", 25, "25th"),
        ("thirtieth", 30, "30th"),
        ("thirty-second", 32, "32nd"),
    ],
)
def test_session_names_become_numerals(overview, word, n, numeral):
    assert overview.ordinal_number(word) == n
    assert overview.numeral(n) == numeral


@pytest.mark.parametrize("word", ["twenty", "twenty-tenth", "fifth-first", "zeroth"])
def test_a_word_that_is_not_an_ordinal_is_refused(overview, word):
    with pytest.raises(overview.TableError, match=word):
        overview.ordinal_number(word)


def test_the_overview_reads_each_rows_differences_as_written(overview):
    runs = overview.read_runs(TABLE)
    assert len(runs) == 2, "the next section's table is not read"
    first, second = runs
    assert first.label == "21st: 1024, as the 19th, seed 1"
    assert first.paper_vs_retraining == (-0.058, -0.083, -0.032)
    assert first.paper_vs_sisa == (-0.009, -0.036, +0.018)
    assert first.selected_vs_retraining == (-0.042, -0.061, -0.022)  # bold allowed
    assert first.selected_vs_sisa == (+0.007, -0.012, +0.027)
    assert second.label == "14th: 256 train (bf16 partition) ¹"  # the footnote mark stays
    assert second.paper_vs_sisa == (-0.137, -0.169, -0.104)
    assert second.selected_vs_retraining is None and second.selected_vs_sisa is None
    assert overview.footnote(TABLE) == "¹ The fourteenth session's SISA is over random shards"


def test_a_long_label_is_wrapped_with_its_parenthesis_on_a_line_of_its_own(overview):
    label = overview.plot_label("sixteenth: 256 train, 4 epochs, lr 1e-3 (fp32 partition, fp32 training)")
    assert label == "16th: 256 train, 4 epochs, lr 1e-3\n(fp32 partition, fp32 training)"
    assert all(len(line) <= overview.LABEL_WIDTH for line in label.splitlines())


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (TABLE.replace("−0.058 [−0.083, −0.032]", "−0.058 (−0.083, −0.032)"), "not a difference with its CI"),
        (TABLE.replace("| −0.146 [−0.177, −0.113] ", "| "), "paper's τ"),
        (TABLE.replace("| not served | | |", "| not served | |"), "8 cells, not 9"),
        (TABLE.replace("### At a glance", "### Elsewhere"), "no '### At a glance' section"),
        (TABLE.replace("− SISA", "− Sisa"), "columns"),
    ],
)
def test_a_table_the_overview_cannot_read_is_refused_by_name(overview, broken, message):
    with pytest.raises(overview.TableError, match=message):
        overview.read_runs(broken)


def test_the_overview_plots_every_row_of_the_results_table(overview):
    text = (REPO / "docs" / "RESULTS.md").read_text()
    section = text.split("### At a glance", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # the header
    runs = overview.read_runs(text)
    assert len(runs) == len(rows) >= 19
    for row, run in zip(rows, runs, strict=True):
        session = row.strip("| ").split(":", 1)[0]
        assert run.label.startswith(f"{overview.numeral(overview.ordinal_number(session))}:"), row


def test_the_overview_plot_is_drawn(overview, tmp_path):
    out = tmp_path / "overview.png"
    overview.draw(out, TABLE)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _partition(*shards: list[str]) -> Partition:
    return Partition(
        shards=[list(s) for s in shards],
        centroids=None,
        config=PartitionConfig(strategy="random", num_shards=len(shards)),
    )


@pytest.mark.parametrize(
    ("b", "expected"),
    [
        (_partition(["a", "b"], ["c", "d"], ["e", "f"]), 0),
        (_partition(["e", "f"], ["a", "b"], ["c", "d"]), 0),  # the same shards, numbered otherwise
        (_partition(["c", "f"], ["a", "b"], ["e", "d"]), 2),  # d and f swapped, then renumbered
        (_partition(["a", "c"], ["b", "e"], ["d", "f"]), 3),
    ],
)
def test_moved_counts_samples_that_change_shard_whatever_the_shard_numbers(b, expected):
    precision = load_script("partition_precision")
    a = _partition(["a", "b"], ["c", "d"], ["e", "f"])
    assert precision.moved(a, b) == expected
    assert precision.moved(b, a) == expected
