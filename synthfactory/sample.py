"""Class-conditional DDIM sampling from a trained checkpoint.

The denoising loop is written out here, not hidden in a pipeline object: start from Gaussian
noise, ask the UNet for the noise at each DDIM timestep, step. Each image's starting noise
comes from its own seed (derived from `sampling.seed` and the image's index), so an image can
be regenerated alone, and the result does not depend on the batch size (up to float rounding).
Samples are stored as 8-bit images: the audit and the release see exactly the same pixels.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

from .model import load_generator, resolve_device, sampling_scheduler
from .progress import progress_bar
from .recipe import Recipe
from .rundir import RunDir, atomic_path, read_json


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample `index`: independent streams per image, from one recipe seed."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, 1, H, W] → uint8 [B, H, W]."""
    x = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x[:, 0].numpy()


def uint8_to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W] → float32 [B, 1, H, W] in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0)[:, None]


@torch.no_grad()
def ddim_sample(
    model: UNet2DModel,
    scheduler: DDIMScheduler,
    labels: torch.Tensor,
    seeds: list[int],
    steps: int,
    image_size: int,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from per-image seeded noise. Returns [B, 1, H, W] in [-1, 1].

    With classifier-free guidance (scale w ≠ 1 and a null class): ε = ε_∅ + w·(ε_y − ε_∅).
    """
    device = next(model.parameters()).device
    noise = [
        torch.randn((1, image_size, image_size), generator=torch.Generator().manual_seed(s)) for s in seeds
    ]
    x = torch.stack(noise).to(device)
    labels = labels.to(device)
    guided = guidance_scale != 1.0
    if guided and null_class is None:
        raise ValueError("guidance needs a model trained with label dropout (a null class)")
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if guided:
            both = model(
                torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, null_class)])
            ).sample
            cond, uncond = both.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        else:
            eps = model(x, t, class_labels=labels).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0).cpu()


@dataclass
class Samples:
    images: np.ndarray  # uint8 [M, H, W]
    labels: np.ndarray  # int64 [M]
    seeds: np.ndarray  # int64 [M]

    def save(self, path) -> None:
        tmp = atomic_path(path)
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=self.images, labels=self.labels, seeds=self.seeds)
        os.replace(tmp, path)

    def sha256(self) -> str:
        """Hash of pixels, labels and seeds: the audit records it, the release checks it."""
        h = hashlib.sha256()
        for arr in (self.images, self.labels, self.seeds):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path) -> Samples:
        with np.load(path) as z:
            return cls(images=z["images"], labels=z["labels"], seeds=z["seeds"])


def plan(recipe: Recipe, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """Labels, per-image seeds and the batches of the whole sample set (shard-independent)."""
    cfg = recipe.sampling
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), cfg.images_per_class)
    seeds = np.array([sample_seed(cfg.seed, i) for i in range(len(labels))], dtype=np.int64)
    batches = [slice(a, min(a + cfg.batch_size, len(labels))) for a in range(0, len(labels), cfg.batch_size)]
    return labels, seeds, batches


def shard_path(run_dir: RunDir, shard: tuple[int, int]) -> Path:
    i, n = shard
    return run_dir.samples.parent / f"shard-{i:04d}-of-{n:04d}.npz"


def generate(
    recipe: Recipe,
    run_dir: RunDir,
    num_classes: int,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> Samples | None:
    """`sampling.images_per_class` images of every class, written to samples/samples.npz.

    Sharded (`shard=(i, n)`, from `--shard i/n` or a torchrun rank): this call generates the
    batches i, i+n, i+2n, ... of the single-process plan (whole batches, so every image is computed
    in the very batch it would be in one process: the union is bit for bit the single-process
    result) into samples/shard-i-of-n.npz; `merge_shards` assembles samples.npz once all n exist.
    Returns the samples, or None for a shard."""
    cfg = recipe.sampling
    model, train_scheduler = load_generator(run_dir.final_checkpoint, ema=cfg.use_ema)
    info = read_json(run_dir.final_checkpoint / "synthfactory.json")
    model.to(resolve_device(recipe.training.device))
    scheduler = sampling_scheduler(train_scheduler)
    size = int(model.config.sample_size)
    labels, seeds, batches = plan(recipe, num_classes)
    mine = batches if shard is None else batches[shard[0] :: shard[1]]
    images = np.empty((len(labels), size, size), dtype=np.uint8)
    done = np.zeros(len(labels), dtype=bool)
    with progress_bar(sum(b.stop - b.start for b in mine), "sample", "img", progress) as bar:
        for sl in mine:
            x = ddim_sample(
                model,
                scheduler,
                torch.from_numpy(labels[sl]),
                seeds[sl].tolist(),
                cfg.ddim_steps,
                size,
                cfg.guidance_scale,
                info["null_class"],
            )
            images[sl] = to_uint8(x)
            done[sl] = True
            bar.update(len(x))
    run_dir.samples.parent.mkdir(parents=True, exist_ok=True)
    if shard is not None:
        idx = np.flatnonzero(done)
        tmp = atomic_path(shard_path(run_dir, shard))
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, index=idx, images=images[idx], n_total=len(labels))
        os.replace(tmp, shard_path(run_dir, shard))
        return None
    samples = Samples(images=images, labels=labels, seeds=seeds)
    samples.save(run_dir.samples)
    return samples


def merge_shards(recipe: Recipe, run_dir: RunDir, num_classes: int, n: int) -> Samples | None:
    """samples.npz from shard-*-of-n.npz once every shard is there (None until then)."""
    paths = [shard_path(run_dir, (i, n)) for i in range(n)]
    if not all(p.exists() for p in paths):
        return None
    labels, seeds, _ = plan(recipe, num_classes)
    images, filled = None, np.zeros(len(labels), dtype=bool)
    for p in paths:
        with np.load(p) as z:
            if int(z["n_total"]) != len(labels):
                raise ValueError(
                    f"{p}: made for {int(z['n_total'])} images, the recipe asks for {len(labels)}"
                )
            if images is None:
                images = np.empty((len(labels), *z["images"].shape[1:]), dtype=np.uint8)
            images[z["index"]] = z["images"]
            filled[z["index"]] = True
    if not filled.all():
        raise ValueError(f"shards of {n} leave {int((~filled).sum())} images missing")
    samples = Samples(images=images, labels=labels, seeds=seeds)
    samples.save(run_dir.samples)
    for p in paths:
        p.unlink()
    return samples
