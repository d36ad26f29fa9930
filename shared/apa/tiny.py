"""A tiny random Llama (2 layers, 32 wide) with a word-level tokenizer: `--model tiny`.

For tests and for smoke tests of a deployment without weights: it loads in milliseconds, a LoRA
retrain takes seconds, and it exercises every code path of the real model (left padding, LoRA on
q/v projections, Yes/No scoring). Its predictions are meaningless. Built deterministically from a
seed, so its digest is stable across processes and machines.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch

from apa.prompts import MOVIE_INSTRUCTION, PROMPT_TEMPLATE

TINY_MODEL = "tiny"
"""`BackboneConfig.model` value of the tiny random model."""

_BASE_WORDS = re.findall(r"\w+|[^\w\s]", PROMPT_TEMPLATE + " " + MOVIE_INSTRUCTION + " Yes. No.")
_EXTRA_WORDS = (
    "User Preference Unpreference Whether the user will enjoy target movie book written by "
    "Toy Story Heat Alien Fargo Casino Brazil Babe Clerks Jaws Rocky Vertigo Psycho Titanic "
    '( ) " , . : 1995 1996 1997 1998 1999 1 2 3 4 5 6 7 8 9 0'
).split()


def build_tiny_tokenizer() -> Any:
    """A WordLevel tokenizer (whitespace + punctuation split), padding on the left like the real setup."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {}
    for word in specials + _BASE_WORDS + _EXTRA_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def build_tiny_llama(vocab_size: int, seed: int = 0) -> Any:
    """A 2-layer, 32-wide random LlamaForCausalLM with q/k/v/o projections for LoRA (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from apa.training import seeded

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
    with seeded(seed, torch.device("cpu")):
        model = LlamaForCausalLM(config)
    model.eval()
    return model


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_tiny(seed: int = 0) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, model id, digest) of the tiny random model."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed)
    return model, tokenizer, f"tiny-random-llama:seed{seed}", weights_digest(model)


__all__ = ["TINY_MODEL", "build_tiny_llama", "build_tiny_tokenizer", "load_tiny", "weights_digest"]
