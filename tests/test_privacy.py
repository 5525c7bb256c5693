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
from synthfactory.objective import Draws, denoising_loss, draw_rows, make_row_loss
from synthfactory.privacy import calibrate_noise, epsilon_of, make_private
from synthfactory.recipe import ModelConfig, load_recipe
from synthfactory.steps import StepSettings, dp_step

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TINY = ModelConfig(
    block_out_channels=[16, 32], layers_per_block=1, attention=True, norm_num_groups=4, attention_head_dim=8
)


def make_rows(x0, labels, scheduler, draws, gen):
    """(noisy, timesteps, labels, noise) for len(x0)·k rows through training's own draws."""
    return draw_rows(x0, labels, scheduler, draws, gen).rows(x0, scheduler, 0, len(x0), draws.k)


def draw_diffusion_noise(x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator):
    """Uniform DDPM timesteps and Gaussian noise for a batch."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator)
    return t, torch.randn(x0.shape, generator=generator)


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


def private_for(model, n_train=100, batch=4, sigma=0.0, clip=1.0, steps=10, mode="hooks"):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
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
        mode=mode,
    )


def batch_for(size: int, n_classes: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((b, 1, size, size), generator=g) * 2 - 1
    return x0, torch.randint(0, n_classes, (b,), generator=g)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "vmap"])
@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_per_example_gradients_match_torch_func_for_recipe_architecture(recipe_path: Path, mode: str) -> None:
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

    private = private_for(model, mode=mode)
    rows = (scheduler.add_noise(x0, noise, t), t, y, noise)
    private.per_example_backward(denoising_loss, rows, len(x0), 1)
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


@pytest.mark.parametrize("mode", ["hooks", "functorch", "vmap", "mixed_ghost"])
def test_each_example_is_clipped_before_summing(mode: str) -> None:
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

    private = private_for(model, batch=expected_batch, sigma=0.0, clip=clip, mode=mode)
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


@pytest.mark.parametrize("mode", ["hooks", "mixed_ghost"])
def test_empty_poisson_batch_steps_with_noise_and_is_counted(mode: str) -> None:
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
        mode=mode,
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


# (history, δ) → (RDP ε, PRV ε), recorded from Opacus 1.6's RDPAccountant and PRVAccountant:
# the tiny test run, the CT recipe's DP-SGD, the warm start's query, and the demo's composition
# (before 2026-12-06: warm start σ 3; since: σ 1, DP-SGD σ as the shipped demo calibrates it).
RECORDED_EPSILON = [
    ([(1.0, 0.25, 4)], 1e-3, 3.1706480492783853, 2.518466837395082),
    ([(0.64, 1024 / 34561, 150)], 1e-6, 10.126325658066921, 8.82104211303142),
    ([(3.0, 1.0, 1)], 1e-5, 1.3862750468052074, 1.2811651012490097),
    ([(3.0, 1.0, 1), (1.08, 512 / 2000, 30)], 1e-5, 9.978204657195745, 8.968545404886337),
    ([(1.0, 1.0, 1), (1.182861328125, 512 / 2000, 30)], 1e-5, 9.993642299509665, 9.094563506906553),
]


@pytest.mark.parametrize(("history", "delta", "rdp", "prv"), RECORDED_EPSILON)
def test_epsilon_is_opacus_at_recorded_histories(history, delta, rdp, prv) -> None:
    """synthfactory's ε is Opacus' ε of the same history at the same δ: fixed figures, and
    Opacus' accountant classes called here directly (not through the product)."""
    from conftest import opacus_epsilon

    assert epsilon_of(history, delta, "rdp") == pytest.approx(rdp, rel=1e-9)
    assert epsilon_of(history, delta, "prv") == pytest.approx(prv, rel=1e-6)
    assert rdp == pytest.approx(opacus_epsilon(history, delta, "rdp"), rel=1e-9)
    assert prv == pytest.approx(opacus_epsilon(history, delta, "prv"), rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_sigma_meets_the_target_tightly(accountant: str) -> None:
    from conftest import opacus_epsilon

    q, steps, delta, target = 0.02, 500, 1e-5, 4.0
    sigma = calibrate_noise(target, delta, q, steps, accountant)
    assert opacus_epsilon([(sigma, q, steps)], delta, accountant) <= target
    assert opacus_epsilon([(sigma * 0.97, q, steps)], delta, accountant) > target - 0.05


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
    from conftest import opacus_epsilon

    assert private.epsilon(1e-3) == pytest.approx(opacus_epsilon([(1.1, 0.2, 5)], 1e-3, "rdp"))
    assert private.epsilon(1e-3) > opacus_epsilon([(1.1, 0.2, 4)], 1e-3, "rdp")


# --- noise multiplicity: K rows per example, folded before clipping ----------------------------


def brute_force_example_grads(model, rows, n, k) -> dict[str, torch.Tensor]:
    """One backward pass per example, in float64: grad of the mean loss over its k rows."""
    ref = copy.deepcopy(model).double()
    out = {name: [] for name, _ in ref.named_parameters()}
    for i in range(n):
        ref.zero_grad()
        ex = [r[i * k : (i + 1) * k] for r in rows]
        ex = [e.double() if e.is_floating_point() else e for e in ex]
        denoising_loss(ref, *ex).mean().backward()
        for name, p in ref.named_parameters():
            out[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in out.items()}


@pytest.mark.parametrize("mode", ["hooks", "functorch", "vmap"])
def test_k_rows_are_folded_into_one_gradient_per_example_before_clipping(mode: str) -> None:
    torch.manual_seed(0)
    model = build_unet(TINY, 16, 3)
    scheduler = build_noise_scheduler(TINY)
    n, k = 3, 4
    x0, y = batch_for(16, 3, n)
    rows = make_rows(x0, y, scheduler, Draws(k=k), torch.Generator().manual_seed(4))
    ref = brute_force_example_grads(model, rows, n, k)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    private = make_private(
        model,
        opt,
        n_train=100,
        expected_batch_size=4,
        steps=2,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        accountant="rdp",
        sample_generator=torch.Generator(),
        noise_generator=torch.Generator(),
        mode=mode,
    )
    private.per_example_backward(denoising_loss, rows, n, k)
    for name, p in model.named_parameters():
        got, want = p.grad_sample.double(), ref[name]
        assert got.shape == want.shape == (n, *p.shape), name
        err = (got - want).abs().max().item()
        assert err <= 2e-4 * want.abs().max().item() + 1e-7, f"{mode} {name}: {err:.3g}"


@pytest.mark.parametrize("mode", ["hooks", "mixed_ghost"])
def test_physical_chunks_give_the_same_clipped_sum_and_noise_once(mode: str) -> None:
    torch.manual_seed(0)
    scheduler = build_noise_scheduler(TINY)
    x0, y = batch_for(16, 3, 5)
    grads = []
    for chunk in (None, 2):
        torch.manual_seed(0)
        model = build_unet(TINY, 16, 3)
        private = private_for(model, batch=5, sigma=0.0, clip=1e-3, mode=mode)
        settings = StepSettings(draws=Draws(k=2), max_physical=chunk)
        dp_step(private, scheduler, x0, y, torch.Generator().manual_seed(9), settings)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert private.accountant.history == [(0.0, 0.05, 1)]  # one logical step, however many chunks
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-9)
    # With noise: the noise is added once per logical batch, not once per chunk.
    torch.manual_seed(0)
    model = build_unet(TINY, 16, 3)
    clean = grads[1]
    private = private_for(model, batch=5, sigma=3.0, clip=1e-3, mode=mode)
    dp_step(
        private,
        scheduler,
        x0,
        y,
        torch.Generator().manual_seed(9),
        StepSettings(draws=Draws(k=2), max_physical=2),
    )
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) - clean
    assert abs(noise.std().item() / (3.0 * 1e-3 / 5) - 1) < 0.02


