"""`apa experiment`'s content-keyed stages: a run stopped mid-way (an injected exception, or a
kill -9 of the process) resumes without redoing finished stages; model directories are adopted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import apa.experiments as experiments
import apa.stages as stages
from apa.backbone import Backbone, BackboneConfig
from apa.cli import main
from apa.data import load_splits, write_jsonl
from apa.data.samples import sample_digest
from apa.experiments import ExperimentConfig, Study, stage_models
from apa.modeldir import ModelDir
from apa.partition import PartitionConfig
from apa.pseudonyms import Pseudonymizer
from apa.sharded import build_model
from apa.stages import StageStore, adopt_model_dir, chunked, embeddings_key, partition_config, split_digest
from model_fixtures import make_samples


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stage-data")
    write_jsonl(root / "train.jsonl", make_samples(12, "train", seed=11))
    write_jsonl(root / "valid.jsonl", make_samples(8, "valid", seed=12))
    write_jsonl(root / "test.jsonl", make_samples(8, "test", seed=13))
    return root


def _args(data_dir: Path, tiny_model_dir: Path, out: Path, store: Path) -> list[str]:
    return [
        "experiment",
        "--what",
        "stages",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--store",
        str(store),
        "--model",
        str(tiny_model_dir),
        "--num-shards",
        "2",
        "--train-size",
        "12",
        "--valid-size",
        "8",
        "--test-size",
        "8",
    ]


def _done_stages(store: Path, kind: str) -> dict[str, str]:
    """digest -> the done.json text of every finished stage of `kind`."""
    root = store / kind
    if not root.is_dir():
        return {}
    return {d.name: (d / "done.json").read_text() for d in root.iterdir() if (d / "done.json").is_file()}


def test_a_stage_failing_mid_way_resumes_without_redoing_finished_stages(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    real_train = stages.train_adapter
    calls: list[str] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[-1]))
        if len(calls) == 3:  # K=1, shard 0 trained; shard 1 dies in the middle of its stage
            raise RuntimeError("injected crash")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages, "train_adapter", failing)
    with pytest.raises(RuntimeError, match="injected crash"):
        main(_args(data_dir, tiny_model_dir, out, store))
    finished = _done_stages(store, "adapter")
    assert len(finished) == 2
    predictions_before = _done_stages(store, "predictions")
    assert len(predictions_before) >= 2 + 2  # zero-shot valid/test + the K=1 adapter's valid/test
    assert any(p.name.endswith(".partial") for p in (store / "adapter").iterdir())

    calls.clear()
    monkeypatch.setattr(stages, "train_adapter", real_train)
    counted: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted.append(str(args[-1]))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages, "train_adapter", counting)
    assert main([*_args(data_dir, tiny_model_dir, out, store), "--resume"]) == 0
    assert len(counted) == 1 and "shard 1" in counted[0]  # only the unfinished adapter
    after = _done_stages(store, "adapter")
    assert len(after) == 3
    for digest, text in finished.items():
        assert after[digest] == text  # untouched: not redone
    predictions_after = _done_stages(store, "predictions")
    for digest, text in predictions_before.items():
        assert predictions_after[digest] == text
    assert not any(p.name.endswith(".partial") for p in (store / "adapter").iterdir())

    # a third run does nothing at all
    monkeypatch.setattr(stages, "train_adapter", lambda *a, **k: pytest.fail("trained again"))
    assert main(_args(data_dir, tiny_model_dir, out, store)) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["stages_ran"] == 0 and summary["stages_reused"] > 0


def test_without_training_the_missing_shards_are_reported_pending_and_none_is_trained(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    assert main([*_args(data_dir, tiny_model_dir, out, store), "--only", "retraining"]) == 0
    assert len(_done_stages(store, "adapter")) == 1
    capsys.readouterr()
    monkeypatch.setattr(stages, "train_adapter", lambda *a, **k: pytest.fail("trained with --train false"))
    assert main([*_args(data_dir, tiny_model_dir, out, store), "--train", "false"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"adapters_done"')]
    report = json.loads(lines[-1])
    done = {name.split("-")[0]: shards for name, shards in report["adapters_done"].items()}
    pending = {name.split("-")[0]: shards for name, shards in report["adapters_pending"].items()}
    # the semantic partition itself is not built without training: both its shards are pending
    assert done == {"retraining": [0]}
    assert pending == {"retraining": [], "semantic": [0, 1]}
    assert len(_done_stages(store, "adapter")) == 1


def test_stage_models_follow_the_issues_order_and_reject_an_unknown_figure() -> None:
    config = ExperimentConfig.from_preset("cpu", train_size=64, num_shards=4)
    assert stage_models(config) == [("random", 1), ("semantic", 4)]
    assert stage_models(config, ["fig5"]) == [("semantic", 4)]
    assert stage_models(config, ["fig6", "table1"]) == [
        ("random", 1),
        ("semantic", 4),
        ("random", 4),
        ("bekm", 4),
        ("user", 4),
        ("semantic", 2),
        ("semantic", 8),
    ]
    assert stage_models(config, ["training"]) == stage_models(config)
    with pytest.raises(ValueError, match="stages_for"):
        stage_models(config, ["fig3"])
    # a variant of APA's partition replaces the semantic shards everywhere but Fig. 4's comparison
    variant = ExperimentConfig.from_preset("cpu", train_size=64, num_shards=4, apa_partition="stratified")
    assert stage_models(variant) == [("random", 1), ("stratified", 4)]
    assert stage_models(variant, ["fig4", "fig6"]) == [
        ("random", 1),
        ("stratified", 4),
        ("semantic", 4),
        ("random", 4),
        ("bekm", 4),
        ("user", 4),
        ("stratified", 2),
        ("stratified", 8),
    ]
    with pytest.raises(ValueError, match="apa_partition"):
        ExperimentConfig.from_preset("cpu", train_size=64, apa_partition="bekm")  # type: ignore[arg-type]


def test_bf16_is_part_of_every_adapters_key_and_the_partition_stays_fp32(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    """`--bf16 false` reproduces an fp32 study on any machine: its adapters are not a bf16 run's."""
    out, store = tmp_path / "out", tmp_path / "store"
    args = [*_args(data_dir, tiny_model_dir, out, store), "--stages_for", "training"]
    assert main([*args, "--bf16", "false"]) == 0
    configs = [json.loads(p.read_text()) for p in (store / "adapter").glob("*/key.json")]
    assert len(configs) == 3 and all(c["train_config"]["bf16_autocast"] is False for c in configs)

    def plan(precision: str) -> list[str]:
        capsys.readouterr()
        assert main([*[a if a != "stages" else "plan" for a in args], "--bf16", precision]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("plan: ", "left "))]

    assert plan("false")[0].startswith("plan: 6 of 6 stages done")
    # the same splits, partitions and fp32 partition embeddings; three adapters to train again in bf16
    bf16 = plan("true")
    assert bf16[0].startswith("plan: 3 of 6 stages done") and bf16[1] == "left to run: 3 adapter"


