"""Disguised copies of training images, to check that the gate catches them on your own data
(tests/test_audit_real.py, benchmarks/audit_planted_copies.py).

`COVERED` are the kinds the audit claims to catch: exact, shifted by 1-4 px (filled with the
image minimum), flipped left-right, intensity-scaled by ±10 %, gamma-corrected (0.7 / 1.4),
noised (Gaussian σ = 0.05 on the [-1, 1] scale), all of shift (edge fill), flip, contrast, gamma
and noise at once (`combined`), Gaussian blur (σ 0.6-1.0 px) and JPEG at quality 50-75.

`GEOMETRIC` are the edits a copy detector should also tolerate: rotation by ±5° or ±10°, zoom
about the centre by 0.9-1.1, shifts of 6-8 px (edge fill), a crop of 85-90 % of the image
re-zoomed to full size, and an 80/20 blend of two training images.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

COVERED = ("exact", "shift", "flip", "scale", "gamma", "noise", "combined", "blur", "jpeg")
GEOMETRIC = ("rotate", "zoom", "shift_far", "crop", "blend")
KINDS = COVERED  # the kinds the gate claims (tests/test_audit_real.py)
_DIRECTIONS = ((1, 0), (0, -1), (1, 1), (-1, 1))


def _from_u8(u: np.ndarray) -> np.ndarray:
    """uint8 → float64 on the [-1, 1] scale (float64, unlike sample.uint8_to_model_range, so that
    the disguises are exact)."""
    return u.astype(np.float64) / 127.5 - 1.0


def _to_u8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] → uint8, as a released image is stored."""
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(x * factor, -1, 1)


def _gamma(x: np.ndarray, g: float) -> np.ndarray:
    return ((x + 1) / 2) ** g * 2 - 1


def _noised(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0, 0.05, x.shape), -1, 1)


def _shifted(x: np.ndarray, dy: int, dx: int, fill: float | None) -> np.ndarray:
    """x moved by (dy, dx) px; the uncovered border is `fill`, or the nearest edge pixel."""
    if fill is None:
        return ndimage.shift(x, (dy, dx), order=0, mode="nearest")
    y = np.full_like(x, fill)
    h, w = x.shape
    y[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return y


def _zoomed(x: np.ndarray, factor: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """x magnified by `factor` about `centre` (default: the image centre), same size, edge fill."""
    c = np.array(centre if centre is not None else ((x.shape[0] - 1) / 2, (x.shape[1] - 1) / 2))
    return ndimage.affine_transform(x, np.eye(2) / factor, offset=c - c / factor, order=1, mode="nearest")


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(_to_u8(x), mode="L").save(buf, format="JPEG", quality=quality)
    return _from_u8(np.asarray(Image.open(buf)))


def _combined(x: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
    s = 1 + i % 4
    dy, dx = _DIRECTIONS[(i // 4) % 4]
    y = _shifted(x, s * dy, s * dx, None)[:, ::-1]
    y = _gamma(_scaled(y, 1.1 if i % 2 else 0.9), 0.8 if i % 3 else 1.25)
    return _noised(y, rng)


def _shift(x: np.ndarray, i: int, rng: np.random.Generator, other: np.ndarray | None) -> np.ndarray:
    dy, dx = _DIRECTIONS[(i // 4) % 4]
    s = 1 + i % 4
    return _shifted(x, s * dy, s * dx, x.min())


def _shift_far(x: np.ndarray, i: int, rng: np.random.Generator, other: np.ndarray | None) -> np.ndarray:
    dy, dx = _DIRECTIONS[(i // 4) % 4]
    s = 6 + i % 3
    return _shifted(x, s * dy, s * dx, None)


def _crop(x: np.ndarray, i: int, rng: np.random.Generator, other: np.ndarray | None) -> np.ndarray:
    """Keep 85-90 % of each side at a corner, re-zoomed to full size."""
    f = 1 / (0.85 + 0.05 * (i % 2))
    h, w = x.shape
    corner = ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1))[(i // 2) % 4]
    return _zoomed(x, f, corner)


def _blend(x: np.ndarray, i: int, rng: np.random.Generator, other: np.ndarray | None) -> np.ndarray:
    if other is None:
        raise ValueError("blend: needs a second training image")
    return 0.8 * x + 0.2 * _from_u8(other)


# kind -> the edit: (x on the [-1, 1] scale, copy index i, rng, other image) -> disguised x
_EDITS: dict[str, Callable[[np.ndarray, int, np.random.Generator, np.ndarray | None], np.ndarray]] = {
    "exact": lambda x, i, rng, other: x,
    "shift": _shift,
    "flip": lambda x, i, rng, other: x[:, ::-1],
    "scale": lambda x, i, rng, other: _scaled(x, 1.1 if i % 2 else 0.9),
    "gamma": lambda x, i, rng, other: _gamma(x, 0.7 if i % 2 else 1.4),
    "noise": lambda x, i, rng, other: _noised(x, rng),
    "combined": lambda x, i, rng, other: _combined(x, i, rng),
    "blur": lambda x, i, rng, other: ndimage.gaussian_filter(x, 0.6 + 0.1 * (i % 5), mode="nearest"),
    "jpeg": lambda x, i, rng, other: _jpeg(x, 50 + 5 * (i % 6)),
    "rotate": lambda x, i, rng, other: ndimage.rotate(
        x, (5.0, -5.0, 10.0, -10.0)[i % 4], reshape=False, order=1, mode="nearest"
    ),
    "zoom": lambda x, i, rng, other: _zoomed(x, (1.1, 0.9, 1.05, 0.95)[i % 4]),
    "shift_far": _shift_far,
    "crop": _crop,
    "blend": _blend,
}


def disguise(
    img: np.ndarray, kind: str, i: int, rng: np.random.Generator, other: np.ndarray | None = None
) -> np.ndarray:
    """One disguised copy of a uint8 image, on the [-1, 1] scale (`other`: the second training
    image of a blend)."""
    x = _from_u8(img)
    if kind not in _EDITS:
        raise ValueError(f"unknown disguise {kind!r}")
    return _EDITS[kind](x, i, rng, other)


def planted_copies(
    train_u8: np.ndarray, per_kind: int, seed: int, kinds: tuple[str, ...] = KINDS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_kind` disguised copies of distinct training images for each kind: (uint8 copies,
    indices of the copied training images, kind of each copy). A blend's index is its 80 % image."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train_u8), per_kind * len(kinds), replace=False)
    seconds = rng.choice(len(train_u8), len(picks))
    labels = np.repeat(kinds, per_kind)
    imgs = [
        disguise(train_u8[p], k, i, rng, train_u8[o])
        for i, (p, o, k) in enumerate(zip(picks, seconds, labels, strict=True))
    ]
    return _to_u8(np.array(imgs)), picks, labels
