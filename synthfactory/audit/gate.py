"""The release gate: a threshold calibrated on held-out real data, and the decision.

The background is what "close" means for this data: the distance from each held-out real image
(never trained on) to its nearest training image. A synthetic image closer to a training image
than the recipe's percentile of that background is a suspected copy. Distances equal to the
threshold count as suspected, so an exact copy (distance 0) is caught even when the background
itself holds exact duplicates and the threshold is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def ordinal(p: float) -> str:
    """1 → '1st', 2.5 → '2.5th'."""
    text = f"{p:g}"
    if "." in text or p % 100 in (11, 12, 13):
        return text + "th"
    return text + {1: "st", 2: "nd", 3: "rd"}.get(int(p) % 10, "th")


@dataclass(frozen=True)
class Threshold:
    value: float
    percentile: float
    n_heldout: int
    heldout_exact_copies: int

    def to_json(self, heldout_dist: np.ndarray) -> dict:
        qs = [0, 1, 5, 25, 50, 75, 100]
        out = {
            "rule": "heldout_percentile",
            "percentile": self.percentile,
            "value": self.value,
            "derived_from": (
                "pixel-L2 distance from each held-out real image to its nearest training image; "
                f"threshold = its {ordinal(self.percentile)} percentile (numpy 'lower' method, so it "
                "is one of the observed distances)"
            ),
            "n_heldout": self.n_heldout,
            "heldout_distance_percentiles": {str(q): float(np.percentile(heldout_dist, q)) for q in qs},
            "heldout_exact_copies": self.heldout_exact_copies,
        }
        if self.heldout_exact_copies:
            out["warning"] = (
                f"{self.heldout_exact_copies} held-out images are exact copies of training images: "
                "the split leaks, and the threshold is lower than it should be"
            )
        return out


def calibrate(heldout_dist: np.ndarray, percentile: float) -> Threshold:
    value = float(np.percentile(heldout_dist, percentile, method="lower"))
    return Threshold(
        value=value,
        percentile=percentile,
        n_heldout=int(len(heldout_dist)),
        heldout_exact_copies=int(np.sum(heldout_dist == 0)),
    )


def suspected_copies(nn_dist: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean mask of synthetic samples that look copied."""
    return nn_dist <= threshold.value


def decide(flagged: np.ndarray, action: str) -> str:
    """'release' (possibly after dropping the flagged) or 'block' (nothing is released)."""
    if action == "block" and bool(flagged.any()):
        return "block"
    return "release"