def test_stages_for_training_trains_the_analysiss_adapters_and_scores_nothing(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    args = [*_args(data_dir, tiny_model_dir, out, store), "--stages_for", "training"]
    dry = [a if a != "stages" else "plan" for a in args]
    assert main(dry) == 0  # a dry run: counts what is left, builds nothing
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("plan: ", "left "))]
    assert (
        lines[0].startswith("plan: 0 of 6 stages done")
        and lines[1] == "left to run: 2 partition, 3 adapter, 1 embeddings"  # the partition's, in fp32
    )
    assert not [p for p in store.iterdir() if p.name != "data"] and not (out / "results.json").exists()
    assert main(args) == 0
    # the plan at the start and again after each adapter (the partitions and their embeddings first)
    plans = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert [line.split(" stages done")[0] for line in plans] == [f"plan: {d} of 6" for d in (0, 4, 5, 6)]
    assert "h left" in plans[0] or "min left" in plans[0]
    assert plans[-1].startswith("plan: 6 of 6 stages done; about 0 min left")
    assert not any("epoch cap" in line for line in plans)  # quick: one epoch, no early stopping
    # Retraining and the 2 semantic shards, and no prediction or valid/test embedding stage
    assert len(_done_stages(store, "adapter")) == 3
    assert _done_stages(store, "predictions") == {} and len(_done_stages(store, "embeddings")) == 1
    capsys.readouterr()
    assert main([*args, "--train", "false"]) == 0
    plans = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert len(plans) == 1  # nothing finished: the plan is not repeated
    assert plans[0].startswith("plan: 6 of 6 stages done")  # embeddings, 2 partitions, 3 adapters
    training = [a if a != "stages" else "training" for a in _args(data_dir, tiny_model_dir, out, store)]
    assert main(training) == 0
    assert json.loads((out / "training.json").read_text())["missing"] == []
    capsys.readouterr()
    assert main(dry) == 0
    assert "left to run: nothing" in capsys.readouterr().out


