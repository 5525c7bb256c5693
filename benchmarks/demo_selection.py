"""How the demo's warm start and DP learning rate were chosen (docs/results.md, "What made the
demo's figure hold"): sample a run's generator, before or after DP-SGD, and score the samples
with the evaluate stage's own TSTR over several classifier seeds.

    synthfactory create recipes/demo.yaml --out DIR --set data.phantom.seed=1 [--set ...]
    synthfactory pretrain RUN_DIR -q && synthfactory train RUN_DIR -q
    python benchmarks/demo_selection.py RUN_DIR [--checkpoint pretrained|final] [--seeds 3]
        [--guidance W ...]

`pretrained` is the warm-started model before DP-SGD ("warm start alone"), `final` the trained
generator. Use another phantom draw than the demo's own (`data.phantom.seed=1`): the held-out
split scored here must not be the one the shipped demo reports on.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from synthfactory.audit import quantize
from synthfactory.evaluate import evaluate_arrays
from synthfactory.model import (
    build_noise_scheduler,
    load_generator,
    load_unet,
    null_class,
    sampling_scheduler,
)
from synthfactory.pipeline import to_uint8
from synthfactory.run import open_run
from synthfactory.sample import ddim_sample, sample_seed, uint8_to_model_range


def load_checkpoint(run_dir, recipe, checkpoint: str):
    """(model, its training noise scheduler): the final generator, or the pre-trained UNet."""
    if checkpoint == "final":
        return load_generator(run_dir.final_checkpoint)
    return load_unet(run_dir.pretrained / "unet").eval(), build_noise_scheduler(recipe.model)


def sample(model, train_scheduler, recipe, images, labels: np.ndarray, guidance: float) -> torch.Tensor:
    """DDIM samples in the model's range for `labels`, with fixed per-sample seeds (the same noise
    for every checkpoint and guidance scale)."""
    with torch.no_grad():
        x = ddim_sample(
            model, sampling_scheduler(train_scheduler), torch.from_numpy(labels),
            [sample_seed(123, i) for i in range(len(labels))], recipe.sampling.ddim_steps,
            images.image_size, guidance, null_class(recipe, len(images.class_names)),
        )  # fmt: skip
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", choices=["pretrained", "final"], default="final")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument(
        "--guidance", type=float, nargs="+", default=[1.0],
        help="classifier-free guidance scales to score (the same noise for each); 1 = none",
    )  # fmt: skip
    args = ap.parse_args()
    checked, run_dir = open_run(args.run_dir)
    recipe, images = checked.recipe, checked.images
    n_classes = len(images.class_names)
    model, train_scheduler = load_checkpoint(run_dir, recipe, args.checkpoint)
    labels = np.repeat(np.arange(n_classes), args.per_class)
    cfg = recipe.evaluation.model_copy(update={"classifier_seeds": args.seeds, "bootstrap_resamples": 0})
    real = uint8_to_model_range(quantize(images.train_images))
    print("real training images, mean pixel per class " + " ".join(
        f"{real[images.train_labels == c].mean():.3f}" for c in range(n_classes)))  # fmt: skip
    for w in args.guidance:
        x = sample(model, train_scheduler, recipe, images, labels, w)
        ev = evaluate_arrays(to_uint8(x), labels, images, cfg, threshold=0.0)
        per_seed = ev["above_chance_per_seed"]
        recall = " | ".join(
            " ".join(f"{c} {v:.2f}" for c, v in s["per_class_recall"].items()) for s in ev["tstr"]["per_seed"]
        )
        print(
            f"{args.checkpoint}, guidance {w:g}: above chance per classifier seed "
            f"{', '.join(f'{v:.2f}' for v in per_seed)} (mean {np.mean(per_seed):.2f}); "
            f"TSTR recall per seed: {recall}; mean pixel per class "
            + " ".join(f"{x[labels == c].mean():.3f}" for c in range(n_classes)),
            flush=True,
        )


if __name__ == "__main__":
    main()
