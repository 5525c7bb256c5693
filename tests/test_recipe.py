"""Recipe validation: every bad recipe gives one clear message naming the file and the field,
exit code 2, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DELETE, REPO, tiny_recipe, write_recipe
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.recipe import RecipeError, load_recipe

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
    ({"data__source": "npz", "data__path": "missing/file.npz"}, "data.path", "no such file"),
    ({"model__norm_num_groups": 16}, "model.norm_num_groups", "erase the time and class"),
    ({"model__norm_num_groups": 5}, "model.norm_num_groups", "does not divide"),
    ({"privacy__enabled": False}, "privacy.enabled", "i_understand_this_is_not_private"),
    ({"training__epochs": 2}, "training.steps", "exactly one"),
    ({"modality": "pet"}, "modality", "mri"),
    ({"data__image_size": 17}, "data.image_size", "divisible"),
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
    path = write_recipe(tmp_path / "r", tiny_recipe(data__source="npz", data__path="data/x.npz"))
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
