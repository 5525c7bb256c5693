"""The memorization audit: exact search, a threshold calibrated on held-out data, and a gate
that catches every planted copy of a training image while passing clearly different images."""

from __future__ import annotations

import numpy as np
import pytest

from synthfactory.audit import nearest_neighbours, quantize, run_audit
from synthfactory.audit.gate import calibrate, decide, ordinal
from synthfactory.audit.spaces import overlap_crops, search
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


def test_faiss_backend_matches_the_torch_search() -> None:
    pytest.importorskip("faiss", reason="faiss-cpu is in the test extra")
    rng = np.random.default_rng(3)
    refs = rng.uniform(-1, 1, (500, 1, 12, 12)).astype(np.float32)
    queries = np.concatenate([rng.uniform(-1, 1, (40, 1, 12, 12)).astype(np.float32), refs[[3, 444]]])
    ti, td = nearest_neighbours(queries, refs, block_size=16)
    fi, fd = nearest_neighbours(queries, refs, block_size=16, backend="faiss")
    np.testing.assert_array_equal(ti, fi)
    np.testing.assert_allclose(td, fd, rtol=1e-12)
    assert (fd[-2:] == 0).all()


def test_exact_copy_is_zero_even_among_large_norms() -> None:
    rng = np.random.default_rng(1)
    refs = np.clip(rng.normal(0.9, 0.05, (200, 4096)), -1, 1).astype(np.float32)  # bright, near-identical
    idx, dist = nearest_neighbours(refs[[5, 77]], refs, block_size=64)
    assert idx.tolist() == [5, 77] and dist.tolist() == [0.0, 0.0]


def test_joint_calibration_bounds_the_union_false_alarm_rate() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.integers(0, 2, n)
    bg = {"d": rng.normal(10, 1, n), "s": rng.uniform(0, 1, n), "t": rng.uniform(0, 1, n)}
    higher = {"d": False, "s": True, "t": True}
    cal = calibrate(bg, higher, labels, 2.0, min_per_class=500)
    assert 2.0 / 3 <= cal.level <= 2.0
    assert cal.false_alarm_in_sample <= 2.0 and cal.false_alarm_in_sample > 1.0  # not just Bonferroni
    flags = cal.flags(bg, labels)
    union = np.zeros(n, bool)
    for f in flags.values():
        union |= f
    assert 100 * union.mean() == pytest.approx(cal.false_alarm_in_sample)
    # per-class thresholds where classes are large enough, a global one otherwise
    assert set(cal.thresholds["d"].per_class) == {0, 1}
    assert calibrate(bg, higher, labels, 2.0, min_per_class=5000).thresholds["d"].per_class == {}
    # direction: a distance below, a similarity above the threshold is "close"
    t = cal.thresholds["s"]
    assert t.close(np.array([1.0, 0.0]), np.array([0, 0])).tolist() == [True, False]
    assert cal.thresholds["d"].close(np.array([0.0, 99.0]), np.array([1, 1])).tolist() == [True, False]


def test_decision_and_ordinal() -> None:
    flagged = np.array([True, False])
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


