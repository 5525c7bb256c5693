"""`synthfactory plan`: the probe, the accountant's σ for each batch size, the proposal."""

from __future__ import annotations

import re

import pytest
from conftest import tiny_recipe, write_recipe
from typer.testing import CliRunner

from synthfactory import plan as planning
from synthfactory.cli import app
from synthfactory.privacy import calibrate_noise
from synthfactory.recipe import load_recipe
from synthfactory.warmstart import history


def test_options_take_sigma_from_the_accountant_composed_with_the_warm_start(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(warm_start={"noise_multiplier": 2.0, "image_size": 8}))
    r = load_recipe(path)
    opts = planning.options(r, n_train=5000, examples_per_s=100.0, minutes=2.0)
    assert [o.batch for o in opts] == [64, 128, 256, 512, 1024, 2048, 4096]
    for o in opts:
        assert o.steps == int(100 * 120 // o.batch)
        want = calibrate_noise(10.0, 1e-3, o.batch / 5000, o.steps, "rdp", prior=history(r.warm_start))
        assert o.noise_multiplier == pytest.approx(want)
        assert o.noise_per_step == pytest.approx(want / o.batch)
    best = planning.choose(opts, min_steps=20)
    assert best.steps >= 20
    assert all(o.noise_per_step >= best.noise_per_step for o in opts if o.steps >= 20)
    assert planning.choose(opts, min_steps=10**6) is None


def test_plan_command_probes_and_proposes(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    res = CliRunner().invoke(
        app, ["plan", str(path), "--minutes", "0.5", "--n-train", "2000", "--min-steps", "5"]
    )
    assert res.exit_code == 0, res.output
    rate = float(re.search(r"probe\s+([\d.]+) DP example-gradients/s", res.output).group(1))
    assert rate > 0
    m = re.search(r"--set training.expected_batch_size=(\d+) --set training.steps=(\d+)", res.output)
    b, steps = int(m.group(1)), int(m.group(2))
    assert steps >= 5 and abs(steps - rate * 30 / b) < 1.5  # the rate is printed rounded
    # the proposal validates as a recipe
    r = load_recipe(path, {"training.expected_batch_size": b, "training.steps": steps})
    assert r.training.expected_batch_size == b


def test_plan_refuses_a_non_private_recipe(tmp_path):
    path = write_recipe(
        tmp_path, tiny_recipe(privacy={"enabled": False, "i_understand_this_is_not_private": True})
    )
    res = CliRunner().invoke(app, ["plan", str(path), "--n-train", "100"])
    assert res.exit_code == 2 and "privacy.enabled" in res.output
