"""DICOM output of a release: one Secondary Capture file per synthetic image, marked synthetic.

Every file is built by highdicom's `SCImage` from the run's own values: no attribute of any input
DICOM is read here, so none can reach an output (a test plants identifying values in the inputs
and scans the outputs). highdicom validates the pixel module and identifiers it writes; what it
sets otherwise for a Secondary Capture (Modality OT, ConversionType DI, a patient orientation) is
overwritten below with the synthetic markers.

Per file:
- SOP Class: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7), `ConversionType`
  SYN (synthetic image); new UIDs for study (one per run), series (one per class) and instance —
  derived from the run id, class and sample index under pydicom's UID root, never from an input;
- `Modality` from the recipe (MR, CT, US); `ImageType` DERIVED\\SECONDARY;
- synthetic markers: `SyntheticData` (0008,001C) YES, the standard attribute (SOP Common module,
  DICOM 2023b), set by keyword from pydicom's dictionary; `PatientName` SYNTHETIC^<recipe name>, `PatientID` SF-<run id>,
  `PatientIdentityRemoved` YES, `DeidentificationMethod` naming synthfactory,
  `BurnedInAnnotation` NO; patient birth date and sex empty (type 2);
- the class: `SeriesDescription` "synthetic <class>", and in the private block
  "SYNTHFACTORY 1" (group 0x0011): 0x1001 class name, 0x1002 class index, 0x1003 run id,
  0x1004 sample seed, 0x1005 sample index, 0x1008 ε and δ (or NOT PRIVATE); the same in
  `ImageComments` as text for viewers that hide private tags. Only what the DP generator and
  public seeds determine: no audit figure (0x1006 and 0x1007, which once held the audit verdict
  and the nearest-neighbour scores, are no longer written);
- pixels: 8-bit MONOCHROME2. For CT read from DICOM or NIfTI through a window, `RescaleSlope` and
  `RescaleIntercept` map the stored values back to Hounsfield units (`RescaleType` HU) and the
  window is that of the recipe; otherwise the values are the model's 8-bit output (`RescaleType`
  US, unspecified) with a full-range window.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import __version__

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PRIVATE_CREATOR = "SYNTHFACTORY 1"
PRIVATE_GROUP = 0x0011
MODALITY = {"mri": "MR", "ct": "CT", "us": "US"}

# Private elements (offsets within the reserved block 0x10xx of group 0x0011).
PRIVATE_TAGS = {
    "class_name": (0x01, "LO"),
    "class_index": (0x02, "US"),
    "run_id": (0x03, "LO"),
    "sample_seed": (0x04, "LO"),
    "sample_index": (0x05, "UL"),
    "privacy": (0x08, "LO"),
}


def _uid(*parts: object) -> str:
    """A deterministic UID under pydicom's root from the run id and position (no input UID)."""
    return generate_uid(entropy_srcs=["synthfactory", *map(str, parts)])


def hu_rescale(modality: str, source: str, window: tuple[float, float] | None) -> tuple[float, float, str]:
    """(slope, intercept, type) from stored 8-bit values back to the modality's units: Hounsfield
    units for CT read from DICOM or NIfTI (both windowed in HU), none for 8-bit sources."""
    if modality == "ct" and source in ("dicom", "nifti") and window is not None:
        center, width = window
        return width / 255.0, center - width / 2.0, "HU"
    return 1.0, 0.0, "US"


