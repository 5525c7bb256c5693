"""Train the class-conditional diffusion model, with DP-SGD unless the recipe opts out.

An ordinary PyTorch loop: draw a Poisson batch, compute the per-example denoising loss, back-
propagate, step. Privacy (per-example clipping, noise, accounting) comes from `privacy.py`.
The loop checkpoints atomically every `training.checkpoint_every` steps; a run that was killed
resumes from the last checkpoint with the accountant's history, so ε is never under-reported.

Randomness: model initialisation and the diffusion noise use `training.seed`. The DP noise and
the Poisson sampling use a secret seed from the OS (kept in the internal checkpoint so a resume
continues the same streams) unless `privacy.noise_seed` is set, which is for tests only: anyone
who knows that seed knows the noise.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from . import __version__
from .data import ImageSet
from .model import build_noise_scheduler, build_unet, count_parameters
from .privacy import PrivateTraining, calibrate_noise, epsilon_of, make_private, opacus_version
from .progress import progress_bar
from .recipe import Recipe
from .rundir import RunDir, atomic_path, write_json_atomic

log = logging.getLogger(__name__)


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-example epsilon-prediction loss [B]: mean squared error over each example's pixels."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    pred = model(noisy, timesteps, class_labels=labels).sample
    return (pred - noise).pow(2).flatten(1).mean(1)


def draw_diffusion_noise(
    x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform DDPM timesteps and Gaussian noise for a batch."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator)
    return t, torch.randn(x0.shape, generator=generator)


def dp_step(
    private: PrivateTraining,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> float:
    """One DP-SGD step on one Poisson batch (possibly empty). Returns the batch's mean loss."""
    private.optimizer.zero_grad(set_to_none=True)
    if x0.shape[0] == 0:
        private.empty_step()
        return float("nan")
    t, noise = draw_diffusion_noise(x0, scheduler.config.num_train_timesteps, generator)
    loss = diffusion_loss(private.module, scheduler, x0, labels, t, noise).mean()
    loss.backward()
    private.optimizer.step()
    return float(loss.detach())


@dataclass
class TrainResult:
    steps: int
    epsilon: float | None
    checkpoint: Path
    privacy: dict
    seconds: float


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63))


def _planned(recipe: Recipe, n_train: int) -> dict:
    """σ, q and steps the run will use; σ calibrated so ε(steps) ≤ target."""
    steps = recipe.training.total_steps(n_train)
    q = recipe.training.expected_batch_size / n_train
    plan = {"steps": steps, "sample_rate": q, "noise_multiplier": None}
    if recipe.private:
        plan["noise_multiplier"] = calibrate_noise(
            recipe.privacy.target_epsilon, recipe.privacy.delta, q, steps, recipe.privacy.accountant
        )
    return plan


def plan_training(recipe: Recipe, n_train: int) -> dict:
    """What training would do (for `validate`): steps, q, σ and the ε both accountants give."""
    plan = _planned(recipe, n_train)
    if recipe.private:
        history = [(plan["noise_multiplier"], plan["sample_rate"], plan["steps"])]
        plan["epsilon"] = {a: epsilon_of(history, recipe.privacy.delta, a) for a in ("rdp", "prv")}
    return plan


def privacy_record(
    recipe: Recipe, images: ImageSet, plan: dict, history: list, steps_taken: int, dp_seed_source: str
) -> dict:
    """The privacy ledger written to privacy.json and carried into every report."""
    rec = {
        "private": recipe.private,
        "mechanism": (
            f"DP-SGD (Opacus {opacus_version()}): per-example clipping, Gaussian noise, Poisson sampling"
            if recipe.private
            else "NOT PRIVATE: plain SGD (Adam), no clipping or noise"
        ),
        "n_train": int(len(images.train_labels)),
        "expected_batch_size": recipe.training.expected_batch_size,
        "sample_rate": plan["sample_rate"],
        "steps_planned": plan["steps"],
        "steps_taken": steps_taken,
        "data_manifest_sha256": images.manifest_sha256(),
        "recipe_sha256": recipe.sha256(),
        "preprocessing": images.preprocessing,
        "public_inputs": ["model architecture and hyper-parameters from the recipe (no data)"],
        "not_covered_by_epsilon": [
            "the memorization audit reads the private training images after training; which "
            "samples it drops (and their nearest-neighbour distances) depend on them beyond ε",
            "floating-point and timing side channels of the sampler and noise (Opacus "
            "secure_mode is not used)",
        ],
    }
    if recipe.private:
        delta = recipe.privacy.delta
        acc = recipe.privacy.accountant
        other = "prv" if acc == "rdp" else "rdp"
        rec.update(
            {
                "accountant": acc,
                "target_epsilon": recipe.privacy.target_epsilon,
                "delta": delta,
                "epsilon": epsilon_of(history, delta, acc),
                "epsilon_other_accountant": {other: epsilon_of(history, delta, other)},
                "noise_multiplier": plan["noise_multiplier"],
                "max_grad_norm": recipe.privacy.max_grad_norm,
                "accountant_history": [list(h) for h in history],
                "dp_randomness": dp_seed_source,
            }
        )
    else:
        rec.update({"epsilon": None, "delta": None, "warning": "NOT PRIVATE: no differential privacy"})
    return rec


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps the checkpoint holds; later ones were rolled back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


