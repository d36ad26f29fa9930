"""Items and users as the recommend API sees them: the item catalogue (item id -> title), a user's
last interactions, and TALLRec prompts for candidate items.

Interaction ids are `<user>:<item>[#k]` (`apa.data.loaders`), so an interaction names its item. A
sample's target title is the last quoted text of its `input` (TALLRec's "... the target movie
"Title (1995)"?"). `apa bootstrap` fills the registry's `item_catalogue` from the samples of a model
directory (`catalogue_items`); the inference service builds a user's history from their live
samples (`latest_history`): the history of their newest window, shifted by one to end with its
target, as TALLRec would build the user's next sample.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from apa.data import Sample
from apa.data.tallrec import MOVIE_HISTORY, quoted, tallrec_input
from apa.prompts import BOOK_INSTRUCTION, MOVIE_INSTRUCTION, format_prompt

_QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class HistoryItem:
    """One past interaction of a user, as a prompt shows it."""

    title: str
    liked: bool


def item_of(interaction_id: str) -> str:
    """The item id of an interaction id `<user>:<item>[#k]`."""
    _user, _, rest = interaction_id.partition(":")
    return rest.split("#", 1)[0] if rest else interaction_id


def target_title(sample: Sample) -> str | None:
    """The title of a sample's target item (the last quoted text of its input), None if it has none."""
    titles = _QUOTED.findall(sample.input.rsplit("\n", 1)[-1])
    return titles[-1] if titles else None


def catalogue_items(samples: Iterable[Sample]) -> dict[str, str]:
    """item id -> title of every item that is the target of one of `samples`."""
    items: dict[str, str] = {}
    for sample in samples:
        title = target_title(sample)
        if title and sample.interaction_ids:
            items.setdefault(item_of(sample.interaction_ids[-1]), title)
    return items


def _lines(sample: Sample) -> tuple[list[str], list[str]]:
    liked: list[str] = []
    disliked: list[str] = []
    for line in sample.input.split("\n"):
        if line.startswith("User Preference:"):
            liked = _QUOTED.findall(line)
        elif line.startswith("User Unpreference:"):
            disliked = _QUOTED.findall(line)
    return liked, disliked


def latest_history(
    samples: Sequence[Sample], catalogue: Mapping[str, str], length: int = MOVIE_HISTORY
) -> list[HistoryItem]:
    """A user's last `length` interactions from their live samples: the newest window's history
    (liked first, as TALLRec lists them) without its oldest item, plus its target with its label.
    The newest window is the one whose target no other sample holds as history. No samples (a new or
    erased user): an empty history."""
    if not samples:
        return []
    in_history = {i for s in samples for i in s.interaction_ids[:-1]}
    newest = [s for s in samples if s.interaction_ids and s.interaction_ids[-1] not in in_history]
    last = max(newest or samples, key=lambda s: (len(s.interaction_ids), s.sample_id))
    liked, disliked = _lines(last)
    oldest = catalogue.get(item_of(last.interaction_ids[0])) if len(last.interaction_ids) > 1 else None
    items = [HistoryItem(t, True) for t in liked] + [HistoryItem(t, False) for t in disliked]
    if oldest is not None and len(items) >= length:
        for i, item in enumerate(items):
            if item.title == oldest:
                del items[i]
                break
    title = target_title(last)
    if title is not None:
        items.append(HistoryItem(title, bool(last.label)))
    if len(items) > length:  # keep the newest: the target, then history in prompt order
        items = items[len(items) - length :]
    return items


def noun_of(instruction: str) -> str:
    """`movie` or `book`, as the instruction names the target."""
    return "book" if instruction == BOOK_INSTRUCTION else "movie"


def recommend_prompt(history: Sequence[HistoryItem], title: str, instruction: str = MOVIE_INSTRUCTION) -> str:
    """The full TALLRec prompt asking whether a user with `history` will like item `title`."""
    text = tallrec_input(
        [quoted(h.title) for h in history if h.liked],
        [quoted(h.title) for h in history if not h.liked],
        noun_of(instruction),
        quoted(title),
    )
    return format_prompt(instruction, text)


__all__ = [
    "HistoryItem",
    "catalogue_items",
    "item_of",
    "latest_history",
    "noun_of",
    "recommend_prompt",
    "target_title",
]
