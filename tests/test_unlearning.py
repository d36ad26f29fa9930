"""Unlearning a model directory: exactly the affected shards are retrained from scratch, nothing in
the directory keeps the erased data, and a run killed at any point (kill -9, in a real process)
is finished by the next one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from apa.aggregation import AggregatedScorer, WeightConfig
from apa.cli import main
from apa.modeldir import ModelDir
from apa.partition import PartitionConfig
from apa.pseudonyms import pseudonymizer_from_settings
from apa.sharded import UnlearningError, build_model, erased_sample_ids, erasure_problems, unlearn
from apa.training import TrainConfig, train_adapter
from dump_helpers import files_holding
from model_fixtures import loadable_tiny_backbone, make_samples

FAST = TrainConfig(
    lr=3e-2, epochs=2, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)
VICTIM = "erase-me-4711"
"""A user id no random byte string contains by chance (the dump tests grep every file for it)."""


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K=3 model directory on the loadable tiny model; the victim's samples span several shards,
    so that their erasure retrains more than one."""
    bb = loadable_tiny_backbone()
    splits = {
        "train": make_samples(24, seed=1, user_prefix="erase-me-471"),  # users ...4710 to ...4715
        "valid": make_samples(12, "valid", seed=2, user_prefix="erase-me-471"),
        "test": make_samples(6, "test", seed=3, user_prefix="erase-me-471"),
    }
    root = tmp_path_factory.mktemp("unlearn") / "model"
    build_model(
        bb,
        splits,
        root,
        PartitionConfig(strategy="random", num_shards=3, seed=0),
        FAST,
        pseudonymizer=pseudonymizer_from_settings(),
        progress=False,
    )
    md = ModelDir(root)
    victim_shards = {md.partition().shard_of(s.sample_id) for s in splits["train"] if s.user_id == VICTIM}
    assert len(victim_shards) >= 2, victim_shards
    return root


@pytest.fixture()
def model_dir(template: Path, tmp_path: Path) -> ModelDir:
    return ModelDir(shutil.copytree(template, tmp_path / "model"))


def _victim_traces(md: ModelDir, template: Path) -> list[str]:
    """The victim's user id, sample ids and interaction ids, as held by the original directory."""
    samples = [s for v in ModelDir(template).splits().values() for s in v if s.user_id == VICTIM]
    return [VICTIM, *(s.sample_id for s in samples), *(i for s in samples for i in s.interaction_ids)]


def _adapters(md: ModelDir) -> dict[int, dict[str, torch.Tensor]]:
    return {
        m.shard_index: load_file(str(md.adapter_dir(m.shard_index) / "adapter_model.safetensors"))
        for m in md.manifests()
        if m is not None and m.adapter_sha256
    }


def _victim_ids(md: ModelDir) -> set[str]:
    return erased_sample_ids([s for v in md.splits().values() for s in v], user_ids=[VICTIM])


def test_unlearning_a_user_retrains_exactly_the_shards_that_held_them(
    model_dir: ModelDir, template: Path
) -> None:
    md = model_dir
    p = pseudonymizer_from_settings()
    before = md.manifests()
    erased = _victim_ids(md)
    erased_pids = {p.sample(i) for i in erased}
    holding = {m.shard_index for m in before if m is not None and erased_pids & set(m.sample_pids)}
    report = unlearn(md.root, erased, pseudonymizer=p, backbone=loadable_tiny_backbone(), progress=False)
    assert set(report.affected_shards) == holding and report.erased_samples == len(erased)
    for old, new in zip(before, md.manifests(), strict=True):
        assert old is not None and new is not None
        assert not erased_pids & set(new.sample_pids)
        if old.shard_index in holding:
            assert new.version == old.version + 1
            assert set(new.sample_pids) == set(old.sample_pids) - erased_pids
        else:
            assert new == old  # untouched shard: same adapter, same manifest
    assert not _victim_ids(md) and not md.journal().pending and md.journal().erased_pids == erased_pids
    assert erasure_problems(md, frozenset(erased_pids), p) == []
    assert report.estimated_full_retrain_seconds > 0 and report.measured_full_retrain_seconds is None


