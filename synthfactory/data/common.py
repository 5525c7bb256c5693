"""What every data source hands on: an ImageSet of float32 images in [-1, 1], labels, class
names and a manifest with, per image, a SHA-256 of its pixels and the identity of its source item.

The source item names what the image was made from, not its pixels, twice over: by content
(`item`: a file's bytes, a DICOM SOP Instance UID and frame, a NIfTI file and volume, an npz or
`datasets` row's raw bytes, a phantom's seed and index) and, where a source has one, by place
(`place`: an npz or `datasets` split, its length and the row; a file's class folder and name; a
NIfTI file name and volume). It survives re-preprocessing, and the place survives a copy stored at
another size (the same rows in a 64 px and a 128 px file): the same images are the same people. The
privacy ledger (ledger.py) takes two data sets for disjoint only when they share neither.

Preprocessing here is per image only (pad to a square, resize, fixed scaling). Nothing computes
a statistic over the private set, so preprocessing spends no privacy budget.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """The data does not match the recipe. `field` is the recipe field under `data.`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class RawSplit:
    """Images of one split as a source read them: any size, already scaled to [-1, 1]."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)  # patient (see `group_key`), if known
    items: list[str] = field(default_factory=list)  # source-item identity by content (see `item_id`)
    places: list[str | None] = field(default_factory=list)  # and by place, where the source has one
    marked: list[tuple[str, str]] = field(
        default_factory=list
    )  # (source, run id) of synthfactory's own images

    def add(
        self,
        image: np.ndarray,
        label: str,
        source: str,
        group: str | None = None,
        *,
        item: str,
        place: str | None = None,
    ) -> None:
        self.images.append(image)
        self.labels.append(label)
        self.sources.append(source)
        self.groups.append(group)
        self.items.append(item)
        self.places.append(place)


def item_id(kind: str, *parts: object) -> str:
    """The identity of one source item, as the manifest and the privacy ledger hold it: a SHA-256
    prefix (128 bits) of its kind and parts, so that no file name or DICOM UID is written out."""
    text = "\x1f".join([kind, *(str(p) for p in parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def bytes_sha256(data: bytes | memoryview) -> str:
    """SHA-256 of raw bytes (a file, an array row as stored), for `item_id`."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def group_key(value: object) -> str:
    """The manifest's name for a patient (or other group of images that must stay together): a
    SHA-256 prefix of the source's id, so the run directory never holds a patient id."""
    return hashlib.sha256(str(value).encode()).hexdigest()[:16]


