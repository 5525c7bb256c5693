"""A Hugging Face `datasets` DatasetDict saved on disk (`save_to_disk`), with an `image`
column (Image feature) and a `label` column (ClassLabel, whose names are the class names).

Only local copies are read: nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import DataError, RawSplit, bytes_sha256, item_id, to_grayscale, uint_to_unit_range


def read_hf(path: Path, train_split: str, heldout_split: str) -> tuple[RawSplit, RawSplit, list[str]]:
    import datasets

    try:
        dd = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError("path", f"not a dataset saved with save_to_disk: {e}") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise DataError("path", "expected a DatasetDict with train and held-out splits")
    for split, field in ((train_split, "train_split"), (heldout_split, "heldout_split")):
        if split not in dd:
            raise DataError(field, f"the dataset has no split '{split}' (has {list(dd)})")
    features = dd[train_split].features
    if "image" not in features or "label" not in features:
        raise DataError("path", f"need columns 'image' and 'label' (has {list(features)})")
    label_feature = features["label"]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise DataError("path", "the 'label' column must be a ClassLabel carrying class names")
    names = list(label_feature.names)
    marked = {"run_id", "sample_seed", "sample_index"} <= set(features)  # a synthfactory release's columns
    splits = []
    for split in (train_split, heldout_split):
        raw = RawSplit()
        for i, row in enumerate(dd[split]):
            arr = np.ascontiguousarray(np.asarray(row["image"]))
            item = item_id("array-row", arr.dtype.str, arr.shape, bytes_sha256(arr.data))
            arr = to_grayscale(arr) if arr.ndim == 3 else arr
            if arr.dtype not in (np.uint8, np.uint16):
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            place = item_id("row", split, len(dd[split]), i)
            raw.add(uint_to_unit_range(arr), names[row["label"]], f"{split}[{i}]", item=item, place=place)
            if marked:
                raw.marked.append((f"{split}[{i}]", str(row["run_id"])))
        splits.append(raw)
    return splits[0], splits[1], names
