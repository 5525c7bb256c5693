"""DP-SGD as the trainer runs it: per-example gradients equal a torch.func reference for every
architecture a shipped recipe builds, each example is clipped to C before summing, the noise has
the calibrated scale, empty Poisson batches still step and count, and ε comes from the accountant."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from torch.func import functional_call, grad, vmap

from synthfactory.model import build_noise_scheduler, build_unet
from synthfactory.privacy import calibrate_noise, epsilon_of, make_private
from synthfactory.recipe import ModelConfig, load_recipe
from synthfactory.train import diffusion_loss, dp_step, draw_diffusion_noise

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TINY = ModelConfig(
    block_out_channels=[16, 32], layers_per_block=1, attention=True, norm_num_groups=4, attention_head_dim=8
)


def reference_per_example_grads(model, scheduler, x0, labels, t, noise) -> dict[str, torch.Tensor]:
    """torch.func: vmap over examples of the gradient of each example's own loss."""
    ref_model = copy.deepcopy(model)
    params = {k: v.detach() for k, v in ref_model.named_parameters()}

    def loss_one(p, x, y, tt, n):
        out = functional_call(
            ref_model,
            p,
            (scheduler.add_noise(x[None], n[None], tt[None]), tt[None]),
            {"class_labels": y[None]},
        )
        return (out.sample - n[None]).pow(2).mean()

    return vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x0, labels, t, noise)


def private_for(model, n_train=100, batch=4, sigma=0.0, clip=1.0, steps=10):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return make_private(
        model,
        opt,
        n_train=n_train,
        expected_batch_size=batch,
        steps=steps,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        accountant="rdp",
        sample_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2),
    )


