"""Built-in procedural phantoms: labelled MRI-, CT- and ultrasound-like images, no download.

They are the embedded default for `make demo` and for fast tests. Every image is drawn from
its own seed, so the set is reproducible and each class differs by anatomy a model can learn:

- mri: axial brain slices, `no_lesion` or `lesion` (a ring-enhancing mass).
- ct:  axial body slices at three levels, `chest` (lungs, heart), `abdomen` (liver, kidneys),
       `pelvis` (femoral heads, bladder), in a soft-tissue window.
- us:  fan-shaped, speckled fetal scans of a `head` (skull ring and midline), an `abdomen`
       (round section with stomach bubble) or a `femur` (bright bone with acoustic shadow).

This is a test fixture and demo, not a model of real anatomy or physics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .common import RawSplit, item_id

CLASSES: dict[str, list[str]] = {
    "mri": ["no_lesion", "lesion"],
    "ct": ["chest", "abdomen", "pelvis"],
    "us": ["head", "abdomen", "femur"],
}


class _Canvas:
    """Coordinates in [-1, 1] for a batch, and soft-edged shapes on them."""

    def __init__(self, n: int, size: int, rng: np.random.Generator) -> None:
        axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")
        self.y, self.x = self.y[None], self.x[None]
        self.n, self.size, self.rng = n, size, rng
        self.px = 2.0 / size

    def u(self, lo: float, hi: float) -> np.ndarray:
        return self.rng.uniform(lo, hi, size=(self.n, 1, 1)).astype(np.float32)

    def ellipse(self, cx, cy, a, b, theta=0.0) -> np.ndarray:
        """Soft 0..1 mask of an ellipse with semi-axes a, b rotated by theta."""
        c, s = np.cos(theta), np.sin(theta)
        dx, dy = self.x - cx, self.y - cy
        u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
        r = np.sqrt(u * u + v * v)
        edge = (1.0 - r) * np.minimum(a, b)
        return 1.0 / (1.0 + np.exp(-np.clip(edge / (0.5 * self.px), -30, 30)))

    def segment(self, x0, y0, x1, y1, width) -> np.ndarray:
        """Soft 0..1 mask of a thick line segment."""
        vx, vy = x1 - x0, y1 - y0
        t = ((self.x - x0) * vx + (self.y - y0) * vy) / (vx * vx + vy * vy)
        t = np.clip(t, 0.0, 1.0)
        d = np.sqrt((self.x - x0 - t * vx) ** 2 + (self.y - y0 - t * vy) ** 2)
        return 1.0 / (1.0 + np.exp(-np.clip((width - d) / (0.5 * self.px), -30, 30)))

    def smooth_noise(self, cells: int) -> np.ndarray:
        """Low-frequency random field with values around [-1, 1]."""
        coarse = torch.from_numpy(self.rng.standard_normal((self.n, 1, cells, cells)).astype(np.float32))
        return F.interpolate(coarse, size=(self.size, self.size), mode="bicubic", align_corners=True)[
            :, 0
        ].numpy()

    def gauss(self, std: float) -> np.ndarray:
        return self.rng.standard_normal((self.n, self.size, self.size)).astype(np.float32) * std


def _paint(img: np.ndarray, mask: np.ndarray, value) -> np.ndarray:
    return img * (1.0 - mask) + value * mask


def _mri(cv: _Canvas, label: int) -> np.ndarray:
    cx, cy = cv.u(-0.05, 0.05), cv.u(-0.05, 0.05)
    a, b, th = cv.u(0.68, 0.8), cv.u(0.82, 0.92), cv.u(-0.15, 0.15)
    img = np.zeros((cv.n, cv.size, cv.size), np.float32)
    img = _paint(img, cv.ellipse(cx, cy, a, b, th), 0.75)  # scalp fat
    img = _paint(img, cv.ellipse(cx, cy, a * 0.93, b * 0.93, th), 0.12)  # skull
    brain = cv.ellipse(cx, cy, a * 0.86, b * 0.86, th)
    img = _paint(img, brain, 0.52 + 0.06 * cv.smooth_noise(6))
    vw = cv.u(0.06, 0.1)
    for side in (-1.0, 1.0):
        img = _paint(img, cv.ellipse(cx + side * cv.u(0.08, 0.12), cy - 0.05, vw, cv.u(0.18, 0.26), th), 0.1)
    if label == 1:
        r = cv.u(0.09, 0.17)
        ang, dist = cv.u(0, 2 * np.pi), cv.u(0.2, 0.5)
        lx, ly = cx + dist * a * np.cos(ang), cy + dist * b * np.sin(ang)
        img = _paint(img, cv.ellipse(lx, ly, r * 1.35, r * 1.35) * brain, 0.68)  # oedema
        img = _paint(img, cv.ellipse(lx, ly, r, r * cv.u(0.8, 1.2)), 0.97)  # enhancing rim
        img = _paint(img, cv.ellipse(lx, ly, r * 0.6, r * 0.6), 0.3)  # necrotic core
    return img + cv.gauss(0.03)


def _ct(cv: _Canvas, label: int) -> np.ndarray:
    cx, cy = cv.u(-0.04, 0.04), cv.u(-0.04, 0.04)
    a = cv.u(0.78, 0.9) if label < 2 else cv.u(0.85, 0.95)
    b = cv.u(0.55, 0.65)
    img = np.zeros((cv.n, cv.size, cv.size), np.float32)
    img = _paint(img, cv.ellipse(cx, cy, a, b), 0.33)  # subcutaneous fat
    img = _paint(img, cv.ellipse(cx, cy, a * 0.9, b * 0.86), 0.55 + 0.03 * cv.smooth_noise(8))
    spine_y = cy + b * 0.62
    img = _paint(img, cv.ellipse(cx, spine_y, 0.1, 0.09), 1.0)
    img = _paint(img, cv.ellipse(cx, spine_y, 0.05, 0.045), 0.5)  # canal
    if label == 0:  # chest
        for side in (-1.0, 1.0):
            lung = cv.ellipse(cx + side * a * 0.45, cy - 0.02, a * cv.u(0.3, 0.36), b * cv.u(0.62, 0.7))
            img = _paint(img, lung, 0.03 + 0.02 * np.abs(cv.smooth_noise(10)))
        img = _paint(img, cv.ellipse(cx + 0.08, cy - 0.08, cv.u(0.2, 0.26), cv.u(0.2, 0.25)), 0.62)
    elif label == 1:  # abdomen
        img = _paint(img, cv.ellipse(cx - a * 0.4, cy - 0.05, a * 0.42, b * 0.55, cv.u(-0.3, 0.1)), 0.66)
        for side in (-1.0, 1.0):
            img = _paint(img, cv.ellipse(cx + side * a * 0.35, spine_y - 0.08, 0.09, 0.13), 0.74)
        for _ in range(3):
            img = _paint(
                img,
                cv.ellipse(cx + cv.u(0.0, 0.5), cy + cv.u(-0.35, 0.1), cv.u(0.04, 0.08), cv.u(0.03, 0.06)),
                0.02,
            )
    else:  # pelvis
        for side in (-1.0, 1.0):
            hx = cx + side * a * cv.u(0.52, 0.6)
            img = _paint(img, cv.ellipse(hx, cy + 0.05, 0.14, 0.14), 0.95)
            img = _paint(img, cv.ellipse(hx, cy + 0.05, 0.09, 0.09), 0.7)
        img = _paint(img, cv.ellipse(cx, cy - 0.18, cv.u(0.18, 0.26), cv.u(0.14, 0.2)), 0.42)
    return img + cv.gauss(0.04)


def _us(cv: _Canvas, label: int) -> np.ndarray:
    apex_y = -1.05
    dx, dy = cv.x, cv.y - apex_y
    depth = np.sqrt(dx * dx + dy * dy)
    angle = np.arctan2(dx, dy)
    half = cv.u(0.55, 0.65)
    fan = (np.abs(angle) < half) & (depth > 0.15) & (depth < 1.95)
    tissue = 0.32 + 0.08 * cv.smooth_noise(5)
    ox, oy = cv.u(-0.2, 0.2), cv.u(-0.05, 0.25)
    th = cv.u(-0.4, 0.4)
    if label == 0:  # head: skull ring, fluid-dark inside, bright midline
        a, b = cv.u(0.42, 0.55), cv.u(0.32, 0.42)
        tissue = _paint(tissue, cv.ellipse(ox, oy, a, b, th), 0.95)
        tissue = _paint(tissue, cv.ellipse(ox, oy, a * 0.9, b * 0.88, th), 0.16)
        c, s = np.cos(th), np.sin(th)
        tissue = _paint(
            tissue,
            cv.segment(ox - 0.8 * a * c, oy - 0.8 * a * s, ox + 0.8 * a * c, oy + 0.8 * a * s, 0.015),
            0.7,
        )
    elif label == 1:  # abdomen: round section, stomach bubble, spine
        r = cv.u(0.35, 0.45)
        tissue = _paint(tissue, cv.ellipse(ox, oy, r * 1.04, r, th), 0.6)
        tissue = _paint(tissue, cv.ellipse(ox, oy, r * 0.96, r * 0.92, th), 0.3)
        tissue = _paint(tissue, cv.ellipse(ox + cv.u(-0.15, 0.0), oy + cv.u(-0.12, 0.0), 0.1, 0.08), 0.02)
        tissue = _paint(tissue, cv.ellipse(ox + r * 0.55, oy + r * 0.55, 0.05, 0.05), 0.9)
    else:  # femur: bright bone, acoustic shadow beneath
        length, ang = cv.u(0.3, 0.42), cv.u(-0.35, 0.35)
        x0, y0 = ox - length * np.cos(ang), oy - length * np.sin(ang)
        x1, y1 = ox + length * np.cos(ang), oy + length * np.sin(ang)
        bone = cv.segment(x0, y0, x1, y1, 0.035)
        shadow = cv.segment(x0, y0 + 0.3, x1, y1 + 0.3, 0.28) * (cv.y > oy)
        tissue = _paint(tissue, shadow, 0.08)
        tissue = _paint(tissue, bone, 0.97)
    # Rayleigh speckle: magnitude of a smoothed complex Gaussian field.
    field = torch.from_numpy(cv.rng.standard_normal((cv.n, 2, cv.size, cv.size)).astype(np.float32))
    field = F.avg_pool2d(field, 3, stride=1, padding=1)
    speckle = field.square().sum(1).sqrt().numpy() * 1.6
    img = tissue * (0.45 + 0.55 * speckle) * np.exp(-0.3 * depth)
    return np.where(fan, img, 0.0).astype(np.float32)


_DRAW = {"mri": _mri, "ct": _ct, "us": _us}


def phantom_images(modality: str, label: int, n: int, size: int, seed: int) -> np.ndarray:
    """n images of one class, float32 [n, size, size] in [-1, 1]."""
    rng = np.random.default_rng([seed, label, n, size])
    img = _DRAW[modality](_Canvas(n, size, rng), label)
    return (np.clip(img, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def read_phantom(
    modality: str, size: int, n_train: int, n_heldout: int, seed: int
) -> tuple[RawSplit, RawSplit, list[str]]:
    """Balanced train and held-out splits drawn from disjoint seeds."""
    names = CLASSES[modality]
    splits = []
    for split, n_total, offset in (("train", n_train, 0), ("heldout", n_heldout, 1)):
        raw = RawSplit()
        for label, name in enumerate(names):
            n = n_total // len(names) + (label < n_total % len(names))
            if n == 0:
                continue
            imgs = phantom_images(modality, label, n, size, seed * 2 + offset)
            for i in range(n):
                # the item is the phantom's seed and place, not its size: the same set at another
                # image size is the same (procedural) patients
                item = item_id("phantom", modality, seed, split, name, i)
                raw.add(imgs[i], name, f"phantom:{modality}:{split}:{name}:{i}", item=item)
        splits.append(raw)
    return splits[0], splits[1], names
