"""Issue 11 at a glance: APA(D) against Retraining and SISA in every Table 1 run so far.

Draws `docs/issue11-overview.png` (a forest plot of the paired-bootstrap differences with their 95%
CIs, the goal's thresholds as dashed lines) from the "At a glance" table of `docs/RESULTS.md`. The
table is the one source: each row names the RESULTS.md section that measured its figures, and this
script reads the rows as they stand, so a new run is one new row. Nothing here is computed from a
model. Run from the repository root:

    .venv/bin/python docs/issue11_overview.py
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MultipleLocator  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
"""Where the "At a glance" table lives."""
SECTION = "### At a glance"
"""The heading that opens the table's section (the section ends at the next `###`)."""
LABEL_WIDTH = 38
"""Characters per line of a plot's row label."""
FOOTNOTE = "¹"
"""The table's footnote mark; a marked row keeps it in its label and the plot repeats the note."""

Interval = tuple[float, float, float]
"""A difference and its 95% CI: (Δ, low, high)."""

NUMBER = r"[−+-]?\d+\.\d+"
INTERVAL = re.compile(rf"^({NUMBER}) \[({NUMBER}), ({NUMBER})\]$")
UNITS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
TEENS = ("tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
         "seventeenth", "eighteenth", "nineteenth")  # fmt: skip
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50}
TENTHS = {"twentieth": 20, "thirtieth": 30, "fortieth": 40, "fiftieth": 50}
ORDINAL = re.compile(rf"\b(?:(?:{'|'.join(TENS)})-)?(?:{'|'.join(UNITS + TEENS + tuple(TENTHS))})\b")


class TableError(ValueError):
    """The "At a glance" table is not in the shape this script reads."""


@dataclass(frozen=True)
class Run:
    """One Table 1 run of `apa experiment analysis` (1000 test samples, K=4 semantic shards)."""

    label: str
    """The RESULTS.md section and its setting, as the plot's row label."""
    paper_vs_retraining: Interval
    """APA(D) with the paper's τ=1000, n=20, minus Retraining."""
    paper_vs_sisa: Interval
    """The same APA(D) minus SISA (the same shards' averaged predictions)."""
    selected_vs_retraining: Interval | None
    """APA(D) with τ, n selected on validation only, minus Retraining (None: not run)."""
    selected_vs_sisa: Interval | None
    """The same, minus SISA."""


def ordinal_number(word: str) -> int:
    """'twenty-fifth' -> 25 (the session names the table uses, up to the fifty-ninth)."""
    tens, _, unit = word.rpartition("-")
    if tens and tens not in TENS:
        raise TableError(f"not an ordinal: {word!r}")
    if unit in TENTHS and not tens:
        return TENTHS[unit]
    if unit in UNITS:
        return TENS.get(tens, 0) + UNITS.index(unit) + 1
    if unit in TEENS and not tens:
        return 10 + TEENS.index(unit)
    raise TableError(f"not an ordinal: {word!r}")


def numeral(n: int) -> str:
    """25 -> '25th', 21 -> '21st', 12 -> '12th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def plot_label(run_cell: str) -> str:
    """A row's first cell as a short, wrapped label: session names become numerals."""
    text = ORDINAL.sub(lambda m: numeral(ordinal_number(m.group(0))), run_cell)
    text = text.replace(" (other train and valid samples)", "")
    if len(text) <= LABEL_WIDTH or " (" not in text:
        return textwrap.fill(text, LABEL_WIDTH)
    head, note = text.split(" (", 1)  # the parenthesis on a line of its own
    return textwrap.fill(head, LABEL_WIDTH) + "\n" + textwrap.fill("(" + note, LABEL_WIDTH)


def interval(cell: str) -> Interval | None:
    """'−0.023 [−0.043, −0.004]' (bold or footnote-marked allowed) -> (-0.023, -0.043, -0.004); '' -> None."""
    text = cell.replace("**", "").replace(FOOTNOTE, "").strip()
    if not text:
        return None
    match = INTERVAL.match(text)
    if not match:
        raise TableError(f"not a difference with its CI: {cell!r}")
    mid, low, high = (float(g.replace("−", "-")) for g in match.groups())
    return mid, low, high


