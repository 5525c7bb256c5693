"""The evaluation catches a broken generator: TSTR near chance for noise with random labels,
near TRTR when the "synthetic" set is real training data (which the audit would block)."""

from __future__ import annotations

import numpy as np
import pytest

from synthfactory.audit import quantize
from synthfactory.data import load_images
from synthfactory.evaluate import (
    _improves,
    bootstrap_intervals,
    evaluate_arrays,
    frechet_distance,
    prdc,
    predict,
    split_validation,
    train_classifier,
)
from synthfactory.metrics import auc_one_vs_rest
from synthfactory.recipe import ClassifierConfig, EvaluationConfig, PhantomData
from synthfactory.sample import uint8_to_model_range


@pytest.fixture(scope="module")
def ct_phantoms():
    cfg = PhantomData(
        image_size=16,
        classes=["chest", "abdomen", "pelvis"],
        phantom={"n_train": 300, "n_heldout": 150, "seed": 2},
    )
    return load_images(cfg, "ct")


EVAL = EvaluationConfig(
    classifier=ClassifierConfig(epochs=6, patience=3, batch_size=64),
    max_real_features=150,
    classifier_seeds=1,
)


def test_real_data_as_synthetic_scores_like_trtr_and_noise_scores_chance(ct_phantoms) -> None:
    real_u8 = quantize(ct_phantoms.train_images)
    as_real = evaluate_arrays(real_u8, ct_phantoms.train_labels, ct_phantoms, EVAL, threshold=1.0)
    assert as_real["trtr"]["accuracy"] > 0.9  # the classifier fits this data
    assert as_real["tstr_over_trtr_accuracy"] > 0.9 and as_real["tstr_over_trtr_above_chance"] > 0.8
    assert as_real["fidelity"]["precision"] > 0.5 and as_real["fidelity"]["coverage"] > 0.5

    # Pure noise with random labels: any one draw of labels can line up with brightness by
    # chance, so the claim is about the average over draws.
    runs = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        noise = rng.integers(0, 256, real_u8.shape, dtype=np.uint8)
        runs.append(evaluate_arrays(noise, rng.integers(0, 3, len(noise)), ct_phantoms, EVAL, threshold=1.0))
    chance = runs[0]["tstr"]["chance_accuracy"]
    assert np.mean([r["tstr"]["accuracy"] for r in runs]) < chance + 0.1
    assert np.mean([r["tstr_over_trtr_accuracy"] for r in runs]) < 0.5
    assert np.mean([r["tstr_over_trtr_above_chance"] for r in runs]) < 0.25
    for r in runs:
        assert r["fidelity"]["frechet_distance"] > 10 * as_real["fidelity"]["frechet_distance"]
        assert r["fidelity"]["precision"] < 0.1


def test_the_audit_blocks_real_training_data_presented_as_samples(run_copy, tmp_path) -> None:
    from synthfactory.audit import run_audit
    from synthfactory.sample import Samples

    checked, run_dir = run_copy
    real = quantize(checked.images.train_images)
    Samples(real, checked.images.train_labels, np.arange(len(real), dtype=np.int64)).save(run_dir.samples)
    recipe = checked.recipe.model_copy(
        update={"audit": checked.recipe.audit.model_copy(update={"action": "block"})}
    )
    res = run_audit(recipe, run_dir, checked.images, tmp_path / "pa")
    assert res.decision == "block" and res.flagged.all()


def test_diversity_flags_mode_collapse(ct_phantoms) -> None:
    one = quantize(ct_phantoms.train_images[:1])
    collapsed = np.repeat(one, 60, axis=0)
    labels = np.repeat(np.arange(3), 20)
    out = evaluate_arrays(
        collapsed,
        labels,
        ct_phantoms,
        EVAL.model_copy(update={"classifier": ClassifierConfig(epochs=1)}),
        threshold=1.0,
    )
    assert out["diversity"]["share_near_duplicate"] == 1.0


