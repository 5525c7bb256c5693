"""The canary audit: the one-run ε lower bound (Steinke, Nasr & Jagielski 2023) and its stage."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from synthfactory.audit import run_audit
from synthfactory.audit.canary import (
    audit_scores,
    draw_inclusion,
    epsilon_lower_bound,
    make_canaries,
    p_value,
)
from synthfactory.run import StageOptions, run_stage
from synthfactory.rundir import read_json


def test_bound_matches_the_closed_form_when_every_guess_is_right() -> None:
    # δ = 0, v = r: P[Bin(r, q) ≥ r] = q^r = α  ⇒  ε = logit(α^(1/r)).
    for r, alpha in ((10, 0.05), (200, 0.01), (1000, 0.05)):
        expected = float(scipy.special.logit(alpha ** (1 / r)))
        assert epsilon_lower_bound(r, r, r, 0.0, alpha) == pytest.approx(expected, abs=1e-5)
    assert epsilon_lower_bound(100, 100, 50, 0.0, 0.05) == 0.0  # chance-level guessing rejects nothing


def test_delta_only_weakens_the_bound() -> None:
    assert p_value(1000, 500, 400, 1.0, 1e-5) >= p_value(1000, 500, 400, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 500, 400, 1e-5, 0.05) <= epsilon_lower_bound(1000, 500, 400, 0.0, 0.05)
    assert epsilon_lower_bound(1000, 500, 400, 1e-2, 0.05) < epsilon_lower_bound(1000, 500, 400, 1e-5, 0.05)


def _randomized_response(included: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """An exactly ε-DP score per canary: its bit, kept with probability e^ε/(1+e^ε)."""
    keep = rng.random(len(included)) < scipy.special.expit(eps)
    return np.where(keep, included, ~included).astype(float) + 1e-6 * rng.random(len(included))


def test_bound_holds_for_an_eps_dp_mechanism_and_detects_a_leakier_one() -> None:
    rng = np.random.default_rng(0)
    m, trials = 400, 60
    over, bounds = 0, []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        res = audit_scores(_randomized_response(included, 1.0, rng), included, delta=0.0, confidence=0.95)
        over += res["epsilon_lower_bound"] > 1.0
        bounds.append(
            audit_scores(_randomized_response(included, 3.0, rng), included, 0.0)["epsilon_lower_bound"]
        )
    assert over <= 0.05 * trials + 2  # valid: a 1-DP mechanism is rejected at most ~5 % of the time
    assert np.median(bounds) > 1.8  # powerful: a 3-DP mechanism is caught well above 1
    assert max(bounds) <= 3.0 + 0.5


def test_canaries_are_generated_deterministic_and_distinct() -> None:
    a = make_canaries(200, 28, seed=3)
    np.testing.assert_array_equal(a, make_canaries(200, 28, seed=3))
    assert a.shape == (200, 1, 28, 28) and a.dtype == np.float32
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert len({x.tobytes() for x in a}) == 200
    inc = draw_inclusion(2000, 0)
    assert 900 < inc.sum() < 1100 and (inc == draw_inclusion(2000, 0)).all()


def test_canary_stage_trains_a_second_model_and_reports_the_bound(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    audit = checked.recipe.audit.model_copy(
        update={
            "canary": checked.recipe.audit.canary.model_copy(update={"enabled": True, "m": 40}),
            "membership": checked.recipe.audit.membership.model_copy(update={"nonprivate_reference": True}),
        }
    )
    from dataclasses import replace

    checked = replace(checked, recipe=checked.recipe.model_copy(update={"audit": audit}))
    run_stage("audit_models", checked, run_dir, StageOptions(progress=False))
    canary = read_json(run_dir.canary_json)
    sub = read_json(run_dir.canary_run.privacy)
    inc = np.array(canary["included"], bool)
    assert len(inc) == 40 and sub["n_train"] == len(checked.images.train_labels) + inc.sum()
    assert sub["private"] and sub["epsilon"] <= checked.recipe.privacy.target_epsilon
    assert canary["accountant_epsilon"] == sub["epsilon"]
    # The bound is the paper's test on this model's own scores, at the canary run's δ.
    again = audit_scores(
        np.array(canary["scores"]), inc, sub["delta"], checked.recipe.audit.canary.confidence
    )
    assert canary["delta"] == sub["delta"] == checked.recipe.privacy.delta
    assert canary["epsilon_lower_bound"] == again["epsilon_lower_bound"]
    assert canary["n_included"] == int(inc.sum()) and canary["m"] == 40
    assert not list(run_dir.root.rglob("train_state.pt"))  # both audit models' DP secrets are gone
    nonpriv = read_json(run_dir.nonprivate_run.privacy)
    assert nonpriv["private"] is False and nonpriv["steps_taken"] == sub["steps_taken"]

    res = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    ca = res.audit["canary_audit"]
    assert ca["m"] == 40 and "included" not in ca and "scores" not in ca
    ref = res.audit["membership_inference"]["nonprivate_reference"]
    assert 0.0 <= ref["auc"] <= 1.0 and "NOT PRIVATE" in ref["model"]
    assert res.audit["membership_inference"]["auc"] != ref["auc"]  # two different models were attacked
    md = (res.report_dir / "audit-summary.md").read_text()
    assert "## Canary audit" in md and f"{ca['epsilon_lower_bound']:.3f}" in md
    assert "non-private" in md and f"{ref['auc']:.3f}" in md
    assert "and so do the δ" in ca["privacy_of_this_result"]
    from synthfactory.publish import dataset_card

    run_dir.mark_done("audit", decision=res.decision, report=str(res.report_dir))
    card = dataset_card(run_dir, {"lesion": 1})
    both_eps, both_delta = sub["epsilon"] + read_json(run_dir.privacy)["epsilon"], 2 * sub["delta"]
    assert f"(ε = {both_eps:.3f}, δ = {both_delta:g}) by basic composition" in card
    page = (res.report_dir / "internal" / "audit.html").read_text()
    assert (
        "Empirical ε lower bound" in page
        and "Not run" not in page.split('id="canary"')[1].split("</section>")[0]
    )


def test_canary_audit_detects_training_without_dp(recipe_file, tmp_path) -> None:
    """Power: the same audit on a non-private run finds its canaries (measured: ε ≥ 1.44, AUC
    0.84 at 300 steps), so a bound of 0 on a DP run means something."""
    from synthfactory.metrics import auc_one_vs_rest
    from synthfactory.run import check, create_run

    path = recipe_file(
        privacy={"enabled": False, "i_understand_this_is_not_private": True},
        training__steps=300,
        training__expected_batch_size=32,
        training__learning_rate=2e-3,
        training__checkpoint_every=1000,
        data__phantom__n_train=128,
        audit__canary={"enabled": True, "m": 100},
    )
    checked = check(path)
    run_dir = create_run(checked, tmp_path / "runs")
    run_stage("train", checked, run_dir, StageOptions(progress=False))
    run_stage("audit_models", checked, run_dir, StageOptions(progress=False))
    canary = read_json(run_dir.canary_json)
    scores, inc = np.array(canary["scores"]), np.array(canary["included"], bool)
    assert auc_one_vs_rest(scores, inc) > 0.7
    assert canary["epsilon_lower_bound"] > 0.5 and canary["accountant_epsilon"] is None
    assert canary["delta"] == 0.0 and "NOT PRIVATE" in canary["privacy_of_this_result"]
