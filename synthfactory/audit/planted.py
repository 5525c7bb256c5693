"""Disguised copies of training images, to check that the gate catches them on your own data
(tests/test_audit_real.py, benchmarks/audit_planted_copies.py): exact, shifted by 1-4 px,
flipped left-right, intensity-scaled by ±10 %, gamma-corrected (0.7 / 1.4) and noised (Gaussian
σ = 0.05 on the [-1, 1] scale)."""

from __future__ import annotations

import numpy as np

KINDS = ("exact", "shift", "flip", "scale", "gamma", "noise")


def disguise(img: np.ndarray, kind: str, i: int, rng: np.random.Generator) -> np.ndarray:
    """One disguised copy of a uint8 image, on the [-1, 1] scale."""
    x = img.astype(np.float64) / 127.5 - 1.0
    if kind == "shift":
        s = 1 + i % 4
        dy, dx = [(s, 0), (0, -s), (s, s), (-s, s)][(i // 4) % 4]
        y = np.full_like(x, x.min())
        h, w = x.shape
        y[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
            max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        return y
    if kind == "flip":
        return x[:, ::-1]
    if kind == "scale":
        return np.clip(x * (1.1 if i % 2 else 0.9), -1, 1)
    if kind == "gamma":
        return ((x + 1) / 2) ** (0.7 if i % 2 else 1.4) * 2 - 1
    if kind == "noise":
        return np.clip(x + rng.normal(0, 0.05, x.shape), -1, 1)
    return x


def planted_copies(
    train_u8: np.ndarray, per_kind: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train_u8), per_kind * len(KINDS), replace=False)
    kinds = np.repeat(KINDS, per_kind)
    imgs = [disguise(train_u8[p], k, i, rng) for i, (p, k) in enumerate(zip(picks, kinds, strict=True))]
    u8 = np.round((np.clip(np.array(imgs), -1, 1) + 1) * 127.5).astype(np.uint8)
    return u8, picks, kinds
