"""MkDocs hooks. The recipe reference (docs/recipe-reference.md, below `<!-- recipe-reference -->`)
is generated from the recipe's pydantic models: each field's text is its attribute docstring in
synthfactory/recipe.py. `python docs/hooks.py` rewrites it; the site build regenerates it; and
tests/test_docs.py fails when the committed page differs from the models."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from pydantic import BaseModel

from synthfactory.recipe import DATA_SOURCES, Recipe, _DataBase

MARKER = "<!-- recipe-reference -->"


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a field's type (`X`, `X | None`, `list[X]`, a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "pathlib.", "synthfactory.recipe.", "Annotated[", ", FieldInfo"):
        text = text.replace(noise, "")
    return text.split(", Field(")[0].split("[Ge(")[0]


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Path):
        value = str(value)
    if value is None:
        return "`null`"
    return f"`{value!r}`".replace("'", "") if value != "" else '`""`'


def _meaning(field) -> str:
    """The field's docstring, and what `--smoke` sets it to."""
    text = " ".join((field.description or "").split())
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if isinstance(extra.get("smoke"), dict):
        text += (
            " `--smoke`: " + ", ".join(f"`{k}` `{json.dumps(v)}`" for k, v in extra["smoke"].items()) + "."
        )
    elif "smoke" in extra:
        text += f" `--smoke`: `{json.dumps(extra['smoke'])}`."
    if "smoke_at_most" in extra:
        text += f" `--smoke`: at most `{extra['smoke_at_most']}`."
    return text


def _by_source(values: dict[str, str]) -> str:
    """One value, or each value with the sources that have it."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) == 1:
        return distinct[0]
    return "; ".join(f"{v} ({', '.join(k for k in values if values[k] == v)})" for v in distinct)


def data_rows(prefix: str) -> list[tuple[str, str, str, str]]:
    """The `data` block: every source's fields in one table, each saying which sources have it."""
    fields: dict[str, dict[str, object]] = {}
    for source, model in DATA_SOURCES.items():
        for name, field in model.model_fields.items():
            fields.setdefault(name, {})[source] = field
    rows = [(prefix + "source", "str", "required", _meaning(_DataBase.model_fields["source"]))]
    nested = {}
    for name, per_source in list(fields.items())[1:]:
        sources = "" if len(per_source) == len(DATA_SOURCES) else f" Sources: {', '.join(per_source)}."
        kinds = {k: _type_name(f.annotation) for k, f in per_source.items()}
        defaults = {k: _default(f) for k, f in per_source.items()}
        text = _by_source({k: _meaning(f) for k, f in per_source.items()}) + sources
        rows.append((prefix + name, _by_source(kinds), _by_source(defaults), text))
        for f in per_source.values():
            nested.update({m: prefix + name + "." for m in _models(f.annotation)})
    for sub, sub_prefix in nested.items():
        rows += field_rows(sub, sub_prefix, {})
    return rows


def field_rows(
    model: type[BaseModel], prefix: str = "", shown: dict | None = None
) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) of every field, nested models after their
    parent; a model already listed elsewhere (`pretrain.data` is a `data` block) is referred to."""
    shown = {} if shown is None else shown
    rows, nested = [], []
    for name, field in model.model_fields.items():
        text, subs = _meaning(field), _models(field.annotation)
        kind = _type_name(field.annotation)
        if set(subs) & set(DATA_SOURCES.values()):
            kind, subs = "one of the data sources", []
            if "data" in shown:
                text += f" Same sources and fields as `{shown['data']}`."
            else:
                shown["data"] = prefix + name
                nested.append((prefix + name + ".", None))
        for sub in subs:
            if sub in shown:
                text += f" Same fields as `{shown[sub]}`."
            else:
                shown[sub] = prefix + name
                nested.append((prefix + name + ".", sub))
        rows.append((prefix + name, kind, _default(field), text))
    for sub_prefix, sub in nested:
        rows += data_rows(sub_prefix) if sub is None else field_rows(sub, sub_prefix, shown)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows) -> list[str]:
    out = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    return out + [f"| `{n}` | {_cell(t)} | {_cell(d)} | {_cell(m)} |" for n, t, d, m in rows]


def recipe_reference_markdown() -> str:
    """The top-level fields, then one table per block of the recipe."""
    blocks = {name: _models(f.annotation) for name, f in Recipe.model_fields.items()}
    top = [r for r in field_rows(Recipe) if "." not in r[0] and not blocks[r[0]]]
    out = ["## Top level", "", *_table(top), ""]
    shown: dict = {"data": "data"}
    for block, models in blocks.items():
        if models:
            text = " ".join((Recipe.model_fields[block].description or "").split())
            if block == "data":
                rows = data_rows("data.")
                text += (
                    " Which fields apply depends on `source`; each row names the sources that have it.\n\n"
                    + "\n".join(
                        f"- `{name}`: {' '.join((model.__doc__ or '').split())}"
                        for name, model in DATA_SOURCES.items()
                    )
                )
            else:
                rows = field_rows(models[0], block + ".", shown)
                shown.setdefault(models[0], block)
            out += [f"## `{block}`", "", text, "", *_table(rows), ""]
    return "\n".join(out)


def on_files(files, config):
    """The committed reports' figures (sample grids, distance and ROC plots; synthetic images and
    public statistics only) are served under privacy_audits/, so the results page can show them."""
    from mkdocs.structure.files import File

    root = Path(config["docs_dir"]).parent
    for png in sorted((root / "privacy_audits").rglob("*.png")):
        files.append(File.generated(config, png.relative_to(root).as_posix(), abs_src_path=str(png)))
    return files


def write_recipe_reference(page: Path = Path(__file__).parent / "recipe-reference.md") -> bool:
    """Regenerate the tables below the marker of recipe-reference.md; True if it changed."""
    text = page.read_text()
    head = text.split(MARKER)[0]
    new = head + MARKER + "\n\n" + recipe_reference_markdown()
    if new != text:
        page.write_text(new)
    return new != text


def on_pre_build(config) -> None:
    """The site is built from the models as they are now (a stale committed page fails the test
    tests/test_docs.py, and is regenerated here)."""
    write_recipe_reference(Path(config["docs_dir"]) / "recipe-reference.md")


if __name__ == "__main__":
    print("docs/recipe-reference.md", "regenerated" if write_recipe_reference() else "up to date")
