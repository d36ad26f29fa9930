"""AggregatedScorer: exactly the adapters it is told to serve, with per-request weights, on the tiny Llama."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel

from apa.aggregation import AggregatedScorer, AllShardsExcludedError, WeightConfig, aggregation_weights
from apa.aggregation.caches import EMBEDDINGS_FILE, predictions_file
from apa.artifacts import ArtifactError
from apa.backbone import Backbone
from apa.modeldir import ModelDir
from apa.partition import PartitionConfig
from apa.pseudonyms import Pseudonymizer
from apa.sharded import build_model, erased_sample_ids, unlearn
from apa.training import TrainConfig, train_adapter
from model_fixtures import make_samples, tiny_backbone

FAST = TrainConfig(
    lr=3e-2, epochs=2, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)
KEY = Pseudonymizer(b"scorer-tests-key-with-32-bytes-x", source="tests")
K = 3
LEVELS = ["decomposition", "non_decomposition", "prediction"]
ADAPTIVE = WeightConfig(strategy="adaptive", tau=10.0, top_n=4)


@pytest.fixture()
def built(tiny_llama: Any, tmp_path: Path) -> tuple[Backbone, ModelDir, dict[str, list[Any]]]:
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    splits = {
        "train": make_samples(24, seed=1),
        "valid": make_samples(12, "valid", seed=2),
        "test": make_samples(6, "test", seed=3),
    }
    build_model(
        bb,
        splits,
        tmp_path / "m",
        PartitionConfig(strategy="semantic", num_shards=K),
        FAST,
        pseudonymizer=KEY,
        progress=False,
    )
    return bb, ModelDir(tmp_path / "m"), splits


def single_adapter_scores(bb: Backbone, md: ModelDir, shard: int, prompts: list[str]) -> np.ndarray:
    """P(Yes) of one adapter loaded by peft on its own fork, independently of the scorer."""
    return bb.score(prompts, model=PeftModel.from_pretrained(bb.fork_model(), str(md.adapter_dir(shard))))


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
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        before, omega = scorer.score(prompts, level, ADAPTIVE, excluded={1})
        assert np.all(omega[:, 1] == 0) and np.allclose(omega.sum(1), 1)
        served, _ = scorer.score(prompts, level, WeightConfig("average"))
        scramble(scorer, 1)
        after, omega_after = scorer.score(prompts, level, ADAPTIVE, excluded={1})
        garbage, _ = scorer.score(prompts, level, WeightConfig("average"))
        scorer.exclude([1])  # what a stale event does: the shard stops serving for every request
        dropped, omega_dropped = scorer.score(prompts, level, ADAPTIVE)
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(omega_after, omega)
    np.testing.assert_allclose(dropped, before, atol=1e-6, rtol=0)
    assert np.all(omega_dropped[:, 1] == 0)
    assert not np.allclose(garbage, served, atol=1e-3)  # the garbage would have shown if served


@pytest.mark.parametrize("level", LEVELS)
def test_one_hot_weights_score_like_the_single_adapter(
    built: Any, level: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    expected = {k: single_adapter_scores(bb, md, k, prompts) for k in range(K)}
    with AggregatedScorer.from_model_dir(bb, md, batch_size=4) as scorer:
        for k in range(K):
            one_hot = np.zeros((len(prompts), K))
            one_hot[:, k] = 1.0
            capsys.readouterr()
            # the study's long served passes ask for a progress bar; it changes no score
            p, _ = scorer.score(prompts, level, omega=one_hot, progress=k == 0)
            assert ("serve" in capsys.readouterr().err) == (k == 0)
            np.testing.assert_allclose(p, expected[k], atol=1e-5, rtol=0)
        each = scorer.adapter_predictions(prompts)
        major, omega = scorer.score(prompts, level, WeightConfig("major", top_n=4))
    for k in range(K):
        np.testing.assert_allclose(each[:, k], expected[k], atol=1e-6, rtol=0)
    chosen = omega.argmax(1)
    assert np.all(omega.max(1) == 1.0)
    np.testing.assert_allclose(major, each[np.arange(len(prompts)), chosen], atol=1e-5, rtol=0)


def test_it_serves_only_the_versions_it_is_given_not_the_files_on_disk(built: Any) -> None:
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    refs = md.adapter_refs()
    with AggregatedScorer(bb, num_shards=K, source=md, adapters={0: refs[0], 2: refs[2]}) as scorer:
        assert scorer.loaded_shards == [0, 2]  # shard 1's adapter sits on disk, unlisted: not served
        _, omega = scorer.score(prompts, "decomposition", WeightConfig("average"))
        assert np.all(omega[:, 1] == 0) and np.allclose(omega[:, [0, 2]], 0.5)
        with pytest.raises(ArtifactError, match="sha256"):  # a listed version must match its sha256
            scorer.sync({**scorer.serving, 1: replace(refs[1], sha256="0" * 64)})
        assert scorer.loaded_shards == [0, 2]  # the failed sync changed nothing


def test_sync_swaps_in_retrained_versions_and_nothing_of_the_old_ones_is_reused(built: Any) -> None:
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    user = splits["train"][0].user_id
    erased = erased_sample_ids([s for v in splits.values() for s in v], user_ids=[user])
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        old_each = scorer.adapter_predictions(prompts)
        scorer.score(prompts, "decomposition", ADAPTIVE)  # fills the per-adapter validation caches
        old_refs = scorer.serving
        report = unlearn(md.root, erased, pseudonymizer=KEY, backbone=bb, progress=False)
        assert report.affected_shards
        scorer.sync(md.adapter_refs())
        scorer.forget(erased)
        new_each = scorer.adapter_predictions(prompts)
        scorer.score(prompts, "decomposition", ADAPTIVE)
        new_refs = scorer.serving
    for k in range(K):
        np.testing.assert_allclose(
            new_each[:, k], single_adapter_scores(bb, md, k, prompts), atol=1e-6, rtol=0
        )
        if k in report.affected_shards:
            assert new_refs[k].sha256 != old_refs[k].sha256 and new_refs[k].version == old_refs[k].version + 1
            assert not np.allclose(new_each[:, k], old_each[:, k], atol=1e-6)
            assert predictions_file(md.cache_dir(), new_refs[k].sha256).is_file()  # computed anew
        else:
            assert new_refs[k] == old_refs[k]
            np.testing.assert_allclose(new_each[:, k], old_each[:, k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_all_shards_excluded_raises(built: Any, level: Any) -> None:
    bb, md, splits = built
    with AggregatedScorer.from_model_dir(bb, md) as scorer, pytest.raises(AllShardsExcludedError):
        scorer.score([splits["test"][0].prompt], level, ADAPTIVE, excluded={0, 1, 2})


def test_forgotten_validation_samples_are_no_neighbours_and_leave_the_caches(built: Any) -> None:
    bb, md, splits = built
    valid = splits["valid"]
    user = valid[0].user_id
    theirs = [s.prompt for s in valid if s.user_id == user]
    keep = np.array([s.user_id != user for s in valid])
    config = WeightConfig(strategy="adaptive", tau=50.0, top_n=2)
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        embeddings, preds = scorer.valid_embeddings(), scorer.valid_prediction_matrix()
        unmasked = scorer.weights(theirs, config)
        gone = [s.sample_id for s in valid if s.user_id == user]
        assert scorer.forget(sample_pids={KEY.sample(i) for i in gone}, pseudonymizer=KEY) == len(gone)
        omega = scorer.weights(theirs, config)
        expected = aggregation_weights(
            config,
            scorer.embed(theirs),
            valid_embeddings=embeddings[keep],
            valid_labels=np.array([s.label for s in valid])[keep],
            valid_predictions=preds[keep],
        )
        np.testing.assert_allclose(omega, expected, atol=1e-12)
        assert not np.allclose(unmasked, omega, atol=1e-6)  # their own samples were close neighbours
        assert user not in {s.user_id for s in scorer.valid_pool}
    from apa.aggregation import cache_sample_ids

    assert not set(gone) & cache_sample_ids(md.cache_dir())


def test_validation_embeddings_are_cached_by_base_model_digest(built: Any, monkeypatch: Any) -> None:
    bb, md, splits = built
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        first = scorer.valid_embeddings()
    assert (md.cache_dir() / EMBEDDINGS_FILE).is_file() and first.shape[0] == len(splits["valid"])
    calls: list[int] = []
    real_embed = bb.embed
    monkeypatch.setattr(bb, "embed", lambda p, **kw: (calls.append(len(p)), real_embed(p, **kw))[1])
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        np.testing.assert_array_equal(scorer.valid_embeddings(), first)
    assert calls == []  # read from the cache
    bb.model_digest = "1" * 64  # another base model: the cache is stale
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        scorer.valid_embeddings()
    assert calls == [len(splits["valid"])]


def test_the_backbone_never_carries_lora_layers_and_close_ends_the_scorer(built: Any) -> None:
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    base = bb.score(prompts)
    scorer = AggregatedScorer.from_model_dir(bb, md)
    scorer.score(prompts, "non_decomposition", WeightConfig("average"))
    assert not any("lora_" in name for name, _ in bb.model.named_modules())
    np.testing.assert_array_equal(bb.score(prompts), base)  # the base model scores as before, scorer open
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(prompts, "decomposition", WeightConfig("average"))


def test_training_leaves_a_serving_scorer_bit_for_bit_unchanged_without_any_reload(built: Any) -> None:
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        names = scorer.adapters
        before, omega = scorer.score(prompts, "decomposition", ADAPTIVE)
        train_adapter(bb, splits["train"][:8], splits["valid"], FAST)  # e.g. a retrain in the same process
        after, omega_after = scorer.score(prompts, "decomposition", ADAPTIVE)
        assert scorer.adapters == names  # nothing was reloaded
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(omega_after, omega)


def test_a_shard_that_lost_its_adapter_stops_serving_and_the_last_one_raises(built: Any) -> None:
    bb, md, splits = built
    prompts = [s.prompt for s in splits["test"]]
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        each = scorer.adapter_predictions(prompts)
        refs = scorer.serving
        scorer.sync({1: refs[1], 2: refs[2]})  # e.g. unlearning emptied shard 0
        assert scorer.loaded_shards == [1, 2]
        assert np.isnan(scorer.adapter_predictions(prompts)[:, 0]).all()
        scorer.sync({2: refs[2]})
        assert set(scorer.peft_model.peft_config) == {scorer.adapters[2]}  # the dropped weights are gone
        p, _ = scorer.score(prompts, "decomposition", WeightConfig("average"))
        np.testing.assert_allclose(p, each[:, 2], atol=1e-5, rtol=0)
        scorer.sync({})
        with pytest.raises(AllShardsExcludedError):
            scorer.score(prompts, "decomposition", WeightConfig("average"))
        scorer.sync(refs)  # a new fork when adapters come back
        np.testing.assert_allclose(scorer.adapter_predictions(prompts), each, atol=1e-6, rtol=0)


def test_a_broken_adapter_file_is_refused_before_anything_changes(built: Any) -> None:
    bb, md, _ = built
    refs = md.adapter_refs()
    with AggregatedScorer(bb, num_shards=K, source=md, adapters={0: refs[0]}) as scorer:
        shutil.copyfile(
            md.adapter_dir(0) / "adapter_model.safetensors", md.adapter_dir(2) / "adapter_model.safetensors"
        )
        with pytest.raises(ArtifactError):
            scorer.sync({0: refs[0], 2: refs[2]})
        assert scorer.serving == {0: refs[0]}


def test_an_empty_request_batch_scores_nothing(built: Any) -> None:
    bb, md, _ = built
    with AggregatedScorer.from_model_dir(bb, md) as scorer:
        p, omega = scorer.score([], "decomposition", ADAPTIVE)
    assert p.shape == (0,) and omega.shape == (0, K)
