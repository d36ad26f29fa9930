"""Issue 11 at a glance: APA(D) against Retraining and SISA in every Table 1 run so far.

Draws `docs/issue11-overview.png` (a forest plot of the paired-bootstrap differences with their 95%
CIs, the goal's thresholds as dashed lines) from the figures below. Each figure is copied from the
docs/RESULTS.md section named in its row, where the command that measured it is given; nothing here
is computed from a model. Run from the repository root:

    .venv/bin/python docs/issue11_overview.py
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MultipleLocator  # noqa: E402

Interval = tuple[float, float, float]
"""A difference and its 95% CI: (Δ, low, high)."""


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


RUNS: tuple[Run, ...] = (
    Run(
        "2nd: 512 train, patience 2",
        (-0.023, -0.043, -0.004),
        (-0.001, -0.022, +0.021),
        (-0.000, -0.012, +0.011),
        (+0.022, +0.010, +0.035),
    ),
    Run(
        "6th: 1024, patience 2, cap 3",
        (-0.058, -0.081, -0.035),
        (+0.013, -0.015, +0.040),
        (-0.032, -0.048, -0.015),
        (+0.039, +0.014, +0.062),
    ),
    Run(
        "7th: 1024, shards lr 1e-3",
        (-0.095, -0.122, -0.068),
        (-0.037, -0.062, -0.012),
        (-0.039, -0.057, -0.021),
        (+0.018, +0.005, +0.032),
    ),
    Run(
        "9th: 1024, shards patience 3, cap 6",
        (-0.059, -0.082, -0.037),
        (+0.008, -0.022, +0.037),
        (-0.028, -0.042, -0.014),
        (+0.039, +0.016, +0.060),
    ),
    Run(
        "13th: 1024, both patience 3, cap 10",
        (-0.071, -0.100, -0.040),
        (-0.049, -0.073, -0.024),
        (-0.029, -0.048, -0.010),
        (-0.007, -0.025, +0.010),
    ),
    Run(
        "17th: 1024, as the 6th\n(fp32 partition)",
        (-0.049, -0.069, -0.031),
        (+0.004, -0.018, +0.025),
        (-0.030, -0.043, -0.016),
        (+0.023, +0.011, +0.036),
    ),
    Run(
        "19th: 1024, as the 9th\n(fp32 partition)",
        (-0.095, -0.123, -0.067),
        (-0.041, -0.074, -0.008),
        (-0.016, -0.029, -0.005),
        (+0.038, +0.019, +0.056),
    ),
    Run(
        "21st: 1024, as the 19th\n(seed 1)",
        (-0.058, -0.083, -0.032),
        (-0.009, -0.036, +0.018),
        (-0.042, -0.061, -0.022),
        (+0.007, -0.012, +0.027),
    ),
    Run(
        "22nd: 1024, as the 19th\n(seed 2)",
        (-0.064, -0.087, -0.042),
        (-0.046, -0.071, -0.022),
        (-0.024, -0.033, -0.014),
        (-0.006, -0.017, +0.004),
    ),
    Run(
        "25th: 1024, as the 19th\n(seed 3)",
        (-0.023, -0.044, -0.001),
        (+0.001, -0.023, +0.027),
        (-0.010, -0.023, +0.003),
        (+0.014, -0.000, +0.030),
    ),
    Run(
        "14th: 256 train, 4 epochs, lr 1e-3\n(bf16 partition; SISA: random shards)",
        (-0.146, -0.177, -0.113),
        (-0.137, -0.169, -0.104),
        None,
        None,
    ),
    Run(
        "16th: 256 train, as the 14th\n(fp32 partition and training)",
        (-0.049, -0.078, -0.021),
        (+0.005, -0.021, +0.030),
        (-0.034, -0.061, -0.007),
        (+0.020, -0.005, +0.042),
    ),
    Run(
        "23rd: 256 train, as the 16th\n(seed 1)",
        (-0.097, -0.131, -0.064),
        (+0.006, -0.029, +0.039),
        (-0.099, -0.122, -0.074),
        (+0.004, -0.007, +0.014),
    ),
    Run(
        "23rd: 256 train, as the 16th\n(seed 2)",
        (-0.023, -0.051, +0.005),
        (-0.006, -0.034, +0.023),
        (+0.002, -0.017, +0.021),
        (+0.019, +0.000, +0.038),
    ),
    Run(
        "24th: 256 train, as the 16th\n(seed 3)",
        (-0.102, -0.136, -0.068),
        (-0.060, -0.093, -0.027),
        (-0.054, -0.081, -0.025),
        (-0.011, -0.038, +0.016),
    ),
    Run(
        "24th: 256 train, as the 16th\n(seed 3, bf16 training)",
        (-0.111, -0.148, -0.076),
        (-0.067, -0.101, -0.033),
        (-0.066, -0.097, -0.035),
        (-0.022, -0.050, +0.007),
    ),
    Run(
        "18th: 256 train, as the 16th\n(bf16 training)",
        (-0.036, -0.062, -0.010),
        (+0.015, -0.009, +0.040),
        None,
        None,
    ),
    Run(
        "18th: 256, stratified partition\n(variant)",
        (-0.131, -0.164, -0.097),
        (-0.124, -0.151, -0.096),
        None,
        None,
    ),
    Run(
        "19th: 256, stratified partition\n(variant, as the 18th)",
        (-0.125, -0.157, -0.092),
        (-0.121, -0.149, -0.093),
        (-0.040, -0.061, -0.019),
        (-0.036, -0.048, -0.024),
    ),
)

GOALS = {"retraining": -0.02, "sisa": +0.02}
"""Issue 11's thresholds: APA(D) − Retraining ≥ −0.02 and APA(D) − SISA ≥ +0.02."""


def draw(out: Path) -> None:
    # half an inch a row leaves room for the two-line labels
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.5 * len(RUNS)), sharey=True)
    rows = list(range(len(RUNS)))[::-1]
    for ax, side in zip(axes, ("retraining", "sisa"), strict=True):
        for row, run in zip(rows, RUNS, strict=True):
            pairs = (
                (run.paper_vs_retraining, run.selected_vs_retraining)
                if side == "retraining"
                else (run.paper_vs_sisa, run.selected_vs_sisa)
            )
            for offset, interval, colour, name in (
                (+0.15, pairs[0], "tab:red", "APA(D), paper's τ=1000, n=20"),
                (-0.15, pairs[1], "tab:blue", "APA(D), τ/n selected on validation"),
            ):
                if interval is None:
                    continue
                mid, low, high = interval
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
    axes[0].set_yticks(rows, [run.label for run in RUNS])
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Issue 11: APA(D) against Retraining and SISA, each Table 1 run (1000 test samples, K=4)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    target = Path(__file__).with_name("issue11-overview.png")
    draw(target)
    print(f"wrote {target}")
