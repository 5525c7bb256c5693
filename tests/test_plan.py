"""`synthfactory plan` (budget.py): the accountant's σ for each batch size, composed with what
the pre-training stage will write to the ledger; the proposal. The probe's speed is machine load,
a benchmark: the command's test feeds it a fixed rate."""

from __future__ import annotations

import re

import pytest
from conftest import tiny_recipe, write_recipe
from typer.testing import CliRunner

from synthfactory import budget as planning
from synthfactory.cli import app
from synthfactory.privacy import calibrate_noise
from synthfactory.recipe import load_recipe
from synthfactory.warmstart import history


def test_options_take_sigma_from_the_accountant_composed_with_the_warm_start(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(warm_start={"noise_multiplier": 2.0, "image_size": 8}))
    r = load_recipe(path)
    prior = planning.planned_prior(r)
    assert prior == history(r.warm_start) == [(2.0, 1.0, 1)]
    opts = planning.options(r, n_train=5000, examples_per_s=100.0, minutes=2.0, prior=prior)
    assert [o.batch for o in opts] == [64, 128, 256, 512, 1024, 2048, 4096]
    for o in opts:
        assert o.steps == int(100 * 120 // o.batch)
        want = calibrate_noise(10.0, 1e-3, o.batch / 5000, o.steps, "rdp", prior=[(2.0, 1.0, 1)])
        assert o.noise_multiplier == pytest.approx(want)
        assert o.noise_per_step == pytest.approx(want / o.batch)
    best = planning.choose(opts, min_steps=20)
    assert best.steps >= 20
    assert all(o.noise_per_step >= best.noise_per_step for o in opts if o.steps >= 20)
    assert planning.choose(opts, min_steps=10**6) is None


def test_the_plan_composes_a_checkpoints_ledger(tiny_run, tmp_path):
    """A recipe that starts from a DP checkpoint of its own data: the plan's σ is calibrated
    after that run's history (with the images, by the ledger's verdict; without, assumed)."""
    _, src = tiny_run
    from synthfactory.data import load_images
    from synthfactory.rundir import read_json

    path = write_recipe(tmp_path, tiny_recipe(pretrain={"checkpoint": str(src.final_checkpoint / "unet")},
                                              privacy__target_epsilon=20.0))  # fmt: skip
    r = load_recipe(path)
    source = [tuple(h) for h in read_json(src.privacy)["accountant_history"]]
    assert planning.planned_prior(r, load_images(r.data, r.modality)) == source
    assert planning.planned_prior(r) == source


def test_probe_times_dp_steps_of_the_recipe():
    """The probe runs DP steps of the recipe's model on random images; its rate is a figure of
    this machine's load, so only its form is checked here."""
    r = tiny_recipe()
    path_free = load_recipe_from_dict(r)
    p = planning.probe(path_free, n_classes=2, batch=8, steps=1, warmup=1)
    assert p.batch == 8 and p.seconds > 0 and p.examples_per_s > 0


def load_recipe_from_dict(d: dict):
    from synthfactory.recipe import Recipe

    return Recipe.model_validate(d)


def test_plan_command_proposes_from_the_probed_rate(tmp_path, monkeypatch):
    """The command at a fixed probe rate (100 example-gradients/s): the proposal is the least
    noise per step with enough steps, and it validates as a recipe."""
    monkeypatch.setattr(planning, "probe", lambda recipe, n_classes: planning.Probe(100.0, 1.0, 64))
    path = write_recipe(tmp_path, tiny_recipe())
    res = CliRunner().invoke(
        app, ["plan", str(path), "--minutes", "0.5", "--n-train", "2000", "--min-steps", "5"]
    )
    assert res.exit_code == 0, res.output
    assert "probe      100.0 DP example-gradients/s" in res.output
    m = re.search(r"--set training.expected_batch_size=(\d+) --set training.steps=(\d+)", res.output)
    b, steps = int(m.group(1)), int(m.group(2))
    opts = planning.options(load_recipe(path), 2000, 100.0, 0.5)
    best = planning.choose(opts, 5)
    assert (b, steps) == (best.batch, best.steps) and steps == 3000 // b
    r = load_recipe(path, {"training.expected_batch_size": b, "training.steps": steps})
    assert r.training.expected_batch_size == b


def test_plan_refuses_a_non_private_recipe(tmp_path):
    path = write_recipe(
        tmp_path, tiny_recipe(privacy={"enabled": False, "i_understand_this_is_not_private": True})
    )
    res = CliRunner().invoke(app, ["plan", str(path), "--n-train", "100"])
    assert res.exit_code == 2 and "privacy.enabled" in res.output