def test_stages_for_table1_and_fig6_build_every_adapter_those_figures_then_use(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    args = [*_args(data_dir, tiny_model_dir, out, store), "--stages_for", "table1", "--stages_for", "fig6"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"adapters_done"')]
    done = json.loads(lines[-1])["adapters_done"]
    # K=2 on 12 samples: Retraining, semantic, random, bekm and user K=2, then Fig. 6's K=4
    assert [name.split("-N")[0] for name in done] == [
        "retraining-K1",
        "semantic-K2",
        "random-K2",
        "bekm-K2",
        "user-K2",
        "semantic-K4",
    ]
    assert [len(shards) for shards in done.values()] == [1, 2, 2, 2, 2, 4]
    assert len(_done_stages(store, "adapter")) == 13
    # zero-shot valid/test, and valid/test of the K=1 and K=2 adapters; Fig. 6's K=4 serves only
    # APA(D) (one merged pass), so its 4 adapters are scored on valid (for ω) and not on test
    assert len(_done_stages(store, "predictions")) == 2 + 2 * 9 + 4
    # the plan counts exactly these stages: all done, nothing left
    assert main([*args, "--train", "false"]) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: "))
    # embeddings and zero-shot on valid/test 4, the train split's fp32 embeddings 1 (one stage for
    # every partition that clusters them), partitions 6 (K=1 too), adapters 13, their predictions 22
    assert plan.startswith("plan: 46 of 46 stages done; about 0 min left")
    # the figures now train nothing: every adapter they use is in the store
    monkeypatch.setattr(stages, "train_adapter", lambda *a, **k: pytest.fail("a figure trained an adapter"))
    for what in ("table1", "fig4", "fig6"):
        run = [a if a != "stages" else what for a in _args(data_dir, tiny_model_dir, out, store)]
        assert main([*run, "--train", "false"]) == 0
    table1 = json.loads((out / "table1.json").read_text())
    assert [r["method"] for r in table1["rows"]][:4] == ["Retraining", "SISA", "GraphEraser", "RecEraser"]
    assert [p["num_shards"] for p in json.loads((out / "fig6.json").read_text())["points"]] == [2, 4]
    assert {"table1", "fig4", "fig6"} <= set(json.loads((out / "results.json").read_text())["figures"])

    # a second process on the same OUT writes its figure while this one runs: both entries stay
    real_fig5 = Study.fig5

    def fig5_beside_another_process(self: Study) -> Any:
        result = real_fig5(self)
        summary = json.loads((out / "results.json").read_text())
        summary["figures"]["fig3"] = {"outputs": ["fig3.json"], "by": "another process"}
        (out / "results.json").write_text(json.dumps(summary))
        return result

    monkeypatch.setattr(Study, "fig5", fig5_beside_another_process)
    run = [a if a != "stages" else "fig5" for a in _args(data_dir, tiny_model_dir, out, store)]
    assert main([*run, "--train", "false"]) == 0
    figures = json.loads((out / "results.json").read_text())["figures"]
    assert {"table1", "fig4", "fig6", "fig5"} <= set(figures)
    assert figures["fig3"]["by"] == "another process"


def test_a_killed_process_resumes_without_redoing_finished_stages(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    cmd = [sys.executable, "-m", "apa.cli", *_args(data_dir, tiny_model_dir, out, store)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not _done_stages(store, "adapter") and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before a stage finished"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {
        kind: _done_stages(store, kind)
        for kind in ("data", "embeddings", "predictions", "partition", "adapter")
    }
    assert finished["adapter"], "no adapter finished before the kill"

    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for kind, before in finished.items():
        now = _done_stages(store, kind)
        for digest, text in before.items():
            assert now[digest] == text, f"{kind} stage {digest} was redone"
    assert len(_done_stages(store, "adapter")) == 3
    # every finished stage the rest of the run needs is reused; the training split's fp32 embeddings
    # are needed only to build a partition, and the partitions were done before the first adapter
    train = split_digest(load_splits(data_dir)["train"])
    needed = [
        digest
        for kind, before in finished.items()
        for digest in before
        if kind != "embeddings"
        or json.loads((store / kind / digest / "key.json").read_text())["samples"] != train
    ]
    summary = json.loads((out / "results.json").read_text())
    assert summary["stages_reused"] >= len(needed) == sum(len(v) for v in finished.values()) - 1


def test_chunked_scoring_resumes_from_the_last_finished_chunk(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    def compute(a: int, b: int) -> np.ndarray:
        seen.append((a, b))
        if a == 4 and len(seen) == 3:
            raise KeyboardInterrupt
        return np.arange(a, b, dtype=float)

    with pytest.raises(KeyboardInterrupt):
        chunked(tmp_path, 10, compute, chunk=2)
    seen.clear()
    out = chunked(tmp_path, 10, compute, chunk=2)
    assert out.tolist() == list(range(10))
    assert seen == [(4, 6), (6, 8), (8, 10)]  # chunks 0-4 came from disk


def test_two_processes_asking_for_one_stage_build_it_once(tmp_path: Path) -> None:
    """The second asker waits for the first (a lock per stage), then reuses its result; without the
    lock both would write the same work directory at once (seen: a chunk vanished under the other)."""
    import threading

    store_a, store_b = StageStore(tmp_path / "store"), StageStore(tmp_path / "store")
    started, release = threading.Event(), threading.Event()
    builds: list[str] = []

    def slow_build(work: Path) -> None:
        builds.append("a")
        started.set()
        release.wait(10)
        (work / "result.txt").write_text("a")

    def other_build(work: Path) -> None:
        builds.append("b")
        (work / "result.txt").write_text("b")

    key = {"what": "shared stage"}
    first = threading.Thread(target=lambda: store_a.run("memo", key, slow_build))
    first.start()
    assert started.wait(10)
    second_result: list[Path] = []
    second = threading.Thread(target=lambda: second_result.append(store_b.run("memo", key, other_build)))
    second.start()
    second.join(timeout=1)
    assert second.is_alive()  # waiting for the first, not building beside it
    release.set()
    first.join()
    second.join(timeout=10)
    assert builds == ["a"] and (second_result[0] / "result.txt").read_text() == "a"
    assert store_b.reused("memo") == [second_result[0].name]


def test_free_jobs_run_first_and_a_busy_one_is_reused_after_the_other_builds_it(tmp_path: Path) -> None:
    """`run_free_first`: a job whose stage another process holds is put back, the next runs now,
    then the busy one waits and reuses the other's result; results keep the jobs' order."""
    import threading

    store_a, store_b = StageStore(tmp_path / "store"), StageStore(tmp_path / "store")
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow(work: Path) -> None:
        started.set()
        assert release.wait(30)
        (work / "v").write_text("a")

    def build(value: str) -> Any:
        def run(work: Path) -> None:
            order.append(value)
            (work / "v").write_text(value)

        return run

    other = threading.Thread(target=lambda: store_a.run("memo", {"k": "x"}, slow))
    other.start()
    assert started.wait(30)
    jobs = {
        "x": lambda: (store_b.run("memo", {"k": "x"}, build("x")) / "v").read_text(),
        "y": lambda: (store_b.run("memo", {"k": "y"}, build("y")) / "v").read_text(),
    }
    got: list[dict[str, str]] = []
    mine = threading.Thread(target=lambda: got.append(stages.run_free_first(store_b, jobs)))
    mine.start()
    deadline = time.monotonic() + 30
    while order != ["y"]:
        assert time.monotonic() < deadline, order
        time.sleep(0.02)
    assert mine.is_alive()  # now waiting for x
    release.set()
    other.join(30)
    mine.join(30)
    assert got == [{"x": "a", "y": "y"}] and list(got[0]) == ["x", "y"]
    assert order == ["y"] and not store_b.skip_busy


def test_two_stage_processes_train_different_shards_side_by_side(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """A second `stages` run on the same store skips the shard the first is training, trains the
    next one meanwhile, then waits and reuses the first's adapter: every shard is trained once."""
    import threading

    store = tmp_path / "store"
    real_train = stages.train_adapter
    trained: list[tuple[str, str]] = []
    shard0_started, release = threading.Event(), threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        trained.append((threading.current_thread().name, str(args[-1])))
        if str(args[-1]).endswith("shard 0"):
            shard0_started.set()
            assert release.wait(120)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages, "train_adapter", gated)
    rc: dict[str, int] = {}

    def run(name: str) -> None:
        rc[name] = main([*_args(data_dir, tiny_model_dir, tmp_path / name, store), "--only", "shards"])

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert shard0_started.wait(120)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    deadline = time.monotonic() + 120
    while ("second", "shard 1") not in [(t, label[-7:]) for t, label in trained]:
        assert time.monotonic() < deadline, f"the second run did not take shard 1: {trained}"
        assert second.is_alive() or ("second", "shard 1") in [(t, lb[-7:]) for t, lb in trained]
        time.sleep(0.05)
    assert first.is_alive()  # shard 0 is still being trained by the first run
    release.set()
    first.join(120)
    second.join(120)
    assert rc == {"first": 0, "second": 0}
    assert sorted((t, label[-7:]) for t, label in trained) == [("first", "shard 0"), ("second", "shard 1")]
    assert len(_done_stages(store, "adapter")) == 2


def test_two_processes_assembling_one_model_directory_take_turns(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """`table1` and `fig4` in two processes on one OUT both assemble random K=2: the second must not
    find (and delete) a half-built directory (at 256 training samples it failed: model.json missing)."""
    from apa.data import load_splits

    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    config = ExperimentConfig.from_preset("quick", num_shards=2, train_size=12, valid_size=8, test_size=8)
    splits, store = load_splits(data_dir), StageStore(tmp_path / "store")
    first, second = (
        Study(backbone, splits, config, tmp_path / "out", progress=False, store=store) for _ in "ab"
    )
    first.adapters("random", 2)  # in the store: assembling is all that is left
    real_create = experiments.ModelDir.create
    created = threading.Event()

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        md = real_create(*args, **kwargs)
        created.set()
        time.sleep(1.0)  # the other one looks now, while the adapters are not in yet
        return md

    monkeypatch.setattr(experiments.ModelDir, "create", staticmethod(slow_create))
    results: dict[str, Any] = {}

    def assemble(name: str, study: Study) -> None:
        try:
            results[name] = study.manifests(study.model_dir("random", 2))
        except Exception as err:  # noqa: BLE001 - the race's symptom, reported below
            results[name] = err

    a = threading.Thread(target=assemble, args=("first", first))
    a.start()
    created.wait(30)
    assemble("second", second)
    a.join(60)
    for name in ("first", "second"):
        assert not isinstance(results[name], Exception), f"{name}: {results[name]!r}"
    assert [m.adapter_sha256 for m in results["first"]] == [m.adapter_sha256 for m in results["second"]]


def test_existing_model_directories_are_adopted_not_retrained(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    config = ExperimentConfig.from_preset("quick", num_shards=2, train_size=12, valid_size=8, test_size=8)
    from apa.data import load_splits

    splits = load_splits(data_dir)
    built = tmp_path / "built"
    build_model(
        backbone,
        splits,
        built,
        PartitionConfig(strategy="semantic", num_shards=2, seed=0),
        config.train_for(2),
        pseudonymizer=Pseudonymizer(b"another key of the lead, 32 bytes", source="t"),
        progress=False,
    )
    store = StageStore(tmp_path / "store")
    assert adopt_model_dir(store, backbone, built) == [0, 1]
    monkeypatch.setattr(
        stages, "train_adapter", lambda *a, **k: pytest.fail("an adopted adapter was retrained")
    )
    study = Study(backbone, splits, config, tmp_path / "out", progress=False, store=store)
    md = study.model_dir("semantic", 2)
    assert [m.adapter_sha256 for m in study.manifests(md)] == [
        m.adapter_sha256 for m in study.manifests(type(md)(built))
    ]
    # the adopted adapters' metrics come along (epochs, steps, validation AUC)
    assert all(m.metrics for m in study.manifests(md))
    # the adopted partition is read back without embedding the training split again
    assert study.partition("semantic", 2).shards == ModelDir(built).partition().shards
    assert not store.done("embeddings", embeddings_key(backbone, splits["train"], bf16=False))


def test_a_model_directory_whose_partition_clustered_bf16_embeddings_gives_its_adapters_not_its_partition(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The partition stage's key promises fp32 embeddings: a partition recorded from bf16 ones (a
    model directory built before partitions were fp32 everywhere) is not adopted under it."""
    from apa.data import load_splits
    from apa.stages import partition_key

    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    config = ExperimentConfig.from_preset("quick", num_shards=2, train_size=12, valid_size=8, test_size=8)
    splits = load_splits(data_dir)
    pconfig = PartitionConfig(strategy="semantic", num_shards=2, seed=0)
    built = tmp_path / "built"
    key = Pseudonymizer(b"another key of the lead, 32 bytes", source="t")
    build_model(backbone, splits, built, pconfig, config.train_for(2), pseudonymizer=key, progress=False)
    model_json = built / "model.json"
    info = json.loads(model_json.read_text())
    del info["partition_bf16"]  # as written before the field, by a backbone under bf16 autocast
    info["backbone_config"]["bf16_autocast"] = True
    model_json.write_text(json.dumps(info))
    store = StageStore(tmp_path / "store")
    assert adopt_model_dir(store, backbone, built) == [0, 1]  # the adapters: keyed by their samples
    assert not store.done("partition", partition_key(backbone, splits["train"], pconfig))
    # the same directory recorded as fp32 gives its partition too
    info["partition_bf16"] = False
    model_json.write_text(json.dumps(info))
    assert adopt_model_dir(StageStore(tmp_path / "store2"), backbone, built) == [0, 1]
    assert StageStore(tmp_path / "store2").done(
        "partition", partition_key(backbone, splits["train"], pconfig)
    )


def test_analysis_and_mia_on_the_tiny_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_samples(16, "train", seed=21))
    write_jsonl(data / "valid.jsonl", make_samples(16, "valid", seed=22))
    write_jsonl(data / "test.jsonl", make_samples(16, "test", seed=23))
    out, store = tmp_path / "out", tmp_path / "store"
    args = _args(data, tiny_model_dir, out, store)
    args[args.index("12")] = "16"
    args[args.index("--valid-size") + 1] = "16"
    args[args.index("--test-size") + 1] = "16"
    analysis = [*args[:2], "analysis", *args[3:]]
    # only the paper's served pass: the other six are left out of the table and named as skipped
    part_out = tmp_path / "part"
    partial_run = [*analysis, "--out", str(part_out), "--served", "paper"]
    assert main(partial_run) == 0
    # the plan counts stages; the served passes the analysis runs are announced beside it
    assert "plus up to 1 served test passes (paper)" in capsys.readouterr().out
    part = json.loads((part_out / "analysis.json").read_text())
    assert "APA(D)" in part["table"]["methods"] and "APA(D) - Retraining" in part["table"]["differences"]
    assert not {"uniform D", "APA(ND)"} & set(part["table"]["methods"])
    assert len(part["served_skipped"]) == 6 and "APA(ND)" in part["served_skipped"]
    assert "Served passes not run" in (part_out / "analysis.md").read_text()
    assert main(analysis) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["served_skipped"] == []
    assert result["table"]["methods"]["APA(D)"] == part["table"]["methods"]["APA(D)"]
    methods = result["table"]["methods"]
    for name in ("zero-shot", "Retraining", "SISA", "uniform D", "APA(D)", "APA(ND)"):
        low, high = methods[name]["ci"]
        assert low <= methods[name]["auc"] <= high or not np.isfinite(low)
    assert "APA(D) - Retraining" in result["table"]["differences"]
    assert "APA(D) - SISA" in result["table"]["differences"]
    # APA(ND) is also served with the τ/n that validation selected for APA(D), and compared
    best = result["selection"]["paper"]["best"]
    nd_selected = f"APA(ND) τ={best['tau']:g}, n={best['top_n']} (valid-selected)"
    assert nd_selected in methods and f"{nd_selected} - SISA" in result["table"]["differences"]
    assert f"{nd_selected} - Retraining" in result["table"]["differences"]
    assert result["selection"]["paper"]["best"]["tau"] in stages_taus()
    assert result["weights_tau1000_n20"]["paper"]["matches_library"]
    assert len(result["shards"]) == 2 and all("test_auc" in s for s in result["shards"])
    # each shard names its samples by digest, so runs on other machines can compare partitions
    semantic = next((out / "models").glob("semantic-K2-*"))
    digests = [sample_digest(shard) for shard in ModelDir(semantic).partition().shards]
    assert [s["sample_digest"] for s in result["shards"]] == digests
    assert f"| 0 | {result['shards'][0]['size']} | {digests[0][:12]} |" in (out / "analysis.md").read_text()
    assert result["training"]["Retraining"]["steps"] > 0
    assert result["speedup"]["speedup_vs_mean_shard"] > 0
    sp = result["speedup"]
    assert sp["retraining_steps"] == result["training"]["Retraining"]["steps"]
    assert sp["steps_speedup_vs_mean_shard"] == pytest.approx(
        sp["retraining_steps"] / np.mean(sp["shard_steps"])
    )
    assert (out / "analysis.md").read_text().count("|") > 10
    assert (out / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    # `training` gives the same records and speed-up from the adapter stages alone
    with monkeypatch.context() as m:
        m.setattr(stages, "train_adapter", lambda *a, **k: pytest.fail("`training` trained an adapter"))
        assert main([*args[:2], "training", *args[3:]]) == 0
        summary = json.loads((out / "training.json").read_text())
        assert summary["training"] == result["training"] and summary["speedup"] == result["speedup"]
        assert summary["missing"] == [] and "| shard 1 |" in (out / "training.md").read_text()
        # on a store without the adapters it names what is missing, and trains nothing
        empty = [*args[:2], "training", *args[3:]]
        empty[empty.index(str(store))] = str(tmp_path / "empty-store")
        assert main(empty) == 0
        assert json.loads((out / "training.json").read_text())["missing"] == [
            "Retraining",
            "shard 0",
            "shard 1",
        ]

    mia = [*args[:2], "mia", *args[3:], "--erase-users", "2"]
    # a second process may build the from-scratch reference first; the full run then reuses it
    assert main([*mia, "--mia-part", "reference"]) == 0
    scratch = out / "mia" / "scratch"

    def built_files() -> dict[Path, int]:  # the model directory, not the serving caches scoring adds
        return {p: p.stat().st_mtime_ns for p in scratch.rglob("*") if p.is_file() and "cache" not in p.parts}

    reference_files = built_files()
    assert reference_files and not (out / "mia.json").exists()
    assert main(mia) == 0
    assert built_files() == reference_files
    r = json.loads((out / "mia.json").read_text())
    assert set(r["runs"]) == {"before erasure", "after erasure", "from scratch without them"}
    assert r["affected_shards"] and r["sizes"]["erased"] > 0
    for run in r["runs"].values():
        assert 0.0 <= run["erased vs non-members"]["auc"] <= 1.0
        assert 0.0 <= run["members vs non-members"]["tpr_at_1pct_fpr"] <= 1.0
    assert (out / "mia.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean P(true label)" in (out / "mia.md").read_text()
    # where ω sends training samples: members are in every model's partition, erased ones only before
    routing = r["own_shard_weight"]
    assert set(routing["before erasure"]) == {"members", "erased"}
    assert set(routing["after erasure"]) == set(routing["from scratch without them"]) == {"members"}
    assert routing["before erasure"]["erased"]["n"] == r["sizes"]["erased"]
    for by_set in routing.values():
        for o in by_set.values():
            assert 0.0 <= o["mean_own_omega"] <= o["mean_max_omega"] <= 1.0 + 1e-9
            assert 0.0 <= o["own_is_argmax"] <= 1.0
    # a re-run reuses the finished erasure and reports it, not an empty second unlearning pass
    assert main(mia) == 0
    again = json.loads((out / "mia.json").read_text())
    assert again["erasure"] == r["erasure"] and again["runs"] == r["runs"]
    # killed after unlearn finished, before its report was saved: the report is read off the dirs
    (out / "mia" / "erasure.json").unlink()
    assert main(mia) == 0
    read_off = json.loads((out / "mia.json").read_text())
    assert read_off["erasure"]["read_off_model_dirs"] and read_off["runs"] == r["runs"]
    for field in ("erased_samples", "affected_shards", "versions", "estimated_full_retrain_seconds"):
        assert read_off["erasure"][field] == r["erasure"][field], field
    assert read_off["erasure"]["erased_samples"] == r["sizes"]["erased"] > 0

    # the served scores are computed in chunks behind a bar: the same numbers as one call
    from apa.aggregation import AggregatedScorer, WeightConfig
    from apa.mia import score_in_chunks

    unlearned = ModelDir(out / "mia" / "model")
    prompts = [s.prompt for split in unlearned.splits().values() for s in split]
    weights = WeightConfig(strategy="adaptive", tau=1000.0, top_n=4)
    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    with AggregatedScorer.from_model_dir(backbone, unlearned) as scorer:
        whole_p, whole_omega = scorer.score(prompts, "decomposition", weights)
        assert len(prompts) > 2 * scorer.batch_size
        chunked_p, chunked_omega = score_in_chunks(scorer, prompts, weights, chunks_of=1)
        # with a work directory, a scoring stopped after its first chunk resumes at the second
        real_score, scored = scorer.score, []

        def stop_after_first_chunk(batch: list[str], *a: Any, **k: Any) -> Any:
            if scored:
                raise RuntimeError("stopped")
            scored.append(len(batch))
            return real_score(batch, *a, **k)

        work = tmp_path / "served-work"
        monkeypatch.setattr(scorer, "score", stop_after_first_chunk)
        with pytest.raises(RuntimeError, match="stopped"):
            score_in_chunks(scorer, prompts, weights, chunks_of=1, work=work)

        def counted(batch: list[str], *a: Any, **k: Any) -> Any:
            scored.append(len(batch))
            return real_score(batch, *a, **k)

        monkeypatch.setattr(scorer, "score", counted)
        resumed_p, resumed_omega = score_in_chunks(scorer, prompts, weights, chunks_of=1, work=work)
        assert scored[0] == scorer.batch_size and sum(scored) == len(prompts)  # no prompt twice
    np.testing.assert_array_equal(chunked_p, whole_p)
    np.testing.assert_array_equal(chunked_omega, whole_omega)
    np.testing.assert_array_equal(resumed_p, whole_p)
    np.testing.assert_array_equal(resumed_omega, whole_omega)
    # the MIA's served-score memos kept their chunks in the stage's work directory
    served = [d for d in store.rglob("served-chunks-of-*") if d.is_dir()]
    assert served and all(any(d.glob("part-*.npy")) for d in served)

    # two builders of the reference never overlap: one waits on the lock, then builds or reuses
    import fcntl
    import threading

    import apa.mia

    shutil.rmtree(scratch)
    released = threading.Event()
    calls: list[bool] = []
    real_build = apa.mia.build_model

    def build_after_release(*a: Any, **k: Any) -> Any:
        calls.append(released.is_set())
        return real_build(*a, **k)

    monkeypatch.setattr(apa.mia, "build_model", build_after_release)
    codes: list[int] = []
    with open(out / "mia" / "scratch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: codes.append(main([*mia, "--mia-part", "reference"])))
        waiter.start()
        waiter.join(timeout=3)
        assert waiter.is_alive() and not calls
        released.set()
    waiter.join()
    assert codes == [0] and calls == [True] and scratch.is_dir()

    # issue 9's ω variants on the same adapters (reused from the store: no adapter is trained again)
    adapters_before = set(_done_stages(store, "adapter"))
    assert main([*args[:2], "embedding", *args[3:]]) == 0
    assert set(_done_stages(store, "adapter")) == adapters_before
    e = json.loads((out / "embedding.json").read_text())
    names = [v["variant"] for v in e["variants"]]
    assert names[0] == "prompt@L" and any("per-request" in n for n in names) and len(names) == 4
    assert {v["layer"] for v in e["variants"]} == {
        e["num_layers"],
        e["num_layers"] // 2,
        e["num_layers"] // 4,
    }
    baseline = e["variants"][0]
    assert baseline["argmax_agrees_with_paper"] == 1.0
    # the paper's ω here is Table 1's APA(D) (same adapters, τ, n, pool): the same test AUC
    assert baseline["test_auc"] == pytest.approx(methods["APA(D)"]["auc"], abs=1e-9)
    assert set(e["bootstrap"]["differences"]) == {f"{n} - prompt@L" for n in names[1:]}
    assert (out / "embedding.md").read_text().count("|") > 20


def stages_taus() -> tuple[float, ...]:
    from apa.study_analysis import TAUS

    return TAUS


def test_validation_halves_by_user_never_share_a_user() -> None:
    from apa.study_analysis import halves, select_tau_n

    rng = np.random.default_rng(0)
    users = np.array([f"u{i % 7}" for i in range(60)])
    for _ in range(20):
        a, b = halves(len(users), rng, users)
        assert len(a) and len(b) and sorted(np.r_[a, b].tolist()) == list(range(60))
        assert not set(users[a].tolist()) & set(users[b].tolist())
    emb = rng.normal(size=(60, 8))
    labels = (rng.random(60) < 0.6).astype(float)
    preds = rng.random((60, 3))
    result = select_tau_n(emb, labels, preds, seed=0, groups=users)
    assert result["best"]["valid_auc"] == max(c["valid_auc"] for c in result["grid"])


def test_the_analysis_neighbours_are_the_serving_librarys_even_for_float32_embeddings() -> None:
    """Stored embeddings are float32; two pool samples whose cosines differ only past float32's
    precision tie there, and the stable sort would take the wrong one at n=1."""
    from apa.aggregation import WeightConfig, aggregation_weights
    from apa.study_analysis import neighbour_error, softmax_weights

    request = np.array([[1.0, 0.0]], dtype=np.float32)
    pool = np.array([[1.0, 1e-4], [1.0, 0.0]], dtype=np.float32)  # the second is the true nearest
    labels = np.array([0.0, 1.0])
    preds = np.array([[0.9, 0.1], [0.9, 0.1]])
    err = neighbour_error("paper", request, pool, labels, preds, top_n=1)
    assert err == pytest.approx(np.array([[0.1, 0.9]]))  # |1 - P_k| of the second sample, not |0 - P_k|
    config = WeightConfig(strategy="adaptive", tau=1000.0, top_n=1)
    lib = aggregation_weights(
        config, request, valid_embeddings=pool, valid_labels=labels, valid_predictions=preds
    )
    assert np.allclose(softmax_weights(err, 1000.0), lib)


def test_a_leading_word_picks_what_for_apa_experiment() -> None:
    from apa.cli import normalise_args
    from apa.experiments import experiment_command

    assert normalise_args(experiment_command, ["mia", "--preset", "cpu"])[:1] == ["--what=mia"]
    assert normalise_args(experiment_command, ["--what", "mia"])[:2] == ["--what", "mia"]


def test_mia_can_erase_users_confined_to_few_shards() -> None:
    from apa.mia import confined_users

    shard_of = {"a1": 0, "a2": 0, "b1": 0, "b2": 1, "c1": 2, "c2": 2, "c3": 2, "d1": 1, "e1": 2, "e2": 1}
    user_of = {sid: sid[0] for sid in shard_of}
    # one shard: users a (2 in shard 0), c (3 in shard 2), d (1 in shard 1): shard 2 holds most
    assert confined_users(shard_of, user_of, 3, 1) == ([2], ["c"])
    # two shards: {1, 2} holds c, d and e (6 samples); {0, 1} holds a, b, d (5)
    assert confined_users(shard_of, user_of, 3, 2) == ([1, 2], ["c", "d", "e"])
    assert confined_users(shard_of, user_of, 3, 3)[1] == ["a", "b", "c", "d", "e"]


class _Recorded:
    """An adapter stage's record, as `_training` reads it."""

    def __init__(self, valid_aucs: list[float], cap: int, patience: int) -> None:
        best = int(np.argmax(valid_aucs)) + 1
        metrics = [{"epoch": e, "steps": 4, "loss": 0.5, "valid_auc": v} for e, v in enumerate(valid_aucs, 1)]
        self.result = {
            "num_samples": 32,
            "metrics": metrics,
            "best_epoch": best,
            "train_seconds": 10.0 * len(metrics),
            "samples_per_second": 3.2,
            "train_config": {"epochs": cap, "patience": patience},
        }
        self.sha256 = "0" * 64


def test_convergence_means_the_patience_ran_out_not_that_the_cap_was_reached() -> None:
    from apa.study_analysis import _training, speedup, speedup_lines, training_lines

    stopped = _training(_Recorded([0.5, 0.6, 0.55, 0.58], cap=10, patience=2))  # type: ignore[arg-type]
    at_cap_done = _training(_Recorded([0.5, 0.6, 0.55], cap=3, patience=1))  # type: ignore[arg-type]
    at_cap_rising = _training(_Recorded([0.5, 0.6, 0.7], cap=3, patience=1))  # type: ignore[arg-type]
    assert stopped and at_cap_done and at_cap_rising
    assert stopped["converged"] and stopped["early_stopped"]
    assert at_cap_done["converged"] and not at_cap_done["early_stopped"]
    assert not at_cap_rising["converged"]
    assert speedup_lines(speedup({"Retraining": stopped, "shards": [at_cap_done]}))[-1].endswith("yes.")
    assert (
        "no:" in speedup_lines(speedup({"Retraining": stopped, "shards": [at_cap_done, at_cap_rising]}))[-1]
    )
    table = "\n".join(training_lines({"Retraining": stopped, "shards": [at_cap_rising, None]}))
    assert "| 4 / 10 | 2 | yes | 16 (8) |" in table and "| no (cap) |" in table
    assert "| shard 1 | - | not trained yet |" in table


def test_the_studys_partition_clusters_fp32_embeddings_under_a_bf16_backbone(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """As `apa train`'s: the study's semantic partition is the one fp32 embeddings give, so it is the
    same on every CPU (bf16 moved 38 of 256 samples on one Xeon); valid/test keep the configured
    autocast (ω's neighbours)."""
    from apa.data import load_splits
    from apa.partition import partition

    bf16 = Backbone.load(BackboneConfig(model=str(tiny_model_dir), bf16_autocast=True))
    fp32 = Backbone.load(BackboneConfig(model=str(tiny_model_dir), bf16_autocast=False))
    config = ExperimentConfig.from_preset("quick", num_shards=2, train_size=12, valid_size=8, test_size=8)
    splits = load_splits(data_dir)
    study = Study(
        bf16, splits, config, tmp_path / "out", progress=False, store=StageStore(tmp_path / "store")
    )
    got = study.partition("semantic", 2)
    train = splits["train"]
    ids, prompts = [s.sample_id for s in train], [s.prompt for s in train]
    expected = partition(ids, partition_config("semantic", 2, config.seed), embeddings=fp32.embed(prompts))
    assert got.shards == expected.shards
    np.testing.assert_array_equal(got.centroids, expected.centroids)
    # the stage store holds the train split's fp32 embeddings beside the configured ones of valid
    assert study.store.done("embeddings", embeddings_key(bf16, train, bf16=False))
    assert not study.store.done("embeddings", embeddings_key(bf16, train))
    study.embeddings("valid")
    assert study.store.done("embeddings", embeddings_key(bf16, splits["valid"]))
    assert not study.store.done("embeddings", embeddings_key(bf16, splits["valid"], bf16=False))


def test_partitions_prints_each_shards_digest_and_trains_nothing(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """`apa experiment partitions`: every shard of the partitions `--stages_for` needs, by size, Yes
    rate and sample digest, read from the stage store's partitions; nothing trained or scored."""
    from apa.data import load_splits
    from apa.stages import partition_key

    out, store = tmp_path / "out", tmp_path / "store"
    base = [a if a != "stages" else "partitions" for a in _args(data_dir, tiny_model_dir, out, store)]
    # without training allowed, a partition that needs the embeddings is not built: a one-line error
    assert main([*base, "--train", "false"]) == 1
    assert "the semantic K=2 partition is not in the store yet" in capsys.readouterr().err
    monkeypatch.setattr(stages, "train_adapter", lambda *a, **k: pytest.fail("partitions trained an adapter"))
    assert main([*base, "--stages_for", "fig4"]) == 0
    printed = capsys.readouterr().out
    assert _done_stages(store, "adapter") == {} and _done_stages(store, "predictions") == {}
    result = json.loads((out / "partitions.json").read_text())
    train = load_splits(data_dir)["train"]
    labels = {s.sample_id: s.label for s in train}
    assert result["train_digest"] == sample_digest(labels) and result["embeddings_bf16"] is False
    assert [(r["strategy"], r["num_shards"]) for r in result["partitions"]] == [
        ("semantic", 2),
        ("random", 2),
        ("bekm", 2),
        ("user", 2),
    ]
    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    for row in result["partitions"]:
        key = partition_key(backbone, train, partition_config(row["strategy"], 2, 0))
        stored = json.loads((StageStore(store).path("partition", key) / "partition.json").read_text())
        shards = stored["shards"]
        assert [s["sample_digest"] for s in row["shards"]] == [sample_digest(ids) for ids in shards]
        assert [s["size"] for s in row["shards"]] == [len(ids) for ids in shards]
        assert [s["yes_rate"] for s in row["shards"]] == pytest.approx(
            [float(np.mean([labels[i] for i in ids])) for ids in shards]
        )
    # the table is printed and written; digests cut to 12 characters
    table = (out / "partitions.md").read_text()
    assert table in printed and result["train_digest"][:12] in table
    first = result["partitions"][0]["shards"][0]
    assert (
        f"| semantic K=2 | 0 | {first['size']} | {first['yes_rate']:.3f} | {first['sample_digest'][:12]} |"
        in table
    )


def test_the_stratified_variant_spreads_each_label_evenly_over_the_studys_shards(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """`--apa_partition stratified`: the study's APA shards come from the label-stratified variant
    (the training labels reach the partition), beside the same Retraining stage."""
    from apa.stages import partition_key

    out, store = tmp_path / "out", tmp_path / "store"
    base = [a if a != "stages" else "partitions" for a in _args(data_dir, tiny_model_dir, out, store)]
    monkeypatch.setattr(stages, "train_adapter", lambda *a, **k: pytest.fail("partitions trained an adapter"))
    assert main([*base, "--apa_partition", "stratified"]) == 0
    result = json.loads((out / "partitions.json").read_text())
    assert [(r["strategy"], r["num_shards"]) for r in result["partitions"]] == [
        ("random", 1),
        ("stratified", 2),
    ]
    train = load_splits(data_dir)["train"]
    labels = {s.sample_id: s.label for s in train}
    backbone = Backbone.load(BackboneConfig(model=str(tiny_model_dir)))
    key = partition_key(backbone, train, partition_config("stratified", 2, 0))
    shards = json.loads((StageStore(store).path("partition", key) / "partition.json").read_text())["shards"]
    for label in (0, 1):  # both labels occur, and each is split in halves as even as it divides
        count = sum(y == label for y in labels.values())
        assert 0 < count < len(labels)
        assert sorted(sum(labels[i] == label for i in ids) for ids in shards) == [
            count // 2,
            count - count // 2,
        ]
