"""NIfTI out: each released slice as a 2D NIfTI-1 that nibabel, synthfactory's own NIfTI reader
and `datasets`' niftifolder read back; Hounsfield units for windowed CT; the synthetic marker;
the spacing the recipe states and no other."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from synthfactory.data.nifti import read_volume
from synthfactory.dicom_export import hu_rescale
from synthfactory.nifti_export import MARKER, synthetic_nifti


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(16, 12), dtype=np.uint8)  # not square: orientation shows


def test_a_slice_s_voxels_read_back_exactly_as_the_nifti_reader_loads_volumes(tmp_path) -> None:
    """What synthfactory writes, its `source: nifti` loads as the same voxels (RAS+, axial); a recipe
    then scales intensities its own way."""
    img = _image()
    path = tmp_path / "s.nii.gz"
    nib.save(synthetic_nifti(img, run_id="r1", class_name="glioma", class_index=2, sample_seed=7,
                             spacing_mm=3.75, rescale=hu_rescale("mri", "npz", None)), path)  # fmt: skip
    back = nib.load(path)
    assert back.shape == (12, 16, 1) and back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.rot90(read_volume(path, 0)[:, :, 0]), img)
    np.testing.assert_allclose(back.affine, np.diag([3.75, 3.75, 3.75, 1.0]))
    assert back.header.get_xyzt_units()[0] == "mm"
    assert back.header["descrip"].item().decode() == f"{MARKER} r1 glioma"
    assert back.header["intent_name"].item().decode() == "2"
    assert np.asarray(back.dataobj).min() >= 0 and back.dataobj.slope == 1.0  # 8-bit, unscaled


def test_windowed_ct_stores_hounsfield_units_as_the_dicom_export_does(tmp_path) -> None:
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rescale = hu_rescale("ct", "dicom", (40.0, 400.0))
    path = tmp_path / "ct.nii.gz"
    nib.save(synthetic_nifti(img, run_id="r", class_name="liver", class_index=0, sample_seed=1,
                             spacing_mm=None, rescale=rescale), path)  # fmt: skip
    back = nib.load(path)
    hu = back.get_fdata()
    assert hu.min() == pytest.approx(-160.0) and hu.max() == pytest.approx(240.0, abs=1e-3)
    assert (back.dataobj.slope, back.dataobj.inter) == pytest.approx(rescale[:2])
    # No spacing in the recipe: the file says unknown, not a guess.
    assert back.header.get_xyzt_units()[0] == "unknown"
    np.testing.assert_allclose(back.header.get_zooms(), (1.0, 1.0, 1.0))
    # 8-bit CT without a window (e.g. OrganAMNIST): no HU to restore, no scaling.
    plain = synthetic_nifti(img, run_id="r", class_name="liver", class_index=0, sample_seed=1,
                            spacing_mm=None, rescale=hu_rescale("ct", "npz", None))  # fmt: skip
    assert plain.header.get_slope_inter() == (None, None)
