"""Where a `mixed_ghost` DP step spends its time, phase by phase and layer by layer, beside the
non-private step on the same model and batch.

    python benchmarks/dp_step_profile.py [--recipe recipes/ct_organamnist.yaml] [--batch 32] [--k 1]
        [--top 12]

Phases of `ghost_clipping.clipped_sum`: the forward pass (recording each trainable module's
input), the backward pass to those modules' outputs (no parameter gradient), each layer's
per-example norms (instantiated or ghost, and the tensors they need), and the clipped sums. The
best of three repeats is printed for each phase, in seconds; a table of the layers that take the
longest follows (Markdown).
"""

from __future__ import annotations

import argparse
import time

import torch

from synthfactory import ghost_clipping
from synthfactory.model import build_noise_scheduler, build_unet
from synthfactory.objective import Draws, draw_rows, make_row_loss
from synthfactory.privacy import make_private
from synthfactory.recipe import load_recipe


def one_step(model, calls, row_loss, rows, n: int, k: int) -> tuple[dict, list]:
    """One clipped sum, timed phase by phase (ghost_clipping.clipped_sum, unrolled)."""
    t0 = time.perf_counter()
    handles = [c.module.register_forward_hook(ghost_clipping._recorder(c)) for c in calls.values()]
    losses = row_loss(model, *rows)
    for h in handles:
        h.remove()
    t1 = time.perf_counter()
    outputs = [o for c in calls.values() for o in c.outputs]
    grads = iter(torch.autograd.grad(losses.view(n, k).mean(1).sum(), outputs, allow_unused=True))
    for c in calls.values():
        c.grads = [torch.zeros_like(o) if g is None else g for o, g in zip(c.outputs, grads, strict=False)]
    t2 = time.perf_counter()
    layers, squared = [], torch.zeros(n)
    for name, c in calls.items():
        a = time.perf_counter()
        layer = ghost_clipping._layer(c, n, k)
        squared += layer.norms_squared()
        layers.append([name, _how(layer), time.perf_counter() - a, layer])
    t3 = time.perf_counter()
    factors = (1.0 / (squared.sqrt() + 1e-6)).clamp(max=1.0)
    for row in layers:
        a = time.perf_counter()
        row[3].set_clipped_grads(factors)
        row[3] = time.perf_counter() - a
    t4 = time.perf_counter()
    for c in calls.values():
        c.inputs, c.outputs, c.grads = [], [], []
    phases = {"forward": t1 - t0, "backward to outputs": t2 - t1, "norms": t3 - t2, "clipped sums": t4 - t3}
    return phases, layers


def _how(layer) -> str:
    """How the layer's norms were taken."""
    if isinstance(layer, ghost_clipping._ConvInstantiated):
        return "instantiated (grouped weight-gradient kernel)"
    if isinstance(layer, ghost_clipping._Dense):
        t, d, p = layer.a.shape[1], layer.a.shape[2], layer.g.shape[2]
        return f"{'ghost' if ghost_clipping._ghost_is_cheaper(t, d, p) else 'instantiated'} (T {t}, d {d}, p {p})"
    return type(layer).__name__.strip("_") + " (per channel or per index)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/ct_organamnist.yaml")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    size, n_classes, n, k = recipe.data.image_size, len(recipe.data.classes), args.batch, args.k
    torch.manual_seed(0)
    model = build_unet(recipe.model, size, n_classes + 1)
    scheduler = build_noise_scheduler(recipe.model)
    x0, y = torch.rand((n, 1, size, size)) * 2 - 1, torch.randint(0, n_classes, (n,))
    draws = Draws(k=k, null_class=n_classes, label_dropout=0.1)
    rows = draw_rows(x0, y, scheduler, draws, torch.Generator().manual_seed(0)).rows(x0, scheduler, 0, n, k)
    row_loss = make_row_loss(torch.device("cpu"), False)
    private = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), n_train=10 * n, expected_batch_size=n,
        steps=1, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp",
        sample_generator=torch.Generator(), noise_generator=torch.Generator(), mode="mixed_ghost",
    )  # fmt: skip
    best, layers = None, None
    for _ in range(4):  # the first is a warm-up
        phases, rows_timed = one_step(model, private.ghost, row_loss, rows, n, k)
        if best is None or sum(phases.values()) < sum(best.values()):
            best, layers = phases, rows_timed
    plain = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        a = time.perf_counter()
        loss = row_loss(model, *rows).mean()
        b = time.perf_counter()
        loss.backward()
        plain.append((b - a, time.perf_counter() - b))
    forward, backward = min(plain, key=sum)
    print(f"{args.recipe}, batch {n}, K = {k}, {torch.get_num_threads()} threads")
    print(
        f"non-private: forward {forward:.3f} s, backward {backward:.3f} s, total {forward + backward:.3f} s"
    )
    print(
        "mixed_ghost: "
        + ", ".join(f"{name} {t:.3f} s" for name, t in best.items())
        + f", total {sum(best.values()):.3f} s"
    )
    print("\n| layer | norm by | norms (s) | clipped sum (s) |\n| --- | --- | --- | --- |")
    for name, how, norm_s, sum_s in sorted(layers, key=lambda r: -(r[2] + r[3]))[: args.top]:
        print(f"| {name} | {how} | {norm_s:.4f} | {sum_s:.4f} |")


if __name__ == "__main__":
    main()
