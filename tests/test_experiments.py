"""`apa experiment all` end to end on a tiny random Llama saved to disk: every table and figure."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import apa.experiments as experiments
import apa.stages as stages
from apa.cli import main
from apa.data import write_jsonl
from apa.experiments import ExperimentConfig, quick_budget, write_json
from model_fixtures import make_samples

METHODS = ["Retraining", "SISA", "GraphEraser", "RecEraser", "APA(D)", "APA(ND)"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", make_samples(24, "train", seed=1))
    write_jsonl(root / "valid.jsonl", make_samples(12, "valid", seed=2))
    write_jsonl(root / "test.jsonl", make_samples(16, "test", seed=3))
    return root


def test_experiment_all_writes_every_table_and_figure(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    out = tmp_path / "runs"
    args = ["--data", str(data_dir), "--out", str(out), "--model", str(tiny_model_dir)]
    sizes = ["--num-shards", "2", "--train-size", "20", "--valid-size", "12", "--test-size", "16"]
    assert main(["experiment", "--what", "all", *args, *sizes]) == 0

    for name in (
        ["table1.json", "table1.md", "results.json"]
        + [f"{f}.{ext}" for f in ("table1", "fig3", "fig4", "fig5", "fig6") for ext in ("json", "png")]
        + [f"{f}.md" for f in ("fig4", "fig5", "fig6")]
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = json.loads((out / "table1.json").read_text())
    assert [r["method"] for r in table["rows"]] == METHODS
    reference = table["rows"][0]["auc"]
    assert reference == table["retraining_auc"]
    for row in table["rows"]:
        assert 0.0 <= row["auc"] <= 1.0
        assert row["delta"] == pytest.approx(row["auc"] - reference)
        if row["method"] != "Retraining":
            assert row["num_shards"] == 2 and 0.0 <= row["before_aggregation_auc"] <= 1.0
    assert "| Δ |" in (out / "table1.md").read_text()
    # every Table 1 AUC and Δ carries a paired bootstrap 95% CI on the same test samples
    for row in table["rows"]:
        low, high = row["auc_ci"]
        assert low <= row["auc"] <= high
        if row["method"] == "Retraining":
            assert row["delta_ci"] is None
        else:
            assert row["delta_ci"][0] <= row["delta"] <= row["delta_ci"][1]
    apa_minus_sisa = table["differences"]["APA(D) - SISA"]
    assert apa_minus_sisa["diff"] == pytest.approx(table["rows"][4]["auc"] - table["rows"][1]["auc"])
    table_md = (out / "table1.md").read_text()
    assert "| 95% CI |" in table_md and "| Δ 95% CI |" in table_md and "APA(D) - SISA: " in table_md

    fig3 = json.loads((out / "fig3.json").read_text())
    assert set(fig3["inference"]) == {"Retraining", "SISA", "APA(D)", "APA(ND)"}
    assert fig3["unlearning"]["apa_retrain"]["shard"] in (0, 1)
    assert fig3["unlearning"]["retraining_seconds"] > 0 and fig3["unlearning"]["apa_seconds"] > 0
    fig4 = json.loads((out / "fig4.json").read_text())
    assert [r["partition"] for r in fig4["rows"]] == ["semantic", "random", "user", "bekm"]
    fig5 = json.loads((out / "fig5.json").read_text())
    assert [r["weights"] for r in fig5["rows"]] == ["adaptive", "average", "major", "semantic"]
    fig6 = json.loads((out / "fig6.json").read_text())
    assert [p["num_shards"] for p in fig6["points"]] == [2, 4]
    # each figure also as a markdown table, one row per bar / point (Fig. 6: plus Retraining)
    for name, rows in (("fig4", fig4["rows"]), ("fig5", fig5["rows"]), ("fig6", [None, *fig6["points"]])):
        table_rows = [line for line in (out / f"{name}.md").read_text().splitlines() if line.startswith("| ")]
        assert len(table_rows) == 1 + len(rows), name  # the header and one row each
    assert [p["shard_size"] for p in fig6["points"]] == [10, 5]
    # every figure's AUC carries a paired bootstrap 95% CI on the same test samples
    for row in [*fig4["rows"], *fig5["rows"], *fig6["points"], fig6["retraining"]]:
        low, high = row["auc_ci"]
        assert low <= row["auc"] <= high
    for p in fig6["points"]:
        assert p["minus_retraining"]["diff"] == pytest.approx(p["auc"] - fig6["retraining"]["auc"])
        assert p["unlearning_steps"] > 0
    assert fig6["retraining"]["unlearning_steps"] > max(p["unlearning_steps"] for p in fig6["points"])
    assert fig4["rows"][0]["minus_semantic"] is None
    assert fig4["rows"][1]["minus_semantic"]["diff"] == pytest.approx(
        fig4["rows"][1]["auc"] - fig4["rows"][0]["auc"]
    )
    assert fig5["rows"][1]["adaptive_minus"]["diff"] == pytest.approx(
        fig5["rows"][0]["auc"] - fig5["rows"][1]["auc"]
    )
    # shared results: APA(D) of Table 1 is Fig. 4's semantic bar, Fig. 5's adaptive bar and Fig. 6's K=2 point
    apa_d = table["rows"][4]["auc"]
    assert fig4["rows"][0]["auc"] == fig5["rows"][0]["auc"] == fig6["points"][0]["auc"] == apa_d

    summary = json.loads((out / "results.json").read_text())
    assert summary["sizes"] == {"train": 20, "valid": 12, "test": 16}
    assert summary["machine"]["torch_threads"] >= 1
    assert summary["machine"]["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert summary["model"]["model_id"] == tiny_model_dir.name
    assert set(summary["figures"]) == {"table1", "fig3", "fig4", "fig5", "fig6"}
    # one model directory per (strategy, K): K=1, four partitions at K=2, semantic at K=4
    assert len(list((out / "models").iterdir())) == 6

    # a second run re-uses the trained shard sets and the cached scores: no training at all
    def no_training(*_: Any, **__: Any) -> None:
        raise AssertionError("an adapter in the store was trained again")

    monkeypatch.setattr(stages, "train_adapter", no_training)
    assert main(["experiment", "--what", "table1", *args, *sizes]) == 0
    assert json.loads((out / "table1.json").read_text())["rows"] == table["rows"]


def test_quick_preset_fits_the_cpu_budget() -> None:
    config = ExperimentConfig.from_preset("quick")
    assert (config.train_size, config.valid_size, config.test_size, config.num_shards) == (96, 32, 64, 4)
    assert config.shard_counts == (2, 4, 8)
    assert quick_budget(config)["total_seconds"] < 30 * 60
    paper = ExperimentConfig.from_preset("paper")
    assert (paper.train_size, paper.valid_size, paper.test_size, paper.num_shards) == (1024, 500, 1000, 4)
    assert paper.weights.top_n == 20 and paper.weights.tau == 1000.0
    assert ExperimentConfig.from_preset("paper", "bookcrossing").weights.top_n == 100


def test_lr_and_early_stopping_reach_every_adapter_config() -> None:
    default = ExperimentConfig.from_preset("cpu")
    assert default.train.lr == 5e-4 and default.train.valid_eval_size == 200
    fit = ExperimentConfig.from_preset("cpu", lr=2e-3, early_stopping=False, retrain_epochs=7)
    for k in (1, 4):
        assert fit.train_for(k).lr == 2e-3 and fit.train_for(k).valid_eval_size == 0
    assert fit.train_for(1).epochs == 7
    assert ExperimentConfig.from_preset("paper", lr=3e-4).train.lr == 3e-4


def test_retraining_can_take_its_own_learning_rate_while_the_shards_keep_theirs() -> None:
    config = ExperimentConfig.from_preset("cpu", lr=1e-3, retrain_lr=5e-4, retrain_epochs=3)
    assert config.train_for(1).lr == 5e-4 and config.train_for(1).epochs == 3
    assert all(config.train_for(k).lr == 1e-3 for k in (2, 4, 8))
    assert config.train_for(4).epochs == config.train.epochs != 3
    # a different Retraining lr is a different adapter: its stage key must change with it
    assert (
        config.train_for(1).to_json() != ExperimentConfig.from_preset("cpu", lr=1e-3).train_for(1).to_json()
    )


def test_patience_reaches_the_adapters_and_zero_is_an_error_naming_the_field(capsys: Any) -> None:
    assert ExperimentConfig.from_preset("cpu").train.patience == 2
    assert ExperimentConfig.from_preset("cpu", patience=3).train_for(1).patience == 3
    # patience 0 would stop after the first epoch that does not improve, i.e. behave as 1
    with pytest.raises(ValueError, match="patience must be >= 1"):
        ExperimentConfig.from_preset("cpu", patience=0)
    assert experiments.experiment_command("plan", patience=0) == 1
    assert "patience must be >= 1, got 0" in capsys.readouterr().err


def test_an_unknown_served_pass_is_an_error_naming_the_field(tmp_path: Path, capsys: Any) -> None:
    code = experiments.experiment_command("analysis", data=str(tmp_path / "d"), served=["paper", "bogus"])
    err = capsys.readouterr().err
    assert code == 1 and "served" in err and "bogus" in err
    from apa.study_analysis import served_passes

    assert served_passes(["none"]) == ()
    assert served_passes(None)[:2] == ("uniform", "paper")


def test_missing_data_is_an_error_not_a_crash(tmp_path: Path, capsys: Any) -> None:
    code = experiments.experiment_command(
        "table1", data=str(tmp_path / "nowhere"), out=str(tmp_path / "o"), dataset="bookcrossing"
    )
    assert code == 1 and "error" in capsys.readouterr().err


def test_table1_markdown_marks_an_undefined_auc_and_delta_as_missing() -> None:
    """A method whose AUC is undefined (one-class test split, NaN) shows "-", never "nan"."""
    row = {"before_aggregation_auc": 0.61, "auc": 0.70, "delta": 0.0, "auc_ci": [0.66, 0.74]}
    nan_row = {**row, "method": "SISA", "auc": float("nan"), "delta": float("nan"), "delta_ci": None}
    result = {
        "dataset": "movie",
        "num_shards": 4,
        "test_samples": 16,
        "rows": [{**row, "method": "Retraining"}, nan_row, {**row, "method": "APA(D)", "delta": -0.0123}],
    }
    table = experiments.table1_markdown(result)
    assert "nan" not in table.lower()
    assert "| Δ | - | - | -0.0123 |" in table
    assert "| AUC | 0.7000 | - | 0.7000 |" in table


def test_two_processes_writing_the_same_results_file_do_not_take_each_others_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `analysis` processes on one `--out` finish together and both write analysis.json. Both
    have written their temporary file before either renames it (a barrier in `os.replace` forces
    that order): each rename must find its own file, and the result is one writer's whole JSON."""
    real_replace = os.replace
    barrier = threading.Barrier(2, timeout=10)

    def replace_after_both_wrote(src: Any, dst: Any) -> None:
        barrier.wait()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_both_wrote)
    path = tmp_path / "out" / "analysis.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            write_json(path, {"writer": n, "auc": np.float64(0.5), "missing": float("nan")})
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = json.loads(path.read_text())
    assert result["writer"] in (1, 2) and result["auc"] == 0.5 and result["missing"] is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["analysis.json"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes
