"""A folder of PNG/JPEG images with one subfolder per class.

Either `path/<train_split>/<class>/*` and `path/<heldout_split>/<class>/*`, or `path/<class>/*`
split at random by `data.heldout_fraction` (whole patients at a time with `data.group_by`). Images become grayscale; 8- and 16-bit pixels are
scaled to [-1, 1] by their bit depth. A file that cannot be decoded is skipped and listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .common import DataError, RawSplit, file_sha256, item_id, uint_to_unit_range
from .groups import group_rule, split_groups, split_items

if TYPE_CHECKING:
    from ..recipe import FolderData

SUFFIXES = {".png", ".jpg", ".jpeg"}


def _class_files(root: Path) -> list[tuple[str, str]]:
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in SUFFIXES:
                items.append((str(f), class_dir.name))
    return items


SYNTHETIC_MARKER = "synthfactory-run"  # the PNG text key synthfactory's releases carry


def marker_run(path: str) -> str | None:
    """The run id in synthfactory's synthetic marker (a PNG text chunk) of an image file, if any."""
    with Image.open(path) as im:
        text = {**im.info, **getattr(im, "text", {})}
    return str(text[SYNTHETIC_MARKER]) if SYNTHETIC_MARKER in text else None


def read_image_file(path: str) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return uint_to_unit_range(np.asarray(im, dtype=np.uint16))
        if im.mode == "I":
            return uint_to_unit_range(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
        return uint_to_unit_range(np.asarray(im.convert("L"), dtype=np.uint8))


def read_folder(cfg: FolderData) -> tuple[RawSplit, RawSplit, list[str], list[dict]]:
    """Both splits of a folder data set (cfg: the recipe's `data` block, `source: folder`)."""
    path = Path(cfg.path)
    rule = group_rule(cfg.group_by, path)
    if (path / cfg.train_split).is_dir() and (path / cfg.heldout_split).is_dir():
        train_items, held_items = _class_files(path / cfg.train_split), _class_files(path / cfg.heldout_split)
        groups = split_groups(train_items, held_items, rule)
    else:
        train_items, held_items, groups = split_items(
            _class_files(path), rule, cfg.heldout_fraction, cfg.split_seed
        )
    if not train_items:
        raise DataError("path", f"no PNG/JPEG files in class subfolders under {path}")
    names = sorted({lab for _, lab in train_items + held_items})
    skipped: list[dict] = []
    splits = []
    for items in (train_items, held_items):
        raw = RawSplit()
        for f, label in items:
            try:
                image = read_image_file(f)
                item = item_id("file", file_sha256(f))
                place = item_id("file-place", label, Path(f).stem)  # a re-encoded copy keeps its name
                rel = str(Path(f).relative_to(path))
                raw.add(image, label, rel, groups.get(f), item=item, place=place)
                run = marker_run(f)
                if run is not None:
                    raw.marked.append((rel, run))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                skipped.append({"file": f, "reason": f"{type(e).__name__}: {e}"})
        splits.append(raw)
    return splits[0], splits[1], names, skipped
