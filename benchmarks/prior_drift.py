"""What DP-SGD did to the pre-trained model: samples of a run's generator before DP-SGD
(checkpoints/pretrained: the public stage and/or the warm start) and after it (checkpoints/final),
one row per label, the null label first, from the same seeds.

    python benchmarks/prior_drift.py RUN_DIR OUT.png [--per-label 6]

Every image is drawn from public or DP-trained weights (covered by ε; no real image is shown), so
the figure may be published. It is how docs/results.md (MRI, "What DP-SGD does to the public
prior", rows ²⁰, ²¹, ²³, ²⁴) saw that 90 DP-SGD steps turn the public stage's brain slices into
texture.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from synthfactory.model import load_generator, load_unet, null_class, sampling_scheduler
from synthfactory.pipeline import to_uint8
from synthfactory.run import open_run
from synthfactory.sample import ddim_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--per-label", type=int, default=6)
    args = ap.parse_args()
    checked, run_dir = open_run(args.run_dir)
    recipe, images = checked.recipe, checked.images
    n_classes = len(images.class_names)
    null = null_class(recipe, n_classes)
    labels = ([null] if null is not None else []) + list(range(n_classes))
    final, train_scheduler = load_generator(run_dir.final_checkpoint)
    scheduler = sampling_scheduler(train_scheduler)
    rows = []
    for model in (load_unet(run_dir.pretrained / "unet").eval(), final):
        for label in labels:
            with torch.no_grad():
                x = ddim_sample(model, scheduler, torch.full((args.per_label,), label),
                                list(range(args.per_label)), recipe.sampling.ddim_steps, images.image_size)  # fmt: skip
            rows.append(np.concatenate(list(to_uint8(x)), axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.out)
    names = ["null"] * (null is not None) + images.class_names
    print(f"{args.out}: rows {names} before DP-SGD (pretrained), then the same after (final)")


if __name__ == "__main__":
    main()
