"""Data sources: each yields float32 [N, 1, H, W] in [-1, 1], int64 labels, the recipe's class
names and a manifest with one SHA-256 per image; unreadable files are skipped and listed."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydantic import TypeAdapter

from synthfactory.data import DataError, ImageSet, load_images
from synthfactory.data.dicom import dataset_frames, load_dicom
from synthfactory.data.phantom import CLASSES, phantom_images
from synthfactory.recipe import DataConfig, DicomData, FolderData, HFData, NpzData, PhantomData


def assert_image_set(s: ImageSet, size: int, classes: list[str]) -> None:
    for imgs, labels in ((s.train_images, s.train_labels), (s.heldout_images, s.heldout_labels)):
        assert imgs.dtype == np.float32 and imgs.shape[1:] == (1, size, size)
        assert imgs.min() >= -1.0 and imgs.max() <= 1.0
        assert labels.dtype == np.int64 and len(labels) == len(imgs)
        assert set(np.unique(labels)) <= set(range(len(classes)))
    assert s.class_names == classes
    assert len(s.manifest) == len(s.train_labels) + len(s.heldout_labels)
    first = s.manifest[0]
    assert first["split"] == "train" and first["index"] == 0
    expected = hashlib.sha256(np.ascontiguousarray(s.train_images[0]).tobytes()).hexdigest()
    assert first["sha256"] == expected
    assert len(s.manifest_sha256()) == 64


@pytest.mark.parametrize("modality", ["mri", "ct", "us"])
def test_phantom_each_modality(modality: str) -> None:
    classes = CLASSES[modality]
    cfg = PhantomData(image_size=32, classes=classes, phantom={"n_train": 30, "n_heldout": 9})
    s = load_images(cfg, modality)
    assert_image_set(s, 32, classes)
    assert len(s.train_labels) == 30 and len(s.heldout_labels) == 9
    assert np.bincount(s.train_labels).tolist() == [30 // len(classes)] * len(classes)
    again = load_images(cfg, modality)
    assert again.manifest_sha256() == s.manifest_sha256()  # reproducible
    # Classes differ in content: the mean image of each class is distinct.
    means = [s.train_images[s.train_labels == k].mean(0) for k in range(len(classes))]
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            assert np.abs(means[a] - means[b]).max() > 0.1


def test_phantom_train_and_heldout_differ() -> None:
    tr = phantom_images("mri", 1, 8, 16, seed=0)
    ho = phantom_images("mri", 1, 8, 16, seed=1)
    assert not np.allclose(tr, ho)


def test_class_subset_in_recipe_order() -> None:
    cfg = PhantomData(image_size=16, classes=["pelvis", "chest"], phantom={"n_train": 30, "n_heldout": 9})
    s = load_images(cfg, "ct")
    assert s.class_names == ["pelvis", "chest"]
    assert len(s.train_labels) == 20  # abdomen dropped
    assert {m["label"] for m in s.manifest} == {"pelvis", "chest"}


def test_unknown_class_is_a_data_error() -> None:
    cfg = PhantomData(image_size=16, classes=["chest", "brain"])
    with pytest.raises(DataError) as e:
        load_images(cfg, "ct")
    assert e.value.field == "classes" and "brain" in str(e.value)


# --- npz on real data --------------------------------------------------------------------------


def test_npz_real_mri_group_split(shared_data: Path) -> None:
    path = shared_data / "mri_brain_tumor" / "brain_tumor_mri_64_groupsplit.npz"
    classes = ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
    s = load_images(NpzData(path=path, image_size=32, classes=classes), "mri")
    assert_image_set(s, 32, classes)
    assert (len(s.train_labels), len(s.heldout_labels)) == (2283, 583)  # as the set's README says
    assert np.bincount(s.train_labels).tolist() == [647, 656, 350, 630]
    with np.load(path) as z:
        raw = z["train_images"][0].astype(np.float32) / 127.5 - 1.0
    down = raw.reshape(32, 2, 32, 2).mean((1, 3))  # 2x2 box ≈ antialiased bilinear at exactly 1/2
    assert np.abs(s.train_images[0, 0] - down).mean() < 0.05
    # its groups are clusters of near-duplicate images, disjoint between the splits
    assert s.heldout_of_training_patients() is not None
    assert not s.heldout_of_training_patients().any()


def test_npz_real_ct_native_size(shared_data: Path) -> None:
    path = shared_data / "ct_organamnist" / "organamnist_28_full.npz"
    s = load_images(
        NpzData(path=path, image_size=28, classes=["liver", "spleen"], heldout_split="val"),
        "ct",
    )
    assert_image_set(s, 28, ["liver", "spleen"])
    with np.load(path) as z:
        names = list(z["class_names"])
        keep = np.isin(z["train_labels"].reshape(-1), [names.index("liver"), names.index("spleen")])
        first = z["train_images"][keep][0].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(s.train_images[0, 0], first, atol=1e-6)  # 28 → 28: no resampling


def test_npz_missing_split_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(4, np.int64))
    with pytest.raises(DataError) as e:
        load_images(NpzData(path=path, image_size=8, classes=["0"]), "mri")
    assert e.value.field == "heldout_split"


def test_npz_groups_mark_heldout_images_of_training_patients(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    img = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    np.savez(path, train_images=img[:2], train_labels=[0, 1], train_group=["p1", "p2"],
             test_images=img, test_labels=[0, 1, 1], test_group=["p2", "p3", "p1"])  # fmt: skip
    s = load_images(NpzData(path=path, image_size=8, classes=["0", "1"]), "ct")
    assert s.heldout_of_training_patients().tolist() == [True, False, True]
    groups = {m["group"] for m in s.manifest}
    assert len(groups) == 3 and "p1" not in groups  # hashed: no patient id in the run directory
    np.savez(path, train_images=img[:2], train_labels=[0, 1], test_images=img, test_labels=[0, 1, 1])
    s = load_images(NpzData(path=path, image_size=8, classes=["0", "1"]), "ct")
    assert s.heldout_of_training_patients() is None and all("group" not in m for m in s.manifest)


def test_npz_without_class_names_and_column_labels(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(
        path,
        train_images=imgs,
        train_labels=np.array([[0], [1], [0], [1], [0], [1]]),
        test_images=imgs[:2],
        test_labels=np.array([0, 1]),
    )
    s = load_images(NpzData(path=path, image_size=8, classes=["0", "1"]), "ct")
    np.testing.assert_allclose(s.train_images[:, 0], imgs / 127.5 - 1.0, atol=1e-6)
    assert s.train_labels.tolist() == [0, 1, 0, 1, 0, 1]


# --- image folder ---------------------------------------------------------------------------------


def _write_pngs(root: Path, n: int) -> None:
    for label, name in enumerate(CLASSES["mri"]):
        imgs = phantom_images("mri", label, n, 24, seed=5)
        for split in ("train", "test"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(imgs):
                u8 = np.round((img + 1) * 127.5).astype(np.uint8)
                Image.fromarray(u8).save(root / split / name / f"{i}.png")


def test_folder_with_split_folders_and_a_corrupt_file(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "train" / "lesion" / "broken.png").write_bytes(b"not a png")
    s = load_images(
        FolderData(path=tmp_path / "imgs", image_size=16, classes=["no_lesion", "lesion"]),
        "mri",
    )
    assert_image_set(s, 16, ["no_lesion", "lesion"])
    assert (len(s.train_labels), len(s.heldout_labels)) == (6, 6)
    assert len(s.skipped) == 1 and s.skipped[0]["file"].endswith("broken.png")


def _patient_pngs(root: Path, n_patients: int, slices: int) -> None:
    """<class>/p<k>_s<j>.png: every patient has `slices` images, half of them in each class."""
    rng = np.random.default_rng(0)
    for k in range(n_patients):
        for j in range(slices):
            label = ("no_lesion", "lesion")[j % 2]
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(
                root / label / f"p{k}_s{j}.png"
            )


def _patients_by_split(s: ImageSet) -> dict[str, set[str]]:
    return {
        split: {m["source"].split("/")[-1].split("_")[0] for m in s.manifest if m["split"] == split}
        for split in ("train", "heldout")
    }


def test_folder_split_by_patient_never_crosses(tmp_path: Path) -> None:
    _patient_pngs(tmp_path / "imgs", n_patients=10, slices=4)
    cfg = FolderData(path=tmp_path / "imgs", image_size=12, classes=["no_lesion", "lesion"],
                     heldout_fraction=0.3, group_by=r"regex:/(p\d+)_")  # fmt: skip
    for seed in range(5):
        s = load_images(cfg.model_copy(update={"split_seed": seed}), "mri")
        patients = _patients_by_split(s)
        assert not patients["train"] & patients["heldout"] and len(patients["heldout"]) == 3
        assert s.group_counts() == {"train": 7, "heldout": 3, "heldout_images_of_training_patients": 0}
    # per file (no group_by), the same data puts patients on both sides
    s = load_images(cfg.model_copy(update={"group_by": None}), "mri")
    assert _patients_by_split(s)["train"] & _patients_by_split(s)["heldout"]


def test_folder_split_folders_with_a_crossing_patient_are_refused(tmp_path: Path) -> None:
    _patient_pngs(tmp_path / "imgs" / "train", n_patients=2, slices=2)
    _patient_pngs(tmp_path / "imgs" / "test", n_patients=3, slices=2)  # p0 and p1 again
    cfg = FolderData(path=tmp_path / "imgs", image_size=12,
                     classes=["no_lesion", "lesion"], group_by=r"regex:/(p\d+)_")  # fmt: skip
    with pytest.raises(DataError) as e:
        load_images(cfg, "mri")
    assert e.value.field == "group_by" and "2 group(s)" in str(e.value) and "p0_s0.png" in str(e.value)
    bad = cfg.model_copy(update={"group_by": r"regex:(q\d+)_"})
    with pytest.raises(DataError, match="does not match"):
        load_images(bad, "mri")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "npz", "group_by": "patient"}, "Extra inputs are not permitted"),
        ({"source": "folder", "group_by": "patient"}, "reads DICOM headers"),
        ({"source": "dicom", "group_by": "column:subject"}, "labels_csv"),
        ({"source": "folder", "group_by": "column:subject"}, "only dicom and nifti have"),
        ({"source": "folder", "group_by": "regex:(unclosed"}, "not a valid regular expression"),
        ({"source": "folder", "group_by": "subject"}, "'patient', 'column:NAME' or 'regex:PATTERN'"),
    ],
)
def test_group_by_is_checked_by_the_recipe(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TypeAdapter(DataConfig).validate_python(
            {"path": Path("x"), "image_size": 8, "classes": ["a"], **fields}
        )


def test_dicom_series_of_one_patient_land_on_one_side(shared_data: Path, tmp_path: Path) -> None:
    src = pydicom.dcmread(shared_data / "dicom_samples" / "MR_small.dcm")
    rows = []
    for k, (patient, subject) in enumerate([("A", "s1")] * 3 + [("B", "s2")] * 2 + [("C", "s3")] * 2):
        ds = src.copy()
        ds.PatientID, ds.SeriesInstanceUID = patient, pydicom.uid.generate_uid()
        (tmp_path / "mr").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "mr" / f"{k}.dcm")
        rows.append((f"mr/{k}.dcm", "mr", subject))
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "label", "subject"), *rows])
    base = {"path": tmp_path, "image_size": 16, "classes": ["mr"], "heldout_fraction": 0.4}
    for group_by, csv_path in (("patient", None), ("column:subject", tmp_path / "labels.csv")):
        for seed in range(4):
            cfg = DicomData(**base, group_by=group_by, labels_csv=csv_path, split_seed=seed)
            s = load_images(cfg, "mri")
            assert s.group_counts()["heldout_images_of_training_patients"] == 0
            sides = {m["group"]: set() for m in s.manifest}
            for m in s.manifest:
                sides[m["group"]].add(m["split"])
            assert len(sides) == 3 and all(len(v) == 1 for v in sides.values()), sides


def test_folder_split_by_fraction(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "imgs", 5)
    root = tmp_path / "imgs" / "train"  # class folders directly under the root
    cfg = FolderData(path=root, image_size=24, classes=["no_lesion", "lesion"], heldout_fraction=0.4)
    s = load_images(cfg, "mri")
    assert (len(s.train_labels), len(s.heldout_labels)) == (6, 4)
    train_src = {m["source"] for m in s.manifest if m["split"] == "train"}
    held_src = {m["source"] for m in s.manifest if m["split"] == "heldout"}
    assert not train_src & held_src
    with pytest.raises(DataError) as e:
        load_images(cfg.model_copy(update={"heldout_fraction": None}), "mri")
    assert e.value.field == "heldout_fraction"


# --- DICOM on the real files ----------------------------------------------------------------------

DICOM_LABELS = {
    "CT_small.dcm": ("ct", "train"),
    "eCT_Supplemental.dcm": ("ct", "test"),
    "MR_small.dcm": ("mr", "train"),
    "MR_small_RLE.dcm": ("mr", "train"),
    "MR2_UNCR.dcm": ("mr", "train"),
    "MR-SIEMENS-DICOM-WithOverlays.dcm": ("mr", "train"),
    "emri_small.dcm": ("mr", "test"),
    "US1_UNCR.dcm": ("us", "train"),
    "US1_J2KR.dcm": ("us", "train"),
    "gdcm-US-ALOKA-16.dcm": ("us", "test"),
    "README.md": ("us", "train"),  # not DICOM: must be skipped and listed
}


@pytest.fixture
def dicom_csv(shared_data: Path, tmp_path: Path) -> Path:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes((shared_data / "dicom_samples" / "MR_small.dcm").read_bytes()[:2000])
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "split"])
        for f, (label, split) in DICOM_LABELS.items():
            w.writerow([f, label, split])
        w.writerow([str(truncated), "mr", "train"])
    return path


def test_dicom_real_files_with_csv_labels(shared_data: Path, dicom_csv: Path) -> None:
    cfg = DicomData(
        path=shared_data / "dicom_samples",
        labels_csv=dicom_csv,
        image_size=32,
        classes=["ct", "mr", "us"],
    )
    s = load_images(cfg, "mri")
    assert_image_set(s, 32, ["ct", "mr", "us"])
    # train: CT_small, MR_small, MR_small_RLE, MR2, MR-SIEMENS, US1_UNCR, US1_J2KR = 7 images
    # held-out: eCT (2 frames), emri (10 frames), ALOKA (1) = 13 images
    assert (len(s.train_labels), len(s.heldout_labels)) == (7, 13)
    skipped = {Path(x["file"]).name: x["reason"] for x in s.skipped}
    assert set(skipped) == {"README.md", "truncated.dcm"}
    assert "not a DICOM file" in skipped["README.md"]
    sources = [m["source"] for m in s.manifest if m["split"] == "heldout"]
    assert "emri_small.dcm#frame9" in sources and "eCT_Supplemental.dcm#frame1" in sources
    # RLE and uncompressed MR_small decode to the same image; so do J2K and uncompressed US1.
    by_src = {m["source"]: m["sha256"] for m in s.manifest}
    assert by_src["MR_small.dcm"] == by_src["MR_small_RLE.dcm"]
    assert by_src["US1_UNCR.dcm"] == by_src["US1_J2KR.dcm"]


def test_dicom_ct_window_applies_rescale(shared_data: Path) -> None:
    path = shared_data / "dicom_samples" / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    (img,) = dataset_frames(load_dicom(path), "CT", window=(40.0, 400.0), percentiles=(0.5, 99.5))
    expected = np.clip((hu - (40 - 200)) / 400.0, 0, 1) * 2 - 1
    np.testing.assert_allclose(img, expected, atol=1e-6)
    (narrow,) = dataset_frames(load_dicom(path), "CT", window=(40.0, 80.0), percentiles=(0.5, 99.5))
    assert (narrow == 1.0).mean() > (img == 1.0).mean()  # a narrower window saturates more


def test_dicom_enhanced_ct_uses_functional_group_rescale(shared_data: Path) -> None:
    path = shared_data / "dicom_samples" / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds  # only in the functional groups
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array[0].astype(np.float64) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    frames = dataset_frames(load_dicom(path), "CT", window=(40.0, 400.0), percentiles=(0.5, 99.5))
    assert len(frames) == 2
    np.testing.assert_allclose(frames[0], np.clip((hu + 160) / 400, 0, 1) * 2 - 1, atol=1e-6)


def test_dicom_monochrome1_is_inverted(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "dicom_samples" / "MR_small.dcm"
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    (a,) = dataset_frames(load_dicom(src), "MR", (40, 400), (0.5, 99.5))
    (b,) = dataset_frames(load_dicom(inverted), "MR", (40, 400), (0.5, 99.5))
    np.testing.assert_allclose(b, -a)


def test_dicom_colour_and_palette_become_grayscale(shared_data: Path) -> None:
    for name in ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm"):
        (img,) = dataset_frames(
            load_dicom(shared_data / "dicom_samples" / name), "US", (40, 400), (0.5, 99.5)
        )
        assert img.shape == (480, 640) and img.dtype == np.float32
        assert img.min() == -1.0 and img.max() == 1.0  # per-image percentile scaling


def test_dicom_labels_from_subfolders(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    for name, label in (
        ("CT_small.dcm", "ct"),
        ("eCT_Supplemental.dcm", "ct"),
        ("MR_small.dcm", "mr"),
        ("emri_small.dcm", "mr"),
    ):
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "dicom_samples" / name, root / label / name)
    (root / "mr" / "notes.txt").write_text("not an image")
    cfg = DicomData(path=root, image_size=16, classes=["ct", "mr"], heldout_fraction=0.5)
    s = load_images(cfg, "ct")
    assert_image_set(s, 16, ["ct", "mr"])
    files = {m["split"]: set() for m in s.manifest}
    for m in s.manifest:
        files[m["split"]].add(m["source"].split("#")[0])
    assert not files["train"] & files["heldout"]  # frames of one file never straddle the split
    assert any(Path(x["file"]).name == "notes.txt" for x in s.skipped)


def test_dicom_patient_ids_mark_heldout_images_of_training_patients(
    shared_data: Path, tmp_path: Path
) -> None:
    # one patient with a training and a held-out series, one patient only held out, and a file
    # without PatientID (its StudyInstanceUID is the group)
    src = pydicom.dcmread(shared_data / "dicom_samples" / "MR_small.dcm")
    for split, name, patient in (("train", "a.dcm", "P-1"), ("test", "b.dcm", "P-1"),
                                 ("test", "c.dcm", "P-2"), ("test", "d.dcm", None)):  # fmt: skip
        ds = src.copy()
        if patient is None:
            del ds.PatientID
        else:
            ds.PatientID = patient
        (tmp_path / split / "mr").mkdir(parents=True, exist_ok=True)
        ds.save_as(tmp_path / split / "mr" / name)
    s = load_images(DicomData(path=tmp_path, image_size=16, classes=["mr"]), "mri")
    held = sorted((m["index"], m["source"]) for m in s.manifest if m["split"] == "heldout")
    flags = dict(zip([src for _, src in held], s.heldout_of_training_patients().tolist(), strict=True))
    assert flags == {"test/mr/b.dcm": True, "test/mr/c.dcm": False, "test/mr/d.dcm": False}
    assert "P-1" not in {m.get("group") for m in s.manifest}


# --- Hugging Face datasets on disk ------------------------------------------------------------------


def test_hf_dataset_on_disk(tmp_path: Path) -> None:
    import datasets

    imgs = np.random.default_rng(1).integers(0, 256, (6, 12, 12), dtype=np.uint8)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(i) for i in imgs], "label": [0, 1, 0, 1, 0, 1]}, features=feats
    )
    datasets.DatasetDict({"train": split, "test": split.select([0, 1])}).save_to_disk(str(tmp_path / "ds"))
    s = load_images(HFData(path=tmp_path / "ds", image_size=12, classes=["b", "a"]), "us")
    assert_image_set(s, 12, ["b", "a"])
    assert s.train_labels.tolist() == [1, 0, 1, 0, 1, 0]
    np.testing.assert_allclose(s.train_images[0, 0], imgs[0] / 127.5 - 1, atol=1e-6)


def test_dicom_per_frame_rescale_overrides_shared(shared_data: Path, tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(shared_data / "dicom_samples" / "eCT_Supplemental.dcm")
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept, item.RescaleType = "2", "-2048", "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = Sequence([item])
    path = tmp_path / "perframe.dcm"
    ds.save_as(path)
    raw = ds.pixel_array.astype(np.float64)
    f0, f1 = dataset_frames(load_dicom(path), "CT", window=(40.0, 400.0), percentiles=(0.5, 99.5))
    np.testing.assert_allclose(f0, np.clip((raw[0] - 1024 + 160) / 400, 0, 1) * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(f1, np.clip((raw[1] * 2 - 2048 + 160) / 400, 0, 1) * 2 - 1, atol=1e-6)
