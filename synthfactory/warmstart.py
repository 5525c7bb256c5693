"""DP warm start from central images (after DP-FETA, Li et al., IEEE S&P 2025), sized for small N.

One query of the Gaussian mechanism over the *whole* private training set (no subsampling: at
N in the thousands, DP-FETA's q = 0.1 leaves too few images per class) gives, per class, the sum
of the images and the count. Each image is downsampled to `warm_start.image_size`, mapped to
[0, 1] and clipped to L2 norm C; the example adds the vector [x / C, 1] to its class's block, so
one example changes the released vector by at most √2 in L2 (add/remove adjacency). Gaussian
noise of standard deviation σ·√2 is added to every coordinate (σ = `warm_start.noise_multiplier`).

Its Rényi DP is α / (2σ²), that of one step of the sampled Gaussian mechanism at q = 1, so the
query enters the Opacus accountant's history as (σ, 1.0, 1). DP-SGD's σ is then calibrated for
the *composed* ε (train.py), and privacy.json reports the composed ε.

The query is written to the run's privacy ledger (ledger.py) with a hash of its answer *before*
the answer is stored or used; the noisy class means (noisy sum / noisy count, clamped to [0, 1]:
post-processing) and counts are then written once per run to checkpoints/central_images.npz
(RunDir.central_images) and reused if the stage runs again, so the query is answered once. An
answer on disk without its ledger entry is never used. They are covered by ε. The UNet is then
pre-trained on them (`train_on_answer`), upsampled and augmented (shifts, gain and offset),
without DP-SGD: post-processing of the DP output.

Written by hand: no kept library (Opacus, diffusers) offers a DP mean release; the mechanism
is a sum and one `torch.normal` draw.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .ledger import LedgerRefused, Mechanism, RunLedger, answer_sha256, new_id
from .recipe import Recipe, RecipeError, WarmStartConfig
from .steps import plain_training


@dataclass
class CentralImages:
    """The mechanism's output: per-class noisy mean images in [0, 1] and noisy counts."""

    means: np.ndarray  # float32 [n_classes, s, s]
    counts: np.ndarray  # float32 [n_classes]
    noise_multiplier: float
    clip_norm: float
    noise_source: str


def history(cfg: WarmStartConfig) -> list[tuple[float, float, int]]:
    """The query's entry in the accountant's history."""
    return [(float(cfg.noise_multiplier), 1.0, 1)]


def clip_norm(cfg: WarmStartConfig) -> float:
    """C; by default the largest L2 norm an image in [0, 1] at this size can have (no clipping)."""
    return float(cfg.clip_norm if cfg.clip_norm is not None else cfg.image_size)


def downsample(images: np.ndarray, size: int, chunk: int = 4096) -> torch.Tensor:
    """[N, 1, H, W] in [-1, 1] → [N, size·size] in [0, 1] (bilinear, antialiased)."""
    out = []
    for a in range(0, len(images), chunk):
        x = torch.from_numpy(np.asarray(images[a : a + chunk], dtype=np.float32))
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(((x + 1) / 2).clamp(0, 1).flatten(1))
    return torch.cat(out) if out else torch.zeros(0, size * size)


def query(
    images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: WarmStartConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian mechanism: noisy per-class sums of x / C (clipped) and noisy counts."""
    x = downsample(images, cfg.image_size).double()
    c = clip_norm(cfg)
    scale = torch.clamp(c / x.norm(dim=1).clamp_min(1e-12), max=1.0)
    x = x * scale[:, None] / c  # every row has L2 norm ≤ 1
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=n_classes).double()
    std = cfg.noise_multiplier * math.sqrt(2.0)  # sensitivity of [x / C, 1] is √2
    sums = sums + std * torch.randn(sums.shape, generator=generator, dtype=torch.float64)
    counts = counts + std * torch.randn(counts.shape, generator=generator, dtype=torch.float64)
    return sums, counts


def central_images(
    images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: WarmStartConfig, noise_seed: int | None
) -> CentralImages:
    """Answer the query once. `noise_seed` seeds the noise (tests only: NOT PRIVATE); otherwise
    a secret from the OS, not kept."""
    seed = noise_seed if noise_seed is not None else secrets.randbits(62)
    source = (
        "seeded from the recipe (privacy.noise_seed): the noise is known"
        if noise_seed is not None
        else ("secret seed from the OS, not kept")
    )
    sums, counts = query(images, labels, n_classes, cfg, torch.Generator().manual_seed(seed))
    c = clip_norm(cfg)
    means = (c * sums / counts.clamp_min(1.0)[:, None]).clamp(0, 1)
    s = cfg.image_size
    return CentralImages(
        means=means.float().reshape(n_classes, s, s).numpy(),
        counts=counts.float().numpy(),
        noise_multiplier=float(cfg.noise_multiplier),
        clip_norm=c,
        noise_source=source,
    )


def save(path: Path, central: CentralImages) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(
        tmp,
        means=central.means,
        counts=central.counts,
        noise_multiplier=central.noise_multiplier,
        clip_norm=central.clip_norm,
        noise_source=central.noise_source,
    )
    tmp.replace(path)


def load(path: Path) -> CentralImages:
    with np.load(path) as z:
        return CentralImages(
            means=z["means"],
            counts=z["counts"],
            noise_multiplier=float(z["noise_multiplier"]),
            clip_norm=float(z["clip_norm"]),
            noise_source=str(z["noise_source"]),
        )


def answer_digest(central: CentralImages) -> str:
    """The hash of the answer the ledger entry names (the means and counts as stored)."""
    return answer_sha256(np.asarray(central.means, np.float32), np.asarray(central.counts, np.float32))


@dataclass(frozen=True)
class Asker:
    """Where the answer goes: the stored file, the run's ledger, the run and its data's ledger key."""

    path: Path
    ledger: RunLedger
    run_id: str
    data_key: str


def answered_once(
    asker: Asker, images: np.ndarray, labels: np.ndarray, recipe: Recipe, n_classes: int
) -> CentralImages:
    """The run's central images: those stored by an earlier attempt of this stage (the query is
    answered once per run; an answer the ledger does not hold is refused), else a new answer,
    written to the ledger and then stored before anything is trained on it."""
    cfg = recipe.warm_start
    assert cfg is not None
    if asker.path.is_file():
        central = load(asker.path)
        if central.means.shape != (n_classes, cfg.image_size, cfg.image_size) or (
            central.noise_multiplier != cfg.noise_multiplier or central.clip_norm != clip_norm(cfg)
        ):
            raise ValueError(f"{asker.path}: answered with other warm_start settings; start a new run")
        covered_answer(asker.ledger.read().warm_start(), central, asker.path)
        return central
    central = central_images(images, labels, n_classes, cfg, recipe.privacy.noise_seed)
    entry = Mechanism(
        id=new_id(asker.run_id, "warm_start"),
        kind="warm_start",
        run_id=asker.run_id,
        data=asker.data_key,
        history=tuple(history(cfg)),
        private=recipe.privacy.noise_seed is None,
        detail={**record(central, cfg), "answer_sha256": answer_digest(central)},
    )
    asker.ledger.record(entry)  # first: the answer is counted before it exists anywhere else
    save(asker.path, central)
    return central


def covered_answer(entry: Mechanism | None, central: CentralImages, path: Path) -> None:
    """Refuse an answer that the ledger entry `entry` (a warm-start mechanism) does not name."""
    if entry is None or entry.detail.get("answer_sha256") != answer_digest(central):
        raise LedgerRefused(
            f"{path}: this warm-start answer has no entry in the ledger behind it, so its ε is not "
            "counted; it cannot be used (start a new run)"
        )


def training_images(central: CentralImages, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The central images at the model's resolution in [-1, 1], one per class, and their labels."""
    x = torch.from_numpy(central.means)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.arange(len(x))


