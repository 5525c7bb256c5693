"""Score a committed release with today's evaluate stage (TSTR and TRTR over several classifier
seeds, per-class recall, bootstrap interval), so that rows evaluated before a change of the
evaluation (one classifier seed until 2026-12-06) can be compared with new ones.

    python benchmarks/rescore_release.py RECIPE privacy_audits/<recipe>/<run>/release/dataset [--seeds 3]
        [--early-stopping val_loss|val_accuracy]

The recipe gives the real data (its training split for TRTR, its held-out split for both) and
the evaluation settings; the release's images and labels are the synthetic set, read with
`datasets.load_from_disk` as a user would. Prints one line per figure and the JSON of the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from datasets import load_from_disk

from synthfactory.evaluate import evaluate_arrays
from synthfactory.run import check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("release", type=Path, help="a release's dataset folder (datasets.load_from_disk)")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds")
    ap.add_argument(
        "--early-stopping", choices=["val_loss", "val_accuracy"], default=None,
        help="the classifiers' early-stopping rule (default: the recipe's); val_accuracy scores as before 2026-12-06",
    )  # fmt: skip
    args = ap.parse_args()
    checked = check(args.recipe)
    images = checked.images
    ds = load_from_disk(str(args.release))["train"]
    if ds.features["label"].names != images.class_names:
        raise SystemExit(
            f"{args.release}: classes {ds.features['label'].names} are not the recipe's {images.class_names}"
        )
    synth = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in ds["image"]])
    labels = np.asarray(ds["label"], dtype=np.int64)
    cfg = checked.recipe.evaluation.model_copy(update={"classifier_seeds": args.seeds})
    if args.early_stopping:
        classifier = cfg.classifier.model_copy(update={"early_stopping": args.early_stopping})
        cfg = cfg.model_copy(update={"classifier": classifier})
    ev = evaluate_arrays(synth, labels, images, cfg, threshold=0.0)
    ci = ev["intervals"]["tstr_over_trtr_above_chance"] if ev.get("intervals") else None
    interval = f"95 % {ci[0]:.2f}–{ci[1]:.2f}" if ci else "no interval: fewer than two held-out units"
    print(f"release    {args.release} ({len(labels)} images)")
    print(f"TRTR       {ev['trtr']['accuracy']:.3f}   TSTR {ev['tstr']['accuracy']:.3f}   "
          f"(mean of {args.seeds} classifier seeds)")  # fmt: skip
    print(f"above      {ev['tstr_over_trtr_above_chance']:.2f} ({interval}); per seed "
          + ", ".join(f"{v:.2f}" for v in ev["above_chance_per_seed"]))  # fmt: skip
    print("recall     " + ", ".join(f"{c} {v:.2f}" for c, v in ev["tstr"]["per_class_recall"].items())
          + f"; macro AUC {ev['tstr']['macro_auc']:.2f}")  # fmt: skip
    keep = {k: ev[k] for k in ("tstr_over_trtr_above_chance", "above_chance_per_seed", "intervals")}
    print(json.dumps(keep, default=float))


if __name__ == "__main__":
    main()