def section(markdown: str) -> str:
    """The text of the "At a glance" section of a RESULTS.md text, up to the next `###` heading."""
    if SECTION not in markdown:
        raise TableError(f"no {SECTION!r} section")
    return markdown.split(SECTION, 1)[1].split("\n### ", 1)[0]


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of each run's row in the "At a glance" table of a RESULTS.md text."""
    lines = [line for line in section(markdown).splitlines() if line.startswith("| ")]
    if not lines or "− Retraining" not in lines[0] or "− SISA" not in lines[0]:
        raise TableError("the section's table has no '− Retraining' and '− SISA' columns")
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]
    for cells in rows:
        if len(cells) != 9:
            raise TableError(f"a row with {len(cells)} cells, not 9: {cells[0]!r}")
    return rows


def footnote(markdown: str) -> str | None:
    """The first clause of the section's footnote (the line that starts with the mark), if any."""
    for line in section(markdown).splitlines():
        if line.startswith(FOOTNOTE + " "):
            return line.split(";", 1)[0].split(". ", 1)[0]
    return None


def read_runs(markdown: str) -> tuple[Run, ...]:
    """Every row of the table as a plotted run, in the table's order."""
    runs = []
    for cells in table_rows(markdown):
        paper_retraining, paper_sisa = interval(cells[4]), interval(cells[5])
        if paper_retraining is None or paper_sisa is None:
            raise TableError(f"a row without the paper's τ differences: {cells[0]!r}")
        marked = FOOTNOTE in "".join(cells)
        runs.append(
            Run(
                plot_label(cells[0]) + (f" {FOOTNOTE}" if marked else ""),
                paper_retraining,
                paper_sisa,
                interval(cells[7]),
                interval(cells[8]),
            )
        )
    return tuple(runs)


GOALS = {"retraining": -0.02, "sisa": +0.02}
"""Issue 11's thresholds: APA(D) − Retraining ≥ −0.02 and APA(D) − SISA ≥ +0.02."""


def draw(out: Path, markdown: str | None = None) -> None:
    """Plot the table of `markdown` (default: docs/RESULTS.md) into the PNG `out`."""
    markdown = RESULTS.read_text() if markdown is None else markdown
    runs = read_runs(markdown)
    note = footnote(markdown)
    # about a third of an inch a label line leaves room for the wrapped labels
    lines = sum(run.label.count("\n") + 1 for run in runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.8 + 0.27 * lines + 0.1 * len(runs)), sharey=True)
    rows = list(range(len(runs)))[::-1]
    for ax, side in zip(axes, ("retraining", "sisa"), strict=True):
        for row, run in zip(rows, runs, strict=True):
            pairs = (
                (run.paper_vs_retraining, run.selected_vs_retraining)
                if side == "retraining"
                else (run.paper_vs_sisa, run.selected_vs_sisa)
            )
            for offset, pair, colour, name in (
                (+0.15, pairs[0], "tab:red", "APA(D), paper's τ=1000, n=20"),
                (-0.15, pairs[1], "tab:blue", "APA(D), τ/n selected on validation"),
            ):
                if pair is None:
                    continue
                mid, low, high = pair
                ax.errorbar(
                    mid, row + offset, xerr=[[mid - low], [high - mid]], fmt="o", color=colour,
                    capsize=3, label=name if row == rows[0] else None,
                )  # fmt: skip
        ax.axvline(
            GOALS[side],
            color="green",
            linestyle="--",
            label="goal (each panel's threshold)" if side == "sisa" else None,
        )
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"APA(D) − {'Retraining' if side == 'retraining' else 'SISA'} (test AUC, 95% CI)")
        ax.xaxis.set_major_locator(MultipleLocator(0.05))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, [run.label for run in runs], fontsize=8)
    handles, names = axes[1].get_legend_handles_labels()
    # the legend above the footnote, both below the panels
    fig.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 0.018), ncol=3, fontsize=8)
    if note:
        fig.text(0.01, 0.004, textwrap.fill(note, 160), fontsize=7, va="bottom")
    fig.suptitle("Issue 11: APA(D) against Retraining and SISA, each Table 1 run (1000 test samples, K=4)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    target = Path(__file__).with_name("issue11-overview.png")
    draw(target)
    print(f"wrote {target}")
