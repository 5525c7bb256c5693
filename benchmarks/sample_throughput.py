"""Sampling throughput: DDIM images per second of a recipe's UNet, through the product's own loop.

    python benchmarks/sample_throughput.py --recipe recipes/mri_brain_tumor.yaml --n 512
    python benchmarks/sample_throughput.py --set data.image_size=64 --batch 256 --bf16 --json out.json

The weights are the freshly initialised ones (the cost of a DDIM step does not depend on them);
the loop is `synthfactory.pipeline.ddim_denoise`, as the sample stage runs it, with the recipe's
DDIM steps. One untimed batch first (CUDA kernels, allocator); then the best of `--windows`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from synthfactory.model import build_noise_scheduler, build_unet, sampling_scheduler
from synthfactory.pipeline import ddim_denoise
from synthfactory.recipe import load_recipe, parse_override

REPO = Path(__file__).resolve().parents[1]


def images_per_second(
    model, scheduler, size: int, n: int, batch: int, steps: int, bf16: bool, device
) -> float:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    n_classes = model.class_embedding.num_embeddings - 1
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for first in range(0, n, batch):
            b = min(batch, n - first)
            labels = torch.arange(b) % n_classes
            ddim_denoise(model, scheduler, torch.randn(b, 1, size, size), labels, steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "mri_brain_tumor.yaml"))
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    ap.add_argument("--n", type=int, default=256, help="images per timed window")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, dict(parse_override(item) for item in args.set))
    size, n_classes = recipe.data.image_size, len(recipe.data.classes)
    device = torch.device(args.device)
    model = build_unet(recipe.model, size, n_classes + 1).to(device).eval()
    scheduler = sampling_scheduler(build_noise_scheduler(recipe.model))
    steps = recipe.sampling.ddim_steps
    images_per_second(model, scheduler, size, min(args.batch, args.n), args.batch, steps, args.bf16, device)
    rate = max(
        images_per_second(model, scheduler, size, args.n, args.batch, steps, args.bf16, device)
        for _ in range(args.windows)
    )
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    result = {
        "device": name,
        "recipe": args.recipe,
        "set": args.set,
        "image_size": size,
        "ddim_steps": steps,
        "batch": args.batch,
        "bf16": args.bf16,
        "images_per_s": rate,
    }
    print(
        f"{name}: {rate:.1f} images/s ({size}×{size}, {steps} DDIM steps, batch {args.batch}, "
        f"{'bf16' if args.bf16 else 'fp32'})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
