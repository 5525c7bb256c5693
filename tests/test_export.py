"""Release: a real `datasets` round trip holding only samples that passed the audit."""

from __future__ import annotations

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

    folder, info = release(
        run_dir, ["hf", "png"], private=True, report_dir=tmp_path / "pa" / "tiny" / run_dir.run_id
    )
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
        assert row["nn_distance"] == pytest.approx(audit["samples"][i]["nn_distance"], rel=1e-6)
    pngs = sorted(p.name for p in (folder / "png").rglob("*.png"))
    assert pngs == sorted(f"{i:06d}.png" for i in passed)
    assert info["n_released"] == len(passed) == read_json(folder / "release.json")["n_released"]
    assert info["privacy"]["epsilon"] <= info["privacy"]["target_epsilon"]


def test_release_refuses_samples_changed_after_the_audit(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    s = Samples.load(run_dir.samples)
    s.images[0] = 255 - s.images[0]
    s.save(run_dir.samples)
    with pytest.raises(ReleaseRefused, match="changed after the audit"):
        release(run_dir, ["hf"], private=True)


def test_release_refuses_without_audit(run_copy) -> None:
    _, run_dir = run_copy
    with pytest.raises(ReleaseRefused, match="no audit"):
        release(run_dir, ["hf"], private=True)
