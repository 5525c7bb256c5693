"""LoRA adapters (peft) in the DP stage: per-example gradients of the adapters equal a torch.func
reference in every mode, the final checkpoint is a plain UNet2DModel that computes what the
adapted model did, and only the adapters (and `training.trainable`) move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from test_privacy import TINY, batch_for, draw_diffusion_noise, private_for, reference_per_example_grads
from test_train import PUBLIC_PHANTOMS, _fresh_run

from synthfactory.model import (
    add_lora,
    build_noise_scheduler,
    build_unet,
    load_generator,
    load_unet,
    plain_unet,
)
from synthfactory.objective import denoising_loss
from synthfactory.recipe import LoraSettings, RecipeError
from synthfactory.run import StageOptions, check, run_stage
from synthfactory.rundir import read_json


def adapted_unet(rank: int = 2, alpha: float | None = None, seed: int = 0):
    """TINY (attention on) with adapters whose B is not zero, so every adapter has a gradient."""
    torch.manual_seed(seed)
    model = add_lora(build_unet(TINY, 16, 3), LoraSettings(rank=rank, alpha=alpha))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("mode", ["hooks", "functorch", "vmap"])
def test_per_example_gradients_of_the_adapters_match_torch_func(mode: str) -> None:
    model = adapted_unet()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    assert any("to_q" in n for n in trained) and any("conv1" in n for n in trained)
    scheduler = build_noise_scheduler(TINY)
    x0, y = batch_for(16, 3, 3)
    t, noise = draw_diffusion_noise(x0, 1000, torch.Generator().manual_seed(3))
    ref = reference_per_example_grads(model, scheduler, x0, y, t, noise)

    private = private_for(model, mode=mode)
    private.per_example_backward(denoising_loss, (scheduler.add_noise(x0, noise, t), t, y, noise), 3, 1)
    for name, p in model.named_parameters():
        if name not in trained:
            assert getattr(p, "grad_sample", None) is None, name
            continue
        scale = ref[name].abs().max().item()
        assert scale > 1e-6, name
        assert (p.grad_sample - ref[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_the_merged_unet_computes_what_the_adapted_one_does() -> None:
    model = adapted_unet(rank=2, alpha=6.0).eval()  # scale alpha/r = 3: a dropped scale shows
    plain = plain_unet(model).eval()
    assert type(plain).__name__ == "UNet2DModel"
    assert set(plain.state_dict()) == set(build_unet(TINY, 16, 3).state_dict())
    x, y = batch_for(16, 3, 4)
    t = torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        a = model(x, t, class_labels=y).sample
        b = plain(x, t, class_labels=y).sample
        torch.manual_seed(0)
        base = build_unet(TINY, 16, 3).eval()  # adapted_unet's base weights
        c = base(x, t, class_labels=y).sample
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert (a - c).abs().max() > 1e-2 * a.abs().max()  # the adapters did change the function


def test_dp_fine_tuning_with_lora_moves_only_adapted_weights_and_counts_them(tmp_path: Path) -> None:
    checked, run_dir = _fresh_run(
        tmp_path,
        "lora",
        pretrain={"data": PUBLIC_PHANTOMS, "steps": 3, "expected_batch_size": 8},
        training__steps=3,
        training__learning_rate=0.01,
        training__lora={"rank": 2, "target_modules": ["conv1", "to_q", "to_v"]},
        training__trainable=["class_embedding.*"],
    )
    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    pre = load_unet(run_dir.pretrained / "unet")
    run_stage("train", checked, run_dir, StageOptions(progress=False))
    fine, _ = load_generator(run_dir.final_checkpoint, ema=False)
    assert type(fine).__name__ == "UNet2DModel"
    changed = {
        n
        for (n, p), q in zip(pre.named_parameters(), fine.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    allowed = ("conv1.weight", "to_q.weight", "to_v.weight", "class_embedding.weight")
    assert changed and all(n.endswith(allowed) for n in changed), changed - {
        n for n in changed if n.endswith(allowed)
    }
    assert any(n.endswith("conv1.weight") for n in changed) and "class_embedding.weight" in changed
    trained = read_json(run_dir.privacy)["private_inputs"]["trained_parameters"]
    adapters = add_lora(load_unet(run_dir.pretrained / "unet"), checked.recipe.training.lora)
    n_lora = sum(p.numel() for n, p in adapters.named_parameters() if ".lora_" in n)
    assert trained["parameters"] == n_lora + pre.class_embedding.weight.numel()
    assert trained["of"] == sum(p.numel() for p in pre.parameters())
    assert trained["lora"]["rank"] == 2 and trained["lora"]["merged_into_final_weights"]


def test_lora_recipes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="with training.lora, list the parameters"):
        check(write_recipe(tmp_path / "a", tiny_recipe(warm_start={}, training__lora={"rank": 2})))
    with pytest.raises(RecipeError, match="training.lora: adapters on a randomly initialised UNet"):
        check(write_recipe(tmp_path / "b", tiny_recipe(training__lora={"rank": 2}, training__trainable=[])))
