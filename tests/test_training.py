"""LoRA training per shard, model directories and exact unlearning, on a tiny random Llama."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from apa.training import EpochRecord, TrainConfig, answer_batch, answer_loss, seeded, train_adapter
from model_fixtures import loadable_tiny_backbone, make_samples, tiny_backbone

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


def _lora_model(tiny_llama, seed: int = 5):
    """(peft model, backbone) over the tiny Llama, LoRA on q/v with random A and B."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)  # freezes the base weights; the LoRA layers come after
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero B, so the prefix's LoRA inputs get gradients as well
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft, bb


def test_shared_prefix_batch_gives_the_plain_loss_and_gradients(tiny_llama):
    """The prompts' common tokens run once (batch 1, with gradients through their keys and values):
    loss and every LoRA gradient equal those of the left-padded full rows."""
    peft, bb = _lora_model(tiny_llama)
    tok = bb.tokenizer
    samples = make_samples(5, seed=3)
    assert len({s.output for s in samples}) == 2  # Yes and No answers (different token spans)
    plain, shared = answer_batch(bb, samples), answer_batch(bb, samples, shared_prefix=True)
    prompt_tokens = min(len(tok(s.prompt)["input_ids"]) for s in samples)
    assert "prefix_ids" not in plain and shared["prefix_ids"].shape[1] > prompt_tokens // 3
    assert torch.equal(plain["labels"], shared["labels"])
    grads = []
    for batch in (plain, shared):
        peft.zero_grad(set_to_none=True)
        loss = answer_loss(bb, peft, batch, bf16=False)
        loss.backward()
        grads.append(
            (loss.item(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad})
        )
    (loss_plain, g_plain), (loss_shared, g_shared) = grads
    assert loss_shared == pytest.approx(loss_plain, rel=1e-5)
    assert g_plain.keys() == g_shared.keys() and len(g_plain) > 0
    layer0 = [n for n in g_plain if ".layers.0." in n and "lora_A" in n]
    assert layer0 and all(g_plain[n].abs().sum() > 0 for n in layer0)  # the prefix's tokens matter
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], rtol=1e-4, atol=1e-6)


def test_shared_prefix_gradients_are_bit_for_bit_the_same_on_one_or_two_threads():
    """A retrain must not depend on the worker's thread count: with odd micro-batch sizes a
    contiguous gather into the head made the last bits differ between 1 and 2 threads."""
    from peft import get_peft_model

    from apa.training import _num_layers, lora_config

    bb = loadable_tiny_backbone()
    with seeded(0, bb.device):
        peft = get_peft_model(
            bb.fork_model(), lora_config(TrainConfig(lora_dropout=0.0), _num_layers(bb.model))
        )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    threads = torch.get_num_threads()
    try:
        for size in (2, 3, 5):
            batch = answer_batch(bb, make_samples(size, seed=size, user_prefix="x-47"), shared_prefix=True)
            assert "prefix_ids" in batch
            grads = []
            for count in (1, 2):
                torch.set_num_threads(count)
                peft.zero_grad(set_to_none=True)
                answer_loss(bb, peft, batch, bf16=False).backward()
                grads.append({n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None})
            assert grads[0].keys() == grads[1].keys()
            assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]), size
    finally:
        torch.set_num_threads(threads)


