"""The diffusion objective: how a training example becomes K rows (noise levels, noise, label
dropout) and the per-row epsilon-prediction loss. Training (train.py) minimises it; the
membership attack (audit/membership.py) measures it on candidate images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler

from .recipe import TimestepSampling


@dataclass(frozen=True)
class Draws:
    """How each example becomes k training rows: noise levels, noise, label dropout."""

    k: int = 1
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    label_dropout: float = 0.0
    null_class: int | None = None


def sample_timesteps(
    n: int, scheduler: DDPMScheduler, cfg: TimestepSampling, gen: torch.Generator
) -> torch.Tensor:
    """n DDPM timesteps: uniform, or EDM-style log-normal noise levels mapped to the nearest
    timestep (σ_t = √((1−ᾱ_t)/ᾱ_t) increases with t)."""
    steps = scheduler.config.num_train_timesteps
    if cfg.distribution == "uniform":
        return torch.randint(0, steps, (n,), generator=gen)
    log_sigma_t = 0.5 * torch.log((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).double()
    target = cfg.p_mean + cfg.p_std * torch.randn(n, generator=gen, dtype=torch.float64)
    hi = torch.searchsorted(log_sigma_t, target).clamp(1, steps - 1)
    closer_low = (target - log_sigma_t[hi - 1]).abs() <= (log_sigma_t[hi] - target).abs()
    return torch.where(closer_low, hi - 1, hi)


@dataclass
class RowDraws:
    """The random part of a logical batch's rows: timesteps, (dropped) labels and noise for
    each of its n·k rows, drawn once for the whole batch so that how the batch is split into
    physical chunks changes nothing."""

    t: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor

    def rows(self, x0: torch.Tensor, scheduler: DDPMScheduler, a: int, b: int, k: int):
        """(noisy, timesteps, labels, noise) rows of examples a..b."""
        sl = slice(a * k, b * k)
        x = x0[a:b].repeat_interleave(k, 0)
        t, noise = self.t[sl], self.noise[sl]
        return scheduler.add_noise(x, noise, t), t, self.labels[sl], noise


def draw_rows(
    x0: torch.Tensor, labels: torch.Tensor, scheduler: DDPMScheduler, draws: Draws, gen: torch.Generator
) -> RowDraws:
    n = len(x0) * draws.k
    t = sample_timesteps(n, scheduler, draws.timesteps, gen)
    noise = torch.randn((n, *x0.shape[1:]), generator=gen)
    y = labels.repeat_interleave(draws.k, 0)
    if draws.label_dropout > 0:
        drop = torch.rand(n, generator=gen) < draws.label_dropout
        y = torch.where(drop, torch.full_like(y, draws.null_class), y)
    return RowDraws(t=t, labels=y, noise=noise)


def make_row_loss(device: torch.device, bf16: bool) -> Callable[..., torch.Tensor]:
    """Per-row epsilon-prediction loss; the forward pass in bf16 autocast if asked (CUDA or CPU).
    Per-example gradients are cast to fp32 before clipping (privacy.as_parameter_precision)."""

    def row_loss(model, noisy, t, labels, noise) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(noisy, t, class_labels=labels).sample
        return (pred.float() - noise).pow(2).flatten(1).mean(1)

    return row_loss


denoising_loss = make_row_loss(torch.device("cpu"), False)


def diffusion_loss(model, scheduler: DDPMScheduler, x0, labels, timesteps, noise) -> torch.Tensor:
    """Per-example epsilon-prediction loss [B] at given timesteps and noise."""
    return denoising_loss(model, scheduler.add_noise(x0, noise, timesteps), timesteps, labels, noise)
