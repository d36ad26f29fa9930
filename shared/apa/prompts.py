"""The alpaca/TALLRec prompt and its Yes/No answers (docs/ARCHITECTURE.md §1, TALLRec's templates)."""

from __future__ import annotations

import re

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""TALLRec's alpaca template; the answer follows `### Response:\\n`."""

YES = "Yes."
"""Label text of a positive sample (the user likes the target item)."""
NO = "No."
"""Label text of a negative sample."""

MOVIE_INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the target movie "
    'by answering "Yes." or "No.".'
)
BOOK_INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the target book "
    'by answering "Yes." or "No.".'
)


def format_prompt(instruction: str, input: str) -> str:  # noqa: A002 - TALLRec's field name
    """The full prompt up to and including `### Response:\\n` (the model's answer comes next)."""
    return PROMPT_TEMPLATE.format(instruction=instruction, input=input)


def answer_text(label: int) -> str:
    """`Yes.` for label 1, `No.` for label 0."""
    return YES if label else NO


_TARGET = re.compile(r"the target \w+")


def request_prefix(prompt: str) -> str:
    """What a ranking request's candidate prompts share: the prompt up to "... the target movie"
    (instruction and history, no target item). It is what per-request ω embeds, for the request and
    for the validation pool alike; a prompt without that phrase is its own prefix."""
    ends = [match.end() for match in _TARGET.finditer(prompt)]
    return prompt[: ends[-1]] if ends else prompt
