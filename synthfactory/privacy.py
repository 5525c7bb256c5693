"""DP-SGD with Opacus: per-example gradients, clipping, calibrated Gaussian noise, Poisson
sampling, and the privacy accountant. ε is computed here and nowhere else.

`make_private` wraps the caller's own model and optimizer (Opacus' DPOptimizer, and its
GradSampleModule unless the torch.func path is chosen) and returns them with a Poisson sampler
and an accountant attached to every optimizer step; `train.py` stays an ordinary PyTorch loop.

Noise multiplicity: an example may be fed as K rows (K noise draws). Its gradient is the mean
of its K row gradients, formed *before* clipping (`PrivateTraining.per_example_backward`), so
one example still contributes one clipped gradient of norm ≤ C and the accountant is unchanged.
Clipping each row instead would give the example a sensitivity of K·C.

Per-example gradient paths (`privacy.per_example_gradients`):
- `hooks`: Opacus GradSampleModule hooks (fast layer-wise formulas), K rows folded by a mean;
- `functorch`: Opacus GradSampleModule with per-layer torch.func for every layer;
- `vmap`: torch.func `vmap(grad(loss of one example over its K rows))` on the whole model;
- `mixed_ghost`: book-keeping with mixed ghost norms (ghost_clipping.py): per-example norms layer
  by layer, then the clipped sum in one pass, with no per-example weight gradient of the model;
  Opacus' DPOptimizerFastGradientClipping adds the noise to that sum.

Two traps this module handles (diffusers 0.42, Opacus 1.6):
- diffusers' attention returns channels_last-strided tensors; Opacus' `hooks` mode unfolds
  conv inputs as if contiguous and silently computes all-zero per-example gradients for the
  convolutions that follow. Every Conv2d gets its input made contiguous first.
- Poisson sampling yields empty batches; they still take an optimizer step (noise only), and
  the accountant still counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import opacus
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.optimizers import (
    DistributedDPOptimizer,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch.func import functional_call, grad_and_value, vmap

from . import ghost_clipping

ACCOUNTANTS = ("rdp", "prv")
MODES = ("hooks", "functorch", "vmap", "mixed_ghost")

RowLoss = Callable[..., torch.Tensor]
"""row_loss(model, *rows) -> per-row loss [rows]; `model` is called like the original module."""


def _contiguous_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def make_conv_inputs_contiguous(model: torch.nn.Module) -> list:
    """Register a forward pre-hook on every Conv2d that makes its input contiguous.

    Opacus' conv grad sampler reads the activation its forward hook captured; with this
    pre-hook that activation is the contiguous tensor. Returns the hook handles.
    """
    return [
        m.register_forward_pre_hook(_contiguous_inputs)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]


MAX_SIGMA = 1e6  # as Opacus' get_noise_multiplier: a budget that needs more noise is too small


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: list[tuple[float, float, int]] | tuple = (),
) -> float:
    """Smallest noise multiplier σ (to 0.01 in ε) whose ε after `prior` plus `steps` steps at
    (σ, q) is ≤ target.

    The bisection of Opacus' `get_noise_multiplier` (same bracket, same tolerance, so the same σ
    without a prior), written out because Opacus' cannot start from a prior history: a run that
    starts from another DP run's weights on the same data composes with it (`prior`).
    """
    prior = [tuple(h) for h in prior]

    def eps(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, sample_rate, steps)], delta, accountant)

    spent = epsilon_of(prior, delta, accountant)  # 0 without a prior
    if spent >= target_epsilon:
        raise ValueError(
            f"the composed prior run already spends ε = {spent:.3f} ≥ the target {target_epsilon:g}"
        )
    low, high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target_epsilon:
        high *= 2
        eps_high = eps(high)
        if high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    for _ in range(200):  # within 0.01 of the target in ~20 halvings; a target no σ reaches stops here
        if target_epsilon - eps_high <= 0.01:
            break
        sigma = (low + high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            high, eps_high = sigma, e
        else:
            low = sigma
    return float(high)


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε of an accountant history [(σ, q, steps), ...] at δ. 0 for an empty history."""
    if not history or sum(h[2] for h in history) == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        # RDP: the bound is valid, only possibly loose, when the best order is the largest.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        # PRV at q = 1 (the warm start's one full-batch query) takes log(0) = -inf on the way; the result is finite.
        warnings.filterwarnings(
            "ignore", message="divide by zero encountered in log", category=RuntimeWarning
        )
        return float(acc.get_epsilon(delta=delta))


