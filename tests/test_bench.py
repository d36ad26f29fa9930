"""`apa bench inference|train` end to end on a tiny random Llama (fields only: timings are never asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apa.bench import ratios, synthetic_samples
from apa.cli import main
from apa.data import write_jsonl
from model_fixtures import make_samples

METHODS = {
    "single_merged",
    "single_lora",
    "mixture_D",
    "mixture_ND",
    "apa_D_end_to_end",
    "apa_ND_end_to_end",
    "sisa",
}
TIMING_FIELDS = {"samples_per_second", "latency_ms_p50", "latency_ms_p95", "seconds", "requests"}


def test_bench_inference_reports_every_method_k_and_batch_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--data", str(tmp_path / "no-data")]
    opts = ["--num-shards", "[2,4]", "--batch-sizes", "[1,4]", "--num-requests", "6", "--repeats", "1"]
    assert main(["bench", "inference", *args, *opts]) == 0

    report = json.loads((out / "inference.json").read_text())
    assert (out / "inference.png").read_bytes()[:4] == b"\x89PNG"
    assert "random LoRA" in report["note"] and report["prompts"] == "synthetic"
    assert report["num_shards"] == [2, 4] and report["batch_sizes"] == [1, 4]
    seen = {(r["method"], r["num_shards"], r["batch_size"]) for r in report["results"]}
    for method in METHODS:
        ks = [1] if method.startswith("single") else [2, 4]
        assert {(method, k, b) for k in ks for b in (1, 4)} <= seen, method
    for row in report["results"]:
        assert TIMING_FIELDS <= set(row) and row["requests"] == 6
        assert row["samples_per_second"] > 0 and row["latency_ms_p95"] >= row["latency_ms_p50"] > 0
    single, sisa = report["ratios"]["mixture_vs_single"], report["ratios"]["mixture_vs_sisa"]
    assert single["batch_size"] == 4 and single["target"] == 0.9  # no batch 16 asked: the largest
    assert set(single["ratios"]) == {"K=2", "K=4"}
    assert sisa["num_shards"] == 4 and sisa["target"] == 3.4 and set(sisa["ratios"]) == {"batch=1", "batch=4"}
    assert set(sisa["ratios"]["batch=4"]) == {
        "mixture_D",
        "mixture_ND",
        "apa_D_end_to_end",
        "apa_ND_end_to_end",
        *(f"apa_D_end_to_end_exit{layer}" for layer in report["exit_layers"]),
    }
    assert report["exit_layers"] == sorted(
        {report["num_layers"] // 4, report["num_layers"] // 8}, reverse=True
    )
    assert {
        (f"apa_D_end_to_end_exit{layer}", k, b)
        for layer in report["exit_layers"]
        for k in (2, 4)
        for b in (1, 4)
    } <= seen
    rec = report["recommend"]  # one ranking request: full prompts vs the shared prefix
    assert rec["candidates"] == 50 and rec["target"] == 5.0
    assert {r["method"] for r in rec["results"]} == {
        "full_prompts_per_candidate_omega",
        "per_candidate_omega_shared_prefix_embedding",
        "full_prompts_per_request_omega",
        "shared_prefix_per_request_omega",
        "shared_prefix_per_request_omega_exit",
    }
    assert 0 < rec["shared_tokens"] < rec["prompt_tokens"] and rec["speedup"] > 0
    assert rec["speedup_per_candidate"] > 0
    assert report["machine"]["torch_threads"] >= 1
    # the base model is left without LoRA layers (adapters unloaded after the bench)


def test_bench_train_times_one_shard_against_everything(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_samples(16, "train", seed=1))
    out = tmp_path / "bench"
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--data", str(data)]
    assert main(["bench", "train", *args, "--train-size", "16", "--num-shards", "4", "--epochs", "1"]) == 0

    report = json.loads((out / "train.json").read_text())
    assert report["train_size"] == 16 and report["epochs"] == 1 and report["samples"].endswith("train.jsonl")
    assert report["full"]["samples"] == 16 and report["full"]["seconds"] > 0
    (shard,) = report["shards"]
    assert shard["num_shards"] == 4 and shard["samples"] == 4 and shard["expected_ratio"] == 0.25
    assert shard["ratio_to_full"] == pytest.approx(shard["seconds"] / report["full"]["seconds"])
    assert report["train_config"]["epochs"] == 1 and report["train_config"]["valid_eval_size"] == 0


def test_ratios_compare_runs_of_the_same_bench() -> None:
    rows: list[dict[str, Any]] = [
        {"method": "single_merged", "num_shards": 1, "batch_size": 16, "samples_per_second": 10.0}
    ]
    for k in (4, 8):
        for m, v in [
            ("mixture_D", 9.0),
            ("mixture_ND", 8.0),
            ("apa_D_end_to_end", 5.0),
            ("apa_ND_end_to_end", 4.0),
        ]:
            rows.append({"method": m, "num_shards": k, "batch_size": 16, "samples_per_second": v})
        rows.append({"method": "sisa", "num_shards": k, "batch_size": 16, "samples_per_second": 2.0})
    result = ratios(rows, [4, 8], [16])
    assert result["mixture_vs_single"]["ratios"]["K=4"]["mixture_D"] == pytest.approx(0.9)
    assert result["mixture_vs_single"]["meets_target"]["K=4"] == {
        "mixture_D": True,
        "mixture_ND": False,
        "apa_D_end_to_end": False,
        "apa_ND_end_to_end": False,
    }
    assert result["mixture_vs_sisa"]["ratios"]["batch=16"]["mixture_D"] == pytest.approx(4.5)
    assert result["mixture_vs_sisa"]["meets_target"]["batch=16"]["mixture_ND"] is True


def test_synthetic_samples_are_valid_tallrec_samples() -> None:
    samples = synthetic_samples(5, "train", seed=3)
    assert len({s.sample_id for s in samples}) == 5
    assert all("### Response:" in s.prompt and s.split == "train" for s in samples)


def _bench_args(model_dir: Path, tmp_path: Path, test: int) -> tuple[Path, list[str]]:
    """(out, CLI arguments) of a model bench on `test` test and 24 training samples."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "test.jsonl", make_samples(test, "test", seed=1))
    write_jsonl(data / "train.jsonl", make_samples(24, "train", seed=2))
    out = tmp_path / "bench"
    return out, [
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--data",
        str(data),
        "--num-requests",
        str(test),
    ]