def test_unlearned_adapter_equals_one_trained_from_scratch_on_the_remainder(model_dir: ModelDir) -> None:
    md = model_dir
    bb = loadable_tiny_backbone()
    splits = md.splits()
    victim = splits["train"][5]
    shard = md.partition().shard_of(victim.sample_id)
    unlearn(md.root, {victim.sample_id}, backbone=bb, progress=False)
    members = set(md.partition().shards[shard])
    remainder = [s for s in splits["train"] if s.sample_id in members]
    expected = train_adapter(bb, remainder, splits["valid"], FAST).adapter_state
    saved = load_file(str(md.adapter_dir(shard) / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_unlearning_prunes_the_caches_a_scorer_filled(model_dir: ModelDir, template: Path) -> None:
    md = model_dir
    bb = loadable_tiny_backbone()
    with AggregatedScorer.from_model_dir(bb, md) as scorer:  # fills embeddings + per-adapter predictions
        scorer.score([s.prompt for s in md.splits()["test"]], "decomposition", WeightConfig(top_n=3))
    assert files_holding(md.cache_dir(), _victim_traces(md, template))  # the caches hold the victim
    unlearn(md.root, _victim_ids(md), backbone=bb, progress=False)
    assert files_holding(md.root, _victim_traces(md, template)) == {}


def test_unlearn_refuses_to_finish_if_a_manifest_keeps_an_erased_sample(
    model_dir: ModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    import apa.sharded as sharded

    md = model_dir
    erased = sorted(_victim_ids(md))
    p = pseudonymizer_from_settings()
    real = sharded.shard_manifest

    def leaky(shard: int, version: int, samples: Any, *args: Any) -> Any:
        manifest = real(shard, version, samples, *args)
        from dataclasses import replace

        return replace(manifest, sample_pids=(*manifest.sample_pids, p.sample(erased[0])))

    monkeypatch.setattr(sharded, "shard_manifest", leaky)
    with pytest.raises(UnlearningError, match="erased samples"):
        unlearn(md.root, erased, backbone=loadable_tiny_backbone(), progress=False)
    assert md.journal().pending  # the run is not done: the next one retrains again


def test_a_failed_delete_is_an_error(model_dir: ModelDir, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(f"cannot delete {path}")

    monkeypatch.setattr("apa.modeldir.shutil.rmtree", refuse)
    with pytest.raises(PermissionError):
        unlearn(model_dir.root, _victim_ids(model_dir), backbone=loadable_tiny_backbone(), progress=False)
    monkeypatch.undo()
    assert any(
        "were not deleted" in p
        for p in erasure_problems(model_dir, model_dir.journal().erased_pids, pseudonymizer_from_settings())
    )


# --- crashes: a real process killed with SIGKILL at a chosen point, then a plain re-run ------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import apa.modeldir, apa.sharded
    from apa.sharded import unlearn

    root, ids, point = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    on_shard = None
    if point == "after-intent":
        apa.sharded.scrub = kill  # the journal is written, nothing else changed
    elif point == "after-first-shard":
        on_shard = kill
    elif point == "between-renames":
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if "/.trash/old-" in str(dst):
                kill()
        apa.modeldir.os.rename = rename
    unlearn(root, ids, on_shard=on_shard, progress=False)
    """
)


def _run_until_killed(root: Path, ids: set[str], point: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(root), ",".join(sorted(ids)), point],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("point", ["after-intent", "after-first-shard", "between-renames"])
def test_an_unlearning_killed_at_any_point_is_finished_by_a_plain_rerun(
    model_dir: ModelDir, template: Path, tmp_path: Path, point: str, capsys: pytest.CaptureFixture[str]
) -> None:
    md = model_dir
    erased = _victim_ids(md)
    reference = ModelDir(shutil.copytree(template, tmp_path / "reference"))
    unlearn(reference.root, erased, backbone=loadable_tiny_backbone(), progress=False)

    _run_until_killed(md.root, erased, point)
    assert md.journal().pending  # the intent survived the crash
    assert main(["unlearn", str(md.root), "--user-id", VICTIM]) == 0  # not "no sample matches"
    assert '"resumed": true' in capsys.readouterr().out
    p = pseudonymizer_from_settings()
    assert erasure_problems(md, md.journal().erased_pids, p) == [] and not md.journal().pending
    assert _adapters(md).keys() == _adapters(reference).keys()
    for k, weights in _adapters(md).items():  # bit for bit what an uninterrupted run produced
        assert all(torch.equal(weights[n], _adapters(reference)[k][n]) for n in weights)
    assert [m.version if m else None for m in md.manifests()] == [
        m.version if m else None for m in reference.manifests()
    ]
    assert files_holding(md.root, _victim_traces(md, template)) == {}
    assert main(["unlearn", str(md.root), "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_measure_full_retrain_times_a_real_k1_retrain(model_dir: ModelDir) -> None:
    report = unlearn(
        model_dir.root,
        _victim_ids(model_dir),
        backbone=loadable_tiny_backbone(),
        progress=False,
        measure_full_retrain=True,
    )
    assert report.measured_full_retrain_seconds is not None and report.measured_full_retrain_seconds > 0
    assert report.to_json()["measured_speedup"] is not None
