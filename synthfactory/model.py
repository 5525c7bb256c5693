"""The generator: a class-conditional diffusers UNet2DModel and its DDPM noise schedule.

Built from the recipe's `model` block and nothing else. No privacy code lives here: the model
is a plain diffusers model that `privacy.py` wraps for DP-SGD and that `sample.py` drives with
a DDIM scheduler derived from the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .recipe import LoraSettings, ModelConfig, Recipe


def build_unet(cfg: ModelConfig, image_size: int, num_classes: int) -> UNet2DModel:
    """A UNet with one down/up block per width; attention (if on) at the lowest resolution
    level and in the middle block. Class conditioning through `num_class_embeds`."""
    levels = len(cfg.block_out_channels)
    attn = [cfg.attention and i == levels - 1 for i in range(levels)]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        add_attention=cfg.attention,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=num_classes,
    )


def num_class_embeds(recipe: Recipe, n_classes: int) -> int:
    """Classes, plus one null class when labels are dropped for classifier-free guidance."""
    return n_classes + (1 if recipe.training.label_dropout > 0 else 0)


def null_class(recipe: Recipe, n_classes: int) -> int | None:
    """The label of the null (unconditional) class, if the recipe drops labels."""
    return n_classes if recipe.training.label_dropout > 0 else None


def seeded_unet(recipe: Recipe, image_size: int, n_classes: int) -> UNet2DModel:
    """The recipe's UNet, initialised from `training.seed` (the RNG state outside is untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(recipe.training.seed)
        return build_unet(recipe.model, image_size, num_class_embeds(recipe, n_classes))


def add_lora(model: UNet2DModel, cfg: LoraSettings) -> UNet2DModel:
    """LoRA adapters (peft's `inject_adapter_in_model`, as diffusers' `add_adapter` does for its
    conditional UNets) on the modules `cfg.target_modules` names; only the adapters are then
    trainable, and at the start (B = 0) the model computes what it did before."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in model.named_modules()]
    present = [t for t in cfg.target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(f"training.lora.target_modules: {cfg.target_modules} name no module of this UNet")
    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, target_modules=present, lora_dropout=0.0
    )
    return inject_adapter_in_model(config, model)


def lora_layers(model: torch.nn.Module) -> dict:
    """The modules peft put an adapter on, by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def plain_unet(model: UNet2DModel) -> UNet2DModel:
    """The UNet as diffusers saves and loads it: each adapter's update (alpha/r · B·A, peft's
    `get_delta_weight`) merged into its base weight, the adapters gone. A model without adapters
    is returned as it is."""
    layers = lora_layers(model)
    if not layers:
        return model
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        for name, layer in layers.items():
            for adapter in layer.active_adapters:
                state[f"{name}.base_layer.weight"] += layer.get_delta_weight(adapter)
    plain = UNet2DModel.from_config(model.config)
    plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in state.items()})
    return plain


def weights_sha256(folder: Path) -> str:
    """One hash over a model folder's weights and config (safetensors, config.json): what the
    model is, without synthfactory's records beside it (whose data identities are internal)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and (f.suffix == ".safetensors" or f.name == "config.json"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The training noise schedule; epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM over the same betas as training."""
    return DDIMScheduler.from_config(train_scheduler.config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_unet(folder: Path) -> UNet2DModel:
    """A UNet2DModel saved with save_pretrained, from safetensors only: a checkpoint folder named
    in a recipe is never unpickled (a pickle can run code)."""
    return UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False, use_safetensors=True)


def uses_ema(checkpoint: Path) -> bool:
    """Whether a final checkpoint's pipeline samples with its EMA weights: `use_ema` in its
    model_index.json (set once, by training, from `sampling.use_ema` and whether EMA ran), the
    one record that sampling, the audit and `ClassConditionalPipeline` all follow."""
    index = json.loads((checkpoint / "model_index.json").read_text())
    return bool(index.get("use_ema")) and (checkpoint / "unet_ema").is_dir()


def load_generator(checkpoint: Path, ema: bool | None = None) -> tuple[UNet2DModel, DDPMScheduler]:
    """Model and scheduler from `checkpoints/final`: the weights its pipeline samples with
    (`uses_ema`), or, for tests, the EMA (`ema=True`, if present) or last (`ema=False`) weights."""
    ema = uses_ema(checkpoint) if ema is None else ema
    folder = checkpoint / ("unet_ema" if ema and (checkpoint / "unet_ema").is_dir() else "unet")
    model = load_unet(folder)
    scheduler = DDPMScheduler.from_pretrained(checkpoint / "scheduler")
    return model.eval(), scheduler


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device: cuda asked for, but no CUDA device is available")
    return torch.device(name)
