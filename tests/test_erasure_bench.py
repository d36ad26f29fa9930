"""`apa bench erasure` end to end on a small configuration (fields only: timings are never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apa.bench_erasure import ErasureBenchConfig, run_erasure_bench

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_bench_erasure_reports_throughput_latency_and_retrains_with_and_without_coalescing(
    tmp_path: Path,
) -> None:
    config = ErasureBenchConfig(
        num_shards=4,
        paced_events=10,
        paced_rate=20.0,
        burst_events=20,
        coalesce_events=10,
        inprocess_events=5,
        group_commit_batch=3,
    )
    report = run_erasure_bench(tmp_path, config)
    saved = json.loads((tmp_path / "erasure.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "erasure.png").read_bytes()[:4] == b"\x89PNG"
    for phase in ("latency_paced", "throughput_burst"):
        assert saved[phase]["lost"] == 0 and saved[phase]["recorded"] == saved[phase]["events"]
        for latency in ("publish_to_stale_registry", "publish_to_stale_event_acked"):
            assert set(saved[phase][latency]) == {"n", "p50_ms", "p95_ms", "p99_ms", "max_ms"}
    on, off = saved["retrains_with_coalescing"], saved["retrains_without_coalescing"]
    assert on["retrain_tasks_queued"] <= config.num_shards  # one per shard while none has started
    assert off["retrain_tasks_queued"] == off["shards_made_stale"]  # one per erasure and shard
    assert saved["registry_transaction_only"]["sql_statements_per_event"] > 0
    group = saved["registry_group_commit"]
    assert group["events"] == 5 and group["events_per_transaction"] == 3
    assert (
        0 < group["sql_statements_per_event"] < saved["registry_transaction_only"]["sql_statements_per_event"]
    )
    assert set(saved["targets"]) == {
        "events_per_second",
        "events_per_second_met",
        "p99_publish_to_stale_ms",
        "p99_met",
    }
