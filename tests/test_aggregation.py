"""Aggregation: weight strategies (Eq. 7-8) and batched LoRA mixtures (Eq. 5-6) on the tiny Llama.

Equivalences are checked three ways: the batched in-layer mixture, a dense per-request merge of
ΔW into the base weights (independent of peft's forward), and peft's own `add_weighted_adapter`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from apa.aggregation import (
    AllShardsExcludedError,
    MixtureLoRA,
    WeightConfig,
    aggregation_weights,
    cache_sample_ids,
    cached_embeddings,
    embedding_key,
    export_merged_adapter,
    lora_layers,
    prune_caches,
    valid_predictions,
    write_valid_embeddings,
    write_valid_predictions,
)
from apa.prompts import MOVIE_INSTRUCTION, format_prompt

K, R, ALPHA = 3, 4, 8
NAMES = [f"shard_{k}" for k in range(K)]
ATOL = 1e-5  # fp32 equivalences: same maths, different summation order
INPUTS = [
    "User Preference : Toy Story , Heat . Whether the user will enjoy target movie : Fargo",
    "User Unpreference : Alien",
    "User Preference : Casino , Brazil , Babe , Clerks , Jaws ( 1995 ) , Rocky ( 1976 ) , Vertigo",
    "target movie : Psycho ( 1960 ) , Titanic",
]
PROMPTS = [format_prompt(MOVIE_INSTRUCTION, text) for text in INPUTS]
# One ω row per prompt; row 1 gives shard 2 no weight (a stale shard).
OMEGA = torch.tensor(
    [[0.5, 0.3, 0.2], [0.7, 0.3, 0.0], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float32
)


# ------------------------------------------------------------------------------------------------
# helpers


def encode(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch with position ids that skip the padding (as the real backbone does)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def last_logits(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """fp32 logits at the last position (the answer position under left padding)."""
    with torch.no_grad():
        return model(**encode(tokenizer, prompts)).logits[:, -1, :].float()


def p_yes(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> np.ndarray:
    """P(Yes) = softmax over the Yes/No first-token logits at the last position."""
    yes, no = tokenizer.convert_tokens_to_ids(["Yes", "No"])
    logits = last_logits(model, tokenizer, prompts)[:, [yes, no]]
    return torch.softmax(logits, dim=-1)[:, 0].numpy().astype(np.float64)


def dense_merge(
    base: torch.nn.Module, peft_model: PeftModel, omega: torch.Tensor, level: str
) -> torch.nn.Module:
    """A copy of the base model with ω merged straight into W_0 (no LoRA modules at all)."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    for name, layer in lora_layers(peft_model, NAMES).items():
        a = [layer.lora_A[n].weight.detach() for n in NAMES]
        b = [layer.lora_B[n].weight.detach() for n in NAMES]
        s = [layer.scaling[n] for n in NAMES]
        if level == "non_decomposition":  # Σ ω_k s_k B_k A_k
            delta = sum(omega[k] * s[k] * b[k] @ a[k] for k in range(K))
        else:  # s (Σ ω_k B_k)(Σ ω_k A_k); all adapters share s here
            delta = s[0] * sum(omega[k] * b[k] for k in range(K)) @ sum(omega[k] * a[k] for k in range(K))
        target = modules[name.removeprefix("base_model.model.")]
        assert isinstance(target, torch.nn.Linear)
        with torch.no_grad():
            target.weight += delta
    return merged


