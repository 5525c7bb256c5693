"""Release: a real `datasets` round trip holding only samples that passed the audit."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from test_audit import plant

from synthfactory.audit import run_audit
from synthfactory.export import ReleaseRefused, release
from synthfactory.rundir import read_json
from synthfactory.sample import Samples


def test_release_holds_only_audited_passed_samples(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    plant(run_copy)
    run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    audit = read_json(run_dir.audit_json)
    flagged = {s["index"] for s in audit["samples"] if s["flagged"]}
    passed = [s["index"] for s in audit["samples"] if not s["flagged"]]
    assert flagged and passed

    folder, info = release(run_dir, ["hf", "png"], report_dir=tmp_path / "pa" / "tiny" / run_dir.run_id)
    assert folder == run_dir.root / "release"
    assert (folder / "sample_grid.png").stat().st_size > 1000
    assert (tmp_path / "pa" / "tiny" / run_dir.run_id / "sample_grid.png").is_file()
    dd = datasets.load_from_disk(str(folder / "dataset"))
    ds = dd["train"]
    assert ds.features["label"].names == ["no_lesion", "lesion"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert sorted(ds["sample_index"]) == passed
    assert not flagged & set(ds["sample_index"])
    samples = Samples.load(run_dir.samples)
    for row in ds:
        i = row["sample_index"]
        np.testing.assert_array_equal(np.asarray(row["image"]), samples.images[i])
        assert row["label"] == samples.labels[i] and row["sample_seed"] == samples.seeds[i]
    # Only what the DP generator and public seeds determine; no per-sample audit figure.
    assert list(ds.features) == ["image", "label", "run_id", "sample_seed", "sample_index"]
    assert info["columns"] == list(ds.features)
    pngs = sorted(p.name for p in (folder / "png").rglob("*.png"))
    assert pngs == sorted(f"{i:06d}.png" for i in passed)
    assert info["n_released"] == len(passed) == read_json(folder / "release.json")["n_released"]
    assert info["privacy"]["epsilon"] <= info["privacy"]["target_epsilon"]


def test_release_refuses_samples_changed_after_the_audit(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    s = Samples.load(run_dir.samples)
    images = np.array(s.images)  # the store is read-only (memory-mapped)
    images[0] = 255 - images[0]
    Samples(images, s.labels, s.seeds).save(run_dir.samples)
    with pytest.raises(ReleaseRefused, match="changed after the audit"):
        release(run_dir, ["hf"])


def test_release_refuses_without_audit(run_copy) -> None:
    _, run_dir = run_copy
    with pytest.raises(ReleaseRefused, match="no audit"):
        release(run_dir, ["hf"])


def test_streamed_writer_shards_and_round_trips_through_load_from_disk(tmp_path) -> None:
    """`write_rows` writes save_to_disk's layout itself: shards of at most max_shard_size, in
    order, read back by `datasets.load_from_disk` with features, pixels and row order intact."""
    from PIL import Image

    from synthfactory.export import hf_features, write_rows

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (25, 32, 32), dtype=np.uint8)  # ~1 kB of PNG each
    rows = (
        {
            "image": Image.fromarray(images[i], mode="L"),
            "label": i % 2,
            "run_id": "r",
            "sample_seed": 100 + i,
            "sample_index": i,
        }
        for i in range(25)
    )
    assert write_rows(rows, hf_features(["a", "b"]), tmp_path, max_shard_size="5KB") == 25
    split = tmp_path / "dataset" / "train"
    shards = sorted(split.glob("*.arrow"))
    assert len(shards) >= 4 and shards[0].name == f"data-00000-of-{len(shards):05d}.arrow"
    ds = datasets.load_from_disk(str(tmp_path / "dataset"))["train"]
    assert len(ds) == 25 and ds.features["label"].names == ["a", "b"]
    assert ds.info.splits["train"].num_examples == 25
    for i, row in enumerate(ds):
        np.testing.assert_array_equal(np.asarray(row["image"]), images[i])
        assert row["sample_index"] == i and row["sample_seed"] == 100 + i

    empty = tmp_path / "empty"
    assert write_rows(iter(()), hf_features(["a", "b"]), empty) == 0
    assert len(datasets.load_from_disk(str(empty / "dataset"))["train"]) == 0


def test_streamed_writer_matches_save_to_disk_layout(tmp_path) -> None:
    """The layout `write_rows` writes by hand is the one the installed `datasets` writes with
    `DatasetDict.save_to_disk` for the same rows: the same files, the same state.json, the same
    dataset_info.json features (plus the split sizes), the same table. Fails when a `datasets`
    release changes the layout, so the hand-written writer cannot drift silently."""
    from PIL import Image

    from synthfactory.export import hf_features, write_rows

    features = hf_features(["a", "b"])
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16), dtype=np.uint8)

    def rows():
        for i in range(6):
            yield {
                "image": Image.fromarray(images[i], mode="L"),
                "label": i % 2,
                "run_id": "r",
                "sample_seed": i,
                "sample_index": i,
            }

    ours = tmp_path / "ours"
    write_rows(rows(), features, ours)
    theirs = tmp_path / "theirs"
    reference = datasets.Dataset.from_list(
        [features.encode_example(r) for r in rows()], features=features, split=datasets.Split.TRAIN
    )
    datasets.DatasetDict({"train": reference}).save_to_disk(str(theirs / "dataset"))

    def listing(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert listing(ours / "dataset") == listing(theirs / "dataset")
    for name in ("dataset_dict.json",):
        assert json.loads((ours / "dataset" / name).read_text()) == json.loads(
            (theirs / "dataset" / name).read_text()
        )
    split_ours, split_theirs = ours / "dataset" / "train", theirs / "dataset" / "train"
    state_ours = json.loads((split_ours / "state.json").read_text())
    state_theirs = json.loads((split_theirs / "state.json").read_text())
    assert state_ours.keys() == state_theirs.keys()
    assert {k: v for k, v in state_ours.items() if k != "_fingerprint"} == {
        k: v for k, v in state_theirs.items() if k != "_fingerprint"
    }
    info_ours = json.loads((split_ours / "dataset_info.json").read_text())
    info_theirs = json.loads((split_theirs / "dataset_info.json").read_text())
    # Ours also records the split sizes (a DatasetInfo field save_to_disk leaves out for a
    # dataset built in memory); every other key is the same.
    assert info_theirs.keys() <= info_ours.keys() and info_ours["features"] == info_theirs["features"]
    assert info_ours.keys() - info_theirs.keys() <= {"splits", "dataset_size"}
    assert datasets.DatasetInfo.from_directory(str(split_ours)).splits["train"].num_examples == 6
    a = datasets.load_from_disk(str(ours / "dataset"))["train"]
    b = datasets.load_from_disk(str(theirs / "dataset"))["train"]
    assert a.features == b.features and a.data.table.equals(b.data.table)
