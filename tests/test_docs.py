"""The front door and the docs: every recipe field is described, the recipe reference page is
the one the models generate, README stays short and its links lead somewhere."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from synthfactory.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_hooks"] = module
    spec.loader.exec_module(module)
    return module


def test_every_recipe_field_has_a_description() -> None:
    rows = _hooks().field_rows(Recipe)
    assert len(rows) > 100
    missing = [name for name, _, _, text in rows if not text.strip()]
    assert not missing, f"recipe fields without a description (an attribute docstring): {missing}"


def test_recipe_reference_page_is_generated_from_the_models(tmp_path) -> None:
    hooks = _hooks()
    page = tmp_path / "recipe-reference.md"
    committed = (ROOT / "docs" / "recipe-reference.md").read_text()
    page.write_text(committed)
    assert not hooks.write_recipe_reference(page), (
        "docs/recipe-reference.md differs from the recipe models: run `python docs/hooks.py`"
    )
    for name, *_ in hooks.field_rows(Recipe):
        assert f"`{name}`" in committed


def test_readme_is_short_and_its_local_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local and not [link for link in local if not (ROOT / link).exists()]