@pytest.fixture()
def lora(tiny_llama: Any) -> Iterator[tuple[PeftModel, Any, torch.nn.Module]]:
    """(peft model with K random adapters, tokenizer, untouched copy of the base model)."""
    model, tokenizer = tiny_llama
    base = copy.deepcopy(model)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(peft_model, NAMES).values():
            for name in NAMES:  # peft inits B = 0; random A and B make every delta non-trivial
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(torch.randn(a.shape, generator=gen) * 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
    peft_model.eval()
    yield peft_model, tokenizer, base


def single_adapter_logits(
    peft_model: PeftModel, tokenizer: Any, name: str, prompts: list[str]
) -> torch.Tensor:
    peft_model.set_adapter(name)
    return last_logits(peft_model, tokenizer, prompts)


def peft_weighted_logits(
    peft_model: PeftModel, tokenizer: Any, weights: list[float], combination: str, prompts: list[str]
) -> torch.Tensor:
    name = f"peft_{combination}"
    peft_model.add_weighted_adapter(NAMES, weights, name, combination_type=combination)
    peft_model.eval()  # the new adapter's modules are created in training mode (dropout on)
    try:
        return single_adapter_logits(peft_model, tokenizer, name, prompts)
    finally:
        peft_model.set_adapter(NAMES[0])
        peft_model.delete_adapter(name)


# ------------------------------------------------------------------------------------------------
# mixture levels


def test_adapters_differ_so_equivalences_are_meaningful(lora: Any) -> None:
    peft_model, tok, base = lora
    logits = [single_adapter_logits(peft_model, tok, n, PROMPTS) for n in NAMES]
    base_logits = last_logits(base, tok, PROMPTS)
    for k in range(K):
        assert (logits[k] - base_logits).abs().max() > 0.1
        assert (logits[k] - logits[(k + 1) % K]).abs().max() > 0.1
    assert (encode(tok, PROMPTS)["attention_mask"] == 0).any(), "the batch must contain left padding"


def test_non_decomposition_batch_equals_dense_merge_and_peft_cat(lora: Any) -> None:
    peft_model, tok, base = lora
    mix = MixtureLoRA(peft_model, NAMES)
    with mix.apply(OMEGA, level="non_decomposition"):
        batched = last_logits(peft_model, tok, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        dense = last_logits(dense_merge(base, peft_model, OMEGA[i], "non_decomposition"), tok, [prompt])
        # peft's `cat`: A = [w_k s_k A_k], B = [B_k], new scaling 1 -> Σ w_k s_k B_k A_k exactly
        cat = peft_weighted_logits(peft_model, tok, OMEGA[i].tolist(), "cat", [prompt])
        torch.testing.assert_close(batched[i], dense[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched[i], cat[0], atol=ATOL, rtol=0)


def test_decomposition_batch_equals_dense_merge_and_peft_linear(lora: Any) -> None:
    peft_model, tok, base = lora
    mix = MixtureLoRA(peft_model, NAMES)
    with mix.apply(OMEGA, level="decomposition"):
        batched = last_logits(peft_model, tok, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        dense = last_logits(dense_merge(base, peft_model, OMEGA[i], "decomposition"), tok, [prompt])
        # peft's `linear` multiplies A and B each by sqrt(w_k * s_k) and gives the new adapter scaling 1
        # (lora_alpha = r), i.e. (Σ sqrt(w s) B)(Σ sqrt(w s) A). Passing w = ω² (ω >= 0) yields
        # s·(Σ ω_k B_k)(Σ ω_k A_k): exactly Eq. 5 with the common scaling s.
        linear = peft_weighted_logits(peft_model, tok, (OMEGA[i] ** 2).tolist(), "linear", [prompt])
        torch.testing.assert_close(batched[i], dense[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched[i], linear[0], atol=ATOL, rtol=0)


def test_decomposition_and_non_decomposition_differ_for_mixed_weights(lora: Any) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)
    out = {}
    for level in ("decomposition", "non_decomposition"):
        with mix.apply(OMEGA, level=level):  # type: ignore[arg-type]
            out[level] = last_logits(peft_model, tok, PROMPTS)
    assert (out["decomposition"] - out["non_decomposition"]).abs().max() > 1e-2


@pytest.mark.parametrize("level", ["decomposition", "non_decomposition"])
def test_one_hot_weights_equal_the_single_adapter(lora: Any, level: Any) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)
    for k, name in enumerate(NAMES):
        one_hot = torch.zeros(len(PROMPTS), K)
        one_hot[:, k] = 1.0
        with mix.apply(one_hot, level=level):
            mixed = last_logits(peft_model, tok, PROMPTS)
        alone = single_adapter_logits(peft_model, tok, name, PROMPTS)
        torch.testing.assert_close(mixed, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("level", ["decomposition", "non_decomposition"])
def test_each_row_of_a_mixed_left_padded_batch_equals_that_row_alone(lora: Any, level: Any) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)
    with mix.apply(OMEGA, level=level):
        batched = last_logits(peft_model, tok, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        with mix.apply(OMEGA[i : i + 1], level=level):
            alone = last_logits(peft_model, tok, [prompt])
        torch.testing.assert_close(batched[i], alone[0], atol=ATOL, rtol=0)


def test_prediction_level_is_the_mean_of_single_adapter_scores(lora: Any) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)
    per_adapter = np.stack(
        [(peft_model.set_adapter(n), p_yes(peft_model, tok, PROMPTS))[1] for n in NAMES], 1
    )
    called_with: list[list[str]] = []

    def score_fn(prompts: list[str]) -> np.ndarray:
        called_with.append(list(peft_model.active_adapters))
        return p_yes(peft_model, tok, prompts)

    np.testing.assert_allclose(mix.predict(score_fn, PROMPTS), per_adapter.mean(axis=1), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        mix.score(score_fn, PROMPTS, OMEGA, level="prediction"),
        (OMEGA.double().numpy() * per_adapter).sum(axis=1),
        atol=1e-6,
        rtol=0,
    )
    # with shard 2 weighted 0 in every row, its adapter is never run
    called_with.clear()
    stale = OMEGA.clone()
    stale[:, 2] = 0
    mix.predict(score_fn, PROMPTS, stale / stale.sum(1, keepdim=True))
    assert called_with == [[NAMES[0]], [NAMES[1]]]


def test_score_keeps_rows_aligned_with_a_length_sorting_score_fn(lora: Any) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)
    assert sorted(PROMPTS, key=len) != PROMPTS

    def backbone_like(prompts: list[str]) -> np.ndarray:
        """Scores one batch stably sorted by length and restores the order, like Backbone.score."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = np.zeros(len(prompts))
        out[order] = p_yes(peft_model, tok, [prompts[i] for i in order])
        return out

    expected = []
    for i, prompt in enumerate(PROMPTS):
        with mix.apply(OMEGA[i : i + 1], level="decomposition"):
            expected.append(p_yes(peft_model, tok, [prompt])[0])
    for batch_size in (3, 16):
        got = mix.score(backbone_like, PROMPTS, OMEGA, "decomposition", batch_size=batch_size)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", ["decomposition", "prediction"])
def test_a_long_pass_can_show_its_progress_without_changing_a_score(
    lora: Any, level: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)

    def score_fn(prompts: list[str]) -> np.ndarray:
        return p_yes(peft_model, tok, prompts)

    quiet = mix.score(score_fn, PROMPTS, OMEGA, level, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = mix.score(score_fn, PROMPTS, OMEGA, level, batch_size=2, progress=True)
    np.testing.assert_array_equal(shown, quiet)
    # a bar over the batches (decomposition) or over the adapters' passes (prediction), on stderr
    total = -(-len(PROMPTS) // 2) if level == "decomposition" else K
    assert f"serve {level}" in (err := capsys.readouterr().err) and f"{total}/{total}" in err


@pytest.mark.parametrize("level", ["decomposition", "non_decomposition"])
def test_exported_adapter_reloaded_by_peft_reproduces_the_mixture(
    lora: Any, level: Any, tmp_path: Path
) -> None:
    peft_model, tok, base = lora
    omega = torch.tensor([0.6, 0.0, 0.4])  # shard 1 stale: must not be in the file
    mix = MixtureLoRA(peft_model, NAMES)
    with mix.apply(omega.expand(len(PROMPTS), K), level=level):
        expected = last_logits(peft_model, tok, PROMPTS)
    out = export_merged_adapter(peft_model, NAMES, omega, level, tmp_path / "merged")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == (2 * R if level == "non_decomposition" else R)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    torch.testing.assert_close(last_logits(reloaded, tok, PROMPTS), expected, atol=ATOL, rtol=0)


def test_bf16_autocast_on_cpu_tracks_the_fp32_mixture(lora: Any) -> None:
    peft_model, tok, base = lora
    mix = MixtureLoRA(peft_model, NAMES)
    with mix.apply(OMEGA, level="non_decomposition"):
        fp32 = last_logits(peft_model, tok, PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = last_logits(peft_model, tok, PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_bf16 = last_logits(base, tok, PROMPTS)
    err = (bf16 - fp32).abs().max().item()
    assert torch.isfinite(bf16).all()
    assert err < 0.15  # bf16 has ~3 significant digits; logits are O(1)
    assert (bf16 - base_bf16).abs().max().item() > 5 * err  # the mixture really is applied under autocast


def test_stacks_are_rebuilt_when_an_adapter_changes(lora: Any) -> None:
    peft_model, tok, _ = lora
    mix = MixtureLoRA(peft_model, NAMES)
    one_hot = torch.zeros(len(PROMPTS), K)
    one_hot[:, 1] = 1.0
    with mix.apply(one_hot, level="decomposition"):
        before = last_logits(peft_model, tok, PROMPTS)
    state = {k: v for k, v in peft_model.state_dict().items() if ".lora_B.shard_1." in k}
    peft_model.load_state_dict({k: -v for k, v in state.items()}, strict=False)  # a reloaded adapter
    with mix.apply(one_hot, level="decomposition"):
        after = last_logits(peft_model, tok, PROMPTS)
    alone = single_adapter_logits(peft_model, tok, NAMES[1], PROMPTS)
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("level", ["decomposition", "non_decomposition"])
def test_an_adapter_with_zero_weight_in_every_row_is_never_computed(lora: Any, level: Any) -> None:
    peft_model, tok, _ = lora
    omega = OMEGA.clone()
    omega[:, 2] = 0
    omega /= omega.sum(dim=1, keepdim=True)
    with torch.no_grad():  # a stale shard whose tensors are garbage (e.g. a half-written reload)
        for layer in lora_layers(peft_model, NAMES).values():
            layer.lora_B[NAMES[2]].weight.fill_(math.nan)
    with MixtureLoRA(peft_model, NAMES).apply(omega, level=level):
        batched = last_logits(peft_model, tok, PROMPTS)
    with MixtureLoRA(peft_model, NAMES[:2]).apply(omega[:, :2], level=level):
        without = last_logits(peft_model, tok, PROMPTS)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, without, atol=ATOL, rtol=0)


def test_apply_restores_the_model_and_rejects_misuse(lora: Any) -> None:
    peft_model, tok, _ = lora
    peft_model.set_adapter(NAMES[1])
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    mix = MixtureLoRA(peft_model, NAMES)
    with mix.apply(OMEGA, level="decomposition"):
        with pytest.raises(ValueError, match="weight rows"):
            last_logits(peft_model, tok, PROMPTS[:2])
        with pytest.raises(RuntimeError, match="nested"):
            with mix.apply(OMEGA):
                pass
    assert peft_model.active_adapters == [NAMES[1]]
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == grads
    torch.testing.assert_close(
        last_logits(peft_model, tok, PROMPTS), single_adapter_logits(peft_model, tok, NAMES[1], PROMPTS)
    )
    with pytest.raises(AllShardsExcludedError):
        with mix.apply(torch.zeros(len(PROMPTS), K)):
            pass
    with pytest.raises(ValueError, match="weights must be"):
        with mix.apply(torch.ones(len(PROMPTS), K + 1)):
            pass


# ------------------------------------------------------------------------------------------------
# weight strategies


def random_inputs(seed: int = 0, n_req: int = 7, n_valid: int = 30, d: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "request_embeddings": rng.normal(size=(n_req, d)),
        "valid_embeddings": rng.normal(size=(n_valid, d)),
        "valid_labels": rng.integers(0, 2, size=n_valid).astype(float),
        "valid_predictions": rng.uniform(size=(n_valid, K)),
        "centroids": rng.normal(size=(K, d)),
    }


def brute_force_errors(inputs: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Eq. 7 one request at a time, straight from the definition."""
    out = []
    for q in inputs["request_embeddings"]:
        v = inputs["valid_embeddings"]
        sims = v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
        nearest = np.argsort(-sims)[:n]
        y, p = inputs["valid_labels"][nearest], inputs["valid_predictions"][nearest]
        out.append(np.abs(y[:, None] - p).mean(axis=0))
    return np.array(out)


@pytest.mark.parametrize("strategy", ["adaptive", "average", "major", "semantic"])
def test_every_strategy_gives_rows_that_sum_to_one(strategy: Any) -> None:
    inputs = random_inputs()
    omega = aggregation_weights(WeightConfig(strategy=strategy, tau=10.0, top_n=5), **inputs)
    assert omega.shape == (7, K)
    assert (omega >= 0).all()
    np.testing.assert_allclose(omega.sum(axis=1), 1.0, atol=1e-12)


def test_adaptive_weights_are_softmax_of_minus_tau_neighbour_error() -> None:
    inputs = random_inputs()
    omega = aggregation_weights(WeightConfig(tau=7.0, top_n=4), **inputs)
    logits = -7.0 * brute_force_errors(inputs, 4)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(omega, expected, atol=1e-12)


@pytest.mark.parametrize("strategy", ["adaptive", "average", "major", "semantic"])
def test_excluded_shards_get_exactly_zero_and_the_rest_renormalise(strategy: Any) -> None:
    inputs = random_inputs()
    config = WeightConfig(strategy=strategy, tau=10.0, top_n=5)
    full = aggregation_weights(config, **inputs)
    # a stale shard may not even have validation predictions yet
    inputs["valid_predictions"][:, 1] = np.nan
    omega = aggregation_weights(config, **inputs, excluded={1})
    assert (omega[:, 1] == 0.0).all()
    np.testing.assert_allclose(omega.sum(axis=1), 1.0, atol=1e-12)
    if strategy != "major":
        kept = full[:, [0, 2]]
        np.testing.assert_allclose(omega[:, [0, 2]], kept / kept.sum(axis=1, keepdims=True), atol=1e-12)
    else:
        errors = brute_force_errors(random_inputs(), 5)
        errors[:, 1] = np.inf
        np.testing.assert_array_equal(omega.argmax(axis=1), errors.argmin(axis=1))


def test_all_shards_excluded_raises() -> None:
    with pytest.raises(AllShardsExcludedError, match="excluded") as info:
        aggregation_weights(WeightConfig(), **random_inputs(), excluded={0, 1, 2})
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ValueError, match="out of range"):
        aggregation_weights(WeightConfig(), **random_inputs(), excluded={3})


def test_tau_zero_is_uniform_and_large_tau_is_one_hot_on_lowest_error() -> None:
    inputs = random_inputs()
    uniform = aggregation_weights(WeightConfig(tau=0.0), **inputs)
    np.testing.assert_allclose(uniform, np.full((7, K), 1 / K), atol=1e-12)
    best = brute_force_errors(inputs, 20).argmin(axis=1)
    for tau in (1e6, math.inf):
        omega = aggregation_weights(WeightConfig(tau=tau), **inputs)
        np.testing.assert_allclose(omega, np.eye(K)[best], atol=1e-12)


def test_major_is_one_hot_on_the_best_adaptive_score_with_ties_to_lowest_index() -> None:
    inputs = random_inputs()
    omega = aggregation_weights(WeightConfig(strategy="major", top_n=6), **inputs)
    np.testing.assert_array_equal(omega, np.eye(K)[brute_force_errors(inputs, 6).argmin(axis=1)])
    inputs["valid_predictions"][:] = 0.5  # every adapter equally wrong: a three-way tie
    tie = aggregation_weights(WeightConfig(strategy="major"), **inputs)
    np.testing.assert_array_equal(tie, np.eye(K)[np.zeros(7, dtype=int)])
    tie = aggregation_weights(WeightConfig(strategy="major"), **inputs, excluded={0})
    np.testing.assert_array_equal(tie, np.eye(K)[np.ones(7, dtype=int)])


def test_adaptive_picks_the_adapter_that_is_right_on_the_nearest_neighbours() -> None:
    # two clusters of validation samples; adapter 0 is right on cluster A, adapter 1 on cluster B,
    # adapter 2 is mediocre everywhere
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.normal(size=(10, 3))
    b = np.array([0.0, 1.0, 0.0]) + 0.05 * rng.normal(size=(10, 3))
    labels = np.tile([1.0, 0.0], 10)
    right, wrong = labels[:10], 1 - labels[:10]
    preds = np.zeros((20, K))
    preds[:10, 0], preds[10:, 0] = right, wrong
    preds[:10, 1], preds[10:, 1] = wrong, right
    preds[:, 2] = 0.5
    requests = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    omega = aggregation_weights(
        WeightConfig(top_n=10),
        requests,
        valid_embeddings=np.vstack([a, b]),
        valid_labels=labels,
        valid_predictions=preds,
    )
    np.testing.assert_array_equal(omega.argmax(axis=1), [0, 1])
    assert omega[0, 0] > 0.999 and omega[1, 1] > 0.999


def test_masked_validation_samples_never_influence_the_weights() -> None:
    inputs = random_inputs(n_valid=30)
    erased = np.zeros(30, dtype=bool)
    erased[:10] = True
    kept = {
        **inputs,
        "valid_embeddings": inputs["valid_embeddings"][~erased],
        "valid_labels": inputs["valid_labels"][~erased],
        "valid_predictions": inputs["valid_predictions"][~erased],
    }
    config = WeightConfig(tau=50.0, top_n=5)
    expected = aggregation_weights(config, **kept)
    # make the erased samples the nearest neighbours of every request, with adversarial errors
    poisoned = copy.deepcopy(inputs)
    poisoned["valid_embeddings"][erased] = inputs["request_embeddings"][np.arange(10) % 7]
    poisoned["valid_labels"][erased] = 1.0
    poisoned["valid_predictions"][erased] = [0.0, 1.0, 0.0]
    assert not np.allclose(aggregation_weights(config, **poisoned), expected)  # they would matter...
    masked = aggregation_weights(config, **poisoned, valid_mask=~erased)
    np.testing.assert_array_equal(masked, expected)  # ...but masked they have no influence at all


def test_semantic_weights_follow_cosine_similarity_to_centroids() -> None:
    inputs = random_inputs()
    config = WeightConfig(strategy="semantic", semantic_tau=3.0)
    omega = aggregation_weights(config, inputs["request_embeddings"], centroids=inputs["centroids"])
    q, c = inputs["request_embeddings"], inputs["centroids"]
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    np.testing.assert_allclose(omega, np.exp(3 * cos) / np.exp(3 * cos).sum(1, keepdims=True), atol=1e-12)
    hard = aggregation_weights(
        WeightConfig(strategy="semantic", semantic_tau=math.inf), q, centroids=c, excluded={0}
    )
    cos[:, 0] = -np.inf
    np.testing.assert_array_equal(hard, np.eye(K)[cos.argmax(axis=1)])


def test_average_needs_only_k_and_missing_inputs_are_reported() -> None:
    omega = aggregation_weights(WeightConfig(strategy="average"), np.ones((2, 4)), num_shards=4, excluded={3})
    np.testing.assert_array_equal(omega, np.tile([1 / 3, 1 / 3, 1 / 3, 0.0], (2, 1)))
    with pytest.raises(ValueError, match="valid_embeddings"):
        aggregation_weights(WeightConfig(), np.ones((2, 4)), num_shards=4)
    with pytest.raises(ValueError, match="centroids"):
        aggregation_weights(WeightConfig(strategy="semantic"), np.ones((2, 4)), num_shards=4)
    with pytest.raises(ValueError, match="inconsistent"):
        aggregation_weights(WeightConfig(strategy="semantic"), **random_inputs(), num_shards=5)


@pytest.mark.parametrize(
    "kwargs", [{"strategy": "best"}, {"tau": -1.0}, {"top_n": 0}, {"semantic_tau": math.nan}, {"top_n": 2.5}]
)
def test_weight_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WeightConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# validation-prediction cache


def counting(
    fn: Callable[[list[str]], np.ndarray], calls: list[list[str]]
) -> Callable[[list[str]], np.ndarray]:
    def wrapped(prompts: list[str]) -> np.ndarray:
        calls.append(list(prompts))
        return fn(prompts)

    return wrapped


def test_valid_predictions_are_cached_per_adapter_sha256(tmp_path: Path) -> None:
    ids, prompts = ["v1", "v2", "v3"], ["p1", "p2", "p3"]
    calls: list[list[str]] = []
    fn = counting(lambda p: np.array([0.1 * len(x) * (i + 1) for i, x in enumerate(p)]), calls)
    sha_a, sha_b = "a" * 64, "b" * 64

    first = valid_predictions(tmp_path, sha_a, ids, prompts, fn)
    assert calls == [prompts]
    np.testing.assert_array_equal(valid_predictions(tmp_path, sha_a, ids, prompts, fn), first)
    np.testing.assert_array_equal(valid_predictions(tmp_path, sha_a, ids[1:], prompts[1:], fn), first[1:])
    assert len(calls) == 1  # cache hits, also for a shrunken pool
    valid_predictions(tmp_path, sha_a, [*ids, "v4"], [*prompts, "p4"], fn)
    assert calls[-1] == ["p4"]  # only the new sample is scored
    valid_predictions(tmp_path, sha_b, ids, prompts, fn)  # a retrained adapter: nothing reused
    assert calls[-1] == prompts
    valid_predictions(tmp_path, sha_b, ids, prompts, fn, scorer_key="other-base-model")
    assert calls[-1] == prompts and len(calls) == 4


class FakeBackbone:
    """What the embedding cache reads of a backbone; `embed` records every text it embeds."""

    model_digest, model_id = "0" * 64, "fake"
    config = type("C", (), {"pooling": "last", "embed_layer": -1, "max_length": 64, "bf16_autocast": False})

    def __init__(self) -> None:
        self.embedded: list[str] = []

    def embed(self, texts: list[str], **_: Any) -> np.ndarray:
        self.embedded += texts
        return np.ones((len(texts), 4))


def test_seeded_caches_are_read_back_without_scoring_or_embedding(tmp_path: Path) -> None:
    """What a study writes into a model directory's caches (`write_valid_*`) is what serving reads:
    nothing is scored or embedded again, and a seed under another key is not trusted."""
    ids, prompts, sha = ["v1", "v2"], ["p1", "p2"], "c" * 64
    write_valid_predictions(tmp_path, sha, "key", {"v1": 0.25, "v2": 0.75})
    calls: list[list[str]] = []
    fn = counting(lambda p: np.full(len(p), 0.5), calls)
    np.testing.assert_array_equal(
        valid_predictions(tmp_path, sha, ids, prompts, fn, scorer_key="key"), [0.25, 0.75]
    )
    assert calls == []
    np.testing.assert_array_equal(
        valid_predictions(tmp_path, sha, ids, prompts, fn, scorer_key="other"), [0.5, 0.5]
    )
    assert calls == [prompts]

    backbone = FakeBackbone()
    seeded = {"v1": np.arange(4.0), "v2": np.arange(4.0) + 1}
    write_valid_embeddings(tmp_path, embedding_key(backbone), seeded)
    got = cached_embeddings(backbone, tmp_path / "valid-embeddings.npz", ids, prompts)
    np.testing.assert_array_equal(got, np.stack([seeded["v1"], seeded["v2"]]))
    assert backbone.embedded == []
    write_valid_embeddings(tmp_path, "another model", seeded)
    np.testing.assert_array_equal(
        cached_embeddings(backbone, tmp_path / "valid-embeddings.npz", ids, prompts), 1.0
    )
    assert backbone.embedded == prompts


def test_pruning_removes_erased_samples_from_every_cache(tmp_path: Path) -> None:
    ids, prompts = ["v1", "v2", "v3"], ["p1", "p2", "p3"]
    for sha in ("a" * 64, "b" * 64):
        valid_predictions(tmp_path, sha, ids, prompts, lambda p: np.full(len(p), 0.5))

    cached_embeddings(FakeBackbone(), tmp_path / "valid-embeddings.npz", ids, prompts)
    assert cache_sample_ids(tmp_path) == set(ids)
    assert prune_caches(tmp_path, lambda sid: sid == "v2") == 3  # two prediction files + embeddings
    assert cache_sample_ids(tmp_path) == {"v1", "v3"}
    assert prune_caches(tmp_path, lambda sid: sid == "v2") == 0  # idempotent
