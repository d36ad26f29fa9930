"""Shared-prefix scoring of one ranking request (`apa.aggregation.prefix`) and per-request ω.

The candidates' prompts share their instruction and history; computing those tokens once must give
the same P(Yes) as scoring every full prompt, with the base model, one adapter or a mixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from apa.aggregation import (
    AggregatedScorer,
    MixtureLoRA,
    WeightConfig,
    aggregation_weights,
    common_prefix_length,
    lora_layers,
    score_shared_prefix,
)
from apa.catalogue import HistoryItem, recommend_prompt
from apa.prompts import request_prefix
from erasure_fixtures import build_tiny_model
from model_fixtures import loadable_tiny_backbone, tiny_backbone

K = 3
NAMES = [f"shard_{k}" for k in range(K)]
TITLES = [
    "Fargo (1996)",
    "Casino (1995)",
    "Brazil",
    "Babe (1995), a longer title",
    "Jaws",
    "'Til There Was You (1997)",
]
HISTORY = [
    HistoryItem("Toy Story (1995)", True),
    HistoryItem("Heat (1995)", False),
    HistoryItem("Alien (1979)", True),
]


def _prompts(history: list[HistoryItem] = HISTORY) -> list[str]:
    return [recommend_prompt(history, title) for title in TITLES]


@pytest.fixture()
def peft_model(tiny_llama: Any) -> Iterator[tuple[PeftModel, Any]]:
    model, tok = tiny_llama
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft.add_adapter(name, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(peft, NAMES).values():
            for name in NAMES:
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    peft.eval()
    yield peft, tok


def test_common_prefix_leaves_every_sequence_a_token() -> None:
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 1
    assert common_prefix_length([[7, 1], [8, 1]]) == 0
    assert common_prefix_length([]) == 0


def test_request_prefix_is_the_prompt_without_its_target() -> None:
    prompts = _prompts()
    prefix = request_prefix(prompts[0])
    assert prefix.endswith("Whether the user will like the target movie")
    assert all(request_prefix(p) == prefix and p.startswith(prefix) for p in prompts)
    assert request_prefix("no target here") == "no target here"
    other = recommend_prompt(HISTORY[:2], TITLES[0])
    assert request_prefix(other) != prefix  # another history is another request


def test_shared_prefix_scores_equal_full_prompts_with_the_base_model(tiny_llama: Any) -> None:
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok, batch_size=4)
    prompts = _prompts()
    full = bb.score(prompts)
    for chunk in (1, 4, len(prompts)):
        fast, shared = score_shared_prefix(bb, model, prompts, chunk_size=chunk)
        assert shared > 0.6 * min(len(tok(p)["input_ids"]) for p in prompts)  # most tokens run once
        np.testing.assert_allclose(fast, full, atol=1e-5)
    assert len(set(np.round(full, 6))) > 1  # the candidates really differ


@pytest.mark.parametrize("level", ["decomposition", "non_decomposition"])
def test_shared_prefix_under_a_mixture_equals_the_mixture_on_full_prompts(
    peft_model: Any, level: Any
) -> None:
    peft, tok = peft_model
    bb = tiny_backbone(peft.get_base_model(), tok, batch_size=4)
    mix = MixtureLoRA(peft, NAMES)
    prompts = _prompts()
    row = np.array([[0.5, 0.2, 0.3]])
    omega = np.repeat(row, len(prompts), axis=0)
    full = mix.score(
        lambda p: bb.score(p, model=peft, batch_size=len(p)), prompts, omega, level, batch_size=4
    )
    fast, shared = score_shared_prefix(
        bb, peft, prompts, context=lambda rows: mix.apply(np.repeat(row, rows, axis=0), level), chunk_size=4
    )
    assert shared > 0
    np.testing.assert_allclose(fast, full, atol=1e-5)
    base = bb.score(prompts, model=peft.get_base_model())
    assert not np.allclose(fast, base, atol=1e-3)  # the mixture is really applied to prefix and suffix


def test_what_cannot_share_a_prefix_is_scored_the_plain_way(tiny_llama: Any) -> None:
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    one = _prompts()[:1]
    p, shared = score_shared_prefix(bb, model, one)
    assert shared == 0 and np.allclose(p, bb.score(one), atol=1e-6)
    short = tiny_backbone(model, tok, max_length=16)  # these prompts would be truncated
    p, shared = score_shared_prefix(short, model, _prompts())
    assert shared == 0 and np.allclose(p, short.score(_prompts()), atol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "m", shards=K)


def test_score_request_is_the_scorer_with_the_prefix_omega_for_every_candidate(model_dir: Path) -> None:
    scorer = AggregatedScorer.from_model_dir(loadable_tiny_backbone(), model_dir, cache_dir=None)
    prompts = _prompts()
    config = WeightConfig(strategy="adaptive", tau=5.0, top_n=4)
    p, omega, shared = scorer.score_request(prompts, "decomposition", config, excluded={2})
    assert shared > 0
    prefix = request_prefix(prompts[0])
    valid = scorer.valid_pool
    expected = aggregation_weights(
        config,
        scorer.embed([prefix]),
        num_shards=K,
        excluded={2},
        valid_embeddings=scorer.embed([request_prefix(s.prompt) for s in valid]),
        valid_labels=np.array([s.label for s in valid], dtype=float),
        valid_predictions=np.nan_to_num(scorer.valid_prediction_matrix([0, 1]), nan=0.5),
    )
    np.testing.assert_allclose(omega, np.repeat(expected, len(prompts), axis=0), atol=1e-6)
    assert np.all(omega[:, 2] == 0)
    full, _ = scorer.score(prompts, "decomposition", excluded={2}, omega=omega)
    np.testing.assert_allclose(p, full, atol=1e-5)
    with pytest.raises(ValueError, match="share their prefix"):
        scorer.score_request(prompts + [recommend_prompt(HISTORY[:1], "Jaws")])
    # erased validation samples leave the prefix pool too
    before = len(scorer.valid_prefix_embeddings())
    assert scorer.forget([valid[0].sample_id]) == 1
    assert len(scorer.valid_prefix_embeddings()) == before - 1
