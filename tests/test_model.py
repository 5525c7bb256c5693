"""The generator each recipe builds: a class-conditional diffusers UNet whose output depends on
the class label (GroupNorm keeps the conditioning), and the recipe guard against the trap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO
from diffusers import UNet2DModel

from synthfactory.model import build_noise_scheduler, build_unet, sampling_scheduler
from synthfactory.recipe import ModelConfig, load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def class_effect(model: UNet2DModel, size: int) -> float:
    """Relative change of the output when only the class label changes."""
    torch.manual_seed(1)
    x = torch.randn(2, 1, size, size)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        a = model(x, t, class_labels=torch.tensor([0, 0])).sample
        b = model(x, t, class_labels=torch.tensor([1, 1])).sample
    return float((a - b).abs().mean() / a.abs().mean())


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_recipe_model_is_class_conditional(recipe_path: Path) -> None:
    r = load_recipe(recipe_path)
    torch.manual_seed(0)
    model = build_unet(r.model, r.data.image_size, len(r.data.classes))
    assert model.config.num_class_embeds == len(r.data.classes)
    assert model.config.in_channels == model.config.out_channels == 1
    assert class_effect(model, r.data.image_size) > 1e-3


def test_groupnorm_with_one_channel_per_group_erases_conditioning() -> None:
    """Why the recipe forbids norm_num_groups == width: the class then changes nothing."""
    torch.manual_seed(0)
    bad = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        num_class_embeds=2,
        add_attention=False,
    )
    assert class_effect(bad, 16) < 1e-5
    good = build_unet(ModelConfig(block_out_channels=[16, 16], attention=False, norm_num_groups=4), 16, 2)
    assert class_effect(good, 16) > 1e-3


def test_attention_placement() -> None:
    m = build_unet(ModelConfig(block_out_channels=[16, 32, 32], attention=True, norm_num_groups=4), 32, 3)
    assert m.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert m.config.up_block_types == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    off = build_unet(ModelConfig(block_out_channels=[16, 32], attention=False, norm_num_groups=4), 32, 3)
    assert "Attn" not in "".join(off.config.down_block_types) and not off.config.add_attention


def test_ddim_uses_the_training_betas() -> None:
    cfg = ModelConfig(beta_schedule="linear", num_train_timesteps=500)
    train = build_noise_scheduler(cfg)
    ddim = sampling_scheduler(train)
    assert torch.equal(train.betas, ddim.betas) and ddim.config.num_train_timesteps == 500
