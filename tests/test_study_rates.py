"""The study's time estimate runs at this machine's speeds: measured by the store's own stages that
ran here (same host, same threads), else the defaults for this CPU; the plan counts the validation
scoring of every training epoch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import apa.study_rates as study_rates_module
from apa.backbone import Backbone, BackboneConfig
from apa.data import write_jsonl
from apa.experiments import ExperimentConfig, Study, plan_line
from apa.stages import StageStore, stage_seconds
from apa.study_rates import DEFAULT_RATES, FP32_OF_BF16, ONE_THREAD, runner, study_rates
from model_fixtures import make_samples

HERE = {"host": "trainer-1", "threads": 2}


def _stage(root: Path, kind: str, name: str, seconds: float, ran: dict[str, Any] = HERE) -> Path:
    stage = root / kind / name
    stage.mkdir(parents=True)
    (stage / "done.json").write_text(json.dumps({"kind": kind, "seconds": seconds, **ran}))
    return stage


def _adapter(root: Path, name: str, rate: float, ran: dict[str, Any] = HERE, source: str = "trained") -> None:
    stage = _stage(root, "adapter", name, 100.0, ran)
    (stage / "result.json").write_text(json.dumps({"samples_per_second": rate, "source": source}))


def _scored(
    root: Path,
    kind: str,
    name: str,
    n: int,
    seconds: float,
    ran: dict[str, Any] = HERE,
    embedding: str | None = None,
) -> None:
    stage = _stage(root, kind, name, seconds, ran)
    if embedding is not None:  # the embedding settings' digest, as the stage's key records it
        (stage / "key.json").write_text(json.dumps({"kind": kind, "samples": name, "embedding": embedding}))
    if kind == "predictions":
        np.savez(stage / "predictions.npz", sample_ids=np.array([str(i) for i in range(n)]), p=np.zeros(n))
    else:
        np.savez(
            stage / "embeddings.npz",
            sample_ids=np.array([str(i) for i in range(n)]),
            embeddings=np.zeros((n, 4)),
        )


def test_rates_are_measured_by_this_hosts_stages_and_ignore_other_runners(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _adapter(root, "a", 0.5)
    _adapter(root, "b", 0.7)
    _adapter(root, "c", 0.9)  # median of 0.5, 0.7, 0.9
    _adapter(root, "other-host", 50.0, {"host": "laptop", "threads": 2})
    _adapter(root, "other-threads", 50.0, {"host": "trainer-1", "threads": 1})
    _adapter(root, "adopted", 50.0, source="adopted")  # trained elsewhere, adopted here
    _scored(root, "predictions", "p", 20, 10.0)  # 2.0 / s
    _scored(root, "embeddings", "e", 30, 10.0)  # 3.0 / s
    _scored(root, "predictions", "slow-host", 1, 100.0, {"host": "laptop", "threads": 2})
    _stage(root, "predictions", "no-file", 1.0)  # a done marker without its array: skipped
    rates = study_rates(root, native_bf16=True, here=HERE)
    assert rates.train_per_s == pytest.approx(0.7)
    assert rates.score_per_s == pytest.approx(2.5)
    assert "measured by 3 adapter and 2 scoring stages" in rates.describe()


def test_without_measurements_each_kind_falls_back_to_this_cpus_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    for native in (True, False):
        rates = study_rates(empty, native_bf16=native, here=HERE)
        assert (rates.train_per_s, rates.score_per_s) == DEFAULT_RATES[native]
        assert ("with native bf16" if native else "without native bf16") in rates.source
    one = study_rates(empty, native_bf16=False, here={**HERE, "threads": 1})
    assert one.train_per_s == pytest.approx(DEFAULT_RATES[False][0] * ONE_THREAD)
    # scoring measured, training not yet: each kind on its own
    _scored(tmp_path / "store", "predictions", "p", 12, 4.0)
    mixed = study_rates(tmp_path / "store", native_bf16=False, here=HERE)
    assert (mixed.train_per_s, mixed.score_per_s) == (DEFAULT_RATES[False][0], pytest.approx(3.0))
    assert "measured by 1 scoring stages" in mixed.source and "defaults" in mixed.source


def test_under_bf16_the_partitions_fp32_embeddings_run_at_their_own_speed(tmp_path: Path) -> None:
    """The partition embeds the training split in fp32 whatever the autocast: under bf16 those stages
    are measured apart (by their key's embedding settings), else the scoring speed x FP32_OF_BF16."""
    root = tmp_path / "store"
    _scored(root, "predictions", "p", 40, 10.0)  # 4 / s
    _scored(root, "embeddings", "valid", 40, 10.0, embedding="bf16 settings")  # 4 / s
    _scored(root, "embeddings", "train", 20, 10.0, embedding="fp32 settings")  # 2 / s
    bf16 = study_rates(root, native_bf16=True, here=HERE, fp32_embedding="fp32 settings")
    assert (bf16.score_per_s, bf16.partition_per_s) == (pytest.approx(4.0), pytest.approx(2.0))
    assert "2.00 embedded in fp32 for the partition" in bf16.describe()
    # without bf16 autocast every stage runs in fp32: one speed, the median of all three
    fp32 = study_rates(root, native_bf16=False, here=HERE, fp32_embedding="fp32 settings")
    assert fp32.partition_per_s == fp32.score_per_s == pytest.approx(4.0)
    assert "for the partition" not in fp32.describe()
    # the fp32 embedding not measured yet: the scoring speed x FP32_OF_BF16
    (root / "embeddings" / "train" / "done.json").unlink()
    unmeasured = study_rates(root, native_bf16=True, here=HERE, fp32_embedding="fp32 settings")
    assert unmeasured.partition_per_s == pytest.approx(4.0 * FP32_OF_BF16)


def test_the_plan_counts_the_partitions_fp32_embedding_once_at_its_speed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """Fig. 4's semantic, balanced k-means and user partitions share one stage of the training split's
    fp32 embeddings (the random one embeds nothing), charged at the fp32 speed under bf16 autocast."""
    from apa.data import load_splits

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_samples(12, "train", seed=11))
    write_jsonl(data / "valid.jsonl", make_samples(8, "valid", seed=12))
    write_jsonl(data / "test.jsonl", make_samples(8, "test", seed=13))
    splits = load_splits(data)
    config = ExperimentConfig.from_preset("cpu", num_shards=2, train_size=12, valid_size=8, test_size=8)
    monkeypatch.setattr(study_rates_module, "DEFAULT_RATES", {True: (1.0, 1.0), False: (1.0, 1.0)})
    monkeypatch.setattr(study_rates_module, "ONE_THREAD", 1.0)
    monkeypatch.setattr(study_rates_module, "FP32_OF_BF16", 0.25)
    # the plan reads no stage built here as a measurement: the defaults above stay its speeds
    monkeypatch.setattr(study_rates_module, "runner", lambda: {"host": "another host", "threads": 2})
    for bf16 in (False, True):
        backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir), bf16_autocast=bf16))
        store = StageStore(tmp_path / f"store-{bf16}")
        study = Study(backbone, splits, config, tmp_path / "out", progress=False, store=store, train=False)
        before = study.plan(("fig4",))
        study.embeddings("train", bf16=False)  # the partitions' embeddings, and nothing else
        after = study.plan(("fig4",))
        assert before["left"]["embeddings"] - after["left"].get("embeddings", 0) == 1
        assert after["done"] == before["done"] + 1
        assert before["seconds_left"] - after["seconds_left"] == pytest.approx(12 / (0.25 if bf16 else 1.0))


