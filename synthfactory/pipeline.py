"""The DP generator as a diffusers pipeline: `ClassConditionalPipeline`.

`checkpoints/final/` of a run is a pipeline folder (model_index.json beside unet/, unet_ema/ and
scheduler/), so the released model loads without synthfactory's run directory:

    from synthfactory.pipeline import ClassConditionalPipeline
    pipe = ClassConditionalPipeline.from_pretrained("runs/<run id>/checkpoints/final")
    images = pipe([0, 1, 2], num_inference_steps=50).images          # float [3, H, W, 1] in [0, 1]

With one generator per image, seeded as `synthfactory sample` seeds its images, it draws the very
same images (`output_type="uint8"` rounds exactly as the sample store does). The weights are
covered by the run's (ε, δ); which images the audit then dropped is not.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


@torch.no_grad()
def ddim_denoise(
    unet: UNet2DModel,
    scheduler: DDIMScheduler,
    x: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from the noise `x` [B, 1, H, W]; [-1, 1] on the CPU. With
    classifier-free guidance (scale w ≠ 1 and a null class): ε = ε_∅ + w·(ε_y − ε_∅)."""
    device = next(unet.parameters()).device
    x, labels = x.to(device), labels.to(device)
    guided = guidance_scale != 1.0
    if guided and null_class is None:
        raise ValueError("guidance needs a model trained with label dropout (a null class)")
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if guided:
            null = torch.full_like(labels, null_class)
            cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        else:
            eps = unet(x, t, class_labels=labels).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, 1, H, W] → uint8 [B, H, W] (the sample store's rounding)."""
    x = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x[:, 0].numpy()


class ClassConditionalPipeline(DiffusionPipeline):
    """A class-conditional UNet2DModel (its EMA weights when `use_ema`) sampled with DDIM over
    the training noise schedule (`scheduler`, a DDPMScheduler)."""

    model_cpu_offload_seq = "unet"
    _optional_components = ["unet_ema"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        unet_ema: UNet2DModel | None = None,
        use_ema: bool = True,
        null_class: int | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, unet_ema=unet_ema)
        self.register_to_config(use_ema=use_ema, null_class=null_class)

    @property
    def generator_unet(self) -> UNet2DModel:
        """The weights it samples with: the EMA weights if asked for and present."""
        return self.unet_ema if self.config.use_ema and self.unet_ema is not None else self.unet

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Images of the given classes. `generator`: one per image reproduces `synthfactory
        sample` (its image i starts from `torch.Generator().manual_seed(seed_i)`). `output_type`:
        "np" (float [B, H, W, 1] in [0, 1]), "pil" (8-bit grayscale), "pt" (float [B, 1, H, W] in
        [0, 1]) or "uint8" ([B, H, W], rounded as the sample store rounds)."""
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        unet = self.generator_unet
        size = int(unet.config.sample_size)
        gens = generator if isinstance(generator, list) else [generator] * len(labels)
        if len(gens) != len(labels):
            raise ValueError(f"{len(gens)} generators for {len(labels)} images")
        noise = torch.stack([randn_tensor((1, size, size), generator=g, dtype=torch.float32) for g in gens])
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        x = ddim_denoise(
            unet, ddim, noise, labels, num_inference_steps, guidance_scale, self.config.null_class
        )
        if output_type == "uint8":
            images = to_uint8(x)
        elif output_type == "pt":
            images = (x + 1.0) / 2.0
        elif output_type in ("np", "pil"):
            images = ((x + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = [Image.fromarray(u) for u in to_uint8(x)]
        else:
            raise ValueError(f"output_type: 'np', 'pil', 'pt' or 'uint8', not {output_type!r}")
        return ImagePipelineOutput(images=images) if return_dict else (images,)
