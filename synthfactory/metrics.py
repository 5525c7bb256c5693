"""Ranking metrics shared by the evaluation and the membership-inference audit (scikit-learn)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def auc_one_vs_rest(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of `scores` for the `positive` mask, ties averaged. NaN if one class is empty."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the ROC curve, from (0, 0) to (1, 1), one
    point per distinct score (a high score predicts positive)."""
    fpr, tpr, _ = roc_curve(np.asarray(positive, dtype=bool), scores, drop_intermediate=False)
    return fpr, tpr
