"""DICOM output: inputs full of identifying data go in, synthetic Secondary Capture files come
out with none of it, the same pixels, the provenance, and a clean bill from dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import tiny_recipe, write_recipe
from pydicom.uid import generate_uid

from synthfactory.data.phantom import phantom_images
from synthfactory.dicom_export import SECONDARY_CAPTURE, read_provenance
from synthfactory.run import StageOptions, check, create_run, run_remaining
from synthfactory.rundir import read_json
from synthfactory.sample import Samples

PLANTED = {
    "PatientName": "DOEMOUSE^JANEQUEEN^Q",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19710402",
    "OtherPatientIDs": "ALT-ID-4242-XYZ",
    "InstitutionName": "St Example Memorial Hospital",
    "InstitutionAddress": "12 Nowhere Lane Springfield",
    "ReferringPhysicianName": "HOUSEGREG^GREGORY",
    "StudyDate": "20240517",
    "AccessionNumber": "ACC5551234",
    "StationName": "SCANNER-ROOM-7B",
    "StudyDescription": "BRAIN W/WO CONTRAST PROTOCOL-XQ",
    "DeviceSerialNumber": "SN-A1B2C3D4E5",
}
PRIVATE_VALUE = "SECRET-PRIVATE-PAYLOAD-7731"


def _input_dicoms(template: Path, folder: Path, n_per_class: int = 40) -> list[str]:
    """MR files from a real DICOM (the pydicom test file MR_small.dcm) with phantom pixels and
    identifying values planted everywhere. Returns every planted string, UIDs included."""
    planted = [*PLANTED.values(), PRIVATE_VALUE]
    for label, name in enumerate(("no_lesion", "lesion")):
        (folder / name).mkdir(parents=True)
        imgs = phantom_images("mri", label, n_per_class, 16, 10 + label)
        for i, img in enumerate(imgs):
            ds = pydicom.dcmread(template)
            ds.PixelData = np.round((np.squeeze(img) + 1) * 1000).astype(np.uint16).tobytes()
            ds.Rows = ds.Columns = 16
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            for k, v in PLANTED.items():
                setattr(ds, k, v)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            planted += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
            block = ds.private_block(0x0009, "ACME HOSPITAL 1", create=True)
            block.add_new(0x01, "LO", PRIVATE_VALUE)
            ds.save_as(folder / name / f"{i:03d}.dcm", enforce_file_format=True)
    return planted


@pytest.fixture(scope="module")
def dicom_run(shared_data: Path, tmp_path_factory):
    base = tmp_path_factory.mktemp("dicom_run")
    planted = _input_dicoms(shared_data / "dicom_samples" / "MR_small.dcm", base / "inputs")
    recipe = tiny_recipe(
        data={
            "source": "dicom",
            "path": str(base / "inputs"),
            "image_size": 16,
            "classes": ["no_lesion", "lesion"],
            "heldout_fraction": 0.4,
        },
        outputs={"formats": ["hf", "png", "dicom"]},
        evaluation={"enabled": False},
    )
    checked = check(write_recipe(base, recipe))
    run_dir = create_run(checked, base / "runs")
    run_remaining(checked, run_dir, StageOptions(progress=False, audit_root=base / "pa"))
    return run_dir, planted


def test_outputs_carry_no_input_attribute(dicom_run) -> None:
    run_dir, planted = dicom_run
    outputs = [p for p in run_dir.release_dir(True).rglob("*") if p.is_file()]
    dicoms = [p for p in outputs if p.suffix == ".dcm"]
    assert dicoms and len(dicoms) == read_json(run_dir.release_dir(True) / "release.json")["n_released"]
    needles = [s.encode() for s in planted] + [s.replace("^", " ").encode() for s in planted]
    for path in outputs:  # every released byte: DICOM, Arrow, PNG, JSON
        data = path.read_bytes()
        leaked = [n for n in needles if n in data]
        assert not leaked, f"{path}: {leaked}"
    for path in dicoms:  # and every element's value, decoded
        ds = pydicom.dcmread(path)
        values = " ".join(str(e.value) for e in ds.iterall() if e.tag != 0x7FE00010)
        assert not [s for s in planted if s in values]
        assert not [e for e in ds.iterall() if e.tag.group == 0x0009]


def test_dicom_files_are_synthetic_secondary_captures_with_the_same_pixels(dicom_run) -> None:
    run_dir, _ = dicom_run
    audit = read_json(run_dir.audit_json)
    samples = Samples.load(run_dir.samples)
    dicoms = sorted(run_dir.release_dir(True).glob("dicom/*/*.dcm"))
    uids = set()
    for path in dicoms:
        ds = pydicom.dcmread(path)
        assert (
            ds.SOPClassUID == SECONDARY_CAPTURE and ds.file_meta.MediaStorageSOPClassUID == SECONDARY_CAPTURE
        )
        assert ds.Modality == "MR" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert str(ds.PatientName) == "SYNTHETIC^tiny" and ds.PatientID == f"SF-{run_dir.run_id}"
        assert (
            ds.PatientIdentityRemoved == "YES"
            and ds.BurnedInAnnotation == "NO"
            and ds.ConversionType == "SYN"
        )
        # The standard synthetic marker, read by tag as a viewer without the keyword would.
        assert ds[0x0008, 0x001C].VR == "CS" and ds[0x0008, 0x001C].value == "YES"
        assert "synthfactory" in ds.DeidentificationMethod
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        prov = read_provenance(ds)
        s = audit["samples"][prov["sample_index"]]
        assert not s["flagged"]
        assert prov["class_index"] == s["label"] and prov["class_name"] == path.parent.name
        assert prov["run_id"] == run_dir.run_id and prov["sample_seed"] == s["seed"]
        assert prov["privacy"].startswith("DP eps=")
        # Nothing computed from the private images: no audit verdict, score or distance.
        block_tags = {
            e.tag.element & 0xFF for e in ds.iterall() if e.tag.group == 0x0011 and e.tag.element > 0xFF
        }
        assert block_tags == {1, 2, 3, 4, 5, 8}
        assert "audit" not in ds.ImageComments.lower()
        np.testing.assert_array_equal(ds.pixel_array, samples.images[prov["sample_index"]])
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == len(dicoms)


def test_dicom_files_pass_dciodvfy(dicom_run) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy absent (Debian package dicom3tools; .ci/run installs it)")
    run_dir, _ = dicom_run
    for path in sorted(run_dir.release_dir(True).glob("dicom/*/*.dcm"))[:5]:
        out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        report = out.stdout + out.stderr
        assert "SCImage" in report
        # Debian's dicom3tools (2022-06) predates Synthetic Data (0008,001C, added in 2023): its
        # dictionary calls the tag unrecognised. That line, and only that one, is allowed; any
        # other complaint about the attribute (its VR, its value, its module) fails.
        older = "not a recognized standard attribute - (0x0008,0x001c)"
        errors = [ln for ln in report.splitlines() if ln.startswith("Error") and older not in ln]
        assert not errors, report


def test_ct_rescale_maps_back_to_hounsfield_units(tmp_path) -> None:
    from datetime import datetime, timezone

    from pydicom.pixels import apply_modality_lut

    from synthfactory.dicom_export import hu_rescale, synthetic_dataset

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = synthetic_dataset(
        pixels, run_id="r", recipe_name="ct", modality="ct", class_name="liver", class_index=0,
        sample_index=0, sample_seed=1, privacy="DP",
        rescale=hu_rescale("ct", "dicom", (40.0, 400.0)), window=(40.0, 400.0),
        created=datetime.now(timezone.utc),
    )  # fmt: skip
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    hu = apply_modality_lut(back.pixel_array, back)
    assert hu.min() == pytest.approx(-160.0) and hu.max() == pytest.approx(240.0)  # the recipe's window
    assert back.RescaleType == "HU" and float(back.WindowCenter) == 40.0 and float(back.WindowWidth) == 400.0
    assert hu_rescale("ct", "npz", None)[2] == "US"  # 8-bit sources have no HU to restore
    assert hu_rescale("ct", "nifti", (40.0, 400.0)) == hu_rescale("ct", "dicom", (40.0, 400.0))