def _save_state(path: Path, state: dict) -> None:
    tmp = atomic_path(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(recipe: Recipe, images: ImageSet, run_dir: RunDir, progress: bool = True) -> TrainResult:
    """Train (or resume training) and write checkpoints/final and privacy.json."""
    n_train = len(images.train_labels)
    plan = _planned(recipe, n_train)
    steps_total = plan["steps"]
    x_all = torch.from_numpy(images.train_images)
    y_all = torch.from_numpy(images.train_labels)

    with torch.random.fork_rng():
        torch.manual_seed(recipe.training.seed)
        model = build_unet(recipe.model, images.image_size, len(images.class_names))
    scheduler = build_noise_scheduler(recipe.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.training.learning_rate)

    state = None
    if run_dir.train_state.exists():
        state = torch.load(run_dir.train_state, weights_only=True)
        if state["recipe_sha256"] != recipe.sha256() or state["manifest_sha256"] != images.manifest_sha256():
            raise RuntimeError(
                f"{run_dir.train_state} belongs to another recipe or data set; "
                "start a new run instead of resuming this one"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        log.info("resuming training at step %d of %d", state["step"], steps_total)

    step = state["step"] if state else 0
    train_gen = _generator(recipe.training.seed + 1)
    if state:
        train_gen.set_state(state["train_rng"])
    if recipe.privacy.noise_seed is not None:
        dp_seed, dp_seed_source = (
            recipe.privacy.noise_seed,
            "seeded from the recipe (testing only: the noise is known)",
        )
    else:
        dp_seed, dp_seed_source = (
            secrets.randbits(62),
            "secret seed from the OS, kept in the internal checkpoint",
        )
    if state:
        dp_seed, dp_seed_source = state["dp_seed"], state["dp_seed_source"]
    sample_gen, noise_gen = _generator(dp_seed), _generator(dp_seed + 1)
    if state:
        sample_gen.set_state(state["sample_rng"])
        noise_gen.set_state(state["noise_rng"])

    private: PrivateTraining | None = None
    history: list = list(state["accountant_history"]) if state else []
    if recipe.private:
        private = make_private(
            model,
            optimizer,
            n_train=n_train,
            expected_batch_size=recipe.training.expected_batch_size,
            steps=steps_total - step,
            noise_multiplier=plan["noise_multiplier"],
            max_grad_norm=recipe.privacy.max_grad_norm,
            accountant=recipe.privacy.accountant,
            sample_generator=sample_gen,
            noise_generator=noise_gen,
        )
        private.accountant.history = [tuple(h) for h in history]
        batches = iter(private.sampler)
    model.train()

    def checkpoint() -> None:
        _save_state(
            run_dir.train_state,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "accountant_history": [tuple(h) for h in (private.accountant.history if private else [])],
                "train_rng": train_gen.get_state(),
                "sample_rng": sample_gen.get_state(),
                "noise_rng": noise_gen.get_state(),
                "dp_seed": dp_seed,
                "dp_seed_source": dp_seed_source,
                "recipe_sha256": recipe.sha256(),
                "manifest_sha256": images.manifest_sha256(),
                "synthfactory_version": __version__,
                "seconds": time.perf_counter() - started + previous_seconds,
            },
        )

    log.info(
        "training %s parameters for %d steps, q=%.4g, sigma=%s",
        count_parameters(model),
        steps_total,
        plan["sample_rate"],
        plan["noise_multiplier"],
    )
    started = time.perf_counter()
    previous_seconds = state.get("seconds", 0.0) if state else 0.0
    _truncate_log(run_dir.train_log, step)
    with (
        open(run_dir.train_log, "a") as logfile,
        progress_bar(steps_total, "train", "step", progress, initial=step) as bar,
    ):
        while step < steps_total:
            if private is not None:
                idx = torch.as_tensor(next(batches), dtype=torch.long)
                loss = dp_step(private, scheduler, x_all[idx], y_all[idx], train_gen)
            else:
                idx = torch.randperm(n_train, generator=train_gen)[: recipe.training.expected_batch_size]
                optimizer.zero_grad(set_to_none=True)
                t, noise = draw_diffusion_noise(x_all[idx], scheduler.config.num_train_timesteps, train_gen)
                loss_t = diffusion_loss(model, scheduler, x_all[idx], y_all[idx], t, noise).mean()
                loss_t.backward()
                optimizer.step()
                loss = float(loss_t.detach())
            step += 1
            logfile.write(json.dumps({"step": step, "batch": int(len(idx)), "loss": loss}) + "\n")
            bar.update(1)
            bar.set_postfix(batch=len(idx), loss=f"{loss:.4f}")
            if step % recipe.training.checkpoint_every == 0 or step == steps_total:
                logfile.flush()
                checkpoint()
    seconds = time.perf_counter() - started + previous_seconds

    history = [tuple(h) for h in private.accountant.history] if private else []
    record = privacy_record(recipe, images, plan, history, step, dp_seed_source)
    record["train_seconds"] = round(seconds, 1)
    record["parameters"] = count_parameters(model)
    if recipe.private and record["epsilon"] > recipe.privacy.target_epsilon + 1e-9:
        raise RuntimeError(f"accountant ε {record['epsilon']:.4f} exceeds the target; refusing to go on")

    final = run_dir.final_checkpoint
    tmp_final = atomic_path(final)
    model.eval()
    model.save_pretrained(tmp_final / "unet")
    scheduler.save_pretrained(tmp_final / "scheduler")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_final, final)
    write_json_atomic(run_dir.privacy, record)
    return TrainResult(
        steps=step, epsilon=record["epsilon"], checkpoint=final, privacy=record, seconds=seconds
    )
