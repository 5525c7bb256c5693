"""How well does the release gate catch disguised copies on the real sets, and how many genuine
held-out images does it flag? One line per set.

    python benchmarks/audit_planted_copies.py [--data ../shared/data] [--per-kind 20]
        [--sets ct,us,mri] [--shift-candidates N] [--spaces pixel_l2,ncc,...]

Per set: training images as the private set; held-out images split in two, one half calibrates
the gate (recipe defaults: 1 % false alarms over all six spaces), the other half is presented as
samples together with `per-kind` disguised copies of training images of each kind: the kinds the
audit claims (`planted.COVERED`) and geometric edits beyond them (`planted.GEOMETRIC`). False
alarms are counted on the presented half only, which did not calibrate the gate; and, because
one halving of a small held-out set gives a coarse rate, also averaged over 200 random halvings
of the same held-out scores (each half calibrates `audit.calibrate` as the gate does, the other
half is counted).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from synthfactory.audit import gate, quantize
from synthfactory.audit.gate import calibrate
from synthfactory.audit.planted import COVERED, GEOMETRIC, planted_copies
from synthfactory.audit.spaces import SPACES
from synthfactory.data.common import pad_square_resize, uint_to_unit_range
from synthfactory.recipe import AuditConfig

SETS = {
    "ct": ("ct_organamnist 28px", "ct_organamnist/organamnist_28_full.npz", False),
    "us": ("us_fetal_head 32px", "us_fetal_head_trimester/hc18_trimester_64.npz", True),
    "mri": ("mri_brain_tumor groupsplit 32px", "mri_brain_tumor/brain_tumor_mri_64_groupsplit.npz", True),
}


def tally(caught: np.ndarray, kinds: np.ndarray, group: tuple[str, ...]) -> str:
    """'caught/planted (kind caught/planted, ...)' over the kinds of `group`."""
    inside = np.isin(kinds, group)
    each = ", ".join(f"{k} {int(caught[kinds == k].sum())}/{int((kinds == k).sum())}" for k in group)
    return f"{int(caught[inside].sum())}/{int(inside.sum())} ({each})"


def resampled_false_alarms(
    g, cal_y: np.ndarray, shown_y: np.ndarray, n_copies: int, cfg: AuditConfig, repeats: int = 200
) -> tuple[float, float, float]:
    """False-alarm rate of the gate over random halvings of the held-out images (the calibration
    half's background scores and the shown half's scores pooled): (mean, 5th, 95th percentile)."""
    scores = {n: np.concatenate([g.background[n], g.synth[n][1][n_copies:]]) for n in g.background}
    labels = np.concatenate([cal_y[g.background_mask], shown_y])
    higher = {n: SPACES[n].higher_is_closer for n in scores}
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(repeats):
        order = rng.permutation(len(labels))
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        cal = calibrate({n: v[a] for n, v in scores.items()}, higher, labels[a],
                        cfg.threshold.percentile, cfg.threshold.min_per_class)  # fmt: skip
        flags = cal.flags({n: v[b] for n, v in scores.items()}, labels[b])
        rates.append(np.logical_or.reduce(list(flags.values())).mean())
    return float(np.mean(rates)), float(np.percentile(rates, 5)), float(np.percentile(rates, 95))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-heldout", type=int, default=2000)
    ap.add_argument("--sets", default="ct,us,mri", help="comma-separated: ct, us, mri")
    ap.add_argument(
        "--shift-candidates", type=int, default=None, help="audit.shift_candidates (default: exact)"
    )
    ap.add_argument(
        "--spaces", default=None, help="audit.spaces, comma-separated (default: the recipe default)"
    )
    args = ap.parse_args()
    spaces = {"spaces": args.spaces.split(",")} if args.spaces else {}
    cfg = AuditConfig(shift_candidates=args.shift_candidates, **spaces)
    for key in args.sets.split(","):
        name, rel, downsample = SETS[key]
        with np.load(args.data / rel) as z:
            tr, ty = z["train_images"][: args.max_train], z["train_labels"].ravel()[: args.max_train]
            te, tey = z["test_images"][: args.max_heldout], z["test_labels"].ravel()[: args.max_heldout]
        if downsample:  # 64 → 32 as the recipes' data.image_size does
            tr, te = (quantize(pad_square_resize(list(uint_to_unit_range(x)), 32)) for x in (tr, te))
        order = np.random.default_rng(0).permutation(len(te))
        cal, shown = order[: len(te) // 2], order[len(te) // 2 :]
        copies, picks, kinds = planted_copies(tr, args.per_kind, seed=1, kinds=COVERED + GEOMETRIC)
        start = time.perf_counter()
        g = gate(
            cfg,
            tr,
            te[cal],
            tey[cal],
            np.concatenate([copies, te[shown]]),
            np.concatenate([ty[picks], tey[shown]]),
        )
        caught = g.flagged[: len(copies)]
        fa = g.flagged[len(copies) :]
        print(
            f"{name}: train {len(tr)}, calibration {len(cal)} ({int((~g.background_mask).sum())} near-copies left out), "
            f"shown {len(shown)}; covered kinds caught {tally(caught, kinds, COVERED)}; geometric {tally(caught, kinds, GEOMETRIC)}; "
            f"false alarms {int(fa.sum())}/{len(fa)} = {fa.mean():.1%}; {time.perf_counter() - start:.0f} s"
        )
        mean, lo, hi = resampled_false_alarms(g, tey[cal], tey[shown], len(copies), cfg)
        print(
            f"    false alarms over 200 random halvings of the held-out set: {mean:.1%} (90 % of halvings {lo:.1%}-{hi:.1%})"
        )
        for space, flags in g.flags.items():  # what each space catches on its own, at the shared level
            print(
                f"    {space}: covered {tally(flags[: len(copies)], kinds, COVERED)}; "
                f"geometric {tally(flags[: len(copies)], kinds, GEOMETRIC)}; "
                f"false alarms {int(flags[len(copies) :].sum())}; {g.seconds[space]:.0f} s"
            )


if __name__ == "__main__":
    main()
