"""Prompts that begin with the same tokens run those tokens once.

Every TALLRec prompt starts with the same alpaca preamble and instruction (about 70 of its ~220
tokens), and the candidates of one `/recommend` request share their history as well (most of the
prompt). Whenever ONE model (the base model, one adapter, or a mixture with the same ω on every
row) runs a batch of such prompts, the keys and values of the shared tokens are the same on every
row: they are computed once (batch 1) and each row runs only its own suffix tokens against them.

The shared part is the longest common prefix of the prompts' *token ids* (not of their text), so
the result is the same computation as running each full prompt, up to float summation order: no
tokenizer boundary question arises. Prompts that the backbone would truncate, or a single prompt,
run the plain way.

Users: `score_shared_prefix` (a request's candidates; an adapter's predictions on a sample set;
validation scoring during training), `embed_shared_prefix` (`Backbone.embed`: ω's embeddings) and
`apa.training.answer_loss`, where the prefix runs once per micro-batch *with* gradients (they flow
back through the shared keys and values, summed over rows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from apa.backbone import Backbone, decode, unwrap_causal_lm

RowsContext = Callable[[int], AbstractContextManager[Any]]
"""`context(rows)`: what to run a forward of `rows` sequences in (e.g. a mixture's `apply` with
that many ω rows); the default runs the model as it is."""

Autocast = Callable[[], AbstractContextManager[Any]]
"""A factory of the autocast context a forward runs in (e.g. `backbone.autocast`)."""

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer, the (1, heads, shared, head_dim) keys and values of the shared tokens."""


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


def shareable(backbone: Backbone, prompts: Sequence[str]) -> tuple[list[list[int]], int]:
    """(token ids of each prompt, tokens they share): 0 shared for fewer than two prompts, a prompt
    the backbone would truncate, or no common token; those run as full rows."""
    ids = [list(x) for x in backbone.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    if len(ids) < 2 or max(len(x) for x in ids) > backbone.config.max_length:
        return ids, 0
    return ids, common_prefix_length(ids)


def run_prefix(
    model: Any, prefix_ids: torch.Tensor, autocast: Autocast, layers: int = -1
) -> tuple[KeysValues, torch.Tensor]:
    """Run the shared tokens `prefix_ids` (1, shared) once: every layer's keys and values, and the
    (1, shared, d) hidden states (`layers` as in `apa.backbone.decode`: -1 all, l >= 1 an early
    exit). Under grad mode they stay in the autograd graph, so a loss on the suffixes trains the
    prefix's LoRA inputs too."""
    positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device)[None]
    batch = {
        "input_ids": prefix_ids,
        "attention_mask": torch.ones_like(prefix_ids),
        "position_ids": positions,
    }
    out = decode(model, batch, layers, autocast, use_cache=True)
    kv = [(layer.keys, layer.values) for layer in out.cache.layers[: layers if layers >= 0 else None]]
    return kv, out.last_hidden_state


def suffix_batch(
    suffixes: Sequence[Sequence[int]], shared: int, pad_id: int, device: torch.device, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    """Padded suffix rows after `shared` prefix tokens: `input_ids` (rows, width), the
    `attention_mask` over prefix + suffix (rows, shared + width), `position_ids` counted on from the
    prefix, and each row's suffix `lengths`. Right padding by default (a real token never sees the
    pads after it); `left_pad` puts the pads between prefix and suffix (masked), so that every row
    ends at the last position, as in a left-padded batch of full rows."""
    rows = len(suffixes)
    lengths = [len(s) for s in suffixes]
    width = max(lengths)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    positions = torch.arange(shared, shared + width).repeat(rows, 1)
    for row, suffix in enumerate(suffixes):
        n = lengths[row]
        start = width - n if left_pad else 0
        input_ids[row, start : start + n] = torch.tensor(list(suffix), dtype=torch.long)
        mask[row, shared + start : shared + start + n] = 1
        if left_pad:
            positions[row] = (positions[row] - start).clamp(min=shared)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "lengths": torch.tensor(lengths, dtype=torch.long, device=device),
    }


def suffix_hidden(
    model: Any, kv: KeysValues, batch: dict[str, torch.Tensor], autocast: Autocast, layers: int = -1
) -> torch.Tensor:
    """Hidden states (rows, width, d) of a `suffix_batch` attending to the prefix's keys and values
    (shared by every row: expanded, not copied); `layers` as in `run_prefix`."""
    rows = batch["input_ids"].shape[0]
    cache = DynamicCache(
        ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv],
        config=unwrap_causal_lm(model).get_decoder().config,
    )
    return decode(model, batch, layers, autocast, cache).last_hidden_state  # type: ignore[no-any-return]