def synthetic_dataset(
    pixels: np.ndarray,
    *,
    run_id: str,
    recipe_name: str,
    modality: str,
    class_name: str,
    class_index: int,
    sample_index: int,
    sample_seed: int,
    privacy: str,
    rescale: tuple[float, float, str],
    window: tuple[float, float] | None,
    created: datetime,
) -> Dataset:
    """One Secondary Capture dataset for an 8-bit [H, W] image, built by highdicom's `SCImage`
    (which checks the pixel module and the identifiers it is given), then marked synthetic."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a uint8 [H, W] image, got {pixels.dtype} {pixels.shape}")
    ds = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        # PATIENT needs an orientation; a synthetic image has none, so it is emptied below (type 2C).
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        study_instance_uid=_uid(run_id, "study"),
        series_instance_uid=_uid(run_id, "series", class_index),
        series_number=class_index + 1,
        sop_instance_uid=_uid(run_id, "instance", sample_index),
        instance_number=sample_index + 1,
        manufacturer="synthfactory",
        patient_id=f"SF-{run_id}"[:64],
        patient_name=f"SYNTHETIC^{recipe_name}"[:64],
        patient_birth_date=None,
        patient_sex=None,
        accession_number=None,
        study_id="SYNTH",
        study_date=created.date(),
        study_time=created.time(),
        referring_physician_name=None,
        series_description=f"synthetic {class_name}"[:64],
        software_versions=__version__,
        content_date=created.date(),
        content_time=created.time(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    _mark_synthetic(ds, modality, recipe_name, created)
    _set_display(ds, rescale, window)
    ds.ImageComments = (
        f"SYNTHETIC image, not for diagnosis. class={class_name}; class_index={class_index}; "
        f"run={run_id}; sample={sample_index}; seed={sample_seed}; {privacy}"
    )[:10240]
    values = {
        "class_name": class_name[:64],
        "class_index": int(class_index),
        "run_id": run_id[:64],
        "sample_seed": str(int(sample_seed)),
        "sample_index": int(sample_index),
        "privacy": privacy[:64],
    }
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    for key, (offset, vr) in PRIVATE_TAGS.items():
        block.add_new(offset, vr, values[key])
    return ds


def _mark_synthetic(ds: Dataset, modality: str, recipe_name: str, created: datetime) -> None:
    """What SCImage does not set or sets otherwise: the modality (SCImage writes OT), the
    conversion type SYN (it writes DI, digitized), no identity, the image type of before."""
    ds.file_meta.ImplementationVersionName = f"SYNTHFACTORY{__version__}"[:16]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Modality = MODALITY[modality]
    ds.ConversionType = "SYN"
    ds.SyntheticData = "YES"  # (0008,001C), SOP Common, since 2023: what viewers and de-id tools key on
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.Laterality = ""  # type 2C; a synthetic image has no side
    ds.InstanceCreationDate, ds.InstanceCreationTime = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = (
        f"synthfactory {__version__}: synthetic image from a differentially private diffusion "
        "model; no attribute of any input copied"
    )[:64]
    ds.StudyDescription = f"SYNTHETIC synthfactory {recipe_name}"[:64]
    ds.BurnedInAnnotation = "NO"


def _set_display(ds: Dataset, rescale: tuple[float, float, str], window: tuple[float, float] | None) -> None:
    """Rescale back to the modality's units (HU for windowed CT) and the window to show it in."""
    slope, intercept, rtype = rescale
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleIntercept = f"{intercept:.10g}"
    ds.RescaleType = rtype
    if window is not None and rtype == "HU":
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    else:
        ds.WindowCenter, ds.WindowWidth = "127.5", "256"


def read_provenance(ds: Dataset) -> dict:
    """The private block back as a dict (what a consumer of the files reads)."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    out = {key: block[offset].value for key, (offset, _) in PRIVATE_TAGS.items()}
    out["sample_seed"] = int(out["sample_seed"])
    return out


def write_dicom_files(released, folder: Path) -> list[Path]:
    """dicom/<class>/<sample index>.dcm for every released image of a ReleasedSet."""
    created = datetime.now(timezone.utc)
    rescale = hu_rescale(released.modality, released.source, released.ct_window)
    window = released.ct_window if rescale[2] == "HU" else None
    privacy = f"DP eps={released.epsilon:.4g} delta={released.delta:g}" if released.private else "NOT PRIVATE"
    paths = []
    for k in range(len(released.labels)):
        label = int(released.labels[k])
        name = released.class_names[label]
        ds = synthetic_dataset(
            released.image(k),
            run_id=released.run_id,
            recipe_name=released.recipe_name,
            modality=released.modality,
            class_name=name,
            class_index=label,
            sample_index=int(released.sample_index[k]),
            sample_seed=int(released.seeds[k]),
            privacy=privacy,
            rescale=rescale,
            window=window,
            created=created,
        )
        path = folder / "dicom" / name / f"{int(released.sample_index[k]):06d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
