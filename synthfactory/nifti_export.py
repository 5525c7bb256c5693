"""NIfTI output of a release (nibabel): one 2D NIfTI-1 file per synthetic slice, for pipelines
that read NIfTI (nnU-Net, MONAI, `datasets`' `niftifolder`).

Per file, `nifti/<class>/<sample index>.nii` (uncompressed: `datasets`' niftifolder infers the
class from the folder only for `.nii`; a 64 px slice is 4 kB):
- data: the released 8-bit image, shape (X, Y, 1), laid out so that the NIfTI reader's volume
  loading (RAS+, axial, `np.rot90`) gives back the released image's voxels exactly (a recipe
  reading them then scales intensities its own way);
- affine: RAS+, diagonal, in-plane spacing `outputs.nifti_spacing_mm` (the field of view you
  resample to divided by `data.image_size`), the same for the slice thickness; `xyzt_units` mm.
  Left null, spacing 1 and units "unknown": the pixel size of the recipe's resampling (pad to a
  square, resize) depends on each private volume's field of view, and no statistic of the
  private images is written, so the spacing is only ever what the recipe states;
- values: for CT read from DICOM or NIfTI through a window, `scl_slope`/`scl_inter` map the
  stored values back to Hounsfield units through the recipe's window, as the DICOM export's
  Rescale Slope/Intercept do; otherwise the model's 8-bit output, unscaled;
- marker: `descrip` "SYNTHETIC synthfactory <run id> <class>" (80 bytes at most), `intent_name`
  the class index, `aux_file` the sample seed. Nothing else: no audit figure.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom_export import hu_rescale

MARKER = "SYNTHETIC synthfactory"


def slice_to_nifti_array(image: np.ndarray) -> np.ndarray:
    """(H, W) image -> (X, Y, 1) voxels; the inverse of the reader's `np.rot90` of an axial plane."""
    return np.ascontiguousarray(np.rot90(image, k=-1))[:, :, None]


def synthetic_nifti(
    image: np.ndarray, *, run_id: str, class_name: str, class_index: int, sample_seed: int,
    spacing_mm: float | None, rescale: tuple[float, float, str],
) -> nib.Nifti1Image:  # fmt: skip
    """One released slice as a NIfTI-1 image with the synthetic marker and the stated spacing."""
    spacing = 1.0 if spacing_mm is None else float(spacing_mm)
    img = nib.Nifti1Image(slice_to_nifti_array(image), np.diag([spacing, spacing, spacing, 1.0]))
    hdr = img.header
    hdr.set_data_dtype(np.uint8)
    hdr.set_xyzt_units(xyz="mm" if spacing_mm is not None else "unknown")
    img.set_qform(img.affine, code="scanner")
    img.set_sform(img.affine, code="scanner")
    slope, intercept, kind = rescale
    if kind == "HU":
        hdr.set_slope_inter(slope, intercept)
    hdr["descrip"] = f"{MARKER} {run_id} {class_name}".encode()[:79]
    hdr["intent_name"] = str(class_index).encode()[:15]
    hdr["aux_file"] = f"seed {sample_seed}".encode()[:23]
    return img


def write_nifti_files(released, folder: Path) -> list[Path]:
    """nifti/<class>/<sample index>.nii for every released image of a ReleasedSet."""
    rescale = hu_rescale(released.modality, released.source, released.ct_window)
    paths = []
    for k in range(len(released.labels)):
        label = int(released.labels[k])
        name = released.class_names[label]
        img = synthetic_nifti(
            released.image(k), run_id=released.run_id, class_name=name, class_index=label,
            sample_seed=int(released.seeds[k]), spacing_mm=released.nifti_spacing_mm, rescale=rescale,
        )  # fmt: skip
        path = folder / "nifti" / name / f"{int(released.sample_index[k]):06d}.nii"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
        paths.append(path)
    return paths
