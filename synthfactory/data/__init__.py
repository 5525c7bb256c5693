"""Data sources: real images in, one ImageSet out (float32 [N, 1, H, W] in [-1, 1], int64
labels, class names, a manifest with a SHA-256 per image, the files skipped and why).

The data layer knows nothing of training, privacy or the run directory.
"""

from __future__ import annotations

from ..recipe import DataConfig, DicomData, FolderData, HFData, NiftiData, NpzData, PhantomData
from .common import DataError, ImageSet, build_image_set
from .dicom import read_dicom_folder
from .folder import read_folder
from .hf import read_hf
from .nifti import read_nifti
from .npz import read_npz
from .phantom import CLASSES as PHANTOM_CLASSES
from .phantom import read_phantom

__all__ = ["DataError", "ImageSet", "load_images", "PHANTOM_CLASSES"]

_DICOM_MODALITY = {"mri": "MR", "ct": "CT", "us": "US"}


def load_images(cfg: DataConfig, modality: str) -> ImageSet:
    """Read the recipe's data source into an ImageSet. Raises DataError naming a data field."""
    try:
        train, held, names, skipped, first_step = READERS[cfg.source](cfg, modality)
    except OSError as e:  # the path is not what the source reads: a file for a folder, no access, ...
        raise DataError("path", f"cannot read {getattr(cfg, 'path', '')}: {e.strerror or e}") from None
    steps = [first_step, "pad to a centred square with black, resize (bilinear, antialiased)"]
    steps.append("no statistic computed over the data set: preprocessing spends no privacy budget")
    limits = (cfg.max_train_images, cfg.max_heldout_images)
    if any(v is not None for v in limits):
        steps.append(
            f"random subset (seed {cfg.split_seed}) of at most {limits[0]} training and {limits[1]} held-out images"
        )
    return build_image_set(
        train, held, cfg.classes, names, cfg.image_size, skipped, steps, limits=limits, seed=cfg.split_seed
    )


# Each reader: (train, held-out, class names, skipped files, its preprocessing step).


def _phantom(cfg: PhantomData, modality: str):
    spec = cfg.phantom
    train, held, names = read_phantom(modality, cfg.image_size, spec.n_train, spec.n_heldout, spec.seed)
    return train, held, names, [], "procedural phantom, generated in [0, 1] and scaled to [-1, 1]"


def _npz(cfg: NpzData, modality: str):
    train, held, names = read_npz(cfg.path, cfg.train_split, cfg.heldout_split)
    return train, held, names, [], "fixed scaling by bit depth to [-1, 1]"


def _folder(cfg: FolderData, modality: str):
    train, held, names, skipped = read_folder(cfg)
    return train, held, names, skipped, "grayscale; fixed scaling by bit depth to [-1, 1]"


def _hf(cfg: HFData, modality: str):
    train, held, names = read_hf(cfg.path, cfg.train_split, cfg.heldout_split)
    return train, held, names, [], "grayscale; fixed scaling by bit depth to [-1, 1]"


def _dicom(cfg: DicomData, modality: str):
    train, held, names, skipped = read_dicom_folder(cfg, _DICOM_MODALITY[modality])
    window = cfg.window
    step = (
        "DICOM modality transform (rescale slope/intercept or LUT); CT window "
        f"centre {window[0]:g} HU, width {window[1]:g} HU; other modalities per-image "
        f"percentiles {cfg.percentiles[0]:g}-{cfg.percentiles[1]:g}; MONOCHROME1 inverted; colour to luma"
    )
    return train, held, names, skipped, step


def _nifti(cfg: NiftiData, modality: str):
    train, held, names, skipped = read_nifti(cfg, modality)
    spec = cfg.nifti
    step = (
        f"NIfTI (nibabel): closest canonical RAS+ orientation, volume {spec.volume} of 4D files, "
        f"slices along axis {spec.axis}"
        + (f" in range{tuple(spec.slices)}" if spec.slices else "")
        + ", rotated 90°; "
        + (
            f"CT window centre {cfg.ct_window.center:g} HU, width {cfg.ct_window.width:g} HU"
            if modality == "ct"
            else f"per-slice percentiles {cfg.percentiles[0]:g}-{cfg.percentiles[1]:g}"
        )
    )
    return train, held, names, skipped, step


READERS = {"phantom": _phantom, "npz": _npz, "folder": _folder, "hf": _hf, "dicom": _dicom, "nifti": _nifti}
"""The reader of each `data.source`."""
