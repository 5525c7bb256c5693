"""Recipe validation: every bad recipe gives one clear message naming the file and the field,
exit code 2, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DELETE, REPO, tiny_recipe, write_recipe
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.recipe import RecipeError, load_recipe, load_run_recipe, smoke_overrides

runner = CliRunner()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe: Path) -> None:
    r = load_recipe(recipe)
    assert r.name and r.sampling.images_per_class > 0


BAD = [
    # (overrides, field named in the message, words in the message)
    ({"privacy__epsilon": 3.0}, "privacy.epsilon", "unknown key"),
    ({"trainnig": {"steps": 3}}, "trainnig", "unknown key"),
    ({"training__steps": "many"}, "training.steps", "integer"),
    ({"privacy__target_epsilon": 0}, "privacy.target_epsilon", "greater than 0"),
    ({"privacy__target_epsilon": -1.5}, "privacy.target_epsilon", "greater than 0"),
    ({"privacy__delta": 0.5}, "privacy.delta", "1/N"),
    ({"data__classes": ["no_lesion", "tumour"]}, "data.classes", "tumour"),
    (
        {"data__source": "npz", "data__path": "missing/file.npz", "data__phantom": DELETE},
        "data.path",
        "no such file",
    ),
    ({"model__norm_num_groups": 16}, "model.norm_num_groups", "erase the time and class"),
    ({"model__norm_num_groups": 5}, "model.norm_num_groups", "does not divide"),
    ({"privacy__enabled": False}, "privacy.enabled", "i_understand_this_is_not_private"),
    ({"training__epochs": 2}, "training.steps", "exactly one"),
    ({"modality": "pet"}, "modality", "mri"),
    ({"data__image_size": 17}, "data.image_size", "divisible"),
    ({"data__heldout_fraction": 0.2}, "data.heldout_fraction", "unknown key for the phantom source"),
    ({"data__source": "pet"}, "data.source", "one of phantom, npz"),
    ({"data__phantom": {"n_train": 1}}, "data.phantom.n_train", "greater than or equal to 2"),
    ({"data__phantom": {"ntrain": 9}}, "data.phantom.ntrain", "unknown key (check its spelling"),
    ({"data__source": None}, "data.source", "one of phantom, npz, folder, dicom, hf, nifti is required"),
    ({"data__source": "npz", "data__phantom": DELETE}, "data.path", "required for the npz source"),
    (
        {"data__source": "npz", "data__path": ".", "data__phantom": DELETE, "data__group_by": "patient"},
        "data.group_by",
        "'<split>_group' arrays",
    ),
    ({"data__source": "nifti", "data__path": ".", "data__phantom": DELETE}, "data.labels_csv", "required"),
    ({"sampling": DELETE}, "sampling", "required"),
    ({"training__expected_batch_size": 1000}, "training.expected_batch_size", "exceeds"),
]


@pytest.mark.parametrize(("overrides", "field", "words"), BAD, ids=[b[1] for b in BAD])
def test_bad_recipe_names_file_and_field_exit_2_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, field: str, words: str
) -> None:
    path = write_recipe(tmp_path / "r", tiny_recipe(**overrides))
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    for args in (["validate", str(path)], ["run", str(path), "-q"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert str(path) in result.output
        assert f": {field}:" in result.output
        assert words in result.output
    assert files_under(tmp_path) == before  # no runs/, no privacy_audits/


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodality: [mri\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: not valid YAML \(line 3"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such recipe file" in result.output


def test_relative_data_path_resolves_next_to_recipe(tmp_path: Path) -> None:
    (tmp_path / "r" / "data").mkdir(parents=True)
    (tmp_path / "r" / "data" / "x.npz").write_bytes(b"")
    path = write_recipe(
        tmp_path / "r", tiny_recipe(data__source="npz", data__path="data/x.npz", data__phantom=DELETE)
    )
    assert load_recipe(path).data.path == (tmp_path / "r" / "data" / "x.npz").resolve()


def test_validate_prints_the_plan(recipe_file) -> None:
    result = runner.invoke(app, ["validate", str(recipe_file())])
    assert result.exit_code == 0, result.output
    assert "64 training, 32 held-out" in result.output
    assert "σ =" in result.output and "rdp" in result.output


def test_recipe_hash_is_stable_and_sensitive(recipe_file, tmp_path: Path) -> None:
    a = load_recipe(recipe_file())
    b = load_recipe(write_recipe(tmp_path / "other", tiny_recipe()))
    c = load_recipe(write_recipe(tmp_path / "third", tiny_recipe(privacy__target_epsilon=9.0)))
    assert a.sha256() == b.sha256() != c.sha256()


def test_smoke_sizes_come_from_the_models(tmp_path: Path) -> None:
    """`--smoke` reads each field's smoke size: blocks the recipe has shrink, blocks it leaves out
    stay out, pretrain.data shrinks further than data, and a batch is only ever capped."""
    public = {"source": "phantom", "image_size": 16, "classes": ["no_lesion", "lesion"]}
    raw = tiny_recipe(pretrain={"data": public, "steps": 50}, training__label_dropout=0.1)
    sizes = smoke_overrides(raw)
    assert sizes["training.steps"] == 2 and sizes["training.epochs"] is None
    assert (sizes["data.max_train_images"], sizes["pretrain.data.max_train_images"]) == (400, 200)
    assert sizes["pretrain.steps"] == 2 and sizes["evaluation.classifier.epochs"] == 1
    assert not any(k.startswith("warm_start.") for k in sizes)
    assert sizes["training.expected_batch_size"] == 16
    assert smoke_overrides(tiny_recipe(training__expected_batch_size=8))["training.expected_batch_size"] == 8
    assert (
        smoke_overrides(tiny_recipe(training__expected_batch_size=64.0))["training.expected_batch_size"] == 16
    )
    assert "training.expected_batch_size" not in smoke_overrides(
        tiny_recipe(training__expected_batch_size="x")
    )
    only_checkpoint = smoke_overrides(tiny_recipe(pretrain={"checkpoint": "unet"}))
    assert not any(k.startswith("pretrain.data") for k in only_checkpoint)  # no block is made up
    recipe = load_recipe(write_recipe(tmp_path, raw), smoke=True)
    assert recipe.name == "tiny-smoke" and recipe.pretrain.data.max_heldout_images == 20
    assert recipe.model.block_out_channels == [16, 32] and recipe.audit.canary.m == 40


def test_a_run_recorded_before_sources_had_their_own_fields_still_loads(tmp_path: Path) -> None:
    """Runs started when every source carried every data field (unused ones at their defaults)
    resume; a user's recipe with a field its source does not read is refused."""
    (tmp_path / "x.npz").write_bytes(b"")
    old = tiny_recipe(data__source="npz", data__path=str(tmp_path / "x.npz"), data__heldout_fraction=None,
                      data__group_by=None, data__labels_csv=None, data__ct_window={"center": 40.0, "width": 400.0})  # fmt: skip
    path = write_recipe(tmp_path / "run", old)
    assert load_run_recipe(path).data.source == "npz"
    with pytest.raises(RecipeError, match="data.heldout_fraction: unknown key for the npz source"):
        load_recipe(path)
