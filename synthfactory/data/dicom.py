"""A folder of DICOM files, read with pydicom.

Labels come from class subfolders (`path/<class>/...`, or `path/<split>/<class>/...`) or from a
CSV with columns `file,label[,split]` (file paths relative to `path`). Pixels go through:

1. decoding (pydicom; compressed transfer syntaxes through its plugins),
2. PALETTE COLOR through the palette, colour (RGB, and YBR that pydicom decodes to RGB) to luma,
3. the modality transform: RescaleSlope/RescaleIntercept (per frame for enhanced multi-frame
   objects) or a Modality LUT,
4. CT: the recipe's window (centre/width in HU) to [-1, 1]; MR, US and others: per-image
   percentile scaling (no statistic over the data set, so no privacy budget is spent),
5. MONOCHROME1 inverted so that bright always means high signal.

Every frame of a multi-frame file becomes one image with the file's label; all frames of one
file stay on the same side of the train/held-out split. A file that cannot be read is skipped
and listed with the reason; reading goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut

from .common import (
    DataError,
    RawSplit,
    file_sha256,
    group_key,
    item_id,
    read_labels_csv,
    to_grayscale,
    window_to_unit_range,
)
from .groups import group_rule, split_groups, split_items

if TYPE_CHECKING:
    from ..recipe import DicomData


class UnreadableDicom(Exception):
    """A file that is not a usable DICOM image; the message is the reason recorded."""


def _frame_rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) of one frame from the functional groups of an enhanced object."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq and len(seq) > idx:
            pvt = seq[idx].get("PixelValueTransformationSequence")
            if pvt and "RescaleSlope" in pvt[0] and "RescaleIntercept" in pvt[0]:
                return float(pvt[0].RescaleSlope), float(pvt[0].RescaleIntercept)
    return None


def _modality_values(ds: pydicom.Dataset, frame_pixels: np.ndarray, frame: int) -> np.ndarray:
    rescale = _frame_rescale(ds, frame)
    if rescale is not None:
        slope, intercept = rescale
        return frame_pixels.astype(np.float64) * slope + intercept
    return apply_modality_lut(frame_pixels, ds).astype(np.float64)


def load_dicom(path: str | Path) -> pydicom.Dataset:
    """The whole DICOM dataset of a file; UnreadableDicom when it is not one."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise UnreadableDicom(f"not a DICOM file ({e})") from None
    except Exception as e:  # truncated or corrupt files raise many kinds of errors
        raise UnreadableDicom(f"cannot parse: {type(e).__name__}: {e}") from None


def dataset_frames(
    ds: pydicom.Dataset, fallback_modality: str, window: tuple[float, float], percentiles: tuple[float, float]
) -> list[np.ndarray]:
    """All frames of a loaded DICOM dataset as float32 [H, W] images in [-1, 1]."""
    if "PixelData" not in ds:
        raise UnreadableDicom("no pixel data (not an image object)")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise UnreadableDicom(f"cannot decode pixels: {type(e).__name__}: {e}") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    colour = pixels.ndim == (4 if n_frames > 1 else 3)
    frames = pixels if n_frames > 1 else pixels[None]
    modality = str(ds.get("Modality", "") or fallback_modality).upper()

    out = []
    for k, frame in enumerate(frames):
        if colour:
            # Colour pixels carry display values, not a modality quantity: no rescale or window.
            values = to_grayscale(frame)
            img = window_to_unit_range(values, "OT", window, percentiles)
        else:
            values = _modality_values(ds, frame, k)
            img = window_to_unit_range(values, modality, window, percentiles)
            if photometric == "MONOCHROME1":
                img = -img
        out.append(img)
    return out


def _provenance_run(ds: pydicom.Dataset) -> str:
    """The run id in a synthfactory DICOM file's private block ('' if it cannot be read)."""
    from ..dicom_export import read_provenance

    try:
        return str(read_provenance(ds)["run_id"])
    except (KeyError, ValueError):
        return ""


def patient_of(path: str | Path) -> str | None:
    """The file's patient as a `group_key`: PatientID, else StudyInstanceUID, else None (also
    for a file that is not readable DICOM: it is skipped when its pixels are read)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception:  # noqa: BLE001 - any unreadable file: no patient; reading it reports why
        return None
    return dataset_patient(ds)


def dataset_patient(ds: pydicom.Dataset) -> str | None:
    """A loaded dataset's patient as a `group_key` (PatientID, else StudyInstanceUID), or None."""
    for tag in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(tag, "") or "").strip()
        if value:
            return group_key(value)
    return None


def _labelled_files(root: Path, labels_csv: Path | None, train_split: str, heldout_split: str):
    """([(file, label)] train, [(file, label)] held-out or None when a split is still needed,
    {file: its label-CSV row})."""
    if labels_csv is not None:
        rows = read_labels_csv(labels_csv, root, "file,label[,split]")
        has_split = "split" in rows[0]
        by_file = {r["file"]: r for r in rows}
        items = [(f, r["label"], r.get("split")) for f, r in by_file.items()]
        if has_split:
            train = [(f, lab) for f, lab, s in items if s == train_split]
            held = [(f, lab) for f, lab, s in items if s == heldout_split]
            return train, held, by_file
        return [(f, lab) for f, lab, _ in items], None, by_file

    def walk(base: Path) -> list[tuple[str, str]]:
        found = []
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    found.append((str(f), class_dir.name))
        return found

    if (root / train_split).is_dir() and (root / heldout_split).is_dir():
        return walk(root / train_split), walk(root / heldout_split), {}
    return walk(root), None, {}


def read_dicom_folder(
    cfg: DicomData, fallback_modality: str
) -> tuple[RawSplit, RawSplit, list[str], list[dict]]:
    """Both splits of a DICOM data set (cfg: the recipe's `data` block, `source: dicom`)."""
    root = Path(cfg.path)
    train_items, held_items, rows = _labelled_files(root, cfg.labels_csv, cfg.train_split, cfg.heldout_split)
    rule = group_rule(cfg.group_by, root)
    if held_items is None:
        train_items, held_items, groups = split_items(
            train_items, rule, cfg.heldout_fraction, cfg.split_seed, rows
        )
    else:
        groups = split_groups(train_items, held_items, rule, rows)
    if not train_items:
        raise DataError("path", f"no labelled files under {root}")
    names = sorted({lab for _, lab in train_items + held_items})
    skipped: list[dict] = []
    splits = []
    for items in (train_items, held_items):
        raw = RawSplit()
        for f, label in items:
            try:
                ds = load_dicom(f)
                frames = dataset_frames(ds, fallback_modality, cfg.window, cfg.percentiles)
            except (UnreadableDicom, OSError) as e:
                skipped.append({"file": f, "reason": str(e)})
                continue
            rel = Path(f).relative_to(root) if Path(f).is_relative_to(root) else Path(f)
            patient = groups[f] if rule is not None else dataset_patient(ds)
            if (
                str(ds.get("Manufacturer", "")) == "synthfactory"
                and str(ds.get("ConversionType", "")) == "SYN"
            ):
                raw.marked.append((str(rel), _provenance_run(ds)))
            uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            instance = ("uid", uid) if uid else ("file", file_sha256(f))
            for k, img in enumerate(frames):
                item = item_id("dicom", *instance, k)
                raw.add(img, label, f"{rel}#frame{k}" if len(frames) > 1 else str(rel), patient, item=item)
        splits.append(raw)
    return splits[0], splits[1], names, skipped