def augment(x: torch.Tensor, shift: int, intensity: float, generator: torch.Generator) -> torch.Tensor:
    """Random translations up to ±shift px (edge pixels repeated), gain and offset up to ±intensity."""
    n, _, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=generator)).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if intensity:
        gain = 1 + intensity * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        offset = intensity * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        x = x * gain + offset
    return x.clamp(-1, 1)


def record(central: CentralImages, cfg: WarmStartConfig) -> dict:
    """What the warm start asked and will do with the answer: its ledger entry's detail (read
    by privacy.json and the cards)."""
    return {
        "mechanism": "Gaussian mechanism, one query over the whole training set: per-class sums of "
        f"the images at {cfg.image_size}×{cfg.image_size} in [0, 1], clipped to L2 norm C = "
        f"{central.clip_norm:g}, divided by C, and per-class counts; L2 sensitivity √2, noise std "
        f"σ·√2 with σ = {cfg.noise_multiplier:g}",
        "image_size": cfg.image_size,
        "noise_multiplier": cfg.noise_multiplier,
        "clip_norm": central.clip_norm,
        "noise": central.noise_source,
        "noisy_counts": [round(float(c), 1) for c in central.counts],
        "steps": cfg.steps,
        "public_replay": cfg.public_replay,
        "statement": f"pre-training without DP-SGD for {cfg.steps} steps on the {len(central.counts)} "
        "DP class-mean images of the warm start (covered by ε: the query is in the accountant)"
        + (
            f", {cfg.public_replay:.0%} of each batch replayed from the public images"
            if cfg.public_replay
            else ""
        ),
    }


def train_on_answer(
    model,
    recipe: Recipe,
    images,
    asker: Asker,
    device,
    progress: bool,
    replay=None,
    state: Path | None = None,
) -> dict:
    """The warm start stage: answer the central-image query once (ledger first), then train the
    model on the noisy class means, augmented, without DP-SGD (post-processing). `replay`: the
    public stage's (images, labels), of which `public_replay` of each batch is drawn; `state`: where
    the training saves itself to resume from (`plain_training`). Returns its ledger entry's detail."""
    cfg = recipe.warm_start
    assert cfg is not None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would answer the query with its own noise
        raise RecipeError(
            f"{asker.path.parents[1]}: warm_start: run the pretrain stage in one process, not under "
            "torchrun (`synthfactory pretrain RUN_DIR`), then train under torchrun"
        )
    n_classes = len(images.class_names)
    central = answered_once(asker, images.train_images, images.train_labels, recipe, n_classes)
    x, y = training_images(central, images.image_size)

    n_public = round(cfg.public_replay * cfg.expected_batch_size) if replay is not None else 0

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x), (cfg.expected_batch_size - n_public,), generator=gen)
        xb, yb = augment(x[idx], cfg.shift, cfg.intensity, gen), y[idx]
        if n_public:
            pub = torch.randint(0, len(replay[0]), (n_public,), generator=gen)
            xb, yb = torch.cat([xb, replay[0][pub]]), torch.cat([yb, replay[1][pub]])
        return xb, yb

    run = (cfg.steps, cfg.learning_rate, cfg.seed)
    plain_training(model, recipe, n_classes, device, run, draw, progress, state)
    return record(central, cfg)