def test_bench_backbone_reports_bf16_and_logit_variants(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, args = _bench_args(tiny_model_dir, tmp_path, 12)
    assert main(["bench", "backbone", *args]) == 0
    report = json.loads((out / "backbone.json").read_text())
    assert set(report["scoring"]) >= {"fp32", "bf16_autocast", "speedup_bf16", "max_abs_p_yes_difference"}
    assert 0.0 <= report["scoring"]["fp32"]["auc"] <= 1.0
    assert report["score_samples"] == 12
    assert set(report["training"]) == {"fp32_answer_logits", "bf16_answer_logits", "bf16_full_logits"}
    assert report["training"]["fp32_answer_logits"]["speedup_vs_fp32"] == 1.0


def test_bench_prefix_times_both_layouts_and_shows_they_compute_the_same(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # fp32 on every CPU: under bf16 autocast (the default where bf16 is native) the two layouts
    # round differently, |d embedding| about 4e-4 on the tiny model, and the bounds below are fp32's
    monkeypatch.setattr("apa.backbone.native_bf16", lambda: False)
    out, args = _bench_args(tiny_model_dir, tmp_path, 10)
    assert main(["bench", "prefix", *args, "--train-size", "16"]) == 0
    report = json.loads((out / "prefix.json").read_text())
    assert report["bf16_autocast"] is False
    assert report["train_steps"] == 2 and report["score_samples"] == 10
    for part in ("training", "scoring", "embedding"):
        assert set(report[part]) >= {"full_rows", "shared_prefix", "speedup"}
    assert report["embedding"]["max_abs_difference"] < 1e-4
    # LoRA dropout is off: both layouts take the same three steps and score the same P(Yes)
    assert report["training"]["max_abs_loss_difference"] < 1e-4
    assert report["scoring"]["max_abs_p_yes_difference"] < 1e-5
    assert len(report["training"]["prefix_tokens"]) == 3 and min(report["training"]["prefix_tokens"]) > 10
    assert "shared prefix" in capsys.readouterr().out
