"""Shared-prefix scoring: a ranking request's candidate prompts share their first tokens.

`/recommend` asks about many candidate items for one user. Their TALLRec prompts differ only in the
target item at the end, so the instruction and the history (most of the ~220 tokens) are the same
token sequence in every prompt. With ONE adapter for the whole request (per-request ω, or a single
adapter), the keys and values of those shared tokens are the same for every candidate too: they are
computed once, and each candidate runs only its own suffix tokens against them.

The shared part is the longest common prefix of the prompts' *token ids* (not of their text), so
the result is the same computation as scoring each full prompt: no tokenizer boundary question
arises. Prompts that the backbone would truncate, or a single prompt, are scored the plain way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from apa.backbone import Backbone, unwrap_causal_lm

RowsContext = Callable[[int], AbstractContextManager[Any]]
"""`context(rows)`: what to run a forward of `rows` sequences in (e.g. a mixture's `apply` with
that many ω rows); the default runs the model as it is."""


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the sequences, leaving each at least one token."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences[1:]):
        n += 1
    return max(n, 0)


@torch.no_grad()
def score_shared_prefix(
    backbone: Backbone,
    model: Any,
    prompts: Sequence[str],
    *,
    context: RowsContext | None = None,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, int]:
    """(P(Yes) of each prompt, tokens shared): the shared token prefix runs once (batch 1), then
    each chunk of candidates runs its own suffix tokens with the prefix's keys and values.

    Equal to `backbone.score(prompts, model)` up to float summation order (tested). Falls back to it
    (shared = 0) for fewer than two prompts, prompts the backbone would truncate, or no shared token.
    """
    prompts = list(prompts)
    run_in = context or (lambda _rows: nullcontext())
    size = chunk_size or backbone.config.batch_size
    ids = [list(x) for x in backbone.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    shared = common_prefix_length(ids) if len(prompts) > 1 else 0
    if shared < 1 or max(len(x) for x in ids) > backbone.config.max_length:
        out = np.zeros(len(prompts))
        for idx in backbone.batches(prompts, size):
            with run_in(len(idx)):
                out[idx] = backbone.score([prompts[i] for i in idx], model=model, batch_size=len(idx))
        return out, 0
    decoder = unwrap_causal_lm(model).get_decoder()
    device = backbone.device
    prefix = torch.tensor([ids[0][:shared]], device=device)
    with run_in(1), backbone.autocast():
        first = decoder(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            position_ids=torch.arange(shared, device=device)[None],
            use_cache=True,
        )
    kv = [(layer.keys, layer.values) for layer in first.cache.layers]
    pad = int(backbone.tokenizer.pad_token_id)
    out = np.zeros(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # similar suffix lengths together
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        rows = len(idx)
        lengths = [len(ids[i]) - shared for i in idx]
        width = max(lengths)
        suffix = torch.full((rows, width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((rows, shared + width), dtype=torch.long, device=device)
        mask[:, :shared] = 1
        for row, i in enumerate(idx):  # right padding: a real token never sees the pads after it
            suffix[row, : lengths[row]] = torch.tensor(ids[i][shared:], device=device)
            mask[row, shared : shared + lengths[row]] = 1
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv],
            config=decoder.config,
        )
        positions = torch.arange(shared, shared + width, device=device)[None].expand(rows, -1)
        with run_in(rows), backbone.autocast():
            hidden = decoder(
                input_ids=suffix,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        last = hidden[torch.arange(rows, device=device), torch.tensor(lengths, device=device) - 1]
        logits = backbone.answer_logits(model, last)
        out[idx] = torch.softmax(logits, dim=-1)[:, 0].double().cpu().numpy()
    return out, shared


__all__ = ["common_prefix_length", "score_shared_prefix"]
