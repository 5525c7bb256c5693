"""Every shipped recipe, end to end on the real data, in its --smoke variant (tiny model, two
steps, a few hundred images): the pipeline and the evaluation produce well-formed numbers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.recipe import load_recipe, parse_override
from synthfactory.run import check
from synthfactory.rundir import read_json

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
runner = CliRunner()


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke_run_end_to_end(recipe_path: Path, tmp_path: Path, request) -> None:
    recipe = load_recipe(recipe_path)
    if recipe.data.source != "phantom":
        request.getfixturevalue("shared_data")  # skip (or fail under CI) without the real data
    result = runner.invoke(
        app,
        [
            "run",
            str(recipe_path),
            "--smoke",
            "--out",
            str(tmp_path / "runs"),
            "--audit-dir",
            str(tmp_path / "pa"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    (run_root,) = (tmp_path / "runs").iterdir()
    assert run_root.name.startswith(f"{recipe.name}-smoke-")
    privacy = read_json(run_root / "privacy.json")
    assert privacy["epsilon"] <= privacy["target_epsilon"] and privacy["steps_taken"] == 2
    ev = read_json(run_root / "evaluation.json")
    n_classes = len(recipe.data.classes)
    assert ev["class_names"] == recipe.data.classes
    for key in ("tstr", "trtr"):
        assert 0.0 <= ev[key]["accuracy"] <= 1.0 and _finite(ev[key]["macro_auc"])
        assert len(ev[key]["per_class_recall"]) == n_classes
    assert _finite(ev["tstr_over_trtr_accuracy"])
    assert ev["tstr_over_trtr_above_chance"] is None or isinstance(ev["tstr_over_trtr_above_chance"], float)
    fid = ev["fidelity"]
    assert _finite(fid["frechet_distance"]) and fid["frechet_distance"] >= 0
    assert all(0.0 <= fid[k] <= 1.0 for k in ("precision", "recall", "coverage"))
    assert 0.0 <= ev["diversity"]["share_near_duplicate"] <= 1.0
    report = tmp_path / "pa" / f"{recipe.name}-smoke" / run_root.name
    assert (report / "evaluation.json").is_file() and (report / "evaluation.md").is_file()
    assert "TSTR" in result.output


def _epsilon_one_sets(recipe_path: Path) -> list[str]:
    """The `--set` lines a recipe's header gives for ε = 1 (after "For epsilon 1:")."""
    lines = recipe_path.read_text().splitlines()
    header = " ".join(line.lstrip("#").strip() for line in lines if line.startswith("#"))
    tail = header.split("For epsilon 1:", 1)[1]
    sets = []
    while m := re.match(r"\s*--set (\S+)", tail):
        sets.append(m.group(1))
        tail = tail[m.end() :]
    return sets


# Recipes whose ε = 1 line must also make room for the warm start's DP query. (CT has none, and its
# check screens the public pre-training split against 34,561 private images: minutes, not seconds.)
WARM_STARTED = [p for p in RECIPES if (r := load_recipe(p)).warm_start and r.data.source != "phantom"]


@pytest.mark.parametrize("recipe_path", WARM_STARTED, ids=lambda p: p.stem)
def test_the_epsilon_one_line_of_a_recipe_header_validates(recipe_path: Path, request) -> None:
    """Users copy the header's ε = 1 line as it stands: it must pass the recipe check with the
    warm start's query composed in, and DP-SGD's σ must be calibrated to ε ≤ 1."""
    request.getfixturevalue("shared_data")
    assert "For epsilon 1:" in recipe_path.read_text(), (
        "a real-data recipe's header says how to run it at ε = 1"
    )
    sets = _epsilon_one_sets(recipe_path)
    assert "privacy.target_epsilon=1" in sets
    checked = check(recipe_path, dict(parse_override(s) for s in sets))
    assert checked.recipe.privacy.target_epsilon == 1
    privacy = checked.recipe.privacy
    assert checked.schedule.epsilon(privacy.delta)[privacy.accountant] <= 1.0
    assert checked.schedule.prior, "the warm start's query is composed into DP-SGD's σ"