def test_auc_frechet_and_prdc_on_known_inputs() -> None:
    assert auc_one_vs_rest(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert auc_one_vs_rest(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4))
    b = a + np.array([3.0, 0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(9.0, rel=1e-3)
    same = prdc(a[:500], a[500:1000], k=5)
    far = prdc(a[:500], a[500:1000] + 100.0, k=5)
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.8
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0


def test_bootstrap_intervals_cover_the_estimate_and_resample_patients() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 100)
    trtr = np.where(rng.random(300) < 0.9, y, (y + 1) % 3)
    tstr = np.where(rng.random(300) < 0.6, y, (y + 1) % 3)
    by_image = bootstrap_intervals(tstr, trtr, y, None, 1000, seed=0)
    assert by_image["unit"] == "image" and by_image["n_units"] == 300
    for key, point in [("tstr_accuracy", (tstr == y).mean()), ("trtr_accuracy", (trtr == y).mean())]:
        lo, hi = by_image[key]
        assert lo < point < hi and hi - lo < 0.2
    skill = ((tstr == y).mean() - 1 / 3) / ((trtr == y).mean() - 1 / 3)
    lo, hi = by_image["tstr_over_trtr_above_chance"]
    assert lo < skill < hi
    # Ten slices per patient, each patient all right or all wrong for TSTR: resampling images
    # would treat 300 correlated slices as independent; the patient bootstrap is much wider.
    groups = np.array([f"p{i // 10}" for i in range(300)])
    right = np.repeat(rng.random(30) < 0.6, 10)
    tstr = np.where(right, y, (y + 1) % 3)
    by_patient = bootstrap_intervals(tstr, trtr, y, groups, 1000, seed=0)
    naive = bootstrap_intervals(tstr, trtr, y, None, 1000, seed=0)
    assert by_patient["unit"] == "patient" and by_patient["n_units"] == 30
    width = lambda r: r["tstr_accuracy"][1] - r["tstr_accuracy"][0]  # noqa: E731
    assert width(by_patient) > 2 * width(naive)
    assert bootstrap_intervals(tstr, trtr, y, np.array(["p0"] * 300), 100, seed=0) is None  # one patient


def test_tstr_is_the_mean_over_classifier_seeds_each_seed_as_if_alone(ct_phantoms) -> None:
    """One classifier seed can move the same samples far (0.26 to 1.00 above chance on the demo):
    the figures are the mean over `classifier_seeds` seeds, and each seed's own figures are the
    ones a run with that seed alone would report."""
    rng = np.random.default_rng(0)
    noisy = quantize(ct_phantoms.train_images + rng.normal(0, 0.6, ct_phantoms.train_images.shape))
    labels = np.where(rng.random(len(noisy)) < 0.3, rng.integers(0, 3, len(noisy)), ct_phantoms.train_labels)
    three = evaluate_arrays(
        noisy, labels, ct_phantoms, EVAL.model_copy(update={"classifier_seeds": 3}), threshold=1.0
    )
    seeds = three["tstr"]["per_seed"]
    assert [s["seed"] for s in seeds] == three["tstr"]["classifier_seeds"] == [0, 1, 2]
    assert three["tstr"]["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in seeds]))
    assert three["trtr"]["accuracy"] == pytest.approx(
        np.mean([s["accuracy"] for s in three["trtr"]["per_seed"]])
    )
    assert len(three["above_chance_per_seed"]) == 3
    alone = evaluate_arrays(
        noisy,
        labels,
        ct_phantoms,
        EVAL.model_copy(update={"classifier": EVAL.classifier.model_copy(update={"seed": 2})}),
        threshold=1.0,
    )
    assert alone["tstr"]["accuracy"] == seeds[2]["accuracy"]
    assert alone["tstr_over_trtr_above_chance"] == pytest.approx(three["above_chance_per_seed"][2])
    assert len({s["accuracy"] for s in seeds}) > 1  # the seeds are really different classifiers


def test_bootstrap_above_chance_stays_defined_when_some_resamples_put_trtr_at_chance() -> None:
    """An imbalanced held-out split (70 % one class, as the ultrasound set) with TRTR a little above
    the majority share: in some resamples TRTR is not above chance, where above chance is
    undefined. Those are counted and left out; the interval is finite and holds the estimate
    (scipy's percentile interval was NaN for the whole run on the first ultrasound row)."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [25, 110, 21])  # 156 images, majority share 0.705
    trtr = np.where(rng.random(156) < 0.78, y, (y + 1) % 3)  # about 0.78 correct
    tstr = np.where(rng.random(156) < 0.2, y, 1)  # mostly the majority class
    ci = bootstrap_intervals(tstr, trtr, y, None, 2000, seed=0)
    lo, hi = ci["tstr_over_trtr_above_chance"]
    assert ci["above_chance_undefined_resamples"] > 0
    assert np.isfinite([lo, hi]).all()
    chance = (y == 1).mean()
    assert lo < ((tstr == y).mean() - chance) / ((trtr == y).mean() - chance) < hi


@pytest.mark.parametrize("rule", ["val_loss", "val_accuracy"])
def test_the_classifier_keeps_the_epoch_its_early_stopping_rule_picks(ct_phantoms, rule) -> None:
    """The weights returned are those of the epoch the rule picked, not the last epoch's: they
    reproduce that epoch's validation figures. Noisy labels make the classifier overfit, so the
    kept epoch is an early one."""
    rng = np.random.default_rng(1)
    x = quantize(ct_phantoms.train_images + rng.normal(0, 0.8, ct_phantoms.train_images.shape))
    y = np.where(rng.random(len(x)) < 0.3, rng.integers(0, 3, len(x)), ct_phantoms.train_labels).astype(
        np.int64
    )
    cfg = ClassifierConfig(epochs=12, patience=12, batch_size=64, early_stopping=rule)
    model, info = train_classifier(uint8_to_model_range(x), y, 3, cfg, val_fraction=0.2)
    curve = info["curve"]
    if rule == "val_loss":
        want = min(curve, key=lambda e: e["val_loss"])
    else:
        want = next(e for e in curve if e["val_accuracy"] == max(c["val_accuracy"] for c in curve))
    assert info["best_epoch"] == want["epoch"] < len(curve) and info["early_stopping"] == rule
    assert info["best_val_loss"] == want["val_loss"] and info["best_val_accuracy"] == want["val_accuracy"]
    _, va = split_validation(y, 0.2, cfg.seed)
    probs = predict(model, uint8_to_model_range(x[va]))[0]
    assert float((probs.argmax(1) == y[va]).mean()) == pytest.approx(want["val_accuracy"])
    assert float((probs.argmax(1) == y[va]).mean()) != pytest.approx(curve[-1]["val_accuracy"])


def test_val_loss_keeps_training_past_the_first_perfect_validation_accuracy() -> None:
    """On synthetic images the validation accuracy hits 1.0 early; `val_loss` moves on to an epoch
    with the same accuracy and a lower loss, `val_accuracy` keeps the first."""
    first = {"epoch": 1, "val_accuracy": 1.0, "val_loss": 0.40}
    later = {"epoch": 2, "val_accuracy": 1.0, "val_loss": 0.05}
    worse = {"epoch": 3, "val_accuracy": 1.0, "val_loss": 0.60}
    assert _improves(later, first, "val_loss") and not _improves(worse, later, "val_loss")
    assert not _improves(later, first, "val_accuracy")
    assert _improves(first, None, "val_loss") and _improves(first, None, "val_accuracy")
    no_validation = {"epoch": 2, "val_accuracy": float("nan"), "val_loss": float("nan")}
    assert _improves(no_validation, first, "val_loss")  # no split: train to the last epoch