def as_parameter_precision(grad_sample: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """Per-example gradients in the parameter's precision (fp32) before clipping. Under bf16
    autocast Opacus' hooks return bf16 per-example gradients and compute their norms in bf16,
    so a clipped norm could exceed C by ~0.04 %; norms, clip factors and sums must be fp32."""
    return grad_sample.to(p.dtype)


@dataclass
class PrivateTraining:
    """What `make_private` hands back: the model to run forward passes through, the DP
    optimizer, the sampler that draws each logical batch, and the accountant that counts
    every step."""

    module: torch.nn.Module  # GradSampleModule (hooks, functorch) or the plain model (vmap, mixed_ghost)
    optimizer: DPOptimizer
    accountant: IAccountant
    sampler: UniformWithReplacementSampler
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    mode: str = "hooks"
    model: torch.nn.Module | None = None  # the unwrapped model
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # trainable, by name
    ghost: dict | None = None  # mixed_ghost: the modules owning the trainable parameters

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.accountant.history, delta, self.accountant.mechanism())

    def empty_step(self) -> None:
        """A step on an empty Poisson batch: zero clipped sum plus noise, counted by the
        accountant like any other step (skipping it would change the sampling mechanism)."""
        for p in self.optimizer.params:
            if self.mode == "mixed_ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()

    def per_example_backward(
        self, row_loss: RowLoss, rows: tuple[torch.Tensor, ...], n_examples: int, k: int
    ) -> float:
        """Set `p.grad_sample` [n_examples, ...] for every trainable parameter: each example's
        gradient of the mean loss over its k consecutive rows; or, in `mixed_ghost` mode, `p.grad`
        to the sum of those gradients each clipped to `max_grad_norm`. Returns the mean row loss."""
        if any(len(r) != n_examples * k for r in rows):
            raise ValueError(f"expected {n_examples}×{k} rows")
        if self.mode == "vmap":
            return self._vmap_backward(row_loss, rows, n_examples, k)
        if self.mode == "mixed_ghost":
            loss, _ = ghost_clipping.clipped_sum(
                self.model, self.ghost, row_loss, rows, n_examples, k, self.max_grad_norm
            )
            return loss
        loss = row_loss(self.module, *rows).mean()
        loss.backward()
        for p in self.params.values():
            p.grad_sample = as_parameter_precision(p.grad_sample, p)
            if k > 1:
                p.grad_sample = p.grad_sample.view(n_examples, k, *p.shape).mean(1)
        return float(loss.detach())

    def _vmap_backward(self, row_loss: RowLoss, rows: tuple[torch.Tensor, ...], n: int, k: int) -> float:
        model = self.model
        fixed = {name: t.detach() for name, t in model.named_parameters() if name not in self.params}
        fixed.update(dict(model.named_buffers()))
        trainable = {name: p.detach() for name, p in self.params.items()}

        def example_loss(params, *example_rows):
            def call(*args, **kwargs):
                return functional_call(model, {**fixed, **params}, args, kwargs)

            return row_loss(call, *example_rows).mean()

        # vmap over examples, each a batch of its k rows: the k rows are averaged inside the
        # example's loss, so memory holds one gradient per example, not one per row.
        shaped = [r.reshape(n, k, *r.shape[1:]) for r in rows]
        in_dims = (None,) + (0,) * len(shaped)
        grads, losses = vmap(grad_and_value(example_loss), in_dims=in_dims)(trainable, *shaped)
        for name, p in self.params.items():
            p.grad_sample = as_parameter_precision(grads[name], p)
        return float(losses.mean())


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    n_train: int,
    expected_batch_size: int,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str,
    sample_generator: torch.Generator,
    noise_generator: torch.Generator,
    mode: str = "hooks",
    world: int = 1,
) -> PrivateTraining:
    """Wrap `model` and `optimizer` for DP-SGD with sampling rate q = expected_batch_size / N.

    Loss convention: the caller averages per-example losses over the batch it got
    (`loss_reduction="mean"`); Opacus undoes that average per example and the optimizer divides
    the clipped, noised sum by the *expected* batch size, as DP-SGD with Poisson sampling needs.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}")
    if mode not in MODES:
        raise ValueError(f"per-example gradient mode must be one of {MODES}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not compatible with DP-SGD: {errors}")
    sample_rate = expected_batch_size / n_train
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if optimized != {id(p) for p in params.values()}:
        raise ValueError("the optimizer must hold exactly the model's trainable parameters")
    ghost = None
    if mode == "vmap":
        # diffusers' default attention (scaled_dot_product_attention) has no vmap rule and
        # falls back to a slow loop; the classic processor computes the same attention.
        for m in model.modules():
            if isinstance(m, Attention):
                m.set_processor(AttnProcessor())
        module = model
    elif mode == "mixed_ghost":
        ghost = ghost_clipping.trainable_modules(model, params)
        module = model
    else:
        make_conv_inputs_contiguous(model)
        module = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", strict=True, force_functorch=mode == "functorch"
        )
        module.forbid_grad_accumulation()  # one backward per physical batch, then fold/clip
    # Distributed (world > 1): each rank sums the clipped gradients of its share of the logical
    # batch; DistributedDPOptimizer adds the noise on rank 0 only, all-reduces, and with the
    # per-rank expected batch B/world and its division by world the result is (Σ + noise)/B,
    # exactly the single-process step.
    if mode == "mixed_ghost" and world > 1:  # not yet tested against the single-process step
        raise ValueError("per_example_gradients: mixed_ghost runs in one process; use vmap with torchrun")
    optimizer_class = DistributedDPOptimizer if world > 1 else DPOptimizer
    if mode == "mixed_ghost":  # p.grad holds the clipped sum; the optimizer adds noise to it
        optimizer_class = DPOptimizerFastGradientClipping
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size / world if world > 1 else expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
    )
    acc = create_accountant(mechanism=accountant)
    dp_optimizer.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=sample_rate))
    sampler = UniformWithReplacementSampler(
        num_samples=n_train, sample_rate=sample_rate, generator=sample_generator, steps=steps
    )
    return PrivateTraining(
        module=module,
        optimizer=dp_optimizer,
        accountant=acc,
        sampler=sampler,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        mode=mode,
        model=model,
        params=params,
        ghost=ghost,
    )


def opacus_version() -> str:
    return opacus.__version__
