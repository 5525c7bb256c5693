"""Does embedding the *training* side at a few zooms and rotations let `copy_embedding` catch the
zoomed, cropped and rotated copies it misses? The learned space alone, with and without them.

    python benchmarks/embedding_reference_warps.py [--sets ct,us,mri] [--json out.json]

The grid was fixed before the first run, from the ranges issue 30 names (zooms 0.85-1.2, crops
of 80-85 % resized back, i.e. a zoom of 1.18-1.25 off-centre, rotations up to 15°), not from this
benchmark's results: every training image is also embedded zoomed by 0.87, 1.1 and 1.2 and rotated
by ±8° and ±15° (the gate's own torch warp, `audit.spaces.warped`: bicubic, edge fill), and a
query's score is its best cosine over all of them. The copies are `audit_disguised_copies.py`'s
(Pillow and scikit-image, the same seed, sets and held-out halves), so neither the warp nor the
descriptor's OpenCV/Kornia training edits made them.

Per set and variant: the threshold is the calibration half's 99th percentile of the space's score
(1 % false alarms, this space alone; the gate shares its 1 % over all its spaces, so these catches
are an upper bound of what the space adds there); printed: copies caught per kind, false alarms
on the presented held-out half, ROC AUC of copies against it, and seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from audit_disguised_copies import load
from sklearn.metrics import roc_auc_score

from synthfactory.audit.disguises import KINDS, disguised_copies
from synthfactory.audit.spaces import EMBEDDING_WARPS, embedding_search
from synthfactory.sample import uint8_to_model_range


def run_set(args: argparse.Namespace, key: str) -> dict:
    d = load(args, key)  # uint8 [N, H, W], as the gate takes them
    copies, _, kinds = disguised_copies(d["train"], args.per_kind, seed=args.seed)
    kinds = np.asarray(kinds)
    train, copies = uint8_to_model_range(d["train"]), uint8_to_model_range(copies)
    cal, shown = (uint8_to_model_range(d["heldout"][i]) for i in (d["cal"], d["shown"]))
    out = {}
    for name, warps in (("plain", EMBEDDING_WARPS[:1]), ("reference_warps", EMBEDDING_WARPS)):
        start = (
            time.perf_counter()
        )  # the space's own search (its training-side embeddings are kept between calls)
        s_cal, s_shown, s_copy = (
            embedding_search(x, train, 1024, warps=warps)[1] for x in (cal, shown, copies)
        )
        seconds = time.perf_counter() - start
        level = float(np.quantile(s_cal, 0.99))
        caught = s_copy > level
        y = np.r_[np.ones(len(s_copy)), np.zeros(len(s_shown))]
        out[name] = {
            "threshold": level,
            "caught": int(caught.sum()),
            "planted": len(s_copy),
            "per_kind": {k: int(caught[kinds == k].sum()) for k in KINDS},
            "false_alarms": int((s_shown > level).sum()),
            "shown": len(s_shown),
            "auc_vs_heldout": float(roc_auc_score(y, np.r_[s_copy, s_shown])),
            "seconds": round(seconds, 1),
        }
        r = out[name]
        print(
            f"{key} {name:16s} caught {r['caught']}/{r['planted']}, false alarms {r['false_alarms']}/{r['shown']}, "
            f"AUC {r['auc_vs_heldout']:.3f}, threshold {level:.4f}, {seconds:.0f} s",
            flush=True,
        )
    for k in KINDS:
        print(f"    {k:40s} {out['plain']['per_kind'][k]:3d} -> {out['reference_warps']['per_kind'][k]:3d}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-heldout", type=int, default=2000)
    ap.add_argument("--heldout-split", default="test")
    ap.add_argument("--sets", default="ct,us,mri")
    ap.add_argument("--seed", type=int, default=1, help="seed of the disguises")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {key: run_set(args, key) for key in args.sets.split(",")}
    if args.json:
        args.json.write_text(json.dumps({"warps": EMBEDDING_WARPS, "sets": results}, indent=1))


if __name__ == "__main__":
    main()
