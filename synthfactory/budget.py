"""The DP-SGD budget planner, `synthfactory plan RECIPE --minutes M`: what a wall-time budget buys
on this machine.

Before any private image is trained on: a short probe times DP-SGD steps of the recipe's model
(its per-example gradient path, K, physical chunk size, precision) on *random* images of the
recipe's size; the accountant then gives, for each logical batch size B, the steps T the budget
allows, the σ that reaches the target ε (composed with what the run's pre-training stage will
write to its ledger: the warm start's query, a checkpoint's ledger; pretrain.planned_ledger) and
the noise per step σ·C/B. The row with the least noise per step among those with at least `min_steps` steps is
proposed, with the `--set` lines that apply it.

Why σ/B: at a fixed ε, the noise in the averaged gradient is σ·C/B, and DP-SGD's utility tracks
it more than the step count (Sander et al., "TAN", 2022), while a larger B costs only
proportionally more example-gradients. `min_steps` keeps enough optimizer steps to learn.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import build_noise_scheduler, build_unet, num_class_embeds, resolve_device
from .privacy import calibrate_noise, make_private
from .recipe import Recipe
from .steps import dp_step, step_settings


@dataclass
class Probe:
    examples_per_s: float  # DP example-gradients per second (K rows each), measured
    seconds: float
    batch: int


@dataclass
class Option:
    batch: int
    steps: int
    noise_multiplier: float | None  # None: ε unreachable with these steps
    noise_per_step: float | None  # σ·C/B

    @property
    def example_gradients(self) -> int:
        return self.batch * self.steps


def probe(recipe: Recipe, n_classes: int, batch: int = 64, steps: int = 3, warmup: int = 1) -> Probe:
    """Time `steps` DP steps of `batch` random examples (after `warmup`) with the recipe's settings."""
    device = resolve_device(recipe.training.device)
    size = recipe.data.image_size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_unet(recipe.model, size, num_class_embeds(recipe, n_classes)).to(device)
        x0 = torch.rand((batch, 1, size, size)) * 2 - 1
        y = torch.randint(0, n_classes, (batch,))
    k = recipe.privacy.noise_multiplicity
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.training.learning_rate)
    private = make_private(
        model,
        optimizer,
        n_train=10 * batch,
        expected_batch_size=batch,
        steps=10**6,
        noise_multiplier=1.0,
        max_grad_norm=recipe.privacy.max_grad_norm,
        accountant="rdp",
        sample_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator(device=device).manual_seed(2),
        mode=recipe.privacy.per_example_gradients,
    )
    settings, scheduler, gen = (
        step_settings(recipe, n_classes, device, k),
        build_noise_scheduler(recipe.model),
        torch.Generator(),
    )
    for _ in range(warmup):
        dp_step(private, scheduler, x0, y, gen, settings)
    start = time.perf_counter()
    for _ in range(steps):
        dp_step(private, scheduler, x0, y, gen, settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Probe(examples_per_s=steps * batch / seconds, seconds=seconds, batch=batch)


def planned_prior(recipe: Recipe, images=None) -> list[tuple[float, float, int]]:
    """The accountant history DP-SGD will compose with: the planned ledger of the pre-training
    stage (pretrain.planned_ledger), with what a checkpoint or a synthfactory release used as
    data brings. Without the images (`--n-train`), every mechanism they carry is taken to compose
    (their data cannot be compared)."""
    from .data import DataError, load_images
    from .ledger import LedgerRefused, find_release_ledger, read_artifact
    from .pretrain import checkpoint_verdict, planned_ledger
    from .public import PublicDataRefused, release_verdict
    from .recipe import RecipeError
    from .warmstart import history

    data = recipe.pretrain.data if recipe.pretrain else None
    try:
        if images is not None:
            brought = [checkpoint_verdict(recipe, images)]
            if data is not None:
                brought.append(release_verdict(recipe, load_images(data, recipe.modality), images))
            ledger = planned_ledger(recipe, images, [v for v in brought if v is not None])
            return ledger.history(images.item_ids())
        checkpoint = recipe.pretrain.checkpoint if recipe.pretrain else None
        carried = [read_artifact(checkpoint)] if checkpoint is not None else []
        path = getattr(data, "path", None) if data is not None else None
        found = find_release_ledger(Path(path)) if path else None
    except (LedgerRefused, PublicDataRefused, DataError) as e:
        raise RecipeError(f"pretrain: {e}") from None
    carried += [found[1]] if found else []
    prior = [h for ledger in carried if ledger for m in ledger.mechanisms for h in m.history]
    return prior + (history(recipe.warm_start) if recipe.warm_start else [])


def options(
    recipe: Recipe, n_train: int, examples_per_s: float, minutes: float, prior: list | tuple = ()
) -> list[Option]:
    """For B = 64, 128, ... up to N: the steps the budget allows and the σ the accountant gives
    after `prior` (the planned ledger's composed history)."""
    budget = examples_per_s * minutes * 60  # example-gradients
    out = []
    b = 64
    while b <= n_train:
        steps = int(budget // b)
        sigma = None
        if steps >= 1:
            try:
                sigma = calibrate_noise(
                    recipe.privacy.target_epsilon, recipe.privacy.delta, b / n_train, steps,
                    recipe.privacy.accountant, prior=prior,
                )  # fmt: skip
            except ValueError:
                sigma = None
        noise = sigma * recipe.privacy.max_grad_norm / b if sigma is not None else None
        out.append(Option(b, steps, sigma, noise))
        b *= 2
    return out


def choose(opts: list[Option], min_steps: int) -> Option | None:
    """The least noise per step among the options with at least `min_steps` steps."""
    ok = [o for o in opts if o.noise_per_step is not None and o.steps >= min_steps]
    return min(ok, key=lambda o: o.noise_per_step) if ok else None


def set_lines(option: Option) -> list[str]:
    return [f"--set training.expected_batch_size={option.batch}", f"--set training.steps={option.steps}"]


def current(recipe: Recipe, n_train: int, prior: list | tuple = ()) -> Option:
    """The recipe's own B, steps, σ and noise per step, for comparison."""
    b, steps = recipe.training.expected_batch_size, recipe.training.total_steps(n_train)
    sigma = calibrate_noise(
        recipe.privacy.target_epsilon, recipe.privacy.delta, b / n_train, steps, recipe.privacy.accountant,
        prior=prior,
    )  # fmt: skip
    return Option(b, steps, sigma, sigma * recipe.privacy.max_grad_norm / b)


def minutes_for(option: Option, examples_per_s: float) -> float:
    return option.example_gradients / examples_per_s / 60 if examples_per_s > 0 else math.inf
