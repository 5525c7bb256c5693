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


def generate(recipe: Recipe, run_dir: RunDir, num_classes: int, progress: bool = True) -> Samples:
    """`sampling.images_per_class` images of every class, written to samples/samples.npz."""
    cfg = recipe.sampling
    model, train_scheduler = load_generator(run_dir.final_checkpoint, ema=cfg.use_ema)
    info = read_json(run_dir.final_checkpoint / "synthfactory.json")
    model.to(resolve_device(recipe.training.device))
    scheduler = sampling_scheduler(train_scheduler)
    size = int(model.config.sample_size)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), cfg.images_per_class)
    seeds = np.array([sample_seed(cfg.seed, i) for i in range(len(labels))], dtype=np.int64)
    images = np.empty((len(labels), size, size), dtype=np.uint8)
    with progress_bar(len(labels), "sample", "img", progress) as bar:
        for start in range(0, len(labels), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
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
            bar.update(len(x))
    samples = Samples(images=images, labels=labels, seeds=seeds)
    run_dir.samples.parent.mkdir(parents=True, exist_ok=True)
    samples.save(run_dir.samples)
    return samples
