"""AggregatedScorer: a model directory's adapters served with per-request weights, on the tiny Llama."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from apa.aggregation import (
    VALID_EMBEDDINGS_FILE,
    VALID_PREDICTIONS_FILE,
    AggregatedScorer,
    AllShardsExcludedError,
    WeightConfig,
    aggregation_weights,
)
from apa.backbone import Backbone
from apa.partition import PartitionConfig
from apa.training import ModelDir, TrainConfig, build_model, erased_sample_ids, unlearn
from model_fixtures import make_samples, tiny_backbone

FAST = TrainConfig(
    lr=3e-2, epochs=2, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)
K = 3
LEVELS = ["decomposition", "non_decomposition", "prediction"]
ADAPTIVE = WeightConfig(strategy="adaptive", tau=10.0, top_n=4)


@pytest.fixture()
def built(tiny_llama: Any, tmp_path: Path) -> tuple[Backbone, Path, dict[str, list[Any]]]:
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    splits = {
        "train": make_samples(24, seed=1),
        "valid": make_samples(12, "valid", seed=2),
        "test": make_samples(6, "test", seed=3),
    }
    build_model(bb, splits, tmp_path / "m", PartitionConfig(strategy="semantic", num_shards=K), FAST, False)
    return bb, tmp_path / "m", splits


def single_adapter_scores(bb: Backbone, root: Path, shard: int, prompts: list[str]) -> np.ndarray:
    """P(Yes) of one adapter loaded on its own, independently of the scorer."""
    peft_model = ModelDir(root).load_adapters(bb, [shard])
    try:
        return bb.score(prompts, model=peft_model)
    finally:
        peft_model.unload()


def scramble(scorer: AggregatedScorer, shard: int) -> None:
    """Overwrite a loaded adapter's A/B with large garbage."""
    name = scorer.adapters[shard]
    with torch.no_grad():
        for module in scorer.peft_model.modules():
            for part in ("lora_A", "lora_B"):
                layers = getattr(module, part, None)
                if isinstance(layers, torch.nn.ModuleDict) and name in layers:
                    layers[name].weight.normal_(0, 5.0)


@pytest.mark.parametrize("level", LEVELS)
def test_an_excluded_shard_has_no_influence_on_the_scores(built: Any, level: Any) -> None:
    bb, root, splits = built
    prompts = [s.prompt for s in splits["test"]]
    with AggregatedScorer(bb, root) as scorer:
        before, omega = scorer.score(prompts, level, ADAPTIVE, excluded={1})
        assert np.all(omega[:, 1] == 0) and np.allclose(omega.sum(1), 1)
        served, _ = scorer.score(prompts, level, WeightConfig("average"))
        scramble(scorer, 1)
        after, omega_after = scorer.score(prompts, level, ADAPTIVE, excluded={1})
        garbage, _ = scorer.score(prompts, level, WeightConfig("average"))
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(omega_after, omega)
    assert not np.allclose(garbage, served, atol=1e-3)  # the garbage would have shown if served


@pytest.mark.parametrize("level", LEVELS)
def test_one_hot_weights_score_like_the_single_adapter(built: Any, level: Any) -> None:
    bb, root, splits = built
    prompts = [s.prompt for s in splits["test"]]
    expected = {k: single_adapter_scores(bb, root, k, prompts) for k in range(K)}
    with AggregatedScorer(bb, root, batch_size=4) as scorer:
        for k in range(K):
            one_hot = np.zeros((len(prompts), K))
            one_hot[:, k] = 1.0
            p, _ = scorer.score(prompts, level, omega=one_hot)
            np.testing.assert_allclose(p, expected[k], atol=1e-5, rtol=0)
        each = scorer.adapter_predictions(prompts)
        major, omega = scorer.score(prompts, level, WeightConfig("major", top_n=4))
    for k in range(K):
        np.testing.assert_allclose(each[:, k], expected[k], atol=1e-6, rtol=0)
    chosen = omega.argmax(1)
    assert np.all(omega.max(1) == 1.0)
    np.testing.assert_allclose(major, each[np.arange(len(prompts)), chosen], atol=1e-5, rtol=0)


