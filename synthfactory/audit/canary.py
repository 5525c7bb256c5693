"""Canary audit: an empirical lower bound on ε from one extra training run (Steinke, Nasr &
Jagielski 2023, "Privacy auditing with one (1) training run", NeurIPS).

m canaries (generated images, no private data) are each put into the training set with
probability ½, independently. A second model is trained with exactly the recipe's DP-SGD (same
clipping norm, noise calibration, Poisson sampling, steps) on the private images plus the
included canaries; it is never sampled from or released. Each canary carries a class label of
its own (one extra class embedding per canary, in this model only), so what the model learns
from a canary is not averaged away by the other images: the input-space analogue of the paper's
mislabelled canaries. The auditor scores every canary by how much lower the model's denoising
loss is under the canary's own label than under the null label, guesses "included" for the k
highest scores and "excluded" for the k lowest, abstains on the rest, and counts correct guesses.
If training is (ε, δ)-DP, the number of correct guesses is (up to a δ term) stochastically
dominated by Binomial(guesses, e^ε / (1 + e^ε)) — the paper's Theorem 5.2 — so a count too large
for that binomial at the chosen confidence rejects ε. The largest rejected ε is the lower bound.

A bound far below the accountant's ε is the usual outcome for a black-box audit of the final
model (the paper reports ≈ 1.5 at ε = 8 with input-space canaries); a bound *above* it would
mean the implementation is not private as claimed. The bound is a test of the implementation,
not an estimate of the leakage of the real images.

Written here because no maintained library implements the one-run audit for a diffusion model
(Opacus and the auditing libraries we know stop at multi-run or classifier audits); the binomial
tail itself is SciPy's.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from ..data.common import item_id

# --- the canaries -------------------------------------------------------------------------------


def make_canaries(m: int, image_size: int, seed: int, cells: int = 8) -> np.ndarray:
    """m canaries: random black/white block patterns (a cells × cells grid of ±1 cells, upsampled
    to the image size). Far from any medical image, distinct from each other, and made from a
    seed only: they carry no private data. float32 [m, 1, H, W] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 2, (m, cells, cells)).astype(np.float32) * 2 - 1
    rep = -(-image_size // cells)
    images = np.repeat(np.repeat(grid, rep, 1), rep, 2)[:, :image_size, :image_size]
    return np.ascontiguousarray(images[:, None])


def draw_inclusion(m: int, seed: int) -> np.ndarray:
    """Which canaries go in: each independently with probability ½ (bool [m])."""
    return np.random.default_rng([seed, 1]).random(m) < 0.5


# --- the bound ----------------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability, under (ε, δ)-DP, of at least v correct guesses out of r guesses with m
    canaries (Steinke, Nasr & Jagielski 2023, Theorem 5.2): with q = e^ε/(1+e^ε) and
    β = P[Binomial(r, q) ≥ v], it is at most β + 2mδ · max_{1≤i≤v} (P[Binomial(r, q) ≥ v−i] − β)/i."""
    if v <= 0:
        return 1.0
    q = float(scipy.special.expit(eps))
    binom = scipy.stats.binom(r, q)
    beta = float(binom.sf(v - 1))
    if delta <= 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((binom.sf(v - i - 1) - beta) / i))
    return min(1.0, beta + alpha * 2 * m * delta)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest ε that v correct guesses out of r reject at the significance level (0 if none)."""

    def rejected(eps: float) -> float:
        return significance - p_value(m, r, v, eps, delta)  # > 0: (ε, δ)-DP is rejected

    if rejected(0.0) <= 0:
        return 0.0
    hi = 1.0
    while rejected(hi) > 0:
        hi *= 2
        if hi > 1e3:
            return float("inf")
    return float(scipy.optimize.brentq(rejected, 0.0, hi, xtol=1e-6))


def guess_counts(m: int) -> list[int]:
    """The numbers of guesses tried (half "in" from the top scores, half "out" from the bottom):
    fixed before looking at the scores; the significance is split over them (Bonferroni)."""
    fractions = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    return sorted({max(2, 2 * round(f * m / 2)) for f in fractions if f * m >= 2})


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95) -> dict:
    """The one-run audit of canary scores (higher = more likely included)."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    counts = guess_counts(m)
    significance = (1 - confidence) / len(counts)
    rows = []
    for r in counts:
        k = r // 2
        top, bottom = order[:k], order[m - k :]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        rows.append(
            {
                "guesses": r,
                "correct": correct,
                "epsilon_lower_bound": epsilon_lower_bound(m, r, correct, delta, significance),
                "epsilon_lower_bound_delta0": epsilon_lower_bound(m, r, correct, 0.0, significance),
            }
        )
    best = max(rows, key=lambda row: row["epsilon_lower_bound"])
    return {
        "m": m,
        "n_included": int(included.sum()),
        "confidence": confidence,
        "delta": delta,
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "at_guesses": best["guesses"],
        "by_guesses": rows,
        "method": (
            "Steinke, Nasr & Jagielski 2023, Theorem 5.2: k highest scores guessed in, k lowest "
            f"out; guess counts {counts} fixed in advance, Bonferroni over them "
            f"(each at significance {significance:.4g})"
        ),
    }


# --- the audit run ------------------------------------------------------------------------------


def with_canaries(images, canaries: np.ndarray, included: np.ndarray):
    """An ImageSet whose training split is the private images plus the included canaries, each
    canary with a class of its own (labels n_classes + i; the null class moves after them)."""
    n_real = len(images.class_names)
    m = len(canaries)
    idx = np.flatnonzero(included)
    labels = n_real + idx.astype(np.int64)
    manifest = list(images.manifest) + [
        {
            "split": "canary",
            "index": int(i),
            "label": int(n_real + i),
            "sha256": hashlib.sha256(canaries[i].tobytes()).hexdigest(),
            "source": "synthfactory canary (generated)",
            "item": item_id("canary", hashlib.sha256(canaries[i].tobytes()).hexdigest()),
        }
        for i in idx
    ]
    return replace(
        images,
        train_images=np.concatenate([images.train_images, canaries[idx]]),
        train_labels=np.concatenate([images.train_labels, labels]),
        class_names=[*images.class_names, *(f"canary-{i:05d}" for i in range(m))],
        manifest=manifest,
    )


def canary_scores(own_label_losses: np.ndarray, baseline_losses: np.ndarray) -> np.ndarray:
    """Score per canary: how much lower the canary model's loss is under the canary's own label
    than under the baseline label (mean over timesteps). An excluded canary's label was never
    trained on (only DP noise moved its embedding), so the difference measures what the model
    learned from that one canary."""
    return (baseline_losses - own_label_losses).mean(1)
