"""LoRA training per shard, model directories and exact unlearning, on a tiny random Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apa.backbone import file_sha256
from apa.metrics import auc
from apa.partition import PartitionConfig
from apa.training import (
    ModelDir,
    TrainConfig,
    UnlearningError,
    answer_batch,
    answer_loss,
    build_model,
    erased_sample_ids,
    evaluate_model_dir,
    sample_digest,
    train_adapter,
    unlearn,
)
from model_fixtures import make_samples, tiny_backbone

FAST = TrainConfig(
    lr=3e-2, epochs=3, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)


def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_labels_mask_everything_but_the_answer_tokens(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    samples = make_samples(3)
    batch = answer_batch(bb, samples)
    for row, s in enumerate(samples):
        answer = tok(s.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == answer
        assert batch["input_ids"][row, -len(answer) :].tolist() == answer  # answer ends every row


def test_answer_loss_equals_full_logits_cross_entropy_on_answer_tokens(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    batch = answer_batch(bb, make_samples(4))
    span = batch["labels"].shape[1]
    with torch.no_grad():
        fast = answer_loss(bb, model, batch)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[:, -span - 1 : -1]
        full = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        )
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)


def test_training_learns_and_leaves_the_base_model_untouched(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, valid = make_samples(48, seed=1), make_samples(24, "valid", seed=2)
    result = train_adapter(bb, train, valid, FAST)
    assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    assert result.adapter_state and all("lora_" in k for k in result.adapter_state)
    after = model.state_dict()
    assert before.keys() == after.keys()  # LoRA layers were unloaded
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())


def test_retraining_with_the_same_seed_reproduces_the_adapter_exactly(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    train, valid = make_samples(16, seed=1), make_samples(8, "valid", seed=2)
    first = train_adapter(bb, train, valid, FAST)
    second = train_adapter(bb, train, valid, FAST)
    other_seed = train_adapter(
        bb, train, valid, TrainConfig(**{**FAST.to_json(), "target_modules": ("q_proj", "v_proj"), "seed": 1})
    )
    assert _state_equal(first.adapter_state, second.adapter_state)
    assert not _state_equal(first.adapter_state, other_seed.adapter_state)


def test_early_stopping_keeps_the_best_validation_epoch(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    config = TrainConfig(
        **{**FAST.to_json(), "target_modules": ("q_proj",), "epochs": 6, "patience": 1, "lr": 0.5}
    )
    result = train_adapter(bb, make_samples(16, seed=1), make_samples(16, "valid", seed=2), config)
    aucs = [m["valid_auc"] for m in result.metrics]
    assert result.best_epoch == int(np.nanargmax(aucs)) + 1
    assert len(result.metrics) <= 6


@pytest.fixture()
def model_dir(tiny_llama, tmp_path):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    splits = {
        "train": make_samples(24, seed=1),
        "valid": make_samples(8, "valid", seed=2),
        "test": make_samples(8, "test", seed=3),
    }
    build_model(
        bb, splits, tmp_path / "m", PartitionConfig(strategy="user", num_shards=3), FAST, progress=False
    )
    return bb, tmp_path / "m", splits


def test_model_dir_holds_peft_adapters_and_manifests_that_cover_the_partition(model_dir):
    bb, root, splits = model_dir
    md = ModelDir(root)
    manifests = md.manifests()
    assert [m["shard_id"] for m in manifests] == [0, 1, 2]
    covered = sorted(i for m in manifests for i in m["sample_ids"])
    assert covered == sorted(s.sample_id for s in splits["train"])
    for k, m in enumerate(manifests):
        assert m["sample_digest"] == sample_digest(m["sample_ids"])
        assert m["adapter_sha256"] == file_sha256(md.adapter_dir(k) / "adapter_model.safetensors")
        assert json.loads((md.adapter_dir(k) / "adapter_config.json").read_text())["r"] == FAST.lora_r
        assert m["base_model"] == "tiny-llama" and m["version"] == 1 and m["seed"] == FAST.seed
    assert md.partition().shards == [m["sample_ids"] for m in manifests]


def test_loaded_adapter_scores_like_the_trained_one(model_dir):
    bb, root, splits = model_dir
    md = ModelDir(root)
    prompts = [s.prompt for s in splits["test"]]
    peft_model = md.load_adapters(bb, [1])
    try:
        loaded = bb.score(prompts, model=peft_model)
    finally:
        peft_model.unload()
    base = bb.score(prompts)
    assert not np.allclose(loaded, base)  # the adapter changes predictions
    report = evaluate_model_dir(bb, root, "test", progress=False)
    assert set(report["shard_auc"]) == {0, 1, 2}
    assert report["shard_auc"][1] == pytest.approx(auc([s.label for s in splits["test"]], loaded))


def test_unlearning_a_user_retrains_only_the_shards_that_held_them(model_dir):
    bb, root, splits = model_dir
    md = ModelDir(root)
    before = md.manifests()
    user = splits["train"][0].user_id
    erased = erased_sample_ids([s for v in splits.values() for s in v], user_ids=[user])
    holding = {m["shard_id"] for m in before if erased & set(m["sample_ids"])}
    report = unlearn(root, erased, backbone=bb, progress=False)
    after = md.manifests()
    assert set(report.affected_shards) == holding and len(holding) == 1  # user partition: one shard
    for old, new in zip(before, after, strict=True):
        assert not erased & set(new["sample_ids"])
        if old["shard_id"] in holding:
            assert new["version"] == old["version"] + 1
            assert new["sample_ids"] == sorted(set(old["sample_ids"]) - erased)
        else:
            assert new == old  # untouched shard: same adapter, same manifest
    remaining = {s.sample_id for v in md.splits().values() for s in v}
    assert not remaining & erased
    assert all(s.user_id != user for v in md.splits().values() for s in v)  # every split


def test_unlearned_adapter_equals_one_trained_from_scratch_on_the_remainder(model_dir, tiny_llama):
    from safetensors.torch import load_file

    from apa.training import train_adapter as fresh_train

    bb, root, splits = model_dir
    md = ModelDir(root)
    victim = splits["train"][5]
    shard = md.partition().shard_of(victim.sample_id)
    unlearn(root, {victim.sample_id}, backbone=bb, progress=False)
    remainder = [s for s in splits["train"] if s.sample_id in set(md.manifest(shard)["sample_ids"])]
    valid = [s for s in splits["valid"]]
    expected = fresh_train(bb, remainder, valid, FAST).adapter_state
    saved = load_file(str(md.adapter_dir(shard) / "adapter_model.safetensors"))
    assert len(saved) == len(expected)
    for key, value in expected.items():
        match = [v for k, v in saved.items() if k.replace(".default", "") == key.replace(".default", "")]
        assert match and torch.equal(match[0], value)


def test_interaction_erasure_reaches_samples_holding_it_in_their_history():
    samples = make_samples(10)
    target = samples[3].interaction_ids[0]  # a history interaction of sample 3
    assert erased_sample_ids(samples, interaction_ids=[target]) == {samples[3].sample_id}
    assert erased_sample_ids(samples, user_ids=["nobody"]) == set()


def test_unlearn_refuses_to_finish_if_a_manifest_keeps_an_erased_sample(model_dir, monkeypatch):
    bb, root, splits = model_dir
    import apa.training as training

    real_save = training.ModelDir.save_adapter

    def leaky_save(self, backbone, shard, sample_ids, config, result, version):  # type: ignore[no-untyped-def]
        return real_save(
            self, backbone, shard, [*sample_ids, splits["train"][0].sample_id], config, result, version
        )

    monkeypatch.setattr(training.ModelDir, "save_adapter", leaky_save)
    with pytest.raises(UnlearningError, match="still holds erased"):
        unlearn(root, {splits["train"][0].sample_id}, backbone=bb, progress=False)


def test_length_grouped_batches_cover_every_sample_once_and_hold_similar_lengths():
    from apa.training import _epoch_order

    samples = make_samples(40, seed=4)
    config = TrainConfig(batch_size=8, micro_batch_size=8, group_by_length=True)
    order = _epoch_order(samples, config, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(40))
    lengths = sorted(len(s.prompt) for s in samples)
    batches = [order[i : i + 8] for i in range(0, 40, 8)]
    spans = sorted(
        max(len(samples[i].prompt) for i in b) - min(len(samples[i].prompt) for i in b) for b in batches
    )
    assert spans[-1] <= max(lengths[i + 7] - lengths[i] for i in range(0, 33, 8))
    plain = _epoch_order(
        samples, TrainConfig(batch_size=8, micro_batch_size=8), torch.Generator().manual_seed(0)
    )
    assert plain != order