PRECISIONS = ["fp32", "bf16"]  # bf16: CPU autocast; per-example norms must stay fp32


def _clipped_sum(model, scheduler, x0, y, clip: float, mode: str, precision: str, k: int = 4) -> torch.Tensor:
    """The summed clipped gradient of a batch as the trainer forms it: `dp_step` with σ = 0 and
    an expected batch size of 1, so p.grad is the clipped sum itself."""
    private = private_for(model, batch=1, sigma=0.0, clip=clip, mode=mode)
    settings = StepSettings(
        draws=Draws(k=k), row_loss=make_row_loss(torch.device("cpu"), precision == "bf16")
    )
    dp_step(private, scheduler, x0, y, torch.Generator().manual_seed(4), settings)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", ["hooks", "functorch", "vmap", "mixed_ghost"])
def test_one_example_moves_the_clipped_sum_by_at_most_c(mode: str, precision: str) -> None:
    """Sensitivity through the trainer's own step, K = 4 rows per example: adding one example to
    a batch moves the summed clipped gradient by at most C, in every mode and precision. Clipping
    the K rows separately would allow K·C, no clipping far more; bf16 norms exceed C by ~0.04 %."""
    clip, n = 1e-3, 4
    scheduler = build_noise_scheduler(TINY)
    x0, y = batch_for(16, 3, n, seed=1)
    moved = []
    for i in range(n):
        torch.manual_seed(0)
        one = _clipped_sum(
            build_unet(TINY, 16, 3), scheduler, x0[i : i + 1], y[i : i + 1], clip, mode, precision
        )
        moved.append(float(one.norm()))  # from the empty batch (a zero sum) to {x_i}
    assert max(moved) <= clip * (1 + 1e-6), moved
    assert min(moved) >= 0.99 * clip, moved  # every example's gradient was clipped: the test bites
    # Inside a batch: replacing the last example by another (same batch size, so every other
    # example keeps its rows) moves the sum by at most 2C, one clipped gradient out, one in.
    other_x, other_y = batch_for(16, 3, 1, seed=2)
    sums = []
    for last_x, last_y in ((x0[-1:], y[-1:]), (other_x, other_y)):
        torch.manual_seed(0)
        xb, yb = torch.cat([x0[:-1], last_x]), torch.cat([y[:-1], last_y])
        sums.append(_clipped_sum(build_unet(TINY, 16, 3), scheduler, xb, yb, clip, mode, precision))
    assert float((sums[0] - sums[1]).norm()) <= 2 * clip * (1 + 1e-3)
