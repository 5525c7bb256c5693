"""The DP warm start: the mechanism's sensitivity and noise, one answer per run, and its ε in the
accountant (the reported ε includes it, DP-SGD's σ is re-solved for the composed ε)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe

from synthfactory import warmstart
from synthfactory.privacy import calibrate_noise, epsilon_of
from synthfactory.publish import _fmt
from synthfactory.recipe import WarmStartConfig
from synthfactory.records import PrivacyRecord
from synthfactory.run import StageOptions, check, create_run, run_stage
from synthfactory.rundir import read_json
from synthfactory.templating import environment


def _images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    return x, rng.integers(0, 3, n)


@pytest.mark.parametrize("clip", [None, 2.0])
def test_one_example_moves_the_query_by_at_most_sqrt2(clip):
    """Neighbouring data sets (one image removed), the same noise draw: the released vectors
    differ by the removed example's contribution, whose L2 norm must be ≤ √2 (the sensitivity
    the noise is scaled to). The removed image is all white: the largest norm an image can have."""
    cfg = WarmStartConfig(image_size=8, noise_multiplier=1.0, clip_norm=clip)
    x, y = _images(40)
    x[0] = 1.0
    full = warmstart.query(x, y, 3, cfg, torch.Generator().manual_seed(5))
    less = warmstart.query(x[1:], y[1:], 3, cfg, torch.Generator().manual_seed(5))
    diff = torch.cat([(full[0] - less[0]).flatten(), full[1] - less[1]])
    assert diff.norm().item() <= math.sqrt(2) + 1e-9
    assert diff.norm().item() >= 1.0  # the count moved by one; the image by up to 1
    assert (full[1] - less[1]).abs().max().item() == pytest.approx(1.0)


def test_noise_is_sigma_sqrt2_on_every_coordinate():
    cfg = WarmStartConfig(image_size=8, noise_multiplier=3.0)
    x, y = _images(30)
    exact = warmstart.query(x, y, 3, WarmStartConfig(image_size=8, noise_multiplier=1e-12), torch.Generator())
    sums, counts = [], []
    for seed in range(200):
        s, c = warmstart.query(x, y, 3, cfg, torch.Generator().manual_seed(seed))
        sums.append((s - exact[0]).flatten())
        counts.append(c - exact[1])
    noise = torch.cat([torch.stack(sums).flatten(), torch.stack(counts).flatten()])
    assert noise.std().item() == pytest.approx(3.0 * math.sqrt(2), rel=0.03)
    assert abs(noise.mean().item()) < 0.05


def test_the_query_is_answered_once_per_run(tmp_path):
    """A second attempt of the stage reads the stored answer instead of asking again (which
    would spend ε twice); the answer is drawn from a secret seed, so two answers differ."""
    recipe = check(
        _write(tmp_path, tiny_recipe(warm_start={"noise_multiplier": 2.0, "image_size": 8}))
    ).recipe
    x, y = _images(40)
    path = tmp_path / "c.npz"
    first = warmstart.answered_once(path, x, y, recipe, 3)
    again = warmstart.answered_once(path, x, y, recipe, 3)
    np.testing.assert_array_equal(first.means, again.means)
    other = warmstart.answered_once(tmp_path / "d.npz", x, y, recipe, 3)
    assert not np.array_equal(first.means, other.means)
    assert first.noise_source.startswith("secret")


def _write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_reported_epsilon_includes_the_warm_start_and_sigma_is_resolved(tmp_path):
    """Through the product's stages: pretrain (the warm start) then train. privacy.json's history
    starts with the query, ε is the composed one (≤ target, more than DP-SGD's alone), and
    DP-SGD's σ is the one calibrated for the composition (larger than without the query)."""
    ws = {"noise_multiplier": 1.5, "image_size": 8, "steps": 3, "expected_batch_size": 8}
    checked = check(_write(tmp_path, tiny_recipe(warm_start=ws)))
    run_dir = create_run(checked, tmp_path / "runs")
    opts = StageOptions(progress=False)
    for stage in ("data", "pretrain", "train"):
        run_stage(stage, checked, run_dir, opts)
    priv = read_json(run_dir.privacy)
    r = checked.recipe
    q, steps, delta = priv["sample_rate"], priv["steps_taken"], r.privacy.delta
    assert priv["accountant_history"][0] == [1.5, 1.0, 1]
    assert priv["epsilon"] == pytest.approx(epsilon_of(priv["accountant_history"], delta, "rdp"))
    dp_sgd_alone = epsilon_of([priv["accountant_history"][-1]], delta, "rdp")
    assert dp_sgd_alone < priv["epsilon"] <= r.privacy.target_epsilon
    without = calibrate_noise(r.privacy.target_epsilon, delta, q, steps, "rdp")
    assert priv["noise_multiplier"] > without
    assert priv["noise_multiplier"] == pytest.approx(checked.plan["noise_multiplier"])
    assert priv["warm_start"]["epsilon_alone"] == pytest.approx(epsilon_of([(1.5, 1.0, 1)], delta, "rdp"))
    assert (run_dir.central_images).is_file()
    privacy_part = environment(markdown=True, strict=True).get_template("dataset-card-privacy.md.j2")
    card = privacy_part.render(p=PrivacyRecord.read(run_dir.privacy), s={"n_samples": 8}, n=8, fmt=_fmt)
    assert "DP warm start" in card and "σ = 1.5" in card
    origin = read_json(run_dir.pretrained / "unet" / "synthfactory_origin.json")
    assert origin["trained_on_private_data"] and origin["accountant_history"] == [[1.5, 1.0, 1]]


def test_augment_keeps_range_and_shape():
    x = torch.rand(5, 1, 12, 12) * 2 - 1
    out = warmstart.augment(x, 2, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)


def test_class_counts_share_the_total_by_weight():
    from synthfactory.sample import class_counts

    got = class_counts(600, np.array([120.3, 450.2, 70.1]))
    assert got.sum() == 600 and list(got) == [113, 421, 66]
    assert list(class_counts(600, np.array([-5.0, 100.0, 3.0]))) == [
        1,
        581,
        18,
    ]  # noisy counts < 0: one image
    assert class_counts(7, np.ones(3)).sum() == 7


def test_samples_follow_the_dp_class_counts(tmp_path):
    """sampling.class_proportions: dp_counts draws the same total, shared by the warm start's
    noisy counts (read from the run's stored answer, not from the private labels)."""
    from synthfactory.sample import class_counts

    ws = {"noise_multiplier": 1.0, "image_size": 8, "steps": 2, "expected_batch_size": 8}
    recipe = tiny_recipe(
        warm_start=ws,
        sampling={
            "images_per_class": 6,
            "ddim_steps": 2,
            "seed": 0,
            "batch_size": 8,
            "class_proportions": "dp_counts",
        },
    )
    recipe["data"]["phantom"] = {"n_train": 90, "n_heldout": 32, "seed": 3}
    checked = check(_write(tmp_path, recipe))
    run_dir = create_run(checked, tmp_path / "runs")
    for stage in ("data", "pretrain", "train", "sample"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    counts = warmstart.load(run_dir.central_images).counts
    labels = np.load(run_dir.samples / "labels.npy")
    assert list(np.bincount(labels, minlength=2)) == list(class_counts(12, counts))


def test_dp_counts_need_a_warm_start(tmp_path):
    from synthfactory.recipe import RecipeError, load_recipe

    r = tiny_recipe(sampling={"images_per_class": 4, "class_proportions": "dp_counts"})
    with pytest.raises(RecipeError, match="warm_start"):
        load_recipe(_write(tmp_path, r))


def test_the_warm_start_refuses_to_run_on_several_ranks(tmp_path, monkeypatch):
    """Under torchrun every rank would answer the query with its own secret noise (ε spent once
    per rank): the stage refuses before answering."""
    from synthfactory.recipe import RecipeError

    ws = {"noise_multiplier": 2.0, "image_size": 8, "steps": 2, "expected_batch_size": 8}
    checked = check(_write(tmp_path, tiny_recipe(warm_start=ws)))
    run_dir = create_run(checked, tmp_path / "runs")
    run_stage("data", checked, run_dir, StageOptions(progress=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="one process"):
        run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    assert not (run_dir.central_images).exists()
