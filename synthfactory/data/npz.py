"""NumPy .npz in the MedMNIST layout: `{split}_images` [N, H, W] (or [N, H, W, C]) and
`{split}_labels` [N] (or [N, 1]), with optional `class_names` and `{split}_group` [N] (a patient or
scan id per image: the audit then leaves held-out images of training patients out of its
calibration). Unsigned 8/16-bit pixels are scaled to [-1, 1] by their fixed bit depth, float
pixels are taken to lie in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import DataError, RawSplit, bytes_sha256, group_key, item_id, to_grayscale, uint_to_unit_range


def _scale(img: np.ndarray) -> np.ndarray:
    img = to_grayscale(img) if img.ndim == 3 else img
    if np.issubdtype(img.dtype, np.integer):
        if img.dtype not in (np.uint8, np.uint16):
            img = np.clip(img, 0, 255).astype(np.uint8)
        return uint_to_unit_range(img)
    return (np.clip(img.astype(np.float32), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def read_npz(path: Path, train_split: str, heldout_split: str) -> tuple[RawSplit, RawSplit, list[str]]:
    """Both splits of a MedMNIST-layout .npz. A file that is not a readable .npz (truncated,
    corrupt, not a zip, pickled arrays) raises DataError naming it."""
    try:
        return _read_npz(path, train_split, heldout_split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's reader raises BadZipFile, zlib.error, EOFError,
        # ValueError, and for a damaged array header even tokenize.TokenError: any of them means
        # the file is not a readable .npz.
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError("path", f"{path.name} is not a readable .npz file ({reason})") from None


def _read_npz(path: Path, train_split: str, heldout_split: str) -> tuple[RawSplit, RawSplit, list[str]]:
    # The file handle is ours: np.load on a damaged file can raise with its own handle left open.
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
        keys = set(z.files)
        for split, field in ((train_split, "train_split"), (heldout_split, "heldout_split")):
            for kind in ("images", "labels"):
                if f"{split}_{kind}" not in keys:
                    raise DataError(field, f"{path.name} has no array '{split}_{kind}' (has {sorted(keys)})")
        if "class_names" in keys:
            names = [str(c) for c in z["class_names"]]
        else:
            top = max(int(z[f"{s}_labels"].max()) for s in (train_split, heldout_split))
            names = [str(i) for i in range(top + 1)]
        splits = []
        for split in (train_split, heldout_split):
            images = z[f"{split}_images"]
            labels = z[f"{split}_labels"].reshape(-1).astype(np.int64)
            if len(images) != len(labels):
                raise DataError("path", f"{path.name}: {split}_images and {split}_labels differ in length")
            if labels.min() < 0 or labels.max() >= len(names):
                raise DataError("path", f"{path.name}: {split}_labels outside 0..{len(names) - 1}")
            groups = z[f"{split}_group"].reshape(-1) if f"{split}_group" in keys else None
            if groups is not None and len(groups) != len(labels):
                raise DataError("path", f"{path.name}: {split}_group and {split}_labels differ in length")
            raw = RawSplit()
            for i in range(len(images)):
                group = None if groups is None else group_key(groups[i])
                row = np.ascontiguousarray(images[i])
                item = item_id("array-row", row.dtype.str, row.shape, bytes_sha256(row.data))
                place = item_id("row", split, len(images), i)  # the same row of a copy at another size
                raw.add(
                    _scale(row), names[labels[i]], f"{path.name}:{split}[{i}]", group, item=item, place=place
                )
            splits.append(raw)
    return splits[0], splits[1], names
