"""Class-conditional DDIM sampling from a trained checkpoint.

The denoising loop is the one `ClassConditionalPipeline` runs (`pipeline.ddim_denoise`), with
the weights the pipeline samples with (`model.uses_ema`): start from Gaussian noise, ask the
UNet for the noise at each DDIM timestep, step. Each image's starting noise
comes from its own seed (derived from `sampling.seed` and the image's index), so an image can
be regenerated alone, and the result does not depend on the batch size (up to float rounding).
Samples are stored as 8-bit images: the audit and the release see exactly the same pixels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

from . import warmstart
from .ledger import LedgerRefused, RunLedger, read_artifact, require_covered
from .model import load_generator, resolve_device, sampling_scheduler
from .pipeline import ddim_denoise, to_uint8
from .progress import progress_bar
from .recipe import Recipe
from .rundir import RunDir, atomic_path, read_json


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample `index`: independent streams per image, from one recipe seed."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def uint8_to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W] → float32 [B, 1, H, W] in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0)[:, None]


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
    """Deterministic DDIM from per-image seeded noise (image i from
    `torch.Generator().manual_seed(seeds[i])`), through the pipeline's own loop
    (`pipeline.ddim_denoise`). Returns [B, 1, H, W] in [-1, 1]."""
    noise = [
        torch.randn((1, image_size, image_size), generator=torch.Generator().manual_seed(s)) for s in seeds
    ]
    return ddim_denoise(model, scheduler, torch.stack(noise), labels, steps, guidance_scale, null_class)


@dataclass
class Samples:
    """The sample store: uint8 images [M, H, W], labels and per-sample seeds.

    On disk a folder (samples/store/) of three plain .npy files. `load` memory-maps the images
    (the audit reads them as an array); the release reads them one at a time (`StoreImages`);
    sampling writes them batch by batch (`StoreWriter`). Nothing needs all M images in memory at
    once (200,000 images of 128×128 are 3.3 GB)."""

    images: np.ndarray  # uint8 [M, H, W]; a read-only memmap when loaded
    labels: np.ndarray  # int64 [M]
    seeds: np.ndarray  # int64 [M]

    def save(self, path: Path) -> None:
        writer = StoreWriter(path, self.labels, self.seeds, self.images.shape[1:])
        for a in range(0, len(self.labels), CHUNK):
            writer.write(a, self.images[a : a + CHUNK])
        writer.commit()

    def sha256(self) -> str:
        """Hash of pixels, labels and seeds: the audit records it, the release checks it. Read in
        chunks (same bytes, same hash as one `tobytes()` of each array)."""
        h = hashlib.sha256()
        for a in range(0, len(self.images), CHUNK):
            h.update(np.ascontiguousarray(self.images[a : a + CHUNK]).data)
        for arr in (self.labels, self.seeds):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path: Path) -> Samples:
        path = Path(path)
        legacy = path.parent / "samples.npz"  # run directories written before the store
        if not path.exists() and legacy.exists():
            with np.load(legacy) as z:
                return cls(images=z["images"], labels=z["labels"], seeds=z["seeds"])
        return cls(
            images=np.load(path / "images.npy", mmap_mode="r"),
            labels=np.load(path / "labels.npy"),
            seeds=np.load(path / "seeds.npy"),
        )


CHUNK = 4096  # images per piece when hashing or copying the store


class StoreWriter:
    """A new sample store, written in a folder beside `path` and moved into place by `commit`
    (an older store at `path` is replaced). Labels and seeds are saved at once; the images file
    gets its .npy header, then batches are written at their place with plain file writes (no
    memory map, so written pages never count as this process's memory)."""

    def __init__(self, path: Path, labels: np.ndarray, seeds: np.ndarray, image_shape: tuple[int, ...]):
        self.path = Path(path)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = atomic_path(self.path)
        self.tmp.mkdir()
        np.save(self.tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        np.save(self.tmp / "seeds.npy", np.asarray(seeds, dtype=np.int64))
        self.image_bytes = int(np.prod(image_shape))
        self.shape = (len(labels), *image_shape)
        self._fh = open(self.tmp / "images.npy", "wb")
        header = {"descr": "|u1", "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._fh, header)
        self.offset = self._fh.tell()
        self._fh.truncate(self.offset + len(labels) * self.image_bytes)
        self._fh.flush()

    def write(self, start: int, images: np.ndarray) -> None:
        """Images [b, *image_shape] (uint8) at rows start … start + b − 1."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape[1:] != self.shape[1:] or not 0 <= start <= self.shape[0] - len(images):
            raise ValueError(
                f"rows {start}+{len(images)} of shape {images.shape[1:]} do not fit {self.shape}"
            )
        view, at = memoryview(images).cast("B"), self.offset + start * self.image_bytes
        while view:  # pwrite may write less than asked
            n = os.pwrite(self._fh.fileno(), view, at)
            view, at = view[n:], at + n

    def commit(self) -> None:
        self._fh.close()
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class StoreImages:
    """The store's images read one at a time with plain file reads (`pread`): what the release
    streams. Unlike a memory map, the pages read never count as this process's resident memory,
    so releasing 200,000 images keeps the process small."""

    def __init__(self, path: Path):
        self.file = Path(path) / "images.npy"
        with open(self.file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            self.shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if dtype != np.uint8 or fortran:
            raise ValueError(f"{self.file}: expected a C-ordered uint8 array, found {dtype}")
        self.image_bytes = int(np.prod(self.shape[1:]))
        self._fd = os.open(self.file, os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(k)
        raw = os.pread(self._fd, self.image_bytes, self.offset + k * self.image_bytes)
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.shape[1:])

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def class_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """`total` split in proportion to `weights` (largest remainders), at least one per class."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
    share = w * (total - len(w))  # one image per class first, the rest by weight
    base = np.floor(share).astype(np.int64) + 1
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    base[order[: total - int(base.sum())]] += 1
    return base


def dp_counts(run_dir: RunDir) -> np.ndarray:
    """The warm start's noisy class counts, read back only when the generator's own ledger holds
    the query that answered them (its ε is then in the generator's ε); else LedgerRefused."""
    if not run_dir.central_images.is_file():
        raise LedgerRefused(
            f"{run_dir.central_images}: no warm-start answer; sampling.class_proportions: dp_counts needs one"
        )
    central = warmstart.load(run_dir.central_images)
    carried = read_artifact(run_dir.final_checkpoint / "unet")
    warmstart.covered_answer(carried.warm_start() if carried else None, central, run_dir.central_images)
    return central.counts


def images_per_class(recipe: Recipe, run_dir: RunDir | None, num_classes: int) -> np.ndarray:
    """How many images of each class: equal, or by the warm start's noisy (DP) counts."""
    cfg = recipe.sampling
    if cfg.class_proportions == "equal" or run_dir is None:
        return np.full(num_classes, cfg.images_per_class, dtype=np.int64)
    return class_counts(cfg.images_per_class * num_classes, dp_counts(run_dir))


@dataclass(frozen=True)
class SampleLayout:
    """The whole sample set, whatever the shards: each image's label and seed, and the batches."""

    labels: np.ndarray
    seeds: np.ndarray
    batches: list[slice]


def sample_layout(recipe: Recipe, num_classes: int, run_dir: RunDir | None = None) -> SampleLayout:
    """Labels, per-image seeds and the batches of the whole sample set (shard-independent)."""
    cfg = recipe.sampling
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class(recipe, run_dir, num_classes))
    seeds = np.array([sample_seed(cfg.seed, i) for i in range(len(labels))], dtype=np.int64)
    batches = [slice(a, min(a + cfg.batch_size, len(labels))) for a in range(0, len(labels), cfg.batch_size)]
    return SampleLayout(labels, seeds, batches)


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
    """`sampling.images_per_class` images of every class, written to the sample store (samples/store/).

    Sharded (`shard=(i, n)`, from `--shard i/n` or a torchrun rank): this call generates the
    batches i, i+n, i+2n, ... of the single-process plan (whole batches, so every image is computed
    in the very batch it would be in one process: the union is bit for bit the single-process
    result) into samples/shard-i-of-n.npz; `merge_shards` assembles the store once all n exist.
    Returns the samples, or None for a shard."""
    cfg = recipe.sampling
    require_covered(run_dir.final_checkpoint / "unet", RunLedger(run_dir.ledger).read(), "the generator")
    model, train_scheduler = load_generator(run_dir.final_checkpoint)
    info = read_json(run_dir.final_checkpoint / "synthfactory.json")
    model.to(resolve_device(recipe.training.device))
    scheduler = sampling_scheduler(train_scheduler)
    size = int(model.config.sample_size)
    layout = sample_layout(recipe, num_classes, run_dir)
    labels, seeds, batches = layout.labels, layout.seeds, layout.batches
    mine = batches if shard is None else batches[shard[0] :: shard[1]]
    run_dir.samples.parent.mkdir(parents=True, exist_ok=True)
    # One process: each batch straight into the store. A shard: its batches, saved together.
    store = StoreWriter(run_dir.samples, labels, seeds, (size, size)) if shard is None else None
    parts: list[tuple[slice, np.ndarray]] = []
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
            if store is not None:
                store.write(sl.start, to_uint8(x))
            else:
                parts.append((sl, to_uint8(x)))
            bar.update(len(x))
    if store is None:
        idx = (
            np.concatenate([np.arange(sl.start, sl.stop) for sl, _ in parts])
            if parts
            else np.zeros(0, np.int64)
        )
        images = np.concatenate([im for _, im in parts]) if parts else np.zeros((0, size, size), np.uint8)
        tmp = atomic_path(shard_path(run_dir, shard))
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, index=idx, images=images, n_total=len(labels))
        os.replace(tmp, shard_path(run_dir, shard))
        return None
    store.commit()
    return Samples.load(run_dir.samples)


def merge_shards(recipe: Recipe, run_dir: RunDir, num_classes: int, n: int) -> Samples | None:
    """The sample store from shard-*-of-n.npz once every shard is there (None until then)."""
    paths = [shard_path(run_dir, (i, n)) for i in range(n)]
    if not all(p.exists() for p in paths):
        return None
    layout = sample_layout(recipe, num_classes, run_dir)
    labels, seeds = layout.labels, layout.seeds
    store, filled = None, np.zeros(len(labels), dtype=bool)
    for p in paths:  # one shard in memory at a time
        with np.load(p) as z:
            if int(z["n_total"]) != len(labels):
                raise ValueError(
                    f"{p}: made for {int(z['n_total'])} images, the recipe asks for {len(labels)}"
                )
            index, images = z["index"], z["images"]
            if store is None:
                store = StoreWriter(run_dir.samples, labels, seeds, images.shape[1:])
            for k, image in zip(index, images, strict=True):
                store.write(int(k), image[None])
            filled[index] = True
    if not filled.all():
        store.abort()
        raise ValueError(f"shards of {n} leave {int((~filled).sum())} images missing")
    store.commit()
    for p in paths:
        p.unlink()
    return Samples.load(run_dir.samples)