def batch_for(size: int, n_classes: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((b, 1, size, size), generator=g) * 2 - 1
    return x0, torch.randint(0, n_classes, (b,), generator=g)


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_per_example_gradients_match_torch_func_for_recipe_architecture(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    n_classes, size = len(recipe.data.classes), recipe.data.image_size
    torch.manual_seed(0)
    model = build_unet(recipe.model, size, n_classes)
    scheduler = build_noise_scheduler(recipe.model)
    x0, y = batch_for(size, n_classes, 3)
    t, noise = draw_diffusion_noise(
        x0, scheduler.config.num_train_timesteps, torch.Generator().manual_seed(3)
    )
    ref = reference_per_example_grads(model, scheduler, x0, y, t, noise)

    private = private_for(model)
    diffusion_loss(private.module, scheduler, x0, y, t, noise).mean().backward()
    checked = 0
    for name, p in model.named_parameters():
        gs, r = p.grad_sample, ref[name]
        assert gs.shape == r.shape, name
        scale = r.abs().max().item()
        err = (gs - r).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, (
            f"{name}: per-example grad differs by {err:.3g} (scale {scale:.3g})"
        )
        checked += int(scale > 1e-6)
    assert checked > 0.9 * len(list(model.parameters()))


def test_each_example_is_clipped_before_summing() -> None:
    torch.manual_seed(0)
    model = build_unet(TINY, 16, 3)
    scheduler = build_noise_scheduler(TINY)
    x0, y = batch_for(16, 3, 4)
    clip, expected_batch = 1e-3, 5
    gen = torch.Generator().manual_seed(11)
    t, noise = draw_diffusion_noise(x0, 1000, copy.deepcopy(gen))
    ref = reference_per_example_grads(model, scheduler, x0, y, t, noise)
    names = [n for n, _ in model.named_parameters()]
    norms = torch.stack([ref[n].flatten(1).norm(dim=1) for n in names], 1).norm(dim=1)
    assert (norms > 10 * clip).all()  # every example must be clipped: the test is meaningful
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: torch.einsum("i,i...->...", factor, ref[n]) / expected_batch for n in names}
    unclipped = {n: ref[n].sum(0) / expected_batch for n in names}

    private = private_for(model, batch=expected_batch, sigma=0.0, clip=clip)
    dp_step(private, scheduler, x0, y, gen)
    got = dict(model.named_parameters())
    total_err = sum((got[n].grad - expected[n]).pow(2).sum() for n in names).sqrt()
    total_norm = sum(expected[n].pow(2).sum() for n in names).sqrt()
    assert total_err <= 1e-4 * total_norm
    # The summed gradient has norm ≤ B·C / expected batch; without clipping it would be far larger.
    assert total_norm <= len(x0) * clip / expected_batch * (1 + 1e-4)
    unclipped_norm = sum(unclipped[n].pow(2).sum() for n in names).sqrt()
    assert unclipped_norm > 10 * total_norm


def test_noise_has_the_calibrated_scale() -> None:
    torch.manual_seed(0)
    model = build_unet(TINY, 16, 3)
    scheduler = build_noise_scheduler(TINY)
    x0, y = batch_for(16, 3, 4)
    sigma, clip, expected_batch = 2.0, 0.5, 4
    clean_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    clean = private_for(clean_model, batch=expected_batch, sigma=0.0, clip=clip)
    dp_step(clean, scheduler, x0, y, copy.deepcopy(gen))
    noisy = private_for(model, batch=expected_batch, sigma=sigma, clip=clip)
    dp_step(noisy, scheduler, x0, y, gen)
    diff = torch.cat(
        [
            (p.grad - q.grad).flatten()
            for p, q in zip(model.parameters(), clean_model.parameters(), strict=True)
        ]
    )
    expected_std = sigma * clip / expected_batch
    assert abs(diff.std().item() / expected_std - 1) < 0.02
    assert abs(diff.mean().item()) < 0.01 * expected_std


def test_empty_poisson_batch_steps_with_noise_and_is_counted() -> None:
    torch.manual_seed(0)
    model = build_unet(TINY, 16, 2)
    scheduler = build_noise_scheduler(TINY)
    model_params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(
        model,
        opt,
        n_train=50,
        expected_batch_size=4,
        steps=3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        sample_generator=torch.Generator().manual_seed(0),
        noise_generator=torch.Generator().manual_seed(1),
    )
    loss = dp_step(
        private,
        scheduler,
        torch.zeros((0, 1, 16, 16)),
        torch.zeros((0,), dtype=torch.long),
        torch.Generator(),
    )
    assert np.isnan(loss)
    assert private.accountant.history == [(1.0, 4 / 50, 1)]
    moved = sum(
        float((p.detach() - q).abs().sum()) for p, q in zip(model.parameters(), model_params, strict=True)
    )
    assert moved > 0  # noise was added and applied
    x0, y = batch_for(16, 2, 3)
    dp_step(private, scheduler, x0, y, torch.Generator().manual_seed(0))  # and training goes on
    assert private.accountant.history == [(1.0, 4 / 50, 2)]


def test_poisson_sampler_varies_batch_size_around_q_n() -> None:
    model = build_unet(TINY, 16, 2)
    private = private_for(model, n_train=400, batch=20, steps=300)
    sizes = [len(b) for b in private.sampler]
    assert len(sizes) == 300 and len(set(sizes)) > 5
    assert abs(np.mean(sizes) - 20) < 1.5  # E[|B|] = qN


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_sigma_meets_the_target_tightly(accountant: str) -> None:
    q, steps, delta, target = 0.02, 500, 1e-5, 4.0
    sigma = calibrate_noise(target, delta, q, steps, accountant)
    assert epsilon_of([(sigma, q, steps)], delta, accountant) <= target
    assert epsilon_of([(sigma * 0.97, q, steps)], delta, accountant) > target - 0.05


def test_accountant_counts_every_step() -> None:
    torch.manual_seed(0)
    model = build_unet(TINY, 16, 2)
    scheduler = build_noise_scheduler(TINY)
    private = private_for(model, n_train=40, batch=8, sigma=1.1, steps=5)
    x_all, y_all = batch_for(16, 2, 40)
    for idx in private.sampler:
        idx = torch.as_tensor(idx, dtype=torch.long)
        dp_step(private, scheduler, x_all[idx], y_all[idx], torch.Generator().manual_seed(0))
    assert private.accountant.history == [(1.1, 0.2, 5)]
    assert private.epsilon(1e-3) == pytest.approx(epsilon_of([(1.1, 0.2, 5)], 1e-3, "rdp"))
    assert private.epsilon(1e-3) > epsilon_of([(1.1, 0.2, 4)], 1e-3, "rdp")
