"""Cost of one DP per-example backward (32 examples, the MRI recipe's UNet at 32 px, one thread) with the
whole UNet trained and with LoRA rank 8 (conv1, conv2, time_emb_proj) + the class embedding, in the
vmap and hooks modes, side by side in one process:

    python benchmarks/lora_step_cost.py
"""

import time

import torch

from synthfactory.model import add_lora, build_noise_scheduler, build_unet
from synthfactory.objective import denoising_loss
from synthfactory.privacy import make_private
from synthfactory.recipe import LoraSettings, load_recipe

torch.set_num_threads(1)
r = load_recipe("recipes/mri_brain_tumor.yaml")
sched = build_noise_scheduler(r.model)


def bench(lora, mode):
    torch.manual_seed(0)
    m = build_unet(r.model, 32, 5)
    if lora:
        m = add_lora(m, LoraSettings(rank=8, target_modules=["conv1", "conv2", "time_emb_proj"]))
        for n, p in m.named_parameters():
            p.requires_grad_(".lora_" in n or n.startswith("class_embedding"))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0)
    pt = make_private(
        m,
        opt,
        n_train=2283,
        expected_batch_size=512,
        steps=10,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        sample_generator=torch.Generator().manual_seed(1),
        noise_generator=torch.Generator().manual_seed(2),
        mode=mode,
    )
    x = torch.rand(32, 1, 32, 32) * 2 - 1
    y = torch.randint(0, 4, (32,))
    t = torch.randint(0, 1000, (32,))
    n = torch.randn_like(x)
    rows = (sched.add_noise(x, n, t), t, y, n)
    pt.per_example_backward(denoising_loss, rows, 32, 1)
    t0 = time.perf_counter()
    for _ in range(3):
        for p in m.parameters():
            p.grad_sample = None
        pt.per_example_backward(denoising_loss, rows, 32, 1)
    return (time.perf_counter() - t0) / 3, sum(p.numel() for p in m.parameters() if p.requires_grad)


for mode in ("vmap", "hooks"):
    for lora in (False, True):
        s, d = bench(lora, mode)
        print(mode, "lora" if lora else "full", f"{s:.2f} s per 32 examples", d, "trained", flush=True)
