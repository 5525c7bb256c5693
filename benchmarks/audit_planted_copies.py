"""How well does the release gate catch disguised copies on the real sets, and how many genuine
held-out images does it flag? One line per set.

    python benchmarks/audit_planted_copies.py [--data ../shared/data] [--per-kind 20]

Per set: training images as the private set; held-out images split in two, one half calibrates
the gate (recipe defaults: 1 % false alarms over four spaces), the other half is presented as
samples together with `per-kind` disguised copies of training images of each kind: the kinds the
audit claims (`planted.COVERED`) and geometric edits beyond them (`planted.GEOMETRIC`). False
alarms are counted on the presented half only, which did not calibrate the gate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from synthfactory.audit import gate, quantize
from synthfactory.audit.planted import COVERED, GEOMETRIC, planted_copies
from synthfactory.data.common import pad_square_resize, uint_to_unit_range
from synthfactory.recipe import AuditConfig

SETS = {
    "ct_organamnist 28px": ("ct_organamnist/organamnist_28_full.npz", False),
    "us_fetal_head 32px": ("us_fetal_head_trimester/hc18_trimester_64.npz", True),
    "mri_brain_tumor groupsplit 32px": ("mri_brain_tumor/brain_tumor_mri_64_groupsplit.npz", True),
}


def tally(caught: np.ndarray, kinds: np.ndarray, group: tuple[str, ...]) -> str:
    """'caught/planted (kind caught/planted, ...)' over the kinds of `group`."""
    inside = np.isin(kinds, group)
    each = ", ".join(f"{k} {int(caught[kinds == k].sum())}/{int((kinds == k).sum())}" for k in group)
    return f"{int(caught[inside].sum())}/{int(inside.sum())} ({each})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-heldout", type=int, default=2000)
    args = ap.parse_args()
    for name, (rel, downsample) in SETS.items():
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
            AuditConfig(),
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


if __name__ == "__main__":
    main()
