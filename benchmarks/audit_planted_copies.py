"""How well does the release gate catch disguised copies on the real sets, and how many genuine
held-out images does it flag? One line per set.

    python benchmarks/audit_planted_copies.py [--data ../shared/data] [--per-kind 20]
        [--sets ct,us,mri] [--shift-candidates N] [--spaces pixel_l2,ncc,...] [--heldout-split val]

Per set: training images as the private set; held-out images split in two, one half calibrates
the gate (recipe defaults: 1 % false alarms over all six spaces), the other half is presented as
samples together with `per-kind` disguised copies of training images of each kind: the kinds the
audit claims (`planted.COVERED`) and geometric edits beyond them (`planted.GEOMETRIC`). False
alarms are counted on the presented half only, which did not calibrate the gate; and, because
one halving of a small held-out set gives a coarse rate and one calibration a coarse catch count,
both are also averaged over 200 random halvings of the same held-out scores (each half
calibrates `audit.calibrate` as the gate does; the other half is counted, and the copies are
judged by that calibration).
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


def resampled(
    g, cal_y: np.ndarray, shown_y: np.ndarray, copy_y: np.ndarray, cfg: AuditConfig, repeats: int = 200
) -> tuple[tuple[float, float, float], np.ndarray]:
    """The gate over random halvings of the held-out images (the calibration half's background
    scores and the shown half's scores pooled): each halving's first half calibrates with the
    gate's own `calibrate`, the second half is counted. Returns the false-alarm rate (mean, 5th,
    95th percentile) and, per planted copy, the share of halvings whose gate flags it."""
    n_copies = len(copy_y)
    scores = {n: np.concatenate([g.background[n], g.synth[n][1][n_copies:]]) for n in g.background}
    copies = {n: g.synth[n][1][:n_copies] for n in g.background}
    labels = np.concatenate([cal_y[g.background_mask], shown_y])
    higher = {n: SPACES[n].higher_is_closer for n in scores}
    rng = np.random.default_rng(0)
    rates, caught = [], np.zeros(n_copies)
    for _ in range(repeats):
        order = rng.permutation(len(labels))
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        cal = calibrate({n: v[a] for n, v in scores.items()}, higher, labels[a],
                        cfg.threshold.percentile, cfg.threshold.min_per_class)  # fmt: skip
        flags = cal.flags({n: v[b] for n, v in scores.items()}, labels[b])
        rates.append(np.logical_or.reduce(list(flags.values())).mean())
        caught += np.logical_or.reduce(list(cal.flags(copies, copy_y).values())) | g.exact_copies[:n_copies]
    fa = (float(np.mean(rates)), float(np.percentile(rates, 5)), float(np.percentile(rates, 95)))
    return fa, caught / repeats


def shares(caught: np.ndarray, kinds: np.ndarray, group: tuple[str, ...]) -> str:
    """'share (kind share, ...)' of copies flagged, averaged over halvings."""
    each = ", ".join(f"{k} {caught[kinds == k].mean():.0%}" for k in group)
    return f"{caught[np.isin(kinds, group)].mean():.1%} ({each})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-heldout", type=int, default=2000)
    ap.add_argument("--sets", default="ct,us,mri", help="comma-separated: ct, us, mri")
    ap.add_argument(
        "--heldout-split", default="test", help="the npz split that calibrates and is shown (CT also has val)"
    )
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
            split = args.heldout_split
            te, tey = (
                z[f"{split}_images"][: args.max_heldout],
                z[f"{split}_labels"].ravel()[: args.max_heldout],
            )
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
        (mean, lo, hi), share = resampled(g, tey[cal], tey[shown], ty[picks], cfg)
        print(
            f"    over 200 random halvings of the held-out set: false alarms {mean:.1%} (90 % of halvings {lo:.1%}-{hi:.1%}); "
            f"copies caught: covered {shares(share, np.asarray(kinds), COVERED)}; geometric {shares(share, np.asarray(kinds), GEOMETRIC)}"
        )
        for space, flags in g.flags.items():  # what each space catches on its own, at the shared level
            print(
                f"    {space}: covered {tally(flags[: len(copies)], kinds, COVERED)}; "
                f"geometric {tally(flags[: len(copies)], kinds, GEOMETRIC)}; "
                f"false alarms {int(flags[len(copies) :].sum())}; {g.seconds[space]:.0f} s"
            )


if __name__ == "__main__":
    main()
