"""Evaluation metrics (the paper reports ROC AUC of P(Yes))."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (undefined, never a fake 0.5)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))
