"""ROC AUC: the rank statistic equals sklearn's curve area, ties included, row by row."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from apa.metrics import auc, auc_rows

# few distinct values, so ties between and within the classes are common
SCORES = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5000001, 0.9, 1.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1]), SCORES), min_size=2, max_size=60))
def test_auc_equals_sklearns_roc_auc_score_with_ties(pairs: list[tuple[int, float]]) -> None:
    labels = np.array([y for y, _ in pairs])
    scores = np.array([s for _, s in pairs])
    if len(set(labels.tolist())) < 2:
        assert math.isnan(auc(labels, scores))
    else:
        assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_rows_is_auc_of_each_row_and_nan_where_a_row_has_one_class() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=(50, 40))
    labels[7] = 1  # one class only
    scores = np.round(rng.random((50, 40)), 1)  # ties
    rows = auc_rows(labels, scores)
    assert math.isnan(rows[7])
    expected = [
        roc_auc_score(y, s) if 0 < y.sum() < len(y) else math.nan for y, s in zip(labels, scores, strict=True)
    ]
    np.testing.assert_allclose(rows, expected, atol=1e-12)
    # one label row for every score row
    np.testing.assert_allclose(auc_rows(labels[0], scores), [auc(labels[0], s) for s in scores], atol=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 2, 1], [0.1, 0.2, 0.3], "labels must be 0 or 1"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "scores must be finite"),
        ([0, 1], [0.1, 0.2, 0.3], "equally long"),
    ],
)
def test_bad_input_is_a_value_error_naming_what_is_wrong(
    labels: list[int], scores: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        auc(labels, scores)


def test_auc_of_a_perfect_a_reversed_and_an_empty_ranking() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([], []))
