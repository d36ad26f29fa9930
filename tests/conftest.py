"""Shared fixtures: a tiny random Llama (seconds on CPU) with a word-level tokenizer that knows
the TALLRec prompt vocabulary, so every unit test runs without the real model."""

from __future__ import annotations

import re

import pytest
import torch

from apa.prompts import MOVIE_INSTRUCTION, PROMPT_TEMPLATE

_BASE_WORDS = re.findall(r"\w+|[^\w\s]", PROMPT_TEMPLATE + " " + MOVIE_INSTRUCTION + " Yes. No.")
_EXTRA_WORDS = (
    "User Preference Unpreference Whether the user will enjoy target movie book written by "
    "Toy Story Heat Alien Fargo Casino Brazil Babe Clerks Jaws Rocky Vertigo Psycho Titanic "
    '( ) " , . : 1995 1996 1997 1998 1999 1 2 3 4 5 6 7 8 9 0'
).split()


def build_tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A WordLevel tokenizer (whitespace + punctuation split), pad on the left like the real setup."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {}
    for word in specials + _BASE_WORDS + _EXTRA_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-layer, 32-wide random LlamaForCausalLM with q/k/v/o projections for LoRA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny models run fastest on one thread (two threads on two busy cores thrash); the real-model
    tests raise it again for themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny random Llama and its tokenizer saved with save_pretrained: a local model directory."""
    root = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer():  # type: ignore[no-untyped-def]
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):  # type: ignore[no-untyped-def]
    """(model, tokenizer): a fresh tiny random Llama per test, float32, eval mode."""
    return build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer
