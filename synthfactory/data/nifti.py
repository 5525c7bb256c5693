"""NIfTI volumes (nibabel) → 2D slices: what most MRI and CT research data looks like (BraTS,
IXI, the Medical Segmentation Decathlon).

`data.labels_csv` lists the volumes: columns `file,label` and optionally `split` (else
`data.heldout_fraction` splits whole volumes, or whole subjects with `group_by: column:NAME`),
`slice` (then each row labels one slice of its file, and only listed slices are taken) and
`mask` (a mask volume: only slices where it is non-empty are taken). Each volume is reoriented to
the closest canonical (RAS+) orientation, a 4D file gives its `data.nifti.volume`-th volume, and
slices are cut along `data.nifti.axis` (2: axial), in `data.nifti.slices` (start, stop, step), and
turned so that the next axis points up. Intensities: CT by the HU window (`data.ct_window`),
others by each slice's own percentiles (`data.percentiles`; per slice, so that preprocessing stays
per image). One volume's slices always share a group, so they never straddle the split. Note that
ε protects one training image, i.e. one slice: a patient with k slices in training is protected
at the group level k·ε (weaker), as for any slice data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .common import RawSplit, file_sha256, group_key, item_id, read_labels_csv, window_to_unit_range
from .groups import group_rule, split_groups, split_items

if TYPE_CHECKING:
    from ..recipe import NiftiData


def read_volume(path: str | Path, volume: int) -> np.ndarray:
    """The (volume-th) 3D array of a NIfTI file in the closest canonical (RAS+) orientation,
    float32 in the file's scaled units (e.g. HU)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        if not 0 <= volume < data.shape[3]:
            raise ValueError(f"has {data.shape[3]} volumes, not a volume {volume}")
        data = data[..., volume]
    if data.ndim != 3:
        raise ValueError(f"is {data.ndim}-dimensional, not a 3D or 4D volume")
    return data


def volume_slices(data: np.ndarray, axis: int, keep: range | None, mask: np.ndarray | None) -> list[int]:
    """Indices of the slices to take along `axis`: in `keep`, and where `mask` is non-empty."""
    n = data.shape[axis]
    idx = list(range(n) if keep is None else keep)
    idx = [k for k in idx if 0 <= k < n]
    if mask is not None:
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the volume's {data.shape}")
        nonempty = np.moveaxis(mask != 0, axis, 0).reshape(n, -1).any(1)
        idx = [k for k in idx if nonempty[k]]
    return idx


def read_nifti(cfg: NiftiData, modality: str) -> tuple[RawSplit, RawSplit, list[str], list[dict]]:
    """Both splits of a NIfTI data set (cfg: the recipe's `data` block, `source: nifti`)."""
    root, spec = Path(cfg.path), cfg.nifti
    rows = read_labels_csv(cfg.labels_csv, root, "file,label[,split][,slice][,mask]")
    per_file: dict[str, list[dict]] = {}
    for r in rows:
        per_file.setdefault(r["file"], []).append(r)
    items = [(f, rs[0]["label"]) for f, rs in per_file.items()]
    first = {f: rs[0] for f, rs in per_file.items()}
    rule = group_rule(cfg.group_by, root) or (lambda f, row: group_key(f"volume:{f}"))
    if "split" in rows[0]:
        train = [(f, lab) for f, lab in items if first[f]["split"] == cfg.train_split]
        held = [(f, lab) for f, lab in items if first[f]["split"] == cfg.heldout_split]
        groups = split_groups(train, held, rule, first)
    else:
        train, held, groups = split_items(items, rule, cfg.heldout_fraction, cfg.split_seed, first)
    keep = None if spec.slices is None else range(*spec.slices)
    dicom_modality = {"ct": "CT"}.get(modality, "")
    skipped: list[dict] = []
    splits = []
    for side in (train, held):
        raw = RawSplit()
        for f, _ in side:
            try:
                data = read_volume(f, spec.volume)
                mask = read_volume(root / first[f]["mask"], 0) if first[f].get("mask") else None
                labelled = {
                    int(r["slice"]): r["label"] for r in per_file[f] if r.get("slice") not in (None, "")
                }
                take = volume_slices(data, spec.axis, keep, mask)
            except (OSError, ValueError, EOFError, ImageFileError, HeaderDataError) as e:
                skipped.append({"file": f, "reason": " ".join(f"{type(e).__name__}: {e}".split())[:300]})
                continue
            rel = Path(f).relative_to(root) if Path(f).is_relative_to(root) else Path(f)
            # one item per volume: slices along another axis (or resampled) share its voxels
            item = item_id("nifti", file_sha256(f), spec.volume)
            place = item_id("nifti-place", Path(f).name.split(".nii")[0], spec.volume)
            for k in take:
                if labelled and k not in labelled:
                    continue
                plane = np.rot90(np.take(data, k, axis=spec.axis))
                # per slice, not per volume: the DP unit is one image, and a volume-wide
                # statistic would let one slice change how the others are scaled
                img = window_to_unit_range(plane, dicom_modality, cfg.window, cfg.percentiles)
                raw.add(
                    np.ascontiguousarray(img),
                    labelled.get(k, first[f]["label"]),
                    f"{rel}#slice{k}",
                    groups[f],
                    item=item,
                    place=place,
                )
        splits.append(raw)
    names = sorted({r["label"] for r in rows})
    return splits[0], splits[1], names, skipped
