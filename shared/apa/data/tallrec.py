"""TALLRec's preprocessing (SAI990323/TALLRec `preprocess_movie.py`, `preprocess_book.py`), step for step.

Movie: per user (users in order of first appearance in the ratings file), ratings sorted by time
with a stable sort (equal timestamps keep file order), every window of 10 history items + 1
target is a sample, the last 10,000 windows are kept and split 80/10/10 in order.
Book: users with more than 3 ratings, shuffled (TALLRec does not seed this; we do) and split
80/10/10; each user's ratings are shuffled with seed 42 and give one sample: the first up to 10
as history, the last as target.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from apa.data.loaders import Interaction
from apa.data.samples import Sample, Split
from apa.prompts import BOOK_INSTRUCTION, MOVIE_INSTRUCTION, answer_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

MOVIE_HISTORY = 10
"""History items per movie window."""
MOVIE_MAX_WINDOWS = 10_000
"""TALLRec keeps the last 10,000 windows."""
MOVIE_LIKE_ABOVE = 3.0
"""Movie label: rating > 3."""
BOOK_HISTORY = 10
BOOK_MIN_RATINGS = 4
"""TALLRec keeps users with more than 3 ratings."""
BOOK_LIKE_ABOVE = 5.0
"""Book label: rating > 5."""
BOOK_SHUFFLE_SEED = 42
"""TALLRec's `random.seed(42)` before shuffling each user's ratings."""


def split_in_order(items: Sequence[T]) -> dict[Split, list[T]]:
    """TALLRec's split: `[:int(.8n)]`, `[int(.8n):int(.9n)]`, `[int(.9n):]`."""
    n = len(items)
    a, b = int(n * 0.8), int(n * 0.9)
    return {"train": list(items[:a]), "valid": list(items[a:b]), "test": list(items[b:])}


def by_user(interactions: Sequence[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's interactions in file order; users in order of first appearance."""
    users: dict[str, list[Interaction]] = {}
    for interaction in interactions:
        users.setdefault(interaction.user_id, []).append(interaction)
    return users


def quoted(text: str) -> str:
    return f'"{text}"'


def movie_text(item: Interaction) -> str:
    """`"Toy Story (1995)"`: a movie in TALLRec's prompt."""
    return quoted(item.title)


def book_text(item: Interaction) -> str:
    """`"Title" written by Author`: a book in TALLRec's history lists."""
    return f"{quoted(item.title)} written by {item.author or ''}"


def tallrec_input(liked: Sequence[str], disliked: Sequence[str], noun: str, target: str) -> str:
    """The `input` field of a TALLRec sample."""
    return (
        f"User Preference: {', '.join(liked)}\n"
        f"User Unpreference: {', '.join(disliked)}\n"
        f"Whether the user will like the target {noun} {target}?"
    )


def _sample(
    dataset: str,
    split: Split,
    history: Sequence[Interaction],
    target: Interaction,
    like_above: float,
    render: Callable[[Interaction], str],
    instruction: str,
    noun: str,
    target_text: str,
) -> Sample:
    liked = [h for h in history if h.rating > like_above]
    disliked = [h for h in history if not h.rating > like_above]
    label = int(target.rating > like_above)
    return Sample(
        sample_id=f"{dataset}:{target.interaction_id}",
        user_id=target.user_id,
        split=split,
        instruction=instruction,
        input=tallrec_input([render(h) for h in liked], [render(h) for h in disliked], noun, target_text),
        output=answer_text(label),
        label=label,
        interaction_ids=tuple(h.interaction_id for h in history) + (target.interaction_id,),
    )


def movie_samples(
    interactions: Sequence[Interaction],
    dataset: str = "ml-100k",
    history: int = MOVIE_HISTORY,
    max_windows: int = MOVIE_MAX_WINDOWS,
    like_above: float = MOVIE_LIKE_ABOVE,
) -> dict[Split, list[Sample]]:
    """TALLRec's movie splits (ML-100K: 8000/1000/1000) from interactions in file order."""
    if history < 1 or max_windows < 1:
        raise ValueError(f"history and max_windows must be >= 1, got {history}, {max_windows}")
    windows: list[tuple[list[Interaction], Interaction]] = []
    users = by_user(interactions)
    for rows in users.values():
        rows = sorted(rows, key=lambda r: r.timestamp)  # stable: ties keep file order, as TALLRec
        windows.extend((rows[i - history : i], rows[i]) for i in range(history, len(rows)))
    too_short = sum(len(rows) <= history for rows in users.values())
    logger.info(
        "%s: %d windows of %d+1 from %d users (%d users with <= %d ratings give none); keeping the last %d",
        dataset,
        len(windows),
        history,
        len(users),
        too_short,
        history,
        min(max_windows, len(windows)),
    )
    windows = windows[-max_windows:]
    return {
        split: [
            _sample(dataset, split, h, t, like_above, movie_text, MOVIE_INSTRUCTION, "movie", movie_text(t))
            for h, t in part
        ]
        for split, part in split_in_order(windows).items()
    }


def book_samples(
    interactions: Sequence[Interaction],
    dataset: str = "bookcrossing",
    seed: int = 0,
    history: int = BOOK_HISTORY,
    min_ratings: int = BOOK_MIN_RATINGS,
    like_above: float = BOOK_LIKE_ABOVE,
) -> dict[Split, list[Sample]]:
    """TALLRec's book splits: one sample per user with >= `min_ratings` ratings, users split 80/10/10.

    The target is rendered as in TALLRec's published data: `""Title" written by Author"`.
    """
    users = by_user(interactions)
    kept = {user: rows for user, rows in users.items() if len(rows) >= min_ratings}
    logger.info(
        "%s: %d of %d users have >= %d ratings (one sample each)", dataset, len(kept), len(users), min_ratings
    )
    order = list(kept)
    random.Random(seed).shuffle(order)
    out: dict[Split, list[Sample]] = {}
    for split, part in split_in_order(order).items():
        out[split] = []
        for user in part:
            rows = kept[user]
            positions = list(range(len(rows)))
            random.Random(BOOK_SHUFFLE_SEED).shuffle(positions)  # = random.seed(42); random.shuffle(rows)
            shuffled = [rows[p] for p in positions]
            target = shuffled[-1]
            out[split].append(
                _sample(
                    dataset,
                    split,
                    shuffled[:-1][:history],
                    target,
                    like_above,
                    book_text,
                    BOOK_INSTRUCTION,
                    "book",
                    quoted(book_text(target)),
                )
            )
    return out


def label_counts(samples: Sequence[Sample]) -> tuple[int, int]:
    """(number of Yes, number of No)."""
    yes = sum(s.label for s in samples)
    return yes, len(samples) - yes