def test_spaces_see_through_shift_flip_and_contrast() -> None:
    rng = np.random.default_rng(2)
    train = phantom_images("ct", 1, 40, 24, seed=4)  # [N, H, W] in [-1, 1]
    x = train[17]
    shifted = np.full_like(x, x.min())
    shifted[3:, :-2] = x[:-3, 2:]  # 3 px down, 2 px left
    flipped = x[:, ::-1]
    gamma = ((x + 1) / 2) ** 1.5 * 2 - 1
    scaled = 0.8 * x
    q = np.stack([shifted, flipped, gamma, scaled])
    i, s = search("shift_flip_ncc", q, train, 1024, 4)
    assert i[:2].tolist() == [17, 17] and np.allclose(s[:2], 1.0, atol=1e-5)
    i, s = search("ncc", q, train)
    assert i[3] == 17 and s[3] == pytest.approx(1.0, abs=1e-5)
    i, s = search("rank_thumbnail", q, train)
    assert i[1:].tolist() == [17, 17, 17] and np.allclose(s[1:], 1.0, atol=1e-4)
    # brute force for the shift/flip space on random data
    rq, rr = rng.normal(size=(5, 10, 10)), rng.normal(size=(7, 10, 10))
    idx, val = search("shift_flip_ncc", rq, rr, 2, 2)
    best = np.full(5, -2.0)
    for a in range(5):
        for base in (rq[a], rq[a][:, ::-1]):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    qc, rc = overlap_crops(10, 10, dy, dx)
                    for b in range(7):
                        c = np.corrcoef(base[qc].ravel(), rr[b][rc].ravel())[0, 1]
                        best[a] = max(best[a], c)
    np.testing.assert_allclose(val, best, atol=1e-5)


def test_lowpass_and_warp_spaces_see_through_blur_noise_rotation_zoom_and_far_shifts() -> None:
    import torch
    from scipy import ndimage

    from synthfactory.audit.planted import _shifted, _zoomed
    from synthfactory.audit.spaces import WARPS, warped

    rng = np.random.default_rng(3)
    train = phantom_images("ct", 1, 40, 32, seed=4)  # [N, H, W] in [-1, 1]
    x = train[17]
    blurred = ndimage.gaussian_filter(x, 0.8, mode="nearest")
    noised = np.clip(x + rng.normal(0, 0.05, x.shape), -1, 1)
    q = np.stack([blurred, noised]).astype(np.float32)
    i, s = search("lowpass_l2", q, train)
    _, raw = search("pixel_l2", q, train)
    assert i.tolist() == [17, 17] and (s < raw / 2).all()  # the low-pass halves the distance at least
    rotated = ndimage.rotate(x, 8.0, reshape=False, order=1, mode="nearest")
    zoomed = _zoomed(x, 1.08)
    far = _shifted(x, 7, -6, None)
    q = np.stack([rotated, zoomed, far, x[:, ::-1]]).astype(np.float32)
    i, s = search("warp_ncc", q, train, warp_shift=8)
    _, near = search("shift_flip_ncc", q, train, shift=4)
    assert i.tolist() == [17] * 4 and (s > 0.97).all() and (s[:3] > near[:3]).all()
    assert s[3] == pytest.approx(1.0, abs=1e-5)
    # the shortlist path: every warp scored on the same candidates; with all references as
    # candidates it is the exact search
    j, t = search("warp_ncc", q, train, candidates=len(train) - 1, warp_shift=8)
    assert j.tolist() == [17] * 4 and np.allclose(t, s, atol=1e-5)
    # warp_ncc is the best of shift_flip_ncc over the warps of the query: ±8 px unwarped, ±4 px
    # (audit.shift) rotated or zoomed
    want = np.max([search("shift_flip_ncc", warped(torch.from_numpy(q), a, z).numpy(), train,
                          shift=8 if (a, z) == (0.0, 1.0) else 4)[1]
                   for a, z in WARPS], axis=0)  # fmt: skip
    np.testing.assert_allclose(s, want, atol=1e-6)


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
    assert res.calibration.thresholds["pixel_l2"].value > 0.5  # held-out phantoms, far from 0
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