def test_a_finished_stage_records_its_runner_and_its_speed_is_read_back(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "store")

    def build(work: Path) -> None:
        np.savez(work / "predictions.npz", sample_ids=np.array(["a", "b", "c"]), p=np.zeros(3))

    path = store.run("predictions", {"what": "three prompts"}, build)
    done = json.loads((path / "done.json").read_text())
    assert {done["host"], done["threads"]} == set(runner().values())
    rates = study_rates(store.root, native_bf16=False)
    assert rates.score_per_s == pytest.approx(3 / stage_seconds(path))
    assert rates.train_per_s == DEFAULT_RATES[False][0] * (ONE_THREAD if done["threads"] <= 1 else 1.0)


def test_the_plan_runs_at_the_rates_and_counts_each_epochs_validation_scoring(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from apa.data import load_splits

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_samples(12, "train", seed=11))
    write_jsonl(data / "valid.jsonl", make_samples(8, "valid", seed=12))
    write_jsonl(data / "test.jsonl", make_samples(8, "test", seed=13))
    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    splits, store = load_splits(data), StageStore(tmp_path / "store")
    sizes: dict[str, Any] = {"num_shards": 2, "train_size": 12, "valid_size": 8, "test_size": 8}
    base = ExperimentConfig.from_preset("cpu", **sizes)
    assert base.train.epochs >= 2 and base.train.valid_eval_size == 200  # all 8 validation samples

    def seconds(config: ExperimentConfig, rate: float, figures: tuple[str, ...] = ("training",)) -> float:
        monkeypatch.setattr(study_rates_module, "DEFAULT_RATES", {True: (rate, rate), False: (rate, rate)})
        monkeypatch.setattr(study_rates_module, "ONE_THREAD", 1.0)
        study = Study(backbone, splits, config, tmp_path / "out", progress=False, store=store, train=False)
        plan = study.plan(figures)
        assert plan["done"] == 0 and f"{rate:.2f} trained / {rate:.2f} scored" in plan["rates"]
        # with early stopping the time counts every adapter at its cap: the line says it is a bound
        early = config.train.valid_eval_size != 0
        assert plan["capped"] is early and ("epoch cap" in plan_line(plan)) is early
        return float(plan["seconds_left"])

    # twice the speed, half the time
    assert seconds(base, 2.0) == pytest.approx(seconds(base, 1.0) / 2)
    assert seconds(base, 1.0, ("analysis",)) > seconds(base, 1.0)  # predictions and embeddings too
    # every epoch of Retraining and of the 2 shards scores the 8 validation samples
    quiet = ExperimentConfig.from_preset("cpu", **sizes, early_stopping=False)
    epochs = base.train.epochs
    assert base.retrain_epochs is None and quiet.train.valid_eval_size == 0
    assert seconds(base, 1.0) - seconds(quiet, 1.0) == pytest.approx(epochs * 8 * (1 + 2))
    # once every adapter is trained nothing is left, and the line no longer calls itself a bound
    trainer = Study(
        backbone, splits, replace(base, train=replace(base.train, epochs=2)), tmp_path / "o", store=store
    )
    trainer.stages(figures=("training",))
    done = trainer.plan(("training",))
    assert done["seconds_left"] == 0 and not done["capped"] and "epoch cap" not in plan_line(done)
