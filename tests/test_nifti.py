"""The nifti source on nibabel's own example files: canonical orientation, slices along an axis,
4D volumes, masks, per-slice labels, whole volumes on one side of the split, unreadable files
skipped and listed, and a smoke run end to end."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_recipe, write_recipe

from synthfactory.data import DataError, load_images
from synthfactory.data.nifti import read_volume
from synthfactory.recipe import NiftiData

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    """anatomical.nii (3D, 33×41×25, LAS), example4d.nii.gz (4D, 128×96×24×2), functional.nii
    (4D, 17×21×3×20), a mask of anatomical non-empty in axial slices 5-9, and a broken file."""
    root = tmp_path / "nifti"
    root.mkdir()
    for name in ("anatomical.nii", "example4d.nii.gz", "functional.nii"):
        shutil.copy(NIB_DATA / name, root / name)
    anat = nib.load(root / "anatomical.nii")
    mask = np.zeros(anat.shape, np.uint8)
    mask[10:20, 10:20, 5:10] = 1
    nib.save(nib.Nifti1Image(mask, anat.affine), root / "anatomical_mask.nii.gz")
    (root / "broken.nii").write_bytes(b"not a nifti file")
    return root


def test_volumes_are_read_in_canonical_orientation(volumes: Path) -> None:
    raw = np.asarray(nib.load(volumes / "anatomical.nii").dataobj, dtype=np.float32)
    assert nib.aff2axcodes(nib.load(volumes / "anatomical.nii").affine) == ("L", "A", "S")
    np.testing.assert_array_equal(read_volume(volumes / "anatomical.nii", 0), raw[::-1])  # L → R
    four = read_volume(volumes / "example4d.nii.gz", 1)
    assert four.shape == (128, 96, 24)
    with pytest.raises(ValueError, match="2 volumes"):
        read_volume(volumes / "example4d.nii.gz", 2)


def test_slices_labels_and_split_from_the_csv(volumes: Path) -> None:
    labels = _write_csv(volumes / "labels.csv", ("file", "label", "split", "mask"), [
        ("anatomical.nii", "brain", "train", "anatomical_mask.nii.gz"),
        ("example4d.nii.gz", "functional", "train", ""),
        ("functional.nii", "functional", "test", ""),
        ("broken.nii", "brain", "test", ""),
    ])  # fmt: skip
    cfg = NiftiData(path=volumes, labels_csv=labels, image_size=32,
                     classes=["brain", "functional"])  # fmt: skip
    s = load_images(cfg, "mri")
    # anatomical: the 5 masked axial slices; example4d: 24; functional (held out): 3
    assert (len(s.train_labels), len(s.heldout_labels)) == (5 + 24, 3)
    sources = [m["source"] for m in s.manifest if m["split"] == "train"]
    assert [x for x in sources if x.startswith("anatomical")] == [
        f"anatomical.nii#slice{k}" for k in range(5, 10)
    ]
    assert (
        s.train_images.shape[1:] == (1, 32, 32) and s.train_images.min() >= -1 and s.train_images.max() <= 1
    )
    assert [Path(x["file"]).name for x in s.skipped] == ["broken.nii"]
    # every third sagittal slice of the 2nd volume instead
    cfg2 = cfg.model_copy(
        update={"nifti": cfg.nifti.model_copy(update={"axis": 0, "volume": 1, "slices": (0, 30, 3)})}
    )
    s2 = load_images(cfg2, "mri")
    assert sum(m["source"].startswith("example4d") for m in s2.manifest) == 10  # 0, 3, ..., 27


def test_per_slice_labels(volumes: Path) -> None:
    labels = _write_csv(volumes / "labels.csv", ("file", "label", "split", "slice"), [
        ("anatomical.nii", "lesion", "train", "3"),
        ("anatomical.nii", "no_lesion", "train", "4"),
        ("example4d.nii.gz", "no_lesion", "test", "0"),
    ])  # fmt: skip
    cfg = NiftiData(path=volumes, labels_csv=labels, image_size=16,
                     classes=["no_lesion", "lesion"])  # fmt: skip
    s = load_images(cfg, "mri")
    got = {m["source"]: m["label"] for m in s.manifest}
    assert got == {"anatomical.nii#slice3": "lesion", "anatomical.nii#slice4": "no_lesion",
                   "example4d.nii.gz#slice0": "no_lesion"}  # fmt: skip


def test_split_by_fraction_keeps_whole_volumes_and_subjects(volumes: Path) -> None:
    for k in range(4):  # four more volumes, two subjects
        shutil.copy(volumes / "functional.nii", volumes / f"f{k}.nii")
    rows = [("anatomical.nii", "a", "s1"), ("example4d.nii.gz", "b", "s2"), ("functional.nii", "b", "s3")]
    rows += [(f"f{k}.nii", "a" if k % 2 else "b", f"s{4 + k // 2}") for k in range(4)]
    labels = _write_csv(volumes / "labels.csv", ("file", "label", "subject"), rows)
    for group_by in (None, "column:subject"):
        for seed in range(4):
            cfg = NiftiData(path=volumes, labels_csv=labels, image_size=16, classes=["a", "b"],
                             heldout_fraction=0.3, split_seed=seed, group_by=group_by)  # fmt: skip
            s = load_images(cfg, "mri")
            files = {
                sp: {m["source"].split("#")[0] for m in s.manifest if m["split"] == sp}
                for sp in ("train", "heldout")
            }
            assert files["train"] and files["heldout"] and not files["train"] & files["heldout"]
            if group_by:
                subj = {f: sj for f, _, sj in rows}
                assert not {subj[f] for f in files["train"]} & {subj[f] for f in files["heldout"]}
            assert s.group_counts()["heldout_images_of_training_patients"] == 0


def test_nifti_needs_a_csv_and_checks_its_columns(volumes: Path) -> None:
    with pytest.raises(ValueError, match="labels_csv"):
        NiftiData(path=volumes, image_size=16, classes=["a"])
    bad = _write_csv(volumes / "bad.csv", ("path", "label"), [("anatomical.nii", "a")])
    with pytest.raises(DataError) as e:
        load_images(NiftiData(path=volumes, labels_csv=bad, image_size=16, classes=["a"]), "mri")
    assert e.value.field == "labels_csv"


def test_a_nifti_recipe_runs_end_to_end(volumes: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from synthfactory.cli import app

    labels = _write_csv(volumes / "labels.csv", ("file", "label", "split"), [
        ("anatomical.nii", "brain", "train"), ("functional.nii", "functional", "train"),
        ("example4d.nii.gz", "functional", "test"),
    ])  # fmt: skip
    recipe = tiny_recipe(data={"source": "nifti", "path": str(volumes), "labels_csv": str(labels),
                               "image_size": 16, "classes": ["brain", "functional"]},
                         outputs={"formats": ["hf", "nifti"], "nifti_spacing_mm": 2.5})  # fmt: skip
    path = write_recipe(tmp_path / "r", recipe)
    res = CliRunner().invoke(app, ["run", str(path), "--smoke", "--out", str(tmp_path / "runs"),
                                   "--audit-dir", str(tmp_path / "pa"), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "release" / "dataset").is_dir()
    # NIfTI in, NIfTI out: one file per released slice, the recipe's spacing, read back by
    # `datasets`' niftifolder with the class from the folder name.
    import datasets

    released = datasets.load_from_disk(str(run / "release" / "dataset"))["train"]
    files = sorted((run / "release" / "nifti").glob("*/*.nii"))
    assert len(files) == len(released) > 0
    first = nib.load(files[0])
    assert first.header.get_zooms() == (2.5, 2.5, 2.5) and first.header.get_xyzt_units()[0] == "mm"
    assert first.header["descrip"].item().decode().startswith("SYNTHETIC synthfactory")
    by_index = {int(i): k for k, i in enumerate(released["sample_index"])}
    for f in files[:5]:
        row = released[by_index[int(f.name.split(".")[0])]]
        assert released.features["label"].int2str(row["label"]) == f.parent.name
        np.testing.assert_array_equal(np.rot90(read_volume(f, 0)[:, :, 0]), np.asarray(row["image"]))
    folder = datasets.load_dataset("niftifolder", data_dir=str(run / "release" / "nifti"), split="train")
    assert len(folder) == len(files) and set(folder.features["label"].names) == {"brain", "functional"}
    assert (run / "release" / "nifti" / "synthfactory_ledger.json").is_file()
