"""The scripts under docs/ that draw RESULTS.md's figures or re-run its one-off checks.

`docs/issue11_overview.py` copies its figures by hand from RESULTS.md's "At a glance" table, so the
two can drift apart; these tests hold them together and check that the plot is drawn.
`docs/partition_precision.py` counts samples that change shard between two partitions; its count
must not depend on how the shards happen to be numbered.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from apa.partition import Partition, PartitionConfig

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[−+-]?\d+\.\d+"
ORDINALS = {
    "second": "2nd",
    "sixth": "6th",
    "seventh": "7th",
    "ninth": "9th",
    "thirteenth": "13th",
    "fourteenth": "14th",
    "sixteenth": "16th",
    "seventeenth": "17th",
    "eighteenth": "18th",
    "nineteenth": "19th",
    "twentieth": "20th",
    "twenty-first": "21st",
    "twenty-second": "22nd",
    "twenty-third": "23rd",
    "twenty-fourth": "24th",
    "twenty-fifth": "25th",
}
"""A table row's session name -> the plot label's prefix."""
INTERVAL = re.compile(rf"^({NUMBER}) \[({NUMBER}), ({NUMBER})\]$")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


def _interval(cell: str) -> tuple[float, float, float] | None:
    """'−0.023 [−0.043, −0.004]' (bold or with a footnote mark allowed) -> (-0.023, -0.043, -0.004)."""
    cell = cell.replace("**", "").replace("¹", "").strip()
    if not cell:
        return None
    match = INTERVAL.match(cell)
    assert match, f"not a difference with its CI: {cell!r}"
    mid, low, high = (_number(g) for g in match.groups())
    return mid, low, high


def at_a_glance_rows() -> list[list[str]]:
    """The cells of each run's row in RESULTS.md's issue 11 "At a glance" table."""
    text = (REPO / "docs" / "RESULTS.md").read_text()
    section = text.split("### At a glance", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[1:]
    assert "− Retraining" in header and "− SISA" in header
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def test_the_overview_plot_shows_the_at_a_glance_tables_figures():
    overview = load_script("issue11_overview")
    rows = at_a_glance_rows()
    assert len(rows) == len(overview.RUNS), "one plotted run per table row"
    for cells, run in zip(rows, overview.RUNS, strict=True):
        session = cells[0].split(":", 1)[0]
        assert run.label.startswith(ORDINALS[session] + ":"), f"row {cells[0]!r} is plotted as {run.label!r}"
        assert run.paper_vs_retraining == _interval(cells[4]), cells[0]
        assert run.paper_vs_sisa == _interval(cells[5]), cells[0]
        assert run.selected_vs_retraining == _interval(cells[7]), cells[0]
        assert run.selected_vs_sisa == _interval(cells[8]), cells[0]


def test_the_overview_plot_is_drawn(tmp_path):
    overview = load_script("issue11_overview")
    out = tmp_path / "overview.png"
    overview.draw(out)
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
