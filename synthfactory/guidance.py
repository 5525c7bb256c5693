"""Choosing the classifier-free guidance scale from DP outputs only.

`sampling.guidance_scale` may list candidates. The sample stage then draws a few images per class
at each candidate and keeps the scale whose per-class mean images (at the warm start's resolution)
lie closest to the warm start's noisy class means. Both inputs are outputs of this run's DP
mechanisms (the DP-trained generator and the Gaussian-mechanism class means), so the choice is
post-processing: it costs no ε and no real image, held-out or test, is looked at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import warmstart
from .recipe import Recipe
from .rundir import RunDir, read_json, write_json_atomic
from .sample import ddim_sample, sample_seed
from .warmstart import CentralImages, downsample

PROBE_SEED_OFFSET = 1 << 40  # probe images use sample indices no sample set reaches


@dataclass
class GuidanceChoice:
    scale: float
    candidates: list[float]
    distances: list[float]  # mean over classes of ‖synthetic class mean − DP class mean‖² at s×s
    images_per_class: int
    resolution: int

    def to_dict(self) -> dict:
        return asdict(self)


def class_mean_distance(images: torch.Tensor, labels: np.ndarray, central: CentralImages) -> float:
    """Mean over classes of the squared L2 distance between the images' class means (downsampled
    to the central images' size, in [0, 1]) and the DP class means."""
    s = central.means.shape[-1]
    x = downsample(images.numpy(), s)
    target = torch.from_numpy(central.means).flatten(1).to(x.dtype)
    per_class = [((x[labels == c].mean(0) - target[c]) ** 2).sum() for c in range(len(target))]
    return float(torch.stack(per_class).mean())


def choose(
    model,
    scheduler,
    central: CentralImages,
    candidates: list[float],
    null_class: int | None,
    images_per_class: int,
    ddim_steps: int,
    seed: int,
) -> GuidanceChoice:
    """Score every candidate on the same seeded probe images; keep the least distance (ties: the
    first listed)."""
    n_classes = len(central.means)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), images_per_class)
    seeds = [sample_seed(seed, PROBE_SEED_OFFSET + i) for i in range(len(labels))]
    size = int(model.config.sample_size)
    distances = []
    for w in candidates:
        x = ddim_sample(model, scheduler, torch.from_numpy(labels), seeds, ddim_steps, size, w, null_class)
        distances.append(class_mean_distance(x, labels, central))
    best = int(np.argmin(distances))
    return GuidanceChoice(
        scale=float(candidates[best]),
        candidates=[float(w) for w in candidates],
        distances=distances,
        images_per_class=images_per_class,
        resolution=int(central.means.shape[-1]),
    )


def scale_for(recipe: Recipe, run_dir: RunDir, model, scheduler, null_class: int | None) -> float:
    """The guidance scale to sample with: the recipe's one scale, or the choice among its
    candidates, made once per run and stored (samples/guidance.json) so that every shard and a
    resumed stage sample with the same scale."""
    cfg = recipe.sampling
    if not isinstance(cfg.guidance_scale, list):
        return float(cfg.guidance_scale)
    if run_dir.guidance.is_file():
        stored = read_json(run_dir.guidance)
        if stored["candidates"] == [float(w) for w in cfg.guidance_scale]:
            return float(stored["scale"])
    picked = choose(
        model,
        scheduler,
        warmstart.load(run_dir.central_images),
        cfg.guidance_scale,
        null_class,
        cfg.guidance_probe_images,
        cfg.ddim_steps,
        cfg.seed,
    )
    run_dir.guidance.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir.guidance, picked.to_dict())
    return picked.scale
