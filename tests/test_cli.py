"""The command line end to end on a tiny recipe: run, resume, stage commands, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from conftest import tiny_recipe, write_recipe
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.rundir import STAGES, RunDir, read_json, write_json_atomic

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [*args])


def test_run_end_to_end(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe())
    result = run_cli(
        "run", str(recipe), "--out", str(tmp_path / "runs"), "--audit-dir", str(tmp_path / "pa"), "-q"
    )
    assert result.exit_code == 0, result.output
    (run_root,) = (tmp_path / "runs").iterdir()
    run_dir = RunDir(run_root)
    assert f"dataset    {run_root / 'release' / 'dataset'}" in result.output
    assert (
        f"report     {tmp_path / 'pa' / 'tiny' / run_root.name / 'audit-summary.md'} (internal: internal/audit.html)"
        in result.output
    )
    assert "ε = " in result.output and "spent of target 10" in result.output
    assert set(read_json(run_dir.run_json)["stages"]) == set(STAGES)
    ds = datasets.load_from_disk(str(run_root / "release" / "dataset"))["train"]
    assert ds.features["label"].names == ["no_lesion", "lesion"]
    assert len(ds) == read_json(run_dir.audit_json)["summary"]["n_released"] > 0
    manifest = [json.loads(x) for x in run_dir.manifest.read_text().splitlines()]
    assert len(manifest) == 96 and all(len(m["sha256"]) == 64 for m in manifest)
    assert read_json(run_dir.data_report)["counts"]["train"] == {"no_lesion": 32, "lesion": 32}

    # Rerun one stage alone: the audit reruns and the release it invalidated is redone by `release`.
    result = run_cli("audit", str(run_root), "--audit-dir", str(tmp_path / "pa"), "-q")
    assert result.exit_code == 0, result.output
    assert "release" not in read_json(run_dir.run_json)["stages"]
    assert run_cli("release", str(run_root), "-q").exit_code == 0
    assert "release" in read_json(run_dir.run_json)["stages"]


def test_interrupted_run_resumes(tiny_run, tmp_path: Path) -> None:
    import shutil

    _, src = tiny_run
    root = tmp_path / "runs" / src.run_id
    shutil.copytree(src.root, root)
    info = read_json(root / "run.json")
    del info["stages"]["sample"]  # as if killed while sampling
    write_json_atomic(root / "run.json", info)
    result = run_cli("resume", str(root), "--audit-dir", str(tmp_path / "pa"), "-q")
    assert result.exit_code == 0, result.output
    assert set(read_json(root / "run.json")["stages"]) == set(STAGES)
    assert (root / "release" / "dataset").is_dir()


def test_block_exits_3_and_releases_nothing(tmp_path: Path) -> None:
    from test_audit import plant

    from synthfactory.run import StageOptions, check, create_run, run_stage

    checked = check(write_recipe(tmp_path, tiny_recipe(audit={"action": "block"})))
    run_dir = create_run(checked, tmp_path / "runs")
    for stage in ("pretrain", "train", "sample"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    plant((checked, run_dir))  # samples now include exact copies of training images
    result = run_cli("resume", str(run_dir.root), "--audit-dir", str(tmp_path / "pa"), "-q")
    assert result.exit_code == 3, result.output
    assert "release refused" in result.output and "blocked" in result.output
    assert read_json(run_dir.audit_json)["decision"] == "block"
    assert not run_dir.release_dir(True).exists()
    assert run_cli("release", str(run_dir.root), "-q").exit_code == 3


def test_not_private_run_says_so_everywhere(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, tiny_recipe(privacy={"enabled": False, "i_understand_this_is_not_private": True})
    )
    result = run_cli(
        "run", str(recipe), "--out", str(tmp_path / "runs"), "--audit-dir", str(tmp_path / "pa"), "-q"
    )
    assert result.exit_code == 0, result.output
    assert "NOT PRIVATE" in result.output
    (run_root,) = (tmp_path / "runs").iterdir()
    assert "NOT-PRIVATE" in run_root.name
    assert (run_root / "release-NOT-PRIVATE" / "dataset").is_dir() and not (run_root / "release").exists()
    assert read_json(run_root / "release-NOT-PRIVATE" / "release.json")["private"] is False
    md = (tmp_path / "pa" / "tiny" / run_root.name / "audit-summary.md").read_text()
    assert "NOT PRIVATE" in md