def test_heldout_images_of_training_patients_leave_the_calibration(run_copy, tmp_path) -> None:
    import dataclasses

    checked, run_dir = run_copy
    plant(run_copy)
    n_held = len(checked.images.heldout_labels)
    same = np.arange(n_held) < (n_held - 20) // 2  # the first ones share a training patient
    manifest = []
    for m in checked.images.manifest:
        patient = "train0" if m["split"] == "heldout" and same[m["index"]] else f"{m['split']}{m['index']}"
        manifest.append({**m, "group": patient})
    images = dataclasses.replace(checked.images, manifest=manifest)
    assert images.heldout_of_training_patients().tolist() == same.tolist()
    run_audit(checked.recipe, run_dir, images, tmp_path / "pa")
    cal = read_json(run_dir.audit_json)["calibration"]
    assert cal["heldout_of_training_patients"] == same.sum() > 0
    assert cal["n_heldout_used"] == min(n_held - same.sum(), checked.recipe.audit.threshold.max_heldout)
    mia = read_json(run_dir.audit_json)["membership_inference"]
    assert mia["n_nonmembers"] <= n_held - same.sum()
    md = next((tmp_path / "pa").rglob("audit-summary.md")).read_text()
    assert f"{same.sum()} held-out images of training patients left out" in md
    # every held-out image of a training patient: too few others to calibrate on, so all are used
    # and the report says so (the run does not fail after training)
    manifest = [{**m, "group": "train0"} for m in checked.images.manifest]
    run_audit(
        checked.recipe, run_dir, dataclasses.replace(checked.images, manifest=manifest), tmp_path / "pc"
    )
    cal = read_json(run_dir.audit_json)["calibration"]
    assert cal["heldout_of_training_patients"] == n_held and cal["patients_left_out"] is False
    assert cal["n_heldout_used"] == min(n_held, checked.recipe.audit.threshold.max_heldout)
    assert "too few" in cal["patient_rule"]
    # without patient ids, nothing is left out and the report says there were none
    run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pb")
    cal = read_json(run_dir.audit_json)["calibration"]
    assert cal["heldout_of_training_patients"] is None and "no patient ids" in cal["patient_rule"]


def test_audit_reports_layout_and_internal_marking(run_copy, tmp_path) -> None:
    checked, run_dir = run_copy
    plant(run_copy)
    res = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    assert res.report_dir == tmp_path / "pa" / "tiny" / run_dir.run_id
    audit = read_json(run_dir.audit_json)  # the run directory's: every figure
    public = read_json(res.report_dir / "audit.json")  # the report folder's: no per-sample figure
    assert "samples" not in public and "manifest_sha256" not in public["data"]
    assert public["spaces"].keys() == audit["spaces"].keys() and public["decision"] == audit["decision"]
    assert public["summary"] == {k: v for k, v in audit["summary"].items() if k != "nn_distance_min"}
    assert audit["schema"] == "synthfactory.audit/v2"
    for key in ("recipe_sha256", "samples_sha256", "calibration", "spaces", "decision", "samples", "limits",
                "neighbour_ratios", "data_copying", "membership_inference", "per_class"):  # fmt: skip
        assert key in audit
    assert set(audit["spaces"]) == {
        "pixel_l2",
        "ncc",
        "shift_flip_ncc",
        "rank_thumbnail",
        "lowpass_l2",
        "warp_ncc",
        "aligned_ncc",
    }
    assert audit["data"]["manifest_sha256"] == checked.images.manifest_sha256()
    priv = audit["privacy"]
    assert priv["epsilon"] <= priv["target_epsilon"] and {
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps_taken",
    } <= set(priv)
    s0 = audit["samples"][0]
    assert s0["flagged_by"] == [
        "pixel_l2", "ncc", "shift_flip_ncc", "rank_thumbnail", "lowpass_l2", "warp_ncc", "aligned_ncc", "exact_copy"
    ]  # fmt: skip
    assert set(s0["scores"]) == set(audit["spaces"])
    assert "sha256" not in str(audit["samples"])  # training images are named by index only
    mia = audit["membership_inference"]
    assert 0.0 <= mia["auc"] <= 1.0 and mia["n_members"] == mia["n_nonmembers"] > 0
    # public summary: statistics only
    md = (res.report_dir / "audit-summary.md").read_text()
    assert "holds no image" in md and "data:image" not in md and "train " not in md
    for section in ("Similarity spaces", "Per class", "Data-copying test", "Membership inference"):
        assert f"## {section}" in md
    assert (res.report_dir / "distances.png").stat().st_size > 1000
    assert (res.report_dir / "membership_roc.png").stat().st_size > 1000
    page = (res.report_dir / "internal" / "audit.html").read_text()
    assert "INTERNAL" in page and page.count("data:image/png;base64,") >= 2 + len(audit["spaces"])
    assert "INTERNAL" in (res.report_dir / "internal" / "README.md").read_text()
    # The ε ledger: one row per mechanism of the generator's ledger, with its (σ, q, steps).
    assert (
        'id="dp-accounting"' in page
        and "dp sgd" in page
        and f"{audit['privacy']['steps_taken']} steps" in page
    )
    assert 'class="decision ' in page and f">{audit['decision']}<" in page
    # The public page beside the Markdown: the public figures only, no real image, no pair, no index.
    public = (res.report_dir / "audit-summary.html").read_text()
    assert [p.name for p in res.report_dir.iterdir() if p.suffix == ".html"] == ["audit-summary.html"]
    assert public.count("data:image/png;base64,") == 2  # distances.png and membership_roc.png
    assert "INTERNAL" not in public and 'id="closest-pairs"' not in public
    assert "nearest training image (pixel L2)" not in public and "in the internal report only" in public
    assert 'id="dp-accounting"' in public and "dp sgd" in public


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
        release(run_dir, ["hf", "png"])
    assert not run_dir.release_dir(True).exists()


