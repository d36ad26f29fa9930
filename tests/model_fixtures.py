"""Helpers that build Samples and a tiny Backbone for tests (imported by test modules)."""

from __future__ import annotations

import random

from apa.backbone import Backbone, BackboneConfig
from apa.data import Sample
from apa.prompts import MOVIE_INSTRUCTION, answer_text

TITLES = [
    "Toy Story",
    "Heat",
    "Alien",
    "Fargo",
    "Casino",
    "Brazil",
    "Babe",
    "Clerks",
    "Jaws",
    "Rocky",
    "Vertigo",
    "Psycho",
]


def make_samples(
    n: int, split: str = "train", seed: int = 0, users: int = 6, user_prefix: str = "u"
) -> list[Sample]:
    """`n` TALLRec-shaped samples whose label is learnable from the target title."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        liked = rng.sample(TITLES, 3)
        disliked = rng.sample([t for t in TITLES if t not in liked], 2)
        target = rng.choice(TITLES)
        label = int(TITLES.index(target) % 2 == 0)
        text = (
            "User Preference: "
            + ", ".join(f'"{t} (1995)"' for t in liked)
            + "\nUser Unpreference: "
            + ", ".join(f'"{t} (1995)"' for t in disliked)
            + f'\nWhether the user will enjoy the target movie: "{target} (1995)"?'
        )
        user = f"{user_prefix}{i % users}"
        out.append(
            Sample(
                sample_id=f"test:{split}:{seed}:{i}",
                user_id=user,
                split=split,  # type: ignore[arg-type]
                instruction=MOVIE_INSTRUCTION,
                input=text,
                output=answer_text(label),
                label=label,
                interaction_ids=tuple(f"{user}:{split}:{i}:{j}" for j in range(6)),
            )
        )
    return out


def tiny_backbone(model, tokenizer, **config) -> Backbone:  # type: ignore[no-untyped-def]
    return Backbone(
        model,
        tokenizer,
        BackboneConfig(**{"bf16_autocast": False, **config}),  # fp32 unless a test asks for bf16
        model_id="tiny-llama",
        model_digest="0" * 64,
    )


def loadable_tiny_backbone(**config) -> Backbone:  # type: ignore[no-untyped-def]
    """The tiny model as `Backbone.load` builds it (`--model tiny`): a model directory built with it
    can be reopened by another process (`apa unlearn`, a worker)."""
    return Backbone.load(BackboneConfig(model="tiny", bf16_autocast=False, **config))
