"""The release gate on real data (../shared/data): copies of training images of every kind the
audit claims (planted.COVERED: exact, shifted by 1-4 px, flipped, intensity-scaled, gamma-corrected,
noised, all of these at once, blurred, JPEG-compressed) are all caught, rotated, zoomed and
further-shifted copies nearly all (the bounds are in each test), while held-out real images
presented as samples are dropped at about the calibrated false-alarm rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthfactory.audit import gate, quantize
from synthfactory.audit.planted import COVERED, GEOMETRIC, KINDS, disguise, planted_copies
from synthfactory.audit.run import CT_RECIPE_SPACES
from synthfactory.data.common import pad_square_resize, uint_to_unit_range
from synthfactory.recipe import AuditConfig, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def at_size(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 images resized as a recipe's data.image_size does, back on the 8-bit grid."""
    return quantize(pad_square_resize(list(uint_to_unit_range(x)), size))


# The geometric edits that warp_ncc claims (rotation ±5-10°, zoom 0.9-1.1, shift 6-8 px); crops
# re-zoomed by more than 10 % and blends are not claimed.
WARPED = ("rotate", "zoom", "shift_far")


def run_gate(train, train_y, heldout, heldout_y, per_kind: int, cfg: AuditConfig | None = None):
    rng = np.random.default_rng(0)
    order = rng.permutation(len(heldout))
    cal, shown = order[: len(order) // 2], order[len(order) // 2 :]
    copies, picks, kinds = planted_copies(train, per_kind, seed=1, kinds=KINDS + WARPED)
    synth = np.concatenate([copies, heldout[shown]])
    synth_y = np.concatenate([train_y[picks], heldout_y[shown]])
    g = gate(cfg or AuditConfig(), train, heldout[cal], heldout_y[cal], synth, synth_y)
    caught = g.flagged[: len(copies)]
    missed = {k: int((~caught[kinds == k]).sum()) for k in KINDS + WARPED}
    false_alarm = float(g.flagged[len(copies) :].mean())
    return missed, false_alarm, g


def test_gate_on_ct_catches_every_disguised_copy_at_2pct_false_alarms(shared_data) -> None:
    with np.load(shared_data / "ct_organamnist" / "organamnist_28_full.npz") as z:
        train, train_y = z["train_images"][:2500], z["train_labels"].ravel()[:2500]
        heldout, heldout_y = z["test_images"][:1200], z["test_labels"].ravel()[:1200]
    # as the CT recipe runs it: its spaces, warp_ncc on a half-resolution shortlist
    cfg = load_recipe(RECIPES / "ct_organamnist.yaml").audit
    assert cfg.spaces == ["pixel_l2", "lowpass_l2", "warp_ncc", "copy_embedding", "aligned_ncc"]
    assert tuple(cfg.spaces) == CT_RECIPE_SPACES  # the spaces the report's coverage text names
    assert cfg.shift_candidates == 64
    missed, false_alarm, g = run_gate(train, train_y, heldout, heldout_y, per_kind=20, cfg=cfg)
    assert {k: missed[k] for k in KINDS} == dict.fromkeys(KINDS, 0), missed
    # this subset: 60 of 60 (56 before aligned_ncc, all six default spaces then 52)
    assert sum(missed[k] for k in WARPED) <= 2, missed
    assert false_alarm <= 0.02, false_alarm
    assert g.calibration.false_alarm_in_sample <= 1.0


def test_gate_on_fetal_ultrasound_catches_every_disguised_copy(shared_data) -> None:
    with np.load(shared_data / "us_fetal_head_trimester" / "hc18_trimester_64.npz") as z:
        train, train_y = at_size(z["train_images"], 32), z["train_labels"].ravel()
        heldout, heldout_y = at_size(z["test_images"], 32), z["test_labels"].ravel()
    missed, false_alarm, g = run_gate(train, train_y, heldout, heldout_y, per_kind=15)
    assert {k: missed[k] for k in KINDS} == dict.fromkeys(KINDS, 0), missed
    assert sum(missed[k] for k in WARPED) <= 2, missed  # >= 95 % of 45
    # 156 held-out images: 78 calibrate, 78 are shown. Each space's threshold is then about the
    # single most extreme of 78 scores, so the expected false-alarm rate over six spaces is a few
    # percent, above the 1 % target; the audit report warns when that is the case.
    assert false_alarm <= 0.06, false_alarm


@pytest.mark.parametrize("kind", COVERED + GEOMETRIC)
def test_disguises_do_what_they_say(kind: str) -> None:
    rng = np.random.default_rng(0)
    img = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8  # a ramp: edits show
    other = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    y = disguise(img, kind, 1, rng, other)
    x = img / 127.5 - 1
    assert y.shape == x.shape
    if kind == "exact":
        assert np.array_equal(y, x)
    elif kind == "flip":
        assert np.array_equal(y, x[:, ::-1])
    elif kind == "shift":
        assert np.array_equal(y[2:], x[:-2]) and (y[:2] == x.min()).all()  # i = 1: 2 px down
    elif kind == "shift_far":  # i = 1: 7 px down, the top rows filled with the edge row
        assert np.array_equal(y[7:], x[:-7]) and np.array_equal(y[:7], np.repeat(x[:1], 7, 0))
    elif kind == "blend":
        assert np.allclose(y, 0.8 * x + 0.2 * (other / 127.5 - 1))
    elif kind == "zoom":  # i = 1: shrunk to 0.9 about the centre, so the ramp is 1/0.9 as steep
        assert np.allclose(np.diff(y[4:12, 8]), np.diff(x[4:12, 8]) / 0.9, atol=1e-6)
    elif kind == "rotate":  # i = 1: -5°, the ramp turns but keeps its centre value
        assert 0 < np.abs(y - x).mean() < 0.2 and abs(y[7:9, 7:9].mean() - x[7:9, 7:9].mean()) < 0.02
    elif kind == "combined":  # flipped among the rest: far from the image, close to its flip
        assert np.abs(y - x[:, ::-1]).mean() < np.abs(y - x).mean()
    elif kind == "gamma":  # i = 1: gamma 0.7 on [0, 1]
        assert np.allclose(y, ((x + 1) / 2) ** 0.7 * 2 - 1)
    else:
        assert 0 < np.abs(y - x).mean() < 0.2


def test_ct_recipe_gate_catches_copies_made_by_other_libraries(shared_data) -> None:
    """Copies made only with Pillow and scikit-image (`audit/disguises.py`: rotations up to 15°,
    zooms 0.85-1.2, crops of 80-85 % resized back, elastic warps, compositions of several edits;
    none of them the gate's own warps), 8 of each of the 16 kinds, against the CT recipe's
    spaces as it runs them: nearly all caught, at most 2 % of unseen held-out images flagged."""
    from synthfactory.audit.disguises import KINDS as OTHER_KINDS
    from synthfactory.audit.disguises import disguised_copies

    with np.load(shared_data / "ct_organamnist" / "organamnist_28_full.npz") as z:
        train, train_y = z["train_images"][:2500], z["train_labels"].ravel()[:2500]
        heldout, heldout_y = z["test_images"][:1200], z["test_labels"].ravel()[:1200]
    cfg = load_recipe(RECIPES / "ct_organamnist.yaml").audit
    order = np.random.default_rng(0).permutation(len(heldout))
    cal, shown = order[:600], order[600:]
    copies, picks, kinds = disguised_copies(train, 8, seed=1)
    synth = np.concatenate([copies, heldout[shown]])
    synth_y = np.concatenate([train_y[picks], heldout_y[shown]])
    g = gate(cfg, train, heldout[cal], heldout_y[cal], synth, synth_y)
    caught = g.flagged[: len(copies)]
    per_kind = {k: int(caught[np.asarray(kinds) == k].sum()) for k in OTHER_KINDS}
    assert caught.mean() >= 0.9 and min(per_kind.values()) >= 4, per_kind
    assert g.flagged[len(copies) :].mean() <= 0.02
