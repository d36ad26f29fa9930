"""apa.catalogue: item ids, titles, a user's last interactions, recommend prompts."""

from __future__ import annotations

from apa.catalogue import HistoryItem, catalogue_items, item_of, latest_history, recommend_prompt
from apa.data import Sample
from apa.data.tallrec import tallrec_input
from apa.prompts import MOVIE_INSTRUCTION


def _sample(user: str, items: list[str], liked: set[str], label: int, titles: dict[str, str]) -> Sample:
    history, target = items[:-1], items[-1]
    return Sample(
        sample_id=f"ml-100k:{user}:{target}",
        user_id=user,
        split="train",
        instruction=MOVIE_INSTRUCTION,
        input=tallrec_input(
            [f'"{titles[i]}"' for i in history if i in liked],
            [f'"{titles[i]}"' for i in history if i not in liked],
            "movie",
            f'"{titles[target]}"',
        ),
        output="Yes." if label else "No.",
        label=label,
        interaction_ids=tuple(f"{user}:{i}" for i in items),
    )


TITLES = {str(i): f"Movie {i} (199{i % 10})" for i in range(20)}


def test_item_ids_come_from_interaction_ids_and_titles_from_targets() -> None:
    assert item_of("196:242") == "242" and item_of("196:242#3") == "242"
    s = _sample("7", ["1", "2", "3"], {"1"}, 1, TITLES)
    assert catalogue_items([s]) == {"3": TITLES["3"]}


def test_the_last_interactions_shift_the_newest_window_by_its_target() -> None:
    # windows of 3 history items + target, over items 1..6 (liked: odd ids); target labels likewise
    liked = {"1", "3", "5"}
    windows = [["1", "2", "3", "4"], ["2", "3", "4", "5"], ["3", "4", "5", "6"]]
    samples = [_sample("7", w, liked, int(w[-1] in liked), TITLES) for w in windows]
    history = latest_history(samples, TITLES, length=3)
    assert {h.title for h in history} == {TITLES["4"], TITLES["5"], TITLES["6"]}
    assert {h.title: h.liked for h in history} == {TITLES["4"]: False, TITLES["5"]: True, TITLES["6"]: False}
    assert latest_history([], TITLES) == []


def test_a_recommend_prompt_is_the_tallrec_prompt() -> None:
    prompt = recommend_prompt([HistoryItem("A (1990)", True), HistoryItem("B (1991)", False)], "C (1992)")
    assert 'User Preference: "A (1990)"\nUser Unpreference: "B (1991)"\n' in prompt
    assert prompt.endswith('Whether the user will like the target movie "C (1992)"?\n\n### Response:\n')
