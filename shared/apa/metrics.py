"""Evaluation metrics (the paper reports ROC AUC of P(Yes)).

ROC AUC is computed as the Mann-Whitney statistic with tied scores given their average rank, which
is exactly the area under the ROC curve with ties drawn as diagonal steps (sklearn's
`roc_auc_score`, tested equal). One rank pass in numpy/scipy instead of sklearn's input validation
and curve: the study's τ/n selection and the bootstrap call it thousands of times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `scores` (B x n) against the matching row of binary `labels` (B x n,
    or one row for all; ties averaged); NaN for a row with one class only."""
    from scipy.stats import rankdata

    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    y = np.broadcast_to(np.atleast_2d(np.asarray(labels)).astype(bool), s.shape)
    ranks = rankdata(s, axis=1)
    n1 = y.sum(axis=1)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (np.where(y, ranks, 0.0).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), out, np.nan)


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of `scores` against labels 0/1; NaN when only one class is present (undefined, never
    a fake 0.5). Labels other than 0/1, a length mismatch or a non-finite score are a ValueError."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-d and equally long, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if y.size == 0:
        return float("nan")
    return float(auc_rows(y, s)[0])
