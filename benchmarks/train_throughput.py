"""Training throughput, private against non-private, measured side by side in one run.

    python benchmarks/train_throughput.py                      # the demo recipe's model, 32×32
    python benchmarks/train_throughput.py --recipe recipes/mri_brain_tumor.yaml --batch 64
    python benchmarks/train_throughput.py --recipe recipes/mri_brain_tumor.yaml \
        --set data.image_size=64 --set "model.block_out_channels=[64,128,128]" --json out.json

Every configuration runs in its own subprocess (so its peak memory is its own) on the same
model, the same images and the same logical batch: non-private, and DP with each per-example
gradient path (Opacus hooks with the contiguity fix, Opacus functorch, Opacus ghost clipping at
K = 1 only, torch.func vmap), at noise multiplicity K = 1 and K = 4. Prints examples/s, peak
memory (RSS on the CPU, max allocated on a GPU) and the DP/non-private ratio at equal K.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_one(args: argparse.Namespace) -> dict:
    from synthfactory.model import build_noise_scheduler, build_unet, count_parameters
    from synthfactory.objective import Draws, make_row_loss
    from synthfactory.privacy import make_conv_inputs_contiguous, make_private
    from synthfactory.recipe import load_recipe, parse_override
    from synthfactory.steps import StepSettings, dp_step, plain_step

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, dict(parse_override(item) for item in args.set))
    size, n_classes = recipe.data.image_size, len(recipe.data.classes)
    device = torch.device(args.device)
    model = build_unet(recipe.model, size, n_classes + 1).to(device)
    scheduler = build_noise_scheduler(recipe.model)
    x0 = torch.rand((args.batch, 1, size, size)) * 2 - 1
    y = torch.randint(0, n_classes, (args.batch,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    settings = StepSettings(
        draws=Draws(k=args.k, label_dropout=0.1, null_class=n_classes),
        max_physical=args.physical,
        device=device,
        row_loss=make_row_loss(device, args.bf16),
    )
    gen = torch.Generator().manual_seed(0)

    if args.mode == "nonprivate":
        step = lambda: plain_step(model, opt, scheduler, x0, y, gen, settings)  # noqa: E731
    elif args.mode == "ghost":
        step = ghost_step_fn(model, opt, scheduler, x0, y, gen, settings, make_conv_inputs_contiguous)
    else:
        private = make_private(
            model,
            opt,
            n_train=10 * args.batch,
            expected_batch_size=args.batch,
            steps=10**6,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            accountant="rdp",
            sample_generator=torch.Generator().manual_seed(1),
            noise_generator=torch.Generator(device=device).manual_seed(2),
            mode=args.mode,
        )
        step = lambda: dp_step(private, scheduler, x0, y, gen, settings)  # noqa: E731

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = float("inf")  # best of `windows` timed windows: less sensitive to a busy machine
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "mode": args.mode,
        "k": args.k,
        "examples_per_s": args.steps * args.batch / seconds,
        "peak_mib": peak,
        "parameters": count_parameters(model),
    }


def ghost_step_fn(model, opt, scheduler, x0, y, gen, settings, make_contiguous):
    """Opacus ghost clipping (two backward passes, no per-example gradients); K = 1 only."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from synthfactory.objective import draw_rows

    class PerSampleMSE(torch.nn.Module):
        reduction = "mean"

        def forward(self, pred, target):
            per = (pred - target).pow(2).flatten(1).mean(1)
            return per if self.reduction == "none" else per.mean()

    make_contiguous(model)
    loader = DataLoader(TensorDataset(x0, y), batch_size=len(x0))
    engine = PrivacyEngine()
    gmodel, gopt, criterion, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        criterion=PerSampleMSE(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=False,
    )

    def step():
        gopt.zero_grad(set_to_none=True)
        noisy, t, labels, noise = draw_rows(x0, y, scheduler, settings.draws, gen).rows(
            x0, scheduler, 0, len(x0), 1
        )
        pred = gmodel(
            noisy.to(settings.device), t.to(settings.device), class_labels=labels.to(settings.device)
        ).sample
        loss = criterion(pred, noise.to(settings.device))
        loss.backward()
        gopt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--physical",
        type=int,
        default=32,
        help="examples per physical chunk (training.max_physical_batch_size)",
    )
    ap.add_argument("--steps", type=int, default=3, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=3, help="timed windows; the fastest is reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ks", default="1,4")
    ap.add_argument("--modes", default="nonprivate,hooks,functorch,ghost,vmap")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass (CUDA)")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mode:  # one configuration, in a child process
        print(json.dumps(run_one(args)))
        return

    results = []
    for k in [int(v) for v in args.ks.split(",")]:
        for mode in args.modes.split(","):
            if mode == "ghost" and k > 1:
                continue  # ghost clipping never forms per-example gradients, so it cannot fold K rows
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--k",
                str(k),
                "--recipe",
                args.recipe,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--windows",
                str(args.windows),
                "--device",
                args.device,
            ]
            cmd += ["--physical", str(args.physical)] if args.physical else []
            cmd += ["--bf16"] if args.bf16 else []
            cmd += [a for item in args.set for a in ("--set", item)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(
                    f"{mode} K={k}: failed: {(out.stderr.strip().splitlines() or ['no message'])[-1]}",
                    flush=True,
                )
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            print(
                f"  {mode:10s} K={k}: {res['examples_per_s']:8.1f} ex/s, peak {res['peak_mib']:8.0f} MiB",
                flush=True,
            )

    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    params = results[0]["parameters"] if results else 0
    if args.json:
        meta = {
            "device": device,
            "recipe": args.recipe,
            "set": args.set,
            "batch": args.batch,
            "bf16": args.bf16,
        }
        args.json.write_text(json.dumps({**meta, "results": results}, indent=1))
    print(
        f"\n{device}; recipe {Path(args.recipe).name}, {params / 1e6:.2f}M parameters, logical batch {args.batch}"
        f"{', bf16 autocast' if args.bf16 else ', fp32'}\n"
    )
    print("| mode | K | examples/s | peak memory (MiB) | DP / non-private at equal K |")
    print("| --- | --- | --- | --- | --- |")
    base = {r["k"]: r["examples_per_s"] for r in results if r["mode"] == "nonprivate"}
    for r in results:
        ratio = (
            f"{r['examples_per_s'] / base[r['k']]:.2f}×"
            if r["k"] in base and r["mode"] != "nonprivate"
            else "1.00×"
        )
        print(f"| {r['mode']} | {r['k']} | {r['examples_per_s']:.1f} | {r['peak_mib']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
