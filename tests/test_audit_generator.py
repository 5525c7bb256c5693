"""Audits of the generator as a whole: Meehan et al.'s data-copying test C_T and the loss-based
membership-inference attack."""

from __future__ import annotations

import numpy as np
import pytest

from synthfactory.audit import quantize
from synthfactory.audit.copying import data_copying_test, mann_whitney_z, neighbour_ratios
from synthfactory.audit.membership import loss_attack, tpr_at_fpr
from synthfactory.audit.nearest import knn_distances, nearest_neighbours
from synthfactory.data.phantom import phantom_images
from synthfactory.metrics import roc_points


def _set(seed: int, n: int) -> np.ndarray:
    return np.concatenate([phantom_images("ct", c, n, 16, seed=seed + c) for c in range(3)])


def _c_t(train: np.ndarray, heldout: np.ndarray, synth: np.ndarray) -> dict:
    t8, h8, s8 = (quantize(x[:, None]) for x in (train, heldout, synth))
    f = lambda u: u.astype(np.float32) / 127.5 - 1  # noqa: E731
    _, hd = nearest_neighbours(f(h8), f(t8))
    _, sd = nearest_neighbours(f(s8), f(t8))
    return data_copying_test(t8, h8, hd, s8, sd, n_cells=5, min_per_cell=10, seed=0)


def test_data_copying_test_flags_a_copying_generator_and_passes_a_fresh_one() -> None:
    train, heldout, fresh = _set(0, 150), _set(100, 60), _set(200, 60)
    rng = np.random.default_rng(0)
    copies = np.clip(
        train[rng.choice(len(train), 180, replace=False)] + rng.normal(0, 0.01, (180, 16, 16)), -1, 1
    )
    copying = _c_t(train, heldout, copies)
    honest = _c_t(train, heldout, fresh)
    assert copying["c_t"] < -3 and copying["n_cells_used"] >= 2
    assert abs(honest["c_t"]) < 3
    assert sum(c["n_train"] for c in honest["cells"]) == len(train)


def test_mann_whitney_z_sign_and_scale() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 400), rng.normal(0, 1, 400)
    assert abs(mann_whitney_z(a, b)) < 3
    assert mann_whitney_z(a - 1, b) < -10 and mann_whitney_z(a + 1, b) > 10


def test_neighbour_ratios_single_out_copies() -> None:
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(200, 64))
    q = np.concatenate([refs[:5] + 0.01 * rng.normal(size=(5, 64)), rng.normal(size=(5, 64))])
    r = neighbour_ratios(knn_distances(q, refs, k=20), n_mean=20)
    assert (r["carlini"][:5] < 0.05).all() and (r["carlini"][5:] > 0.7).all()
    assert (r["nn_over_second"][:5] < 0.05).all()


def test_loss_attack_roc_auc_and_low_fpr_tpr() -> None:
    rng = np.random.default_rng(0)
    members = rng.normal(0.5, 0.1, (300, 3))
    nonmembers = rng.normal(1.0, 0.1, (300, 3))
    out = loss_attack(members, nonmembers, [10, 50, 100])
    assert out["auc"] == 1.0 and out["tpr_at_1pct_fpr"] == 1.0
    same = loss_attack(rng.normal(1, 0.1, (2000, 3)), rng.normal(1, 0.1, (2000, 3)), [10, 50, 100])
    assert abs(same["auc"] - 0.5) < 0.05 and same["tpr_at_1pct_fpr"] < 0.05
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.7, 0.1]), np.array([True, False, True, False]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert tpr_at_fpr(np.array([0.9, 0.8, 0.7, 0.1]), np.array([True, False, True, False]), 0.0) == 0.5


@pytest.mark.parametrize("seed", [0])
def test_denoising_losses_are_reproducible(seed: int) -> None:
    import torch
    from diffusers import DDPMScheduler

    from synthfactory.audit.membership import denoising_losses
    from synthfactory.model import build_unet
    from synthfactory.recipe import ModelConfig

    torch.manual_seed(seed)
    model = build_unet(
        ModelConfig(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=4, attention_head_dim=8),
        16,
        2,
    )
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = phantom_images("mri", 1, 6, 16, seed=3)[:, None]
    y = np.ones(6, np.int64)
    a = denoising_losses(model, sched, x, y, [10, 500], seed=4, batch_size=4)
    b = denoising_losses(model, sched, x, y, [10, 500], seed=4, batch_size=4)
    assert a.shape == (6, 2) and np.array_equal(a, b) and (a > 0).all()