@dataclass
class ImageSet:
    """The private training split and the held-out split, ready for every later stage."""

    train_images: np.ndarray  # float32 [N, 1, H, W] in [-1, 1]
    train_labels: np.ndarray  # int64 [N], indices into class_names
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    class_names: list[str]
    manifest: list[dict]  # one entry per image: split, index, label, sha256, source, item
    skipped: list[dict] = field(default_factory=list)  # files a source could not read, and why
    preprocessing: list[str] = field(default_factory=list)  # what was done to the pixels
    synthfactory_marked: list[tuple[str, str]] = field(
        default_factory=list
    )  # (source, run id) of its own images

    def manifest_sha256(self) -> str:
        """One hash for the whole manifest; it names the data without copying any image."""
        lines = "\n".join(json.dumps(m, sort_keys=True) for m in self.manifest)
        return hashlib.sha256(lines.encode()).hexdigest()

    def train_hashes(self) -> set[str]:
        """SHA-256 of every private training image (from the manifest)."""
        return {m["sha256"] for m in self.manifest if m["split"] == "train"}

    def item_ids(self) -> frozenset[str]:
        """The source items of every image, training and held-out, by content and by place: this
        data set's identity in the privacy ledger (both splits: held-out images are private too)."""
        return frozenset(m["item"] for m in self.manifest) | {
            m["place"] for m in self.manifest if "place" in m
        }

    def group_counts(self) -> dict | None:
        """Patients (groups) per split and held-out images of training patients; None without
        patient ids."""
        same = self.heldout_of_training_patients()
        if same is None:
            return None
        per_split = {
            split: len({m["group"] for m in self.manifest if m["split"] == split and "group" in m})
            for split in ("train", "heldout")
        }
        return {**per_split, "heldout_images_of_training_patients": int(same.sum())}

    def heldout_of_training_patients(self) -> np.ndarray | None:
        """Per held-out image, whether its patient (the manifest's `group`) also has training
        images; None when the source gives no patient ids."""
        groups = self.heldout_groups()
        if groups is None:
            return None
        train = {m.get("group") for m in self.manifest if m["split"] == "train"} - {None}
        return np.array([g in train for g in groups], dtype=bool)

    def heldout_groups(self) -> np.ndarray | None:
        """Per held-out image, its patient's group key (`image:<index>`, a patient of its own,
        where it has none); None when the source gives no patient ids."""
        if not any("group" in m for m in self.manifest):
            return None
        held = sorted((m["index"], m.get("group")) for m in self.manifest if m["split"] == "heldout")
        return np.array([g if g is not None else f"image:{i}" for i, g in held])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def read_labels_csv(labels_csv: Path, root: Path, columns: str) -> list[dict]:
    """The rows of a label CSV (`file,label` at least; `columns` names the full form for the
    error), each `file` resolved against the data folder `root`."""
    with open(labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DataError("labels_csv", f"{labels_csv} needs the columns {columns}")
    for r in rows:
        r["file"] = str((root / r["file"]).resolve())
    return rows


def window_to_unit_range(
    values: np.ndarray, modality: str, window: tuple[float, float], percentiles: tuple[float, float]
) -> np.ndarray:
    """Modality values of one image to [-1, 1]: CT through the HU `window` (centre, width), any
    other modality by the image's own `percentiles` (a per-image statistic: no privacy cost)."""
    if modality == "CT":
        center, width = window
        lo, hi = center - width / 2.0, center + width / 2.0
    else:
        lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        return np.full(values.shape, -1.0, dtype=np.float32)
    return (np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def uint_to_unit_range(img: np.ndarray) -> np.ndarray:
    """Fixed scaling of an unsigned integer image (8 or 16 bit) to [-1, 1]."""
    top = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / top) * 2.0 - 1.0


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, C] → [H, W] by ITU-R 601 luma (alpha, if any, is dropped)."""
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        rgb = img[..., :3].astype(np.float64)
        return rgb @ np.array([0.299, 0.587, 0.114])
    if img.ndim == 3 and img.shape[-1] == 1:
        return img[..., 0]
    raise ValueError(f"cannot make a grayscale image from shape {img.shape}")


def pad_square_resize(images: list[np.ndarray], size: int) -> np.ndarray:
    """Zero-pad each image (black, -1) to a centred square, then resize to size×size.

    Keeps the aspect ratio. Images of equal shape are resized in one batched call
    (bilinear with antialiasing, so downsampling does not alias).
    """
    out = np.empty((len(images), 1, size, size), dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    for shape, idx in by_shape.items():
        h, w = shape
        side = max(h, w)
        batch = torch.from_numpy(np.stack([images[i] for i in idx]).astype(np.float32))[:, None]
        if h != w:
            top, left = (side - h) // 2, (side - w) // 2
            batch = F.pad(batch, (left, side - w - left, top, side - h - top), value=-1.0)
        if side != size:
            batch = F.interpolate(
                batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        out[idx] = batch.clamp_(-1.0, 1.0).numpy()
    return out


def random_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of at most `limit` of n items (all if None)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def image_sha256(image: np.ndarray) -> str:
    """SHA-256 of one image exactly as the model sees it (float32, C order)."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


