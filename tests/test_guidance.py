"""Choosing the guidance scale among candidates from DP outputs only: the distance it ranks by,
the choice, the recipe's rules, and the sample stage using it without any private image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe

from synthfactory import guidance, warmstart
from synthfactory.publish import dataset_card
from synthfactory.recipe import RecipeError, load_recipe
from synthfactory.run import StageOptions, check, create_run, run_stage
from synthfactory.rundir import read_json
from synthfactory.sample import Samples, ddim_sample, sample_seed


def _central(means: np.ndarray) -> warmstart.CentralImages:
    return warmstart.CentralImages(
        means=means.astype(np.float32),
        counts=np.full(len(means), 10.0, np.float32),
        noise_multiplier=1.0,
        clip_norm=1.0,
        noise_source="test",
    )


def test_distance_is_zero_on_the_class_means_and_grows_with_the_gap():
    """Flat images of value v per class: their class means at s×s are (v + 1)/2 everywhere."""
    labels = np.array([0, 0, 1, 1])
    images = torch.tensor([-1.0, -1.0, 0.5, 0.5]).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    exact = _central(np.stack([np.zeros((4, 4)), np.full((4, 4), 0.75)]))
    assert guidance.class_mean_distance(images, labels, exact) == pytest.approx(0.0, abs=1e-10)
    off = _central(np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.75)]))
    # class 0 is 0.1 off on 16 pixels, class 1 exact: mean over classes of 16 × 0.01
    assert guidance.class_mean_distance(images, labels, off) == pytest.approx(0.08, rel=1e-5)


def _trained_run(tmp_path, scales):
    ws = {"noise_multiplier": 1.0, "image_size": 8, "steps": 3, "expected_batch_size": 8}
    recipe = tiny_recipe(
        warm_start=ws,
        sampling={
            "images_per_class": 4,
            "ddim_steps": 2,
            "seed": 0,
            "batch_size": 8,
            "guidance_scale": scales,
            "guidance_probe_images": 3,
        },
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    checked = check(path)
    run_dir = create_run(checked, tmp_path / "runs")
    for stage in ("data", "pretrain", "train"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    return checked, run_dir


def test_the_sample_stage_samples_with_the_candidate_nearest_the_dp_class_means(tmp_path, monkeypatch):
    """The stage scores every candidate on seeded probe images against the stored DP class
    means, keeps the least distance, records it, and samples the store with it. No private image
    is read: loading any data source fails during the stage."""
    from synthfactory import data
    from synthfactory.model import load_generator, sampling_scheduler

    checked, run_dir = _trained_run(tmp_path, [1.0, 4.0])

    def no_data(*args, **kwargs):
        raise AssertionError("the guidance choice read a data source")

    monkeypatch.setattr(data, "load_images", no_data)
    run_stage("sample", checked, run_dir, StageOptions(progress=False))
    stored = read_json(run_dir.guidance)
    assert stored["candidates"] == [1.0, 4.0] and len(stored["distances"]) == 2
    assert stored["scale"] == stored["candidates"][int(np.argmin(stored["distances"]))]
    assert run_dir.info()["stages"]["sample"]["guidance_scale"] == stored["scale"]

    # the distances are those of the probe images against the DP class means
    model, sched = load_generator(run_dir.final_checkpoint, ema=True)
    info = read_json(run_dir.final_checkpoint / "synthfactory.json")
    central = warmstart.load(run_dir.central_images)
    labels = np.repeat(np.arange(2), 3)
    seeds = [sample_seed(0, guidance.PROBE_SEED_OFFSET + i) for i in range(6)]
    for w, d in zip(stored["candidates"], stored["distances"], strict=True):
        x = ddim_sample(
            model, sampling_scheduler(sched), torch.from_numpy(labels), seeds, 2, 16, w, info["null_class"]
        )
        assert guidance.class_mean_distance(x, labels, central) == pytest.approx(d, rel=1e-5)

    # the store was sampled with the chosen scale
    s = Samples.load(run_dir.samples)
    first = ddim_sample(
        model,
        sampling_scheduler(sched),
        torch.from_numpy(s.labels[:8]),
        s.seeds[:8].tolist(),
        2,
        16,
        stored["scale"],
        info["null_class"],
    )
    from synthfactory.sample import to_uint8

    np.testing.assert_array_equal(np.asarray(s.images[:8]), to_uint8(first))


def test_the_card_names_the_candidates_and_the_basis_of_the_choice(tmp_path):
    checked, run_dir = _trained_run(tmp_path, [1.0, 2.0])
    for stage in ("sample", "audit_models", "audit"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False, audit_root=tmp_path / "audits"))
    card = dataset_card(run_dir, {"no_lesion": 4, "lesion": 4})
    used = read_json(run_dir.guidance)["scale"]
    assert f"guidance scale {used}, chosen among [1.0, 2.0]" in card
    assert "DP class means" in card


def _write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("sampling", "extra", "match"),
    [
        ({"guidance_scale": [1.0, 2.0]}, {}, "warm_start"),
        ({"guidance_scale": []}, {"warm_start": {"noise_multiplier": 2.0}}, "non-empty"),
        ({"guidance_scale": [1.0, -1.0]}, {"warm_start": {"noise_multiplier": 2.0}}, "≥ 0"),
        (
            {"guidance_scale": [1.0, 2.0]},
            {"warm_start": {"noise_multiplier": 2.0}, "training__label_dropout": 0.0},
            "unconditional",
        ),
    ],
)
def test_the_recipe_refuses_candidates_it_cannot_choose_among(tmp_path, sampling, extra, match):
    r = tiny_recipe(sampling={"images_per_class": 4, **sampling}, **extra)
    with pytest.raises(RecipeError, match=match):
        load_recipe(_write(tmp_path, r))