def test_a_batch_that_cannot_share_a_prefix_uses_the_plain_layout(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    assert "prefix_ids" not in answer_batch(bb, make_samples(1), shared_prefix=True)  # one row
    short = tiny_backbone(model, tok, max_length=24)  # prompts would be cut from the left
    batch = answer_batch(short, make_samples(3), shared_prefix=True)
    assert "prefix_ids" not in batch and batch["input_ids"].shape[1] == 24


def test_training_with_a_shared_prefix_matches_plain_training(tiny_llama):
    """Without dropout the two layouts train the same adapter (up to float summation order)."""
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    train, valid = make_samples(16, seed=1), make_samples(12, "valid", seed=2)
    config = replace(FAST, epochs=2, lr=1e-2)
    plain = train_adapter(bb, train, valid, replace(config, shared_prefix=False))
    shared = train_adapter(bb, train, valid, config)
    for a, b in zip(plain.metrics, shared.metrics, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        assert a.valid_auc == pytest.approx(b.valid_auc, abs=1e-6)
    for name, value in plain.adapter_state.items():
        torch.testing.assert_close(shared.adapter_state[name], value, rtol=1e-3, atol=1e-5)
    assert TrainConfig.from_json({"lr": 1e-3}).shared_prefix is False  # recorded before the field


def test_training_learns_and_owns_its_model(tiny_llama):
    """Training wraps its own fork: the backbone's modules, weights, config and the global RNG are
    exactly as they were, and peft never warns about wrapping a model twice."""
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = {name: id(m) for name, m in model.named_modules()}
    config_before = bb.config
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    train, valid = make_samples(48, seed=1), make_samples(24, "valid", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any peft/transformers warning fails the test
        result = train_adapter(bb, train, valid, replace(FAST, bf16_autocast=True))
        result_again = train_adapter(bb, train, valid, FAST)
    assert result.metrics[-1].loss < result.metrics[0].loss
    assert result.adapter_state and all("lora_" in k for k in result.adapter_state)
    assert result.adapter_config["r"] == FAST.lora_r and result_again.adapter_state
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {name: id(m) for name, m in model.named_modules()} == modules_before  # no LoRA layer ever went in
    assert not any(p.requires_grad for p in model.parameters())
    assert bb.config is config_before and bb.model is model
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global seed is left alone


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


def test_early_stopping_keeps_the_best_validation_epoch(tiny_llama, caplog):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    config = TrainConfig(
        **{**FAST.to_json(), "target_modules": ("q_proj",), "epochs": 6, "patience": 1, "lr": 0.5}
    )
    with caplog.at_level(logging.INFO, logger="apa.training"):
        result = train_adapter(bb, make_samples(16, seed=1), make_samples(16, "valid", seed=2), config)
    aucs = [np.nan if m.valid_auc is None else m.valid_auc for m in result.metrics]
    assert result.best_epoch == int(np.nanargmax(aucs)) + 1
    assert len(result.metrics) <= 6
    # each epoch logs its AUC and where early stopping stands, in words, not a repr
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines) == len(result.metrics)
    last = result.metrics[-1]
    assert f"loss {last.loss:.4f}" in lines[-1] and "EpochRecord" not in lines[-1]
    assert (
        f"best epoch {result.best_epoch}, " in lines[-1] and "of patience 1 without improvement" in lines[-1]
    )


def test_an_epoch_record_reads_as_words():
    assert str(EpochRecord(2, 32, 0.25, 0.61234)) == "32 steps, loss 0.2500, valid AUC 0.6123"
    assert str(EpochRecord(1, 8, 0.5)) == "8 steps, loss 0.5000, valid AUC not evaluated"


def test_without_validation_every_epoch_runs_and_the_last_is_kept(tiny_llama, caplog):
    """valid_eval_size=0 (`apa experiment --early_stopping false`): the adapter fits its shard."""
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    config = TrainConfig(
        **{**FAST.to_json(), "target_modules": ("q_proj",), "epochs": 3, "patience": 1, "lr": 0.5}
    )
    train, valid = make_samples(16, seed=1), make_samples(16, "valid", seed=2)
    with caplog.at_level(logging.INFO, logger="apa.training"):
        result = train_adapter(bb, train, valid, replace(config, valid_eval_size=0))
    assert [m.epoch for m in result.metrics] == [1, 2, 3]
    # the log does not speak of a patience that plays no part
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines) == 3 and all("latest epoch is kept" in line for line in lines)
    assert not any("patience" in line for line in lines)
    assert result.best_epoch == 3 and all(m.valid_auc is None for m in result.metrics)
    # the kept state is the last epoch's: training one epoch less gives a different adapter
    shorter = train_adapter(bb, train, valid, replace(config, valid_eval_size=0, epochs=2))
    assert not _state_equal(result.adapter_state, shorter.adapter_state)


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