def build_image_set(
    train: RawSplit,
    heldout: RawSplit,
    classes: list[str],
    available: list[str],
    size: int,
    skipped: list[dict] | None = None,
    preprocessing: list[str] | None = None,
    limits: tuple[int | None, int | None] = (None, None),
    seed: int = 0,
) -> ImageSet:
    """Keep the recipe's classes (in the recipe's order), optionally a random subset of at most
    `limits` = (train, held-out) images, resize, label and hash every image."""
    missing = [c for c in classes if c not in available]
    if missing:
        raise DataError("classes", f"{missing} not in the data, whose classes are {available}")
    index = {name: i for i, name in enumerate(classes)}
    arrays, labels, manifest = {}, {}, []
    for (split, raw), limit in zip((("train", train), ("heldout", heldout)), limits, strict=True):
        keep = [i for i, lab in enumerate(raw.labels) if lab in index]
        if limit is not None and len(keep) > limit:
            rng = np.random.default_rng([seed, len(keep)])
            keep = sorted(rng.choice(keep, size=limit, replace=False).tolist())
        if not keep:
            raise DataError(
                "train_split" if split == "train" else "heldout_split",
                f"the {split} split holds no image of the classes {classes}",
            )
        arrays[split] = pad_square_resize([raw.images[i] for i in keep], size)
        labels[split] = np.array([index[raw.labels[i]] for i in keep], dtype=np.int64)
        for j, i in enumerate(keep):
            entry = {
                "split": split,
                "index": j,
                "label": raw.labels[i],
                "sha256": image_sha256(arrays[split][j]),
                "source": raw.sources[i],
                "item": raw.items[i],
            }
            if raw.places and raw.places[i] is not None:
                entry["place"] = raw.places[i]
            if raw.groups and raw.groups[i] is not None:
                entry["group"] = raw.groups[i]
            manifest.append(entry)
    marked = [src for raw in (train, heldout) for src in raw.marked]
    return ImageSet(
        synthfactory_marked=marked,
        train_images=arrays["train"],
        train_labels=labels["train"],
        heldout_images=arrays["heldout"],
        heldout_labels=labels["heldout"],
        class_names=list(classes),
        manifest=manifest,
        skipped=list(skipped or []),
        preprocessing=list(preprocessing or []),
    )


def split_by_fraction(
    items: list[tuple[str, str]], fraction: float | None, seed: int, field_name: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Stratified random split of (item, label) pairs into (train, held-out).

    Splitting happens per item (a file), so all frames of one file land on the same side.
    """
    if fraction is None:
        raise DataError(
            field_name,
            "the data has no train/held-out folders or split column; set data.heldout_fraction to split it",
        )
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in sorted({lab for _, lab in items}):
        group = [it for it in items if it[1] == label]
        order = rng.permutation(len(group))
        n_held = int(round(fraction * len(group)))
        if len(group) >= 2:
            n_held = min(max(n_held, 1), len(group) - 1)
        for rank, k in enumerate(order):
            (held if rank < n_held else train).append(group[k])
    return train, held


def split_groups_by_fraction(
    items: list[tuple[str, str]], groups: list[str], fraction: float | None, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Random split of (item, label) pairs that keeps each group (patient) on one side: whole
    groups, in a seeded random order, go to the held-out side until it holds `fraction` of the
    items. Not stratified by class (a patient's images may carry several labels)."""
    if fraction is None:
        raise DataError("heldout_fraction", "set data.heldout_fraction to split the data by group")
    names = sorted(set(groups))
    if len(names) < 2:
        raise DataError("group_by", f"{len(names)} group in the data: cannot split by group")
    order = np.random.default_rng(seed).permutation(len(names))
    held_names: set[str] = set()
    target = fraction * len(items)
    count = {g: groups.count(g) for g in names}
    for k in order[:-1]:  # the last group always stays in training
        if sum(count[g] for g in held_names) >= target:
            break
        held_names.add(names[k])
    train = [it for it, g in zip(items, groups, strict=True) if g not in held_names]
    held = [it for it, g in zip(items, groups, strict=True) if g in held_names]
    return train, held


def refuse_crossing_groups(
    train: list[tuple[str, str]], train_groups: list[str], held: list[tuple[str, str]], held_groups: list[str]
) -> None:
    """One line, naming a file on each side, when a group has images in both splits."""
    first_train = dict(zip(train_groups, (f for f, _ in train), strict=True))
    crossing = [(g, f) for (f, _), g in zip(held, held_groups, strict=True) if g in first_train]
    if crossing:
        n = len({g for g, _ in crossing})
        g, f = crossing[0]
        raise DataError(
            "group_by",
            f"{n} group(s) have images in both splits, e.g. {first_train[g]} (train) and {f} "
            "(held-out); split by group, or use heldout_fraction",
        )
