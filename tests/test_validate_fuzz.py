"""`synthfactory validate` on arbitrary input (hypothesis): any YAML document, any recipe with
fields set to odd values or removed, any damaged data file. It must end with exit 0, or with exit
2 and one line naming the file (and the field), never with a traceback."""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import yaml
from conftest import tiny_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.recipe import Recipe

runner = CliRunner()
# More examples for a deeper search: SYNTHFACTORY_FUZZ_EXAMPLES=1000 make test
FUZZ = settings(
    max_examples=int(os.environ.get("SYNTHFACTORY_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def field_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted field of the recipe schema, nested models included."""
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        for t in (info.annotation, *get_args(info.annotation)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += field_paths(t, f"{prefix}{name}.")
    return out


PATHS = field_paths()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([0, -1, 10**12, 2**63, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["", ".", "..", "/", "/dev/null", "\x00", "~", "all", "phantom", "npz", "hf", "cuda", "auto"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def set_path(doc: dict, dotted: str, value, delete: bool) -> None:
    node = doc
    keys = dotted.split(".")
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    if delete:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def check_outcome(recipe_path: Path) -> int:
    """Run `validate`: exit 0, or exit 2 with one line on stderr and nothing else said (no
    library warning or log line either, which a user would see above the message)."""
    logged = Records()
    loggers = [logging.getLogger(), logging.getLogger("diffusers"), logging.getLogger("datasets")]
    for lg in loggers:
        lg.addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            res = runner.invoke(app, ["validate", str(recipe_path)])
    finally:
        for lg in loggers:
            lg.removeHandler(logged)
    assert isinstance(res.exception, SystemExit | None), (
        f"traceback: {type(res.exception).__name__}: {res.exception}\n{res.output[-2000:]}"
    )
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {recipe_path}") and res.stdout == "", (
            res.output
        )
        said = [str(w.message) for w in warned] + logged.records
        assert not said, (res.output, said)
    return res.exit_code


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@FUZZ
@given(doc=values)
def test_any_yaml_document(tmp_path_factory, doc) -> None:
    tmp = tmp_path_factory.mktemp("doc")
    check_outcome(write(tmp, yaml.safe_dump(doc)))


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text(tmp_path_factory, text: str) -> None:
    tmp = tmp_path_factory.mktemp("text")
    path = tmp / "recipe.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_outcome(path)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), values, st.booleans()), min_size=1, max_size=4))
def test_a_recipe_with_odd_fields(tmp_path_factory, edits) -> None:
    tmp = tmp_path_factory.mktemp("edit")
    doc = copy.deepcopy(tiny_recipe())
    for dotted, value, delete in edits:
        set_path(doc, dotted, value, delete)
    check_outcome(write(tmp, yaml.safe_dump(doc)))


def _npz_bytes() -> bytes:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    labels = rng.integers(0, 2, 40)
    buf = io.BytesIO()
    np.savez(buf, train_images=images, train_labels=labels, test_images=images[:30], test_labels=labels[:30])
    return buf.getvalue()


NPZ = _npz_bytes()


@st.composite
def damaged(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "overwrite", "random", "empty"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "overwrite":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "random":
        return draw(st.binary(max_size=2000))
    return b""


def npz_recipe(path: Path) -> dict:
    return tiny_recipe(data={"source": "npz", "path": str(path), "image_size": 16, "classes": ["0", "1"]})


def test_the_npz_fixture_is_valid(tmp_path) -> None:
    (tmp_path / "data.npz").write_bytes(NPZ)
    assert check_outcome(write(tmp_path, yaml.safe_dump(npz_recipe(tmp_path / "data.npz")))) == 0


@FUZZ
@given(blob=damaged(NPZ))
def test_a_damaged_npz_file(tmp_path_factory, blob: bytes) -> None:
    tmp = tmp_path_factory.mktemp("npz")
    (tmp / "data.npz").write_bytes(blob)
    check_outcome(write(tmp, yaml.safe_dump(npz_recipe(tmp / "data.npz"))))


def test_a_truncated_npz_names_the_file_and_field(tmp_path) -> None:
    (tmp_path / "data.npz").write_bytes(NPZ[: len(NPZ) // 2])
    path = write(tmp_path, yaml.safe_dump(npz_recipe(tmp_path / "data.npz")))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert res.stderr.startswith(f"error: {path}: data.path: data.npz is not a readable .npz file (")
    assert len(res.stderr.strip().splitlines()) == 1


def _png_bytes(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("folders")


@FUZZ
@given(blobs=st.lists(damaged(_png_bytes(0)), min_size=1, max_size=3))
def test_a_folder_with_damaged_images(folder_root, blobs: list[bytes]) -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=folder_root))
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp / split / c).mkdir(parents=True)
            for i in range(3):
                (tmp / split / c / f"{i}.png").write_bytes(_png_bytes(i))
    for i, blob in enumerate(blobs):
        (tmp / "train" / "a" / f"bad{i}.png").write_bytes(blob)
    recipe = tiny_recipe(data={"source": "folder", "path": str(tmp), "image_size": 16, "classes": ["a", "b"]})
    recipe["training"]["expected_batch_size"] = 2
    recipe["privacy"]["delta"] = 1e-2
    check_outcome(write(tmp, yaml.safe_dump(recipe)))


def _checkpoint_folder(folder: Path, config: str) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config)
    return str(folder)


def edge_cases(tmp: Path, recipe_path: Path) -> dict[str, dict]:
    """Recipe sections that once ended in a traceback, or could."""
    training = {"expected_batch_size": 4, "learning_rate": 1e-3}
    return {
        "NUL byte in a path": {
            "data": {"source": "npz", "path": "a\x00b", "image_size": 16, "classes": ["0"]}
        },
        "folder as the npz file": {
            "data": {"source": "npz", "path": "/", "image_size": 16, "classes": ["0"]}
        },
        "empty npz file": {
            "data": {"source": "npz", "path": "/dev/null", "image_size": 16, "classes": ["0"]}
        },
        "file as the image folder": {
            "data": {"source": "folder", "path": str(recipe_path), "image_size": 16, "classes": ["0"]}
        },
        "checkpoint with a broken config": {
            "pretrain": {"checkpoint": _checkpoint_folder(tmp / "a", "{bad")}
        },
        "checkpoint without weights": {
            "pretrain": {"checkpoint": _checkpoint_folder(tmp / "b", '{"_class_name": "UNet2DModel"}')}
        },
        "ε that no σ reaches": {"privacy": {"target_epsilon": 1e300, "delta": 1e-3}},
        "seed beyond 64 bits": {"training": {**training, "steps": 1, "seed": 2**70}},
        "negative seed": {
            "data": {"source": "phantom", "image_size": 16, "classes": ["no_lesion"], "phantom": {"seed": -1}}
        },
        "epochs beyond any step count": {"training": {**training, "epochs": 1e300}},
        "steps beyond the limit": {"training": {**training, "steps": 10**12}},
        "infinite clipping norm": {
            "privacy": {"target_epsilon": 10, "delta": 1e-3, "max_grad_norm": float("inf")}
        },
    }


EDGES = [
    "NUL byte in a path",
    "folder as the npz file",
    "empty npz file",
    "file as the image folder",
    "checkpoint with a broken config",
    "checkpoint without weights",
    "ε that no σ reaches",
    "seed beyond 64 bits",
    "negative seed",
    "epochs beyond any step count",
    "steps beyond the limit",
    "infinite clipping norm",
]


@pytest.mark.parametrize("case", EDGES)
def test_edge_cases_end_in_one_line(case: str, tmp_path: Path) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    cases = edge_cases(tmp_path, recipe_path)
    assert list(cases) == EDGES
    recipe = {**tiny_recipe(), **cases[case]}
    recipe_path.write_text(yaml.safe_dump(recipe))
    assert check_outcome(recipe_path) == 2
