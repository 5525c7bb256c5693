"""The release gate: per-space thresholds calibrated on held-out real data, and the decision.

The background is what "close" means for this data: the score of each held-out real image
(never trained on) against its nearest training image, in every similarity space. A synthetic
image is a suspected copy when its score in *any* space is more extreme than that space's
threshold. All spaces share one percentile level, chosen so that the share of held-out images
flagged by any space (the false-alarm rate) is at most the recipe's rate; a space's threshold is
per class where the class has enough held-out images, global otherwise.

Held-out images that are themselves near-exact copies of a training image (the split leaks) are
left out of the background and counted: they would drag every threshold towards "copy".
A score must be strictly beyond a threshold to count (so the background's own false-alarm
rate is at most the level, even with ties); an exact pixel copy of a training image is always
suspected, whatever the thresholds.

Written here because no maintained library calibrates a copy gate on held-out patients for
medical images; the searches under it are torch (or faiss) and the percentiles NumPy's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def ordinal(p: float) -> str:
    """1 → '1st', 2.5 → '2.5th'."""
    text = f"{p:g}"
    if "." in text or p % 100 in (11, 12, 13):
        return text + "th"
    return text + {1: "st", 2: "nd", 3: "rd"}.get(int(p) % 10, "th")


@dataclass(frozen=True)
class SpaceThreshold:
    space: str
    higher_is_closer: bool
    level: float  # percentile of the background, from the "close" end
    value: float  # global threshold
    per_class: dict[int, float] = field(default_factory=dict)

    def for_labels(self, labels: np.ndarray) -> np.ndarray:
        t = np.full(len(labels), self.value, dtype=np.float64)
        for c, v in self.per_class.items():
            t[labels == c] = v
        return t

    def close(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Boolean mask: strictly beyond the threshold, towards 'copy' (so at most `level` percent
        of the background itself is flagged)."""
        t = self.for_labels(labels)
        return scores > t if self.higher_is_closer else scores < t


def threshold_at(scores: np.ndarray, level: float, higher_is_closer: bool) -> float:
    """The background's `level`-th percentile from the close end; an observed score."""
    if higher_is_closer:
        return float(np.percentile(scores, 100.0 - level, method="higher"))
    return float(np.percentile(scores, level, method="lower"))


def space_threshold(
    space: str, higher: bool, scores: np.ndarray, labels: np.ndarray, level: float, min_per_class: int
) -> SpaceThreshold:
    per_class = {
        int(c): threshold_at(scores[labels == c], level, higher)
        for c in np.unique(labels)
        if (labels == c).sum() >= min_per_class
    }
    return SpaceThreshold(space, higher, level, threshold_at(scores, level, higher), per_class)


@dataclass(frozen=True)
class Calibration:
    thresholds: dict[str, SpaceThreshold]
    level: float
    false_alarm_target: float  # percent
    false_alarm_in_sample: float  # percent of the background flagged by any space

    def flags(self, scores: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
        return {n: t.close(scores[n], labels) for n, t in self.thresholds.items()}


def calibrate(
    background: dict[str, np.ndarray],
    higher_is_closer: dict[str, bool],
    labels: np.ndarray,
    false_alarm_percent: float,
    min_per_class: int,
) -> Calibration:
    """One percentile level for all spaces, the largest whose union false-alarm rate on the
    background is at most `false_alarm_percent` (between the Bonferroni level, which always
    satisfies it, and the rate itself)."""
    names = list(background)

    def build(level: float) -> tuple[dict[str, SpaceThreshold], float]:
        th = {
            n: space_threshold(n, higher_is_closer[n], background[n], labels, level, min_per_class)
            for n in names
        }
        any_flag = np.zeros(len(labels), dtype=bool)
        for n, t in th.items():
            any_flag |= t.close(background[n], labels)
        return th, 100.0 * float(any_flag.mean()) if len(labels) else 0.0

    lo, hi = false_alarm_percent / len(names), false_alarm_percent
    best, best_level = build(lo), lo
    at_hi = build(hi)
    if at_hi[1] <= false_alarm_percent:
        best, best_level = at_hi, hi
    else:
        for _ in range(20):
            mid = (lo + hi) / 2
            cand = build(mid)
            if cand[1] <= false_alarm_percent:
                best, best_level, lo = cand, mid, mid
            else:
                hi = mid
    return Calibration(best[0], best_level, false_alarm_percent, best[1])


def decide(flagged: np.ndarray, action: str) -> str:
    """'release' (possibly after dropping the flagged) or 'block' (nothing is released)."""
    if action == "block" and bool(flagged.any()):
        return "block"
    return "release"