def _suffix_chunks(
    backbone: Backbone, ids: list[list[int]], shared: int, size: int, progress: str | None = None
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(prompt indices, `suffix_batch`) per chunk of `size`, similar suffix lengths together;
    a progress bar named `progress` when given."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    starts: Iterable[int] = range(0, len(order), size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch")
    pad = int(backbone.tokenizer.pad_token_id)
    for start in starts:
        idx = order[start : start + size]
        yield idx, suffix_batch([ids[i][shared:] for i in idx], shared, pad, backbone.device)


@torch.no_grad()
def score_shared_prefix(
    backbone: Backbone,
    model: Any,
    prompts: Sequence[str],
    *,
    context: RowsContext | None = None,
    chunk_size: int | None = None,
    bf16: bool | None = None,
) -> tuple[np.ndarray, int]:
    """(P(Yes) of each prompt, tokens shared): the shared token prefix runs once (batch 1), then
    each chunk of prompts runs its own suffix tokens with the prefix's keys and values. `bf16`
    overrides the backbone's autocast setting.

    Equal to `backbone.score(prompts, model)` up to float summation order (tested). Falls back to it
    (shared = 0) for fewer than two prompts, prompts the backbone would truncate, or no shared token.
    """
    prompts = list(prompts)
    run_in = context or (lambda _rows: nullcontext())
    size = chunk_size or backbone.config.batch_size
    ids, shared = shareable(backbone, prompts)
    if shared < 1:
        out = np.zeros(len(prompts))
        for idx in backbone.batches(prompts, size):
            with run_in(len(idx)):
                out[idx] = backbone.score(
                    [prompts[i] for i in idx], model=model, batch_size=len(idx), bf16=bf16
                )
        return out, 0

    def autocast() -> AbstractContextManager[Any]:
        return backbone.autocast(bf16)

    with run_in(1):
        kv, _ = run_prefix(model, torch.tensor([ids[0][:shared]], device=backbone.device), autocast)
    out = np.zeros(len(prompts))
    for idx, batch in _suffix_chunks(backbone, ids, shared, size):
        with run_in(len(idx)):
            hidden = suffix_hidden(model, kv, batch, autocast)
        last = hidden[torch.arange(len(idx), device=backbone.device), batch["lengths"] - 1]
        logits = backbone.answer_logits(model, last)
        out[idx] = torch.softmax(logits, dim=-1)[:, 0].double().cpu().numpy()
    return out, shared


@torch.no_grad()
def embed_shared_prefix(
    backbone: Backbone,
    prompts: Sequence[str],
    batch_size: int | None = None,
    progress: bool = False,
    bf16: bool | None = None,
) -> np.ndarray | None:
    """`backbone.embed` with the prompts' shared prefix run once: each prompt's base-model hidden
    state at `config.embed_layer`, pooled per `config.pooling` (the last token, or the mean over
    prefix and suffix tokens), fp32. None where nothing can be shared (fewer than two prompts, a
    prompt the backbone would truncate, no shared token, or an exit after zero layers): the caller
    then embeds full rows. Equal to full rows up to float summation order (tested). `bf16`
    overrides the configured autocast."""
    layers = backbone.config.embed_layer
    if layers == 0:
        return None
    ids, shared = shareable(backbone, prompts)
    if shared < 1:
        return None
    prefix_ids = torch.tensor([ids[0][:shared]], device=backbone.device)
    autocast = functools.partial(backbone.autocast, bf16)
    kv, prefix_hidden = run_prefix(backbone.model, prefix_ids, autocast, layers)
    prefix_sum = prefix_hidden[0].float().sum(0)
    out = np.zeros((len(ids), int(prefix_hidden.shape[-1])), dtype=np.float32)
    size = batch_size or backbone.config.batch_size
    for idx, batch in _suffix_chunks(backbone, ids, shared, size, "embed" if progress else None):
        hidden = suffix_hidden(backbone.model, kv, batch, autocast, layers).float()
        for row, i in enumerate(idx):
            n = int(batch["lengths"][row])
            if backbone.config.pooling == "last":
                pooled = hidden[row, n - 1]
            else:
                pooled = (prefix_sum + hidden[row, :n].sum(0)) / (shared + n)
            out[i] = pooled.cpu().numpy()
    return out


__all__ = [
    "Autocast",
    "KeysValues",
    "RowsContext",
    "common_prefix_length",
    "embed_shared_prefix",
    "run_prefix",
    "score_shared_prefix",
    "shareable",
    "suffix_batch",
    "suffix_hidden",
]
