"""The memorization audit: exact search, a threshold calibrated on held-out data, and a gate
that catches every planted copy of a training image while passing clearly different images."""

from __future__ import annotations

import numpy as np
import pytest

from synthfactory.audit import nearest_neighbours, quantize, run_audit
from synthfactory.audit.gate import calibrate, decide, ordinal, suspected_copies
from synthfactory.data.phantom import phantom_images
from synthfactory.rundir import read_json
from synthfactory.sample import Samples


def brute_force(q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(
        ((q[:, None].astype(np.float64) - r[None].astype(np.float64)) ** 2)
        .reshape(len(q), len(r), -1)
        .sum(-1)
    )
    return d.argmin(1), d.min(1)


def test_blocked_search_matches_brute_force_and_finds_exact_copies() -> None:
    rng = np.random.default_rng(0)
    refs = rng.uniform(-1, 1, (300, 1, 8, 8)).astype(np.float32)
    queries = np.concatenate([rng.uniform(-1, 1, (50, 1, 8, 8)).astype(np.float32), refs[[7, 123, 299]]])
    idx, dist = nearest_neighbours(queries, refs, block_size=16)
    bidx, bdist = brute_force(queries, refs)
    np.testing.assert_array_equal(idx, bidx)
    np.testing.assert_allclose(dist, bdist, rtol=1e-9, atol=1e-9)
    assert idx[-3:].tolist() == [7, 123, 299] and (dist[-3:] == 0).all()


def test_exact_copy_is_zero_even_among_large_norms() -> None:
    rng = np.random.default_rng(1)
    refs = np.clip(rng.normal(0.9, 0.05, (200, 4096)), -1, 1).astype(np.float32)  # bright, near-identical
    idx, dist = nearest_neighbours(refs[[5, 77]], refs, block_size=64)
    assert idx.tolist() == [5, 77] and dist.tolist() == [0.0, 0.0]


def test_threshold_and_decision() -> None:
    t = calibrate(np.array([5.0, 1.0, 3.0, 2.0, 4.0] * 20), 1.0)
    assert t.value == 1.0 and t.n_heldout == 100 and t.heldout_exact_copies == 0
    flagged = suspected_copies(np.array([0.0, 1.0, 1.01, 7.0]), t)
    assert flagged.tolist() == [True, True, False, False]
    assert decide(flagged, "drop") == "release" and decide(flagged, "block") == "block"
    assert decide(np.zeros(3, bool), "block") == "release"
    assert [ordinal(p) for p in (1, 2, 3, 4, 11, 21, 2.5)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "21st",
        "2.5th",
    ]


def test_leaky_split_gives_threshold_zero_and_exact_copies_are_still_caught() -> None:
    t = calibrate(np.array([0.0, 0.0, 3.0, 4.0]), 1.0)
    assert t.value == 0.0 and t.heldout_exact_copies == 2
    assert suspected_copies(np.array([0.0, 0.5]), t).tolist() == [True, False]


def plant(run_copy, n_copies: int = 6):
    """Replace the run's samples: exact copies of training images, near copies (±1 grey level),
    and clearly different images (ultrasound fans against MRI training data)."""
    checked, run_dir = run_copy
    train_u8 = quantize(checked.images.train_images)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train_u8), n_copies, replace=False)
    exact = train_u8[picks]
    near = np.clip(train_u8[picks].astype(int) + rng.choice([-1, 1], exact.shape), 0, 255).astype(np.uint8)
    different = quantize(phantom_images("us", 0, n_copies, 16, seed=9)[:, None])
    images = np.concatenate([exact, different, near])
    labels = np.concatenate(
        [checked.images.train_labels[picks], np.zeros(n_copies, np.int64), checked.images.train_labels[picks]]
    )
    Samples(images=images, labels=labels, seeds=np.arange(len(images), dtype=np.int64)).save(run_dir.samples)
    return picks


def test_gate_catches_every_planted_copy_and_no_different_image(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    picks = plant(run_copy)
    res = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    assert res.threshold.value > 0.5  # calibrated on held-out phantoms, far from 0
    assert (
        res.flagged[:6].all()
        and res.nn_index[:6].tolist() == picks.tolist()
        and (res.nn_distance[:6] == 0).all()
    )
    assert res.flagged[12:].all() and res.nn_index[12:].tolist() == picks.tolist()
    assert not res.flagged[6:12].any()
    assert res.decision == "release"
    audit = read_json(run_dir.audit_json)
    assert audit["summary"] == {
        **audit["summary"],
        "n_samples": 18,
        "n_flagged": 12,
        "n_dropped": 12,
        "n_released": 6,
    }


def test_audit_reports_layout_and_internal_marking(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    plant(run_copy)
    res = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    assert res.report_dir == tmp_path / "pa" / "tiny" / run_dir.run_id
    audit = read_json(res.report_dir / "audit.json")
    assert audit == read_json(run_dir.audit_json)
    assert audit["schema"] == "synthfactory.audit/v1"
    for key in ("recipe_sha256", "samples_sha256", "threshold", "decision", "samples", "limits"):
        assert key in audit
    assert audit["data"]["manifest_sha256"] == checked.images.manifest_sha256()
    priv = audit["privacy"]
    assert priv["epsilon"] <= priv["target_epsilon"] and {
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps_taken",
    } <= set(priv)
    s0 = audit["samples"][0]
    assert set(s0) == {"index", "label", "seed", "nearest_train_index", "nn_distance", "flagged"}
    assert "sha256" not in str(audit["samples"])  # training images are named by index only
    md = (res.report_dir / "audit.md").read_text()
    assert "INTERNAL" in md.split("\n\n")[1] and "shows real training images" in md
    assert (res.report_dir / "distances.png").stat().st_size > 1000
    assert (res.report_dir / "internal" / "closest_pairs.png").stat().st_size > 1000
    assert "INTERNAL" in (res.report_dir / "internal" / "README.md").read_text()


def test_block_action_stops_the_release(run_copy, tmp_path) -> None:
    from synthfactory.export import ReleaseRefused, release

    checked, run_dir = run_copy
    plant(run_copy)
    recipe = checked.recipe.model_copy(
        update={"audit": checked.recipe.audit.model_copy(update={"action": "block"})}
    )
    res = run_audit(recipe, run_dir, checked.images, tmp_path / "pa")
    assert res.decision == "block"
    assert read_json(run_dir.audit_json)["summary"]["n_released"] == 0
    with pytest.raises(ReleaseRefused, match="blocked"):
        release(run_dir, ["hf", "png"], private=True)
    assert not run_dir.release_dir(True).exists()
