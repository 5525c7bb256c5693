"""`per_example_gradients: mixed_ghost` forms the same clipped sum as the `vmap` path (torch.func
per-example gradients, clipped by Opacus' formula, summed) on every UNet a shipped recipe builds,
with attention, with LoRA adapters (peft) and with the class embedding alone trainable, for K = 1
and K = 3 rows per example, in fp32 and bf16; and it refuses what it cannot clip."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import REPO

from synthfactory.ghost_clipping import trainable_modules
from synthfactory.model import add_lora, build_noise_scheduler, build_unet
from synthfactory.objective import Draws, draw_rows, make_row_loss
from synthfactory.privacy import make_private
from synthfactory.recipe import LoraSettings, ModelConfig, load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ATTENTION = ModelConfig(
    block_out_channels=[16, 32], layers_per_block=1, attention=True, norm_num_groups=4, attention_head_dim=8
)
N = 5


def private_for(model, mode: str, clip: float = 1.0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return make_private(
        model, opt, n_train=100, expected_batch_size=4, steps=10, noise_multiplier=0.0,
        max_grad_norm=clip, accountant="rdp", sample_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2), mode=mode,
    )  # fmt: skip


def rows_for(model_cfg: ModelConfig, size: int, n_classes: int, k: int):
    """K rows per example through training's own draws, label dropout to the null class included."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((N, 1, size, size), generator=g) * 2 - 1
    y = torch.randint(0, n_classes, (N,), generator=g)
    scheduler = build_noise_scheduler(model_cfg)
    draws = Draws(k=k, null_class=n_classes, label_dropout=0.3)
    return draw_rows(x0, y, scheduler, draws, torch.Generator().manual_seed(5)).rows(x0, scheduler, 0, N, k)


def both_sums(model, rows, k: int, bf16: bool):
    """(mixed_ghost's p.grad, the vmap reference's clipped sum, the reference's per-example norms),
    with C a fifth of the smallest norm: every example is clipped, so the factors matter."""
    row_loss = make_row_loss(torch.device("cpu"), bf16)
    ref_model = copy.deepcopy(model)
    ref = private_for(ref_model, "vmap")
    ref.per_example_backward(row_loss, rows, N, k)
    names = list(ref.params)
    norms = torch.stack([ref.params[n].grad_sample.flatten(1).norm(dim=1) for n in names], 1).norm(dim=1)
    clip = 0.2 * float(norms.min())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 0.25).all()
    want = {n: torch.einsum("i,i...->...", factors, ref.params[n].grad_sample) for n in names}
    ghost = private_for(model, "mixed_ghost", clip)
    ghost.per_example_backward(row_loss, rows, N, k)
    got = {n: ghost.params[n].grad for n in names}
    return got, want


def assert_same_sum(got, want, rtol: float) -> None:
    err = sum((got[n] - want[n]).pow(2).sum() for n in want).sqrt()
    total = sum(w.pow(2).sum() for w in want.values()).sqrt()
    assert err <= rtol * total, f"relative error {float(err / total):.3g}"
    big = [n for n in want if want[n].norm() > 1e-3 * total]
    assert len(big) > 0.5 * len(want)  # most parameters carry gradient: the comparison bites
    for n in big:
        assert (got[n] - want[n]).norm() <= 20 * rtol * want[n].norm(), n


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_mixed_ghost_equals_the_vmap_clipped_sum_on_shipped_unets(recipe_path: Path, k: int) -> None:
    recipe = load_recipe(recipe_path)
    n_classes, size = len(recipe.data.classes), min(recipe.data.image_size, 32)
    torch.manual_seed(0)
    model = build_unet(recipe.model, size, n_classes + 1)
    got, want = both_sums(model, rows_for(recipe.model, size, n_classes, k), k, bf16=False)
    assert_same_sum(got, want, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["attention", "lora", "class_embedding"])
def test_mixed_ghost_equals_vmap_with_attention_lora_and_partial_training(
    variant: str, precision: str
) -> None:
    torch.manual_seed(0)
    model = build_unet(ATTENTION, 16, 4)
    if variant == "lora":
        model = add_lora(model, LoraSettings(rank=4))
        for name, p in model.named_parameters():
            if ".lora_B" in name:  # B = 0 at the start would leave every A without gradient
                torch.nn.init.normal_(p, std=0.05)
    elif variant == "class_embedding":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("class_embedding"))
    got, want = both_sums(model, rows_for(ATTENTION, 16, 3, 2), 2, bf16=precision == "bf16")
    # bf16: both paths run the forward pass in bf16 autocast, and their gradients differ by bf16
    # rounding; the norms, factors and sums are fp32 in both.
    assert_same_sum(got, want, rtol=1e-5 if precision == "fp32" else 2e-2)


def test_mixed_ghost_refuses_a_layer_it_cannot_clip() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, groups=2), torch.nn.Linear(4, 4))
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="cannot clip the trainable parameters of 0"):
        trainable_modules(model, params)
    norm = torch.nn.Sequential(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"cannot clip the trainable parameters of 0 \(LayerNorm\)"):
        trainable_modules(norm, dict(norm.named_parameters()))


def test_mixed_ghost_refuses_several_ranks_until_tested_there() -> None:
    model = build_unet(ATTENTION, 16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="mixed_ghost runs in one process"):
        make_private(
            model, opt, n_train=100, expected_batch_size=4, steps=1, noise_multiplier=1.0,
            max_grad_norm=1.0, accountant="rdp", sample_generator=torch.Generator(),
            noise_generator=torch.Generator(), mode="mixed_ghost", world=2,
        )  # fmt: skip
