"""Shared fixtures: the real data folder (../shared/data) and tiny recipes that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("SYNTHFACTORY_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets beside the checkout. Skips when absent, unless CI requires them."""
    path = shared_data_dir()
    if not path.is_dir():
        msg = f"real data folder {path} is absent (set SYNTHFACTORY_SHARED_DATA to point at it)"
        if os.environ.get("SYNTHFACTORY_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg + "; SYNTHFACTORY_REQUIRE_SHARED_DATA=1 requires it")
        pytest.skip(msg)
    return path


def tiny_recipe(**overrides) -> dict:
    """A complete recipe small enough to train, sample and audit in a few seconds."""
    recipe = {
        "name": "tiny",
        "modality": "mri",
        "data": {
            "source": "phantom",
            "image_size": 16,
            "classes": ["no_lesion", "lesion"],
            "phantom": {"n_train": 64, "n_heldout": 32, "seed": 3},
        },
        "model": {
            "block_out_channels": [16, 32],
            "layers_per_block": 1,
            "attention": True,
            "norm_num_groups": 4,
            "attention_head_dim": 8,
        },
        "training": {
            "steps": 4,
            "expected_batch_size": 16,
            "learning_rate": 1e-3,
            "seed": 0,
            "checkpoint_every": 2,
        },
        "privacy": {
            "target_epsilon": 10.0,
            "delta": 1e-3,
            "max_grad_norm": 1.0,
            "accountant": "rdp",
        },
        "sampling": {"images_per_class": 4, "ddim_steps": 3, "seed": 0, "batch_size": 8},
        "audit": {"threshold": {"rule": "heldout_percentile", "percentile": 1.0}, "action": "drop"},
        "outputs": {"formats": ["hf", "png"]},
    }
    for dotted, value in overrides.items():
        node = recipe
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return recipe


DELETE = object()


def opacus_epsilon(history, delta: float, accountant: str = "rdp") -> float:
    """ε of an accountant history by Opacus' own accountant classes, not by synthfactory's
    `privacy.epsilon_of`: what every ε the product records is checked against."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def dying_on_call(real, at: int):
    """`real`, except that its `at`-th call raises KeyboardInterrupt (a run killed mid-way)."""
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return dying


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path: Path):
    """Factory: recipe_file(**overrides) → path of a tiny recipe with those overrides."""

    def make(**overrides) -> Path:
        return write_recipe(tmp_path / "recipes", tiny_recipe(**overrides))

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """One tiny private run, trained and sampled (not audited). Copy it before changing it."""
    from synthfactory.run import StageOptions, check, create_run, run_stage

    base = tmp_path_factory.mktemp("tiny_run")
    path = write_recipe(base, tiny_recipe())
    checked = check(path)
    run_dir = create_run(checked, base / "runs")
    for stage in ("pretrain", "train", "sample"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    return checked, run_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path: Path):
    """A private copy of the tiny run directory, free to modify."""
    import shutil

    from synthfactory.rundir import RunDir

    checked, run_dir = tiny_run
    dest = tmp_path / "runs" / run_dir.run_id
    shutil.copytree(run_dir.root, dest)
    return checked, RunDir(dest)
