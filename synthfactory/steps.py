"""One training step, as every training stage takes it: a DP-SGD step (the private stage, and
`synthfactory plan`'s probe) or a plain step (public pre-training, the warm start's training on
its DP answer, a recipe that opted out of DP).

A DP step: the logical batch (Poisson-sampled by the caller) becomes K rows per example (K noise
levels and noise draws; objective.py), the per-example gradient of the mean loss over its rows is
taken in physical chunks of at most `training.max_physical_batch_size` examples, clipped, summed
across chunks, and the noise is added once per logical batch (privacy.py). Privacy lives in
privacy.py; nothing here accounts for anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from .distributed import Dist, sum_over_ranks
from .model import build_noise_scheduler, null_class
from .objective import Draws, denoising_loss, draw_rows, make_row_loss
from .privacy import PrivateTraining
from .progress import progress_bar
from .recipe import Recipe
from .rundir import atomic_path


@dataclass
class StepSettings:
    draws: Draws = field(default_factory=Draws)
    max_physical: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    row_loss: Callable[..., torch.Tensor] = denoising_loss


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


def step_settings(recipe: Recipe, n_classes: int, device: torch.device, k: int) -> StepSettings:
    """The recipe's rows per example (k), timestep distribution, label dropout, chunk size and
    precision."""
    bf16 = recipe.training.precision == "bf16"
    return StepSettings(
        draws=Draws(
            k=k,
            timesteps=recipe.training.timesteps,
            label_dropout=recipe.training.label_dropout,
            null_class=null_class(recipe, n_classes),
        ),
        max_physical=recipe.training.max_physical_batch_size,
        device=device,
        row_loss=make_row_loss(device, bf16),
    )


def _chunks(n: int, size: int | None):
    size = size or n
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def dp_step(
    private: PrivateTraining,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    settings: StepSettings | None = None,
    dist: Dist | None = None,
) -> float:
    """One DP-SGD step on one Poisson batch (possibly empty): per chunk of examples, per-example
    gradients over k rows, clipped and summed; noise once at the end. Returns the mean loss.

    Distributed (`dist`): every rank gets the whole logical batch and draws its rows with the
    same generator, then works on its contiguous share of the examples; the optimizer adds the
    noise on rank 0 and sums over ranks. An empty share still takes its (collective) step."""
    settings = settings or StepSettings()
    opt = private.optimizer
    opt.zero_grad(set_to_none=True)
    n = len(x0)
    if n == 0:
        private.empty_step()
        return float("nan")
    drawn = draw_rows(x0, labels, scheduler, settings.draws, gen)
    start, stop = dist.share(n) if dist is not None else (0, n)
    total = 0.0
    chunks = _chunks(stop - start, settings.max_physical)
    if not chunks:
        private.empty_step()
    for j, (a, b) in enumerate(chunks):
        rows = tuple(
            r.to(settings.device) for r in drawn.rows(x0, scheduler, start + a, start + b, settings.draws.k)
        )
        total += private.per_example_backward(settings.row_loss, rows, b - a, settings.draws.k) * (b - a)
        last = j == len(chunks) - 1
        opt.signal_skip_step(do_skip=not last)  # accumulate clipped sums; noise only at the end
        opt.step()
        if not last:
            opt.zero_grad(set_to_none=True)  # keeps the accumulated clipped sum
    return sum_over_ranks(total, dist) / n if dist is not None else total / n


def plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    settings: StepSettings,
) -> float:
    """One non-private step (public pre-training, the warm start's training, a recipe that opted
    out of DP)."""
    optimizer.zero_grad(set_to_none=True)
    n, k = len(x0), settings.draws.k
    total = 0.0
    drawn = draw_rows(x0, labels, scheduler, settings.draws, gen)
    for a, b in _chunks(n, settings.max_physical):
        rows = tuple(r.to(settings.device) for r in drawn.rows(x0, scheduler, a, b, k))
        loss = settings.row_loss(model, *rows).sum() / (n * k)
        loss.backward()
        total += float(loss.detach()) * n
    optimizer.step()
    return total / n


def plain_training(
    model, recipe: Recipe, n_classes: int, device, run: tuple, draw, progress: bool, state: Path | None = None
) -> None:
    """Non-private Adam steps on batches from `draw(generator)`; run = (steps, learning rate,
    seed). What the public pre-training and the warm start's training both run. With `state`, the
    weights, the optimizer and the generator are saved there (atomically) every
    `training.checkpoint_every` steps and at the end, and a state saved there by the same run
    tuple is resumed from: a killed stage goes on where it was saved, to the same weights."""
    steps, lr, seed = run
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = build_noise_scheduler(recipe.model)
    settings = step_settings(recipe, n_classes, device, k=1)
    gen = generator(seed)
    done = _resume_plain(state, run, model, optimizer, gen)
    every = recipe.training.checkpoint_every
    with progress_bar(steps, "pretrain", "step", progress) as bar:
        bar.update(done)
        for step in range(done + 1, steps + 1):
            xb, yb = draw(gen)
            loss = plain_step(model, optimizer, scheduler, xb, yb, gen, settings)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if state is not None and (step % every == 0 or step == steps):
                _save_plain(state, run, step, model, optimizer, gen)


def save_state(path: Path, state: dict) -> None:
    """`torch.save` so that a reader never sees half a file (a killed run resumes from it)."""
    tmp = atomic_path(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _save_plain(path: Path, run: tuple, step: int, model, optimizer, gen: torch.Generator) -> None:
    saved = {"run": list(run), "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    save_state(path, {**saved, "generator": gen.get_state()})


def _resume_plain(path: Path | None, run: tuple, model, optimizer, gen: torch.Generator) -> int:
    """Load a state saved by `_save_plain` for the same run tuple; returns its step (0: none)."""
    if path is None or not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["run"] != list(run):  # another stage's settings: start this one afresh
        return 0
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    gen.set_state(saved["generator"])
    return int(saved["step"])