def test_reload_after_unlearn_serves_the_retrained_adapter(built: Any) -> None:
    bb, root, splits = built
    md = ModelDir(root)
    prompts = [s.prompt for s in splits["test"]]
    user = splits["train"][0].user_id
    erased = erased_sample_ids([s for v in splits.values() for s in v], user_ids=[user])
    trainer = Backbone(copy.deepcopy(bb.model), bb.tokenizer, bb.config, bb.model_id, bb.model_digest)
    with AggregatedScorer(bb, root) as scorer:
        old_each = scorer.adapter_predictions(prompts)
        scorer.score(prompts, "decomposition", ADAPTIVE)  # fills the validation prediction caches
        # the trainer is another process in production: its own copy of the base model
        report = unlearn(root, erased, backbone=trainer, progress=False)
        assert report.affected_shards
        for k in report.affected_shards:
            scorer.reload(k)
        new_each = scorer.adapter_predictions(prompts)
        scorer.score(prompts, "decomposition", ADAPTIVE, erased_users={user})
    for k in range(K):
        expected = single_adapter_scores(bb, root, k, prompts)
        np.testing.assert_allclose(new_each[:, k], expected, atol=1e-6, rtol=0)
        if k in report.affected_shards:
            assert not np.allclose(new_each[:, k], old_each[:, k], atol=1e-6)
            cache = json.loads((md.shard_dir(k) / VALID_PREDICTIONS_FILE).read_text())
            assert cache["adapter_sha256"] == md.manifest(k)["adapter_sha256"]  # recomputed
        else:
            np.testing.assert_allclose(new_each[:, k], old_each[:, k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_all_shards_excluded_raises(built: Any, level: Any) -> None:
    bb, root, splits = built
    with AggregatedScorer(bb, root) as scorer, pytest.raises(AllShardsExcludedError):
        scorer.score([splits["test"][0].prompt], level, ADAPTIVE, excluded={0, 1, 2})


def test_erased_users_validation_samples_are_not_neighbours(built: Any) -> None:
    bb, root, splits = built
    valid = splits["valid"]
    user = valid[0].user_id
    theirs = [s.prompt for s in valid if s.user_id == user]
    keep = np.array([s.user_id != user for s in valid])
    config = WeightConfig(strategy="adaptive", tau=50.0, top_n=2)
    with AggregatedScorer(bb, root) as scorer:
        omega = scorer.weights(theirs, config, erased_users={user})
        embeddings, preds = scorer.valid_embeddings(), scorer.valid_prediction_matrix()
        requests = scorer.embed(theirs)
        expected = aggregation_weights(
            config,
            requests,
            valid_embeddings=embeddings[keep],
            valid_labels=np.array([s.label for s in valid])[keep],
            valid_predictions=preds[keep],
        )
        np.testing.assert_allclose(omega, expected, atol=1e-12)
        # the erased user's own samples may say anything: the weights do not move
        for col in scorer._valid_columns.values():
            col[~keep] = 1.0 - col[~keep]
        np.testing.assert_allclose(scorer.weights(theirs, config, erased_users={user}), omega, atol=1e-12)
        assert not np.allclose(scorer.weights(theirs, config), omega, atol=1e-3)  # unmasked, they would
        assert scorer.drop_valid(user_ids={user}) == int((~keep).sum())
        assert user not in {s.user_id for s in scorer._valid}


def test_validation_embeddings_are_cached_by_base_model_digest(built: Any, monkeypatch: Any) -> None:
    bb, root, splits = built
    with AggregatedScorer(bb, root) as scorer:
        first = scorer.valid_embeddings()
    assert (root / VALID_EMBEDDINGS_FILE).is_file() and first.shape[0] == len(splits["valid"])
    calls: list[int] = []
    real_embed = bb.embed
    monkeypatch.setattr(bb, "embed", lambda p, **kw: (calls.append(len(p)), real_embed(p, **kw))[1])
    with AggregatedScorer(bb, root) as scorer:
        np.testing.assert_array_equal(scorer.valid_embeddings(), first)
    assert calls == []  # read from the cache
    bb.model_digest = "1" * 64  # another base model: the cache is stale
    with AggregatedScorer(bb, root) as scorer:
        scorer.valid_embeddings()
    assert calls == [len(splits["valid"])]


def test_close_leaves_the_plain_base_model(built: Any) -> None:
    bb, root, splits = built
    prompts = [s.prompt for s in splits["test"]]
    base = bb.score(prompts)
    scorer = AggregatedScorer(bb, root)
    scorer.score(prompts, "non_decomposition", WeightConfig("average"))
    scorer.close()
    assert not any("lora_" in name for name, _ in bb.model.named_modules())
    np.testing.assert_allclose(bb.score(prompts), base, atol=1e-7, rtol=0)
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(prompts, "decomposition", WeightConfig("average"))


def test_a_broken_adapter_file_leaves_the_backbone_clean(built: Any) -> None:
    bb, root, splits = built
    md = ModelDir(root)
    (md.adapter_dir(2) / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        AggregatedScorer(bb, root)
    assert not any("lora_" in name for name, _ in bb.model.named_modules())


def test_a_shard_that_lost_its_adapter_is_never_served_after_reload(built: Any) -> None:
    bb, root, splits = built
    md = ModelDir(root)
    prompts = [s.prompt for s in splits["test"]]
    with AggregatedScorer(bb, root) as scorer:
        shutil.rmtree(md.adapter_dir(0))  # e.g. unlearning emptied the shard
        scorer.reload(0)
        assert scorer.loaded_shards == [1, 2]
        p, omega = scorer.score(prompts, "non_decomposition", WeightConfig("average"))
        assert np.all(omega[:, 0] == 0) and np.allclose(omega[:, 1:], 0.5)
        each = scorer.adapter_predictions(prompts)
        assert np.isnan(each[:, 0]).all()
        (md.adapter_dir(1) / "adapter_model.safetensors").write_bytes(b"broken retrain")
        with pytest.raises(Exception):  # noqa: B017
            scorer.reload(1)
        assert scorer.loaded_shards == [2]  # the superseded adapter is gone, the broken one not served
        assert set(scorer.peft_model.peft_config) == {scorer.adapters[2]}
        p2, omega2 = scorer.score(prompts, "decomposition", WeightConfig("average"))
        np.testing.assert_allclose(p2, each[:, 2], atol=1e-5, rtol=0)
        shutil.rmtree(md.adapter_dir(2))
        scorer.reload(2)
        with pytest.raises(AllShardsExcludedError):
            scorer.score(prompts, "decomposition", WeightConfig("average"))


def test_unlearning_on_the_serving_backbone_retrains_exactly_and_the_scorer_recovers(built: Any) -> None:
    """One process (the demo): `unlearn` trains on the backbone the scorer serves from; peft's
    unload at the end of training drops the scorer's LoRA layers, and the scorer re-attaches them."""
    from safetensors.torch import load_file

    from apa.training import train_adapter

    bb, root, splits = built
    md = ModelDir(root)
    clean = Backbone(copy.deepcopy(bb.model), bb.tokenizer, bb.config, bb.model_id, bb.model_digest)
    prompts = [s.prompt for s in splits["test"]]
    user = splits["train"][0].user_id
    erased = erased_sample_ids([s for v in splits.values() for s in v], user_ids=[user])
    with AggregatedScorer(bb, root) as scorer:
        scorer.score(prompts, "decomposition", ADAPTIVE)
        report = unlearn(root, erased, backbone=bb, progress=False)
        for k in report.affected_shards:
            scorer.reload(k)
        served = scorer.adapter_predictions(prompts)
        p, omega = scorer.score(prompts, "decomposition", ADAPTIVE, erased_users={user})
        assert np.isfinite(p).all() and np.allclose(omega.sum(1), 1)
    remaining = {s.sample_id: s for s in splits["train"] if s.sample_id not in erased}
    valid = [s for s in splits["valid"] if s.sample_id not in erased]
    for k in report.affected_shards:
        expected = train_adapter(clean, [remaining[i] for i in md.manifest(k)["sample_ids"]], valid, FAST)
        saved = load_file(str(md.adapter_dir(k) / "adapter_model.safetensors"))
        for key, value in expected.adapter_state.items():
            match = [v for n, v in saved.items() if n.replace(".default", "") == key.replace(".default", "")]
            assert match and torch.equal(match[0], value), key
        np.testing.assert_allclose(served[:, k], single_adapter_scores(bb, root, k, prompts), atol=1e-6)


def test_an_empty_request_batch_scores_nothing(built: Any) -> None:
    bb, root, _ = built
    with AggregatedScorer(bb, root) as scorer:
        p, omega = scorer.score([], "decomposition", ADAPTIVE)
    assert p.shape == (0,) and omega.shape == (0, K)