def _chromium() -> str | None:
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_internal_html_report_renders_in_headless_chromium(run_copy, tmp_path) -> None:
    import subprocess

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); .ci/run installs it")
    checked, run_dir = run_copy
    plant(run_copy)
    res = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    page = res.report_dir / "internal" / "audit.html"
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for section in ("internal-banner", "decision", "dp-accounting", "calibration", "spaces", "closest-pairs",
                    "per-class", "flagged", "data-copying", "membership-inference", "canary", "limits"):  # fmt: skip
        assert f'id="{section}"' in out, section
    assert "INTERNAL: SHOWS REAL TRAINING IMAGES" in out
    assert out.count("<img") >= 2 + len(res.audit["spaces"])


def test_suspected_copies_say_none_when_nothing_was_flagged(run_copy, tmp_path) -> None:
    """An empty table header read as a rendering fault; with no flagged sample both pages say so."""
    from synthfactory.audit.report import audit_html

    checked, run_dir = run_copy
    res = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa")
    audit = read_json(run_dir.audit_json)
    assert audit["summary"]["n_flagged"] == 0
    figures = {"distances": b"png", "membership_roc": b"png"}
    for internal in (True, False):
        page = audit_html(audit, figures, {}, internal=internal)
        flagged = page.split('id="flagged"')[1].split("</section>")[0]
        assert "None: no sample crossed" in flagged and "<table" not in flagged
    assert "None: no sample crossed" in (res.report_dir / "audit-summary.html").read_text()


def test_coverage_statement_names_the_spaces_an_audit_leaves_out() -> None:
    from synthfactory.audit import coverage
    from synthfactory.audit.run import CT_RECIPE_SPACES
    from synthfactory.recipe import AuditConfig

    full = coverage(AuditConfig().spaces, 4, 8)
    assert "rotated (±10°)" in full and "±8 px" in full and "99 % to 100 %" in full
    assert "leaves out" not in full
    # The copies made with other libraries, the kinds below target, and MRI's shortfall are
    # said, not hidden.
    assert (
        "Pillow, scikit-image" in full
        and "aligned_ncc" in full
        and "MRI slices without patient ids 22 %" in full
    )
    assert "65-80 %" in full
    # The CT recipe's five spaces are the ones its figures were measured with.
    assert coverage(list(CT_RECIPE_SPACES), 4, 8) == full
    part = coverage(["pixel_l2", "ncc"], 4, 8)
    assert part.startswith(full)
    assert "leaves out shift_flip_ncc, rank_thumbnail, lowpass_l2, warp_ncc, aligned_ncc:" in part
