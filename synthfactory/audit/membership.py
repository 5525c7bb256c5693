"""Membership inference against the trained diffusion model: a loss-based attack.

Members are training images, non-members held-out real images. For each image the attack
measures the model's denoising (ε-prediction) loss at a few fixed timesteps with fixed noise,
under its true label; a lower loss means "member". Reported: ROC AUC and the true-positive rate
at 1 % false positives (Carlini et al. 2022's low-FPR view), with the per-timestep AUCs. An AUC
near 0.5 and a TPR near 1 % are what a private model should show; DP bounds how far above they
can go (at ε, TPR ≤ e^ε·FPR + δ).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..metrics import auc_one_vs_rest, roc_points
from ..objective import diffusion_loss


@torch.no_grad()
def denoising_losses(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: np.ndarray,
    labels: np.ndarray,
    timesteps: list[int],
    seed: int,
    batch_size: int = 128,
) -> np.ndarray:
    """Loss [N, len(timesteps)] of every image at every timestep; noise fixed by (seed, image)."""
    model.eval()
    out = np.empty((len(images), len(timesteps)), dtype=np.float64)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for a in range(0, len(images), batch_size):
        x, y = x_all[a : a + batch_size], y_all[a : a + batch_size]
        gen = torch.Generator().manual_seed(seed + a)
        for j, t in enumerate(timesteps):
            noise = torch.randn(x.shape, generator=gen)
            tt = torch.full((len(x),), t, dtype=torch.long)
            out[a : a + len(x), j] = diffusion_loss(model, scheduler, x, y, tt, noise).double().numpy()
    return out


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, fpr: float) -> float:
    """Largest true-positive rate over thresholds whose false-positive rate is at most `fpr`."""
    fprs, tprs = roc_points(scores, is_member)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def loss_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, timesteps: list[int]) -> dict:
    scores = -np.concatenate([member_losses, nonmember_losses])  # high score: "member"
    is_member = np.r_[np.ones(len(member_losses), bool), np.zeros(len(nonmember_losses), bool)]
    combined = scores.mean(1)
    fprs, tprs = roc_points(combined, is_member)
    keep = np.unique(np.linspace(0, len(fprs) - 1, min(len(fprs), 101)).astype(int))
    return {
        "attack": "loss threshold: mean ε-prediction loss over the timesteps, fixed noise, true label",
        "timesteps": timesteps,
        "n_members": int(len(member_losses)),
        "n_nonmembers": int(len(nonmember_losses)),
        "auc": auc_one_vs_rest(combined, is_member),
        "tpr_at_1pct_fpr": tpr_at_fpr(combined, is_member, 0.01),
        "tpr_at_10pct_fpr": tpr_at_fpr(combined, is_member, 0.10),
        "auc_per_timestep": {
            str(t): auc_one_vs_rest(scores[:, j], is_member) for j, t in enumerate(timesteps)
        },
        "roc": {"fpr": fprs[keep].tolist(), "tpr": tprs[keep].tolist()},
    }
