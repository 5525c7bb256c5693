"""Which early-stopping rule makes the TSTR classifier's verdict stable? Samples a run's generator
once (the demo's guidance, fixed sampling seeds) and trains the evaluate stage's classifier on those
samples with each `evaluation.classifier.early_stopping` rule and several classifier seeds, then
scores each on the run's held-out split.

    python benchmarks/tstr_early_stopping.py RUN_DIR [--checkpoint final|pretrained] [--seeds 10]
        [--per-class 100] [--guidance 1.5]

Above chance is (TSTR - chance) / (1 - chance): on the phantoms TRTR is 1.000 in every run, so no
TRTR classifier is trained here. Use a phantom draw other than the demo's own
(`--set data.phantom.seed=1` at `synthfactory create`): the held-out split scored here must not be
the one the shipped demo reports on (docs/results.md, "What made the demo's figure hold").
"""

from __future__ import annotations

import argparse

import numpy as np
from demo_selection import load_checkpoint, sample  # the same generator and samples as that script

from synthfactory.audit import quantize
from synthfactory.evaluate import predict, train_classifier
from synthfactory.pipeline import to_uint8
from synthfactory.run import open_run
from synthfactory.sample import uint8_to_model_range


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", choices=["pretrained", "final"], default="final")
    ap.add_argument("--seeds", type=int, default=10, help="classifier seeds")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--guidance", type=float, default=1.5)
    args = ap.parse_args()
    checked, run_dir = open_run(args.run_dir)
    recipe, images = checked.recipe, checked.images
    n = len(images.class_names)
    model, scheduler = load_checkpoint(run_dir, recipe, args.checkpoint)
    labels = np.repeat(np.arange(n), args.per_class)
    x = sample(model, scheduler, recipe, images, labels, args.guidance)
    synth = uint8_to_model_range(to_uint8(x))
    test_x, test_y = uint8_to_model_range(quantize(images.heldout_images)), images.heldout_labels
    chance = np.bincount(test_y).max() / len(test_y)
    for rule in ("val_accuracy", "val_loss"):
        scores, epochs = [], []
        for seed in range(args.seeds):
            cfg = recipe.evaluation.classifier.model_copy(update={"seed": seed, "early_stopping": rule})
            clf, info = train_classifier(synth, labels, n, cfg, recipe.evaluation.val_fraction)
            accuracy = float((predict(clf, test_x)[0].argmax(1) == test_y).mean())
            scores.append((accuracy - chance) / (1 - chance))
            epochs.append(info["best_epoch"])
        print(
            f"{args.checkpoint}, early_stopping {rule}: above chance per classifier seed "
            f"{' '.join(f'{s:.2f}' for s in scores)} (mean {np.mean(scores):.3f}, min {min(scores):.2f}); "
            f"epoch kept {epochs}",
            flush=True,
        )


if __name__ == "__main__":
    main()
