"""The typed model directory: ModelInfo / ShardManifest round trips and validation, atomic shard
replacement and its crash recovery, and building a model directory on the tiny Llama."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from apa.aggregation import AggregatedScorer
from apa.artifacts import file_sha256
from apa.backbone import BackboneConfig
from apa.data.samples import sample_digest
from apa.metrics import auc
from apa.modeldir import ModelDir, ModelDirError, ModelInfo, ShardManifest
from apa.partition import PartitionConfig
from apa.pseudonyms import Pseudonymizer, PseudonymKeyMismatch
from apa.sharded import build_model, evaluate_model_dir
from apa.training import EpochRecord, TrainConfig
from model_fixtures import make_samples, tiny_backbone

KEY = Pseudonymizer(b"model-dir-tests-key-32-bytes-xxx", source="tests")
FAST = TrainConfig(
    lr=3e-2, epochs=2, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)


def _manifest(**overrides: Any) -> ShardManifest:
    fields: dict[str, Any] = {
        "shard_index": 1,
        "version": 2,
        "sample_pids": (KEY.sample("b"), KEY.sample("a")),
        "train_config": FAST,
        "base_model": "tiny",
        "base_model_digest": "0" * 64,
        "pseudonym_key_id": KEY.key_id,
        "adapter_sha256": "f" * 64,
        "metrics": (EpochRecord(1, 3, 0.7, 0.61), EpochRecord(2, 3, 0.5, None)),
        "best_epoch": 1,
        "train_seconds": 1.25,
        "samples_per_second": 3.5,
    }
    return ShardManifest(**{**fields, **overrides})


def test_manifest_round_trips_through_json_and_names_samples_by_pseudonym() -> None:
    manifest = _manifest()
    data = json.loads(json.dumps(manifest.to_json()))
    assert ShardManifest.from_json(data) == manifest
    assert data["sample_pids"] == sorted(data["sample_pids"])  # canonical order
    assert data["sample_digest"] == sample_digest(manifest.sample_pids) and data["num_samples"] == 2
    assert "sample_ids" not in data and "a" not in data["sample_pids"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("version"), "missing field 'version'"),
        (lambda d: d.update(version="2"), "'version' has the wrong type"),
        (lambda d: d.update(version=0), "version must be >= 1"),
        (lambda d: d.update(sample_digest="0" * 64), "sample_digest"),
        (lambda d: d.update(num_samples=3), "num_samples"),
        (lambda d: d.update(adapter_sha256=None), "needs adapter_sha256"),
        (lambda d: d.update(format=1), "format 1"),
        (lambda d: d["train_config"].update(lr=-1), "lr must be > 0"),
        (lambda d: d.update(sample_pids=["x", "x"]), "twice"),
    ],
)
def test_malformed_manifests_are_refused_naming_the_field(change: Any, message: str) -> None:
    data = _manifest().to_json()
    change(data)
    with pytest.raises(ModelDirError, match=message):
        ShardManifest.from_json(data, "shards/1/manifest.json")


def test_model_info_round_trips_and_validates() -> None:
    info = ModelInfo(
        base_model="tiny",
        base_model_digest="0" * 64,
        backbone_config=BackboneConfig(model="tiny", bf16_autocast=False),
        partition_config=PartitionConfig(strategy="random", num_shards=3, seed=4),
        train_config=FAST,
        num_shards=3,
        pseudonym_key_id=KEY.key_id,
    )
    assert ModelInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    assert info.to_json()["partition_bf16"] is False  # partitions cluster fp32 embeddings
    # a model.json from before the field: its partition used the backbone's autocast
    old = {k: v for k, v in info.to_json().items() if k != "partition_bf16"}
    assert ModelInfo.from_json(old).partition_bf16 is False
    old["backbone_config"] = {**old["backbone_config"], "bf16_autocast": True}
    assert ModelInfo.from_json(old).partition_bf16 is True
    with pytest.raises(ModelDirError, match="partition_bf16"):
        ModelInfo.from_json({**info.to_json(), "partition_bf16": "no"})
    broken = {**info.to_json(), "partition_config": {"strategy": "nope"}}
    with pytest.raises(ModelDirError, match="strategy"):
        ModelInfo.from_json(broken)


@pytest.fixture()
def built(tiny_llama: Any, tmp_path: Path) -> tuple[Any, ModelDir, dict[str, list[Any]]]:
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    splits = {
        "train": make_samples(24, seed=1),
        "valid": make_samples(8, "valid", seed=2),
        "test": make_samples(8, "test", seed=3),
    }
    build_model(
        bb,
        splits,
        tmp_path / "m",
        PartitionConfig(strategy="user", num_shards=3),
        FAST,
        pseudonymizer=KEY,
        progress=False,
    )
    return bb, ModelDir(tmp_path / "m"), splits


def test_model_dir_holds_peft_adapters_and_manifests_that_cover_the_partition(built: Any) -> None:
    bb, md, splits = built
    manifests = md.manifests()
    assert [m.shard_index for m in manifests] == [0, 1, 2]
    covered = sorted(p for m in manifests for p in m.sample_pids)
    assert covered == sorted(KEY.sample(s.sample_id) for s in splits["train"])
    for k, m in enumerate(manifests):
        assert md.verify_adapter_file(m) is None
        assert m.adapter_sha256 == file_sha256(md.adapter_dir(k) / "adapter_model.safetensors")
        assert json.loads((md.adapter_dir(k) / "adapter_config.json").read_text())["r"] == FAST.lora_r
        assert m.base_model == bb.model_id and m.version == 1 and m.seed == FAST.seed
        assert [r.epoch for r in m.metrics] == [1, 2] and all(r.steps > 0 for r in m.metrics)
        assert {KEY.sample(i) for i in md.partition().shards[k]} == set(m.sample_pids)
    raw = (md.shard_dir(0) / "manifest.json").read_text()
    assert not any(s.sample_id in raw or s.user_id in raw for s in splits["train"])  # pseudonyms only
    assert md.info.pseudonym_key_id == KEY.key_id
    with pytest.raises(PseudonymKeyMismatch):
        md.check_key(Pseudonymizer(b"some-other-key-with-32-bytes-xxx"))


def test_loaded_adapter_scores_like_the_trained_one(built: Any) -> None:
    from peft import PeftModel

    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    independent = PeftModel.from_pretrained(bb.fork_model(), str(md.adapter_dir(1)))
    expected = bb.score(prompts, model=independent)
    assert not np.allclose(expected, bb.score(prompts))  # the adapter changes predictions
    report = evaluate_model_dir(bb, md.root, "test", progress=False)
    assert set(report["shard_auc"]) == {0, 1, 2}
    assert report["shard_auc"][1] == pytest.approx(auc([s.label for s in splits["test"]], expected))


def test_replacing_a_shard_is_atomic_and_a_crash_between_the_renames_is_recovered(
    built: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, md, _ = built
    old = md.manifest(0)
    assert old is not None
    weights = {"base_model.model.x.lora_A.weight": torch.ones(2, 2)}
    new = replace(old, version=2, adapter_sha256=None)

    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def crash_after_first(src: Any, dst: Any) -> None:
        renames.append((str(src), str(dst)))
        real_rename(src, dst)
        if len(renames) == 1:
            raise KeyboardInterrupt("the process dies between the two renames")

    monkeypatch.setattr("apa.modeldir.os.rename", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        md.save_shard(new, weights, {"r": 2})
    monkeypatch.undo()
    assert md.manifest(0) is None and md.trash_entries()  # the shard dir is aside, the new one staged
    md.recover()
    recovered = md.manifest(0)
    assert recovered is not None and recovered.version == 2 and md.verify_adapter_file(recovered) is None
    assert md.trash_entries() == []  # the replaced adapter is deleted


def test_scorer_from_model_dir_verifies_each_adapter_against_its_manifest(built: Any) -> None:
    from apa.artifacts import ArtifactError

    bb, md, _ = built
    weights = md.adapter_dir(2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ArtifactError, match="sha256"):
        AggregatedScorer.from_model_dir(bb, md)


def test_a_models_semantic_partition_clusters_fp32_embeddings_under_a_bf16_backbone(
    tiny_llama: Any, tmp_path: Path
) -> None:
    """The partition recorded for a model is the one fp32 embeddings give, whatever the backbone's
    autocast: the same shards and centroids wherever `apa train` runs."""
    from apa.partition import partition

    model, tok = tiny_llama
    fp32, bf16 = tiny_backbone(model, tok), tiny_backbone(model, tok, bf16_autocast=True)
    splits = {"train": make_samples(16, seed=5), "valid": make_samples(8, "valid", seed=6), "test": []}
    config = PartitionConfig(strategy="semantic", num_shards=2, seed=0)
    build_model(bf16, splits, tmp_path / "m", config, FAST, pseudonymizer=KEY, progress=False)
    recorded = ModelDir(tmp_path / "m").partition()
    ids, prompts = [s.sample_id for s in splits["train"]], [s.prompt for s in splits["train"]]
    expected = partition(ids, config, embeddings=fp32.embed(prompts))
    assert [sorted(shard) for shard in recorded.shards] == [sorted(shard) for shard in expected.shards]
    np.testing.assert_array_equal(recorded.centroids, expected.centroids)
    # the configured (bf16) embeddings would have recorded other centroids
    rounded = partition(ids, config, embeddings=bf16.embed(prompts))
    assert not np.array_equal(rounded.centroids, expected.centroids)


def test_a_model_built_on_the_stratified_partition_gives_each_shard_its_share_of_each_label(
    tiny_llama: Any, tmp_path: Path
) -> None:
    """`apa train --strategy stratified`: the training labels reach the partition, and the model
    directory records Algorithm 1's centroids with shards that split each label evenly."""
    from apa.partition import partition

    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    splits = {"train": make_samples(16, seed=7), "valid": make_samples(8, "valid", seed=8), "test": []}
    build_model(
        bb, splits, tmp_path / "m", PartitionConfig(strategy="stratified", num_shards=2), FAST, pseudonymizer=KEY,
        progress=False,
    )  # fmt: skip
    recorded = ModelDir(tmp_path / "m").partition()
    label = {s.sample_id: s.label for s in splits["train"]}
    for y in (0, 1):
        count = sum(v == y for v in label.values())
        assert 0 < count < 16
        assert sorted(sum(label[i] == y for i in shard) for shard in recorded.shards) == [
            count // 2,
            count - count // 2,
        ]
    prompts = [s.prompt for s in splits["train"]]
    semantic = partition(
        list(label), PartitionConfig(num_shards=2), embeddings=bb.embed_for_partition(prompts)
    )
    np.testing.assert_array_equal(recorded.centroids, semantic.centroids)
