"""The private stage: train the class-conditional diffusion model with DP-SGD (unless the recipe
opts out), from the pre-trained weights of this run when it has a pre-training stage.

An ordinary PyTorch loop around one step (steps.py): draw a Poisson batch, per-example gradients
over K rows, clip, add noise, step, update the EMA. Privacy (folding, clipping, noise,
accounting) comes from privacy.py; what composes into ε comes from the run's ledger (ledger.py).

Order, as a reviewer checks it:
1. the run's ledger: its data identity, and every mechanism before DP-SGD (the warm start's
   query, the ledgers a checkpoint or a release brought in); the pre-trained weights must carry a
   ledger that the run's ledger covers, else training is refused;
2. σ calibrated so that ε(everything that composes + DP-SGD's steps) ≤ target (`training_schedule`);
3. the loop; every `training.checkpoint_every` steps the ledger records DP-SGD's steps so far
   (fsync'd), *then* the resumable state is written atomically (model, EMA, optimizer, RNG
   states, the accountant's own history); a killed run resumes from its last checkpoint,
   replaying the rolled-back steps with the same batches and noise, so ε is never under-reported;
4. the end: the ledger's last entry, privacy.json read out of the ledger (privacy_record.py),
   the final checkpoint with the ledger beside each model folder; then the resumable state is
   deleted.

Randomness: model initialisation, noise levels and diffusion noise use `training.seed`. The DP
noise and the Poisson sampling use a secret seed from the OS, kept in the resumable state
(checkpoints/train_state.pt) only while training runs: the state is deleted once the final
checkpoint and privacy.json are written, and a finished run is never trained again (that would
spend ε twice). `privacy.noise_seed` seeds them instead, for tests: such a run is NOT PRIVATE.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from . import __version__
from .data import ImageSet
from .distributed import (
    Dist,
    any_over_ranks,
    barrier,
    broadcast_int,
    broadcast_object,
    broadcast_parameters,
    from_env,
    max_parameter_spread,
)
from .ledger import (
    Ledger,
    LedgerRefused,
    Mechanism,
    RunLedger,
    mark_weights,
    new_id,
    require_covered,
    write_artifact,
)
from .model import (
    add_lora,
    build_noise_scheduler,
    count_parameters,
    load_unet,
    lora_layers,
    null_class,
    plain_unet,
    resolve_device,
    seeded_unet,
)
from .pipeline import ClassConditionalPipeline
from .privacy import PrivateTraining, calibrate_noise, epsilon_of, make_private
from .privacy_record import data_description, privacy_record
from .progress import progress_bar
from .recipe import Recipe
from .records import PrivacyRecord
from .rundir import RunDir, atomic_directory, read_json, write_json_atomic
from .steps import StepSettings, dp_step, generator, plain_step, save_state, step_settings

log = logging.getLogger(__name__)

__all__ = ["Schedule", "TrainResult", "dp_step", "train", "training_finished", "training_schedule"]


# --- the schedule: steps, q and σ ------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """What DP-SGD will do: its steps, q and σ, with σ calibrated so that ε of `prior` (the
    accountant history of everything the ledger composes before DP-SGD) and DP-SGD's steps is at
    most the target."""

    steps: int
    sample_rate: float
    noise_multiplier: float | None
    prior: tuple[tuple[float, float, int], ...] = ()

    def history(self) -> list[tuple[float, float, int]]:
        """The composed accountant history at the end of the planned steps."""
        return [*self.prior, (self.noise_multiplier, self.sample_rate, self.steps)]

    def epsilon(self, delta: float) -> dict[str, float]:
        """ε both accountants give for the planned steps, composed with the prior."""
        return {a: epsilon_of(self.history(), delta, a) for a in ("rdp", "prv")}


def training_schedule(recipe: Recipe, n_train: int, prior: list | tuple = ()) -> Schedule:
    """DP-SGD's steps, q and σ for `n_train` images after `prior` (ValueError when no σ reaches
    the target)."""
    steps = recipe.training.total_steps(n_train)
    q = recipe.training.expected_batch_size / n_train
    prior = tuple(tuple(h) for h in prior)
    sigma = None
    if recipe.dp_sgd:
        sigma = calibrate_noise(
            recipe.privacy.target_epsilon, recipe.privacy.delta, q, steps, recipe.privacy.accountant,
            prior=prior,
        )  # fmt: skip
    return Schedule(steps, q, sigma, prior)


def trainable_names(model: torch.nn.Module, patterns) -> list[str]:
    """Parameter names the private stage trains: all, or those matching any glob pattern."""
    names = [n for n, _ in model.named_parameters()]
    if patterns == "all":
        return names
    if not patterns:  # adapters alone (training.lora)
        return []
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        raise ValueError(f"patterns {missing} match no parameter (names look like {names[:3]})")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


# --- the ledger before DP-SGD ----------------------------------------------------------------------


def has_pretraining(recipe: Recipe) -> bool:
    return recipe.pretrain is not None or recipe.warm_start is not None


def ledger_before_training(recipe: Recipe, images: ImageSet, run_dir: RunDir) -> Ledger:
    """The run's ledger as DP-SGD starts (or resumes): its own data recorded, and the pre-trained
    weights it starts from covered by it. Raises LedgerRefused."""
    run_ledger = RunLedger(run_dir.ledger)
    run_ledger.own_data(images.item_ids(), data_description(recipe, images))
    ledger = run_ledger.read()
    if has_pretraining(recipe):
        if not (run_dir.pretrained / "unet").is_dir() or not (run_dir.pretrained / "pretrain.json").is_file():
            raise LedgerRefused(
                f"{run_dir.root}: the pretrain stage has not finished (no checkpoints/pretrained); run "
                "`synthfactory pretrain` or `synthfactory resume` first"
            )
        require_covered(run_dir.pretrained / "unet", ledger, "the pre-trained weights")
    own = ledger.training()
    if own is not None and not run_dir.train_state.exists():
        raise LedgerRefused(
            f"{run_dir.root}: the ledger records {own.steps} training steps of this run, but their "
            "resumable state (checkpoints/train_state.pt) is gone (training finished, or was cut): those "
            "steps cannot be replayed with the same noise, and training again would spend ε twice; "
            "start a new run"
        )
    return ledger


# --- checkpoints -----------------------------------------------------------------------------------


def restore_ema(ema: EMAModel, saved: dict, device: torch.device) -> None:
    """The EMA shadow weights from a checkpoint (read onto the CPU), moved to the model's device."""
    ema.load_state_dict(saved)
    ema.to(device=device)


def log_line(step: int, batch: int, loss: float) -> str:
    """One train_log.jsonl line; an empty Poisson batch has no loss (null, as JSON has no NaN)."""
    return json.dumps({"step": step, "batch": batch, "loss": loss if batch else None}, allow_nan=False)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps the checkpoint holds; later ones were rolled back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


def save_final(
    model: UNet2DModel,
    ema: EMAModel | None,
    scheduler: DDPMScheduler,
    folder: Path,
    info: dict,
    ledger: Ledger,
) -> None:
    """checkpoints/final/{model_index.json, unet, unet_ema, scheduler, synthfactory.json}: a
    `ClassConditionalPipeline` folder, moved in atomically; each UNet folder carries the run's
    ledger (every mechanism its weights rest on, ancestors included)."""
    ema_model = None
    if ema is not None and lora_layers(model):  # the EMA weights, merged as the last ones are
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        ema_model = plain_unet(model)
        ema.restore(model.parameters())
    elif ema is not None:
        ema_model = UNet2DModel.from_config(model.config)
        ema.copy_to(ema_model.parameters())
    model = plain_unet(model)
    pipe = ClassConditionalPipeline(model, scheduler, ema_model, info["use_ema"], info["null_class"])
    with atomic_directory(folder) as tmp:
        pipe.save_pretrained(tmp)  # model_index.json, unet/, unet_ema/, scheduler/ (safetensors)
        for name in ("unet", "unet_ema") if ema is not None else ("unet",):
            mark_weights(tmp / name, info["run_id"])
            write_artifact(tmp / name, ledger)
        write_json_atomic(tmp / "synthfactory.json", info)


@dataclass
class TrainResult:
    steps: int
    epsilon: float | None
    checkpoint: Path
    privacy: dict
    seconds: float


def training_finished(run_dir: RunDir) -> bool:
    """Training ended: the final checkpoint and privacy.json are written and the resumable state
    (which holds the DP secret) is gone. Training such a run again would spend ε a second time."""
    return (
        run_dir.privacy.is_file() and run_dir.final_checkpoint.is_dir() and not run_dir.train_state.exists()
    )


def _check_same_run(path: Path, recipe_sha256: str, manifest_sha256: str, recipe: Recipe, images: ImageSet):
    """A record on disk (resumable state, privacy.json) must belong to this recipe and data."""
    if recipe_sha256 != recipe.sha256() or manifest_sha256 != images.manifest_sha256():
        raise RuntimeError(f"{path} belongs to another recipe or data set; start a new run instead")


def _finished_result(recipe: Recipe, images: ImageSet, run_dir: RunDir) -> TrainResult:
    """The recorded result of a finished run (nothing is trained again)."""
    record = PrivacyRecord.read(run_dir.privacy)
    _check_same_run(run_dir.privacy, record.recipe_sha256, record.data_manifest_sha256, recipe, images)
    log.info("training of %s finished earlier; not training again", run_dir.root)
    return TrainResult(
        steps=record.steps_taken,
        epsilon=record.epsilon,
        checkpoint=run_dir.final_checkpoint,
        privacy=record.to_dict(),
        seconds=record.train_seconds,
    )


def read_train_state(run_dir: RunDir, recipe: Recipe, images: ImageSet, device: torch.device, dist: Dist):
    """The state to resume from, or None. Rank 0 reads checkpoints/train_state.pt and broadcasts
    it: another rank may have no copy (a node's own disk) or a stale one, and a rank that went
    on with its own seed would draw other Poisson batches. A rank holding a copy that disagrees
    with rank 0's (step, DP seed) stops every rank."""
    path = run_dir.train_state
    own_copy = torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None
    saved = broadcast_object(own_copy, dist)

    def step_and_seed(state: dict | None):
        return None if state is None else (state["step"], state["dp_seed"])

    if any_over_ranks(own_copy is not None and step_and_seed(own_copy) != step_and_seed(saved), dist):
        raise RuntimeError(
            f"{path}: a rank's copy disagrees with rank 0's (step, DP seed); resume where every "
            "rank sees rank 0's file, or remove the stale copies"
        )
    if saved is None:
        return None
    _check_same_run(path, saved["recipe_sha256"], saved["manifest_sha256"], recipe, images)
    if "ledger_id" not in saved:
        raise RuntimeError(f"{path} was written by an older synthfactory (no ledger entry); start a new run")
    if saved["device"] != device.type:
        raise RuntimeError(f"{path} was written on {saved['device']}; resume it there")
    return saved


def dp_randomness(recipe: Recipe, saved: dict | None, dist: Dist) -> tuple[int, str]:
    """The seed of the DP noise and Poisson sampling, and where it came from: the checkpoint's
    when resuming, else a secret from the OS drawn by rank 0 (or the recipe's, tests only)."""
    if saved:
        return saved["dp_seed"], saved["dp_seed_source"]
    if recipe.privacy.noise_seed is not None:
        return recipe.privacy.noise_seed, "seeded from the recipe (privacy.noise_seed): the noise is known"
    secret = broadcast_int(secrets.randbits(62), dist)  # rank 0's, shared by all ranks
    return secret, "secret seed from the OS, kept in the resumable state until training ends, then deleted"


# --- what training changes as it goes -----------------------------------------------------------------


@dataclass
class TrainState:
    """What training changes as it goes, and what checkpoints/train_state.pt holds: the weights,
    the EMA, the optimizer, the step, the three generators (rows: training.seed + 1; Poisson
    sampling and DP noise: the DP seed, which is kept here too), and this training's ledger id."""

    model: UNet2DModel
    optimizer: torch.optim.Optimizer
    ema: EMAModel | None
    train_gen: torch.Generator
    sample_gen: torch.Generator
    noise_gen: torch.Generator
    dp_seed: int
    dp_seed_source: str
    ledger_id: str
    step: int = 0
    seconds: float = 0.0  # training time of the attempts before this one
    private: PrivateTraining | None = None  # the DP-SGD wrapping, once built
    start_history: tuple = ()  # this training's own accountant history at the checkpoint resumed from

    def own_history(self) -> list[tuple]:
        """This training's steps as the accountant counted them (every optimizer step, empty
        Poisson batches included), as one (σ, q, steps) row."""
        if self.private is None:
            return []
        rows = [tuple(h) for h in self.private.accountant.history]
        if not rows:
            return []
        sigma, q = rows[0][0], rows[0][1]
        if any((s, r) != (sigma, q) for s, r, _ in rows):
            raise RuntimeError("the accountant counted steps at another σ or q than this training's")
        return [(sigma, q, int(sum(t for _, _, t in rows)))]

    def restore(self, saved: dict, device: torch.device) -> None:
        """Go on from a checkpoint read by `read_train_state`."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.ema is not None:
            restore_ema(self.ema, saved["ema"], device)
        self.step = saved["step"]
        self.seconds = saved.get("seconds", 0.0)
        self.train_gen.set_state(saved["train_rng"])
        self.sample_gen.set_state(saved["sample_rng"])
        self.noise_gen.set_state(saved["noise_rng"])
        self.start_history = tuple(tuple(h) for h in saved["accountant_history"])

    def save(self, job: _Job, seconds: float) -> None:
        """Write checkpoints/train_state.pt atomically (it holds the DP secret)."""
        save_state(
            job.run_dir.train_state,
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "accountant_history": self.own_history(),
                "ledger_id": self.ledger_id,
                "train_rng": self.train_gen.get_state(),
                "sample_rng": self.sample_gen.get_state(),
                "noise_rng": self.noise_gen.get_state(),
                "dp_seed": self.dp_seed,
                "dp_seed_source": self.dp_seed_source,
                "device": job.device.type,
                "recipe_sha256": job.recipe.sha256(),
                "manifest_sha256": job.images.manifest_sha256(),
                "synthfactory_version": __version__,
                "seconds": seconds,
                "world_size": job.dist.world,
            },
        )

    def mechanism(self, job: _Job) -> Mechanism:
        """This training as the ledger records it: DP-SGD's steps so far (the accountant's count),
        or plain training on the private images."""
        ledger = job.ledger
        data = ledger.own_data or ""
        if self.private is None:
            return Mechanism(self.ledger_id, "non_private", job.run_dir.run_id, data, (), False,
                             {"steps": self.step, "what": "plain Adam on the private images, no DP"})  # fmt: skip
        return Mechanism(
            self.ledger_id, "dp_sgd", job.run_dir.run_id, data, tuple(self.own_history()),
            job.recipe.private,
            {"max_grad_norm": job.recipe.privacy.max_grad_norm, "steps_planned": job.schedule.steps,
             "what": "DP-SGD (Opacus): per-example clipping, Gaussian noise, Poisson sampling"},
        )  # fmt: skip


# --- training: set up, the private stage, the loop, finishing ----------------------------------------


@dataclass
class _Job:
    """What one training run works from, fixed while it trains."""

    recipe: Recipe
    images: ImageSet
    run_dir: RunDir
    dist: Dist
    device: torch.device
    ledger: Ledger  # the run's ledger as training started (rank 0's, on every rank)
    schedule: Schedule
    settings: StepSettings
    scheduler: DDPMScheduler
    x_all: torch.Tensor
    y_all: torch.Tensor

    @property
    def n_classes(self) -> int:
        return len(self.images.class_names)


def train(recipe: Recipe, images: ImageSet, run_dir: RunDir, progress: bool = True) -> TrainResult:
    """Train (or resume training) and write checkpoints/final and privacy.json; then delete the
    resumable state, which holds the DP secret (a finished run is not trained again)."""
    device = resolve_device(recipe.training.device)
    dist = from_env(device.type)  # torchrun: join the process group; otherwise one process
    if broadcast_object(training_finished(run_dir), dist):  # rank 0's disk decides, for every rank
        return _finished_result(recipe, images, run_dir)
    saved = read_train_state(run_dir, recipe, images, device, dist)
    job = _prepare_job(recipe, images, run_dir, device, dist, saved)
    model, trainable = _trainable_model(job)
    state = _start_or_resume(job, model, saved)
    batches = _private_stage(job, state)
    broadcast_parameters(model, dist)
    model.train()
    s = job.schedule
    log.info(
        "training %s of %s parameters for %d steps, q=%.4g, sigma=%s, K=%d",
        trainable["parameters"], trainable["of"], s.steps, s.sample_rate, s.noise_multiplier,
        job.settings.draws.k,
    )  # fmt: skip
    seconds = _train_loop(job, state, batches, progress)
    return _finish(job, state, trainable, seconds)


def _prepare_job(
    recipe: Recipe, images: ImageSet, run_dir: RunDir, device: torch.device, dist: Dist, saved: dict | None
) -> _Job:
    """The ledger (rank 0's), the schedule (σ calibrated for the composed ε), this rank's device,
    the step settings and the data."""
    if dist.enabled and not recipe.dp_sgd:
        raise ValueError("distributed training runs DP-SGD; train a non-private recipe in one process")
    ledger = broadcast_object(ledger_before_training(recipe, images, run_dir) if dist.main else None, dist)
    own = ledger.training()
    if saved is not None and (own is None or own.id != saved["ledger_id"]):
        raise LedgerRefused(f"{run_dir.train_state}: its training is not the one the run's ledger records")
    exclude = [own.id] if own is not None else []
    schedule = training_schedule(recipe, len(images.train_labels), ledger.history(images.item_ids(), exclude))
    if (
        own is not None
        and own.history
        and own.history[0][:2] != (schedule.noise_multiplier, schedule.sample_rate)
    ):
        raise LedgerRefused(
            f"{run_dir.root}: the ledger changed since training started (σ {own.history[0][0]:.4f} then, "
            f"{schedule.noise_multiplier:.4f} now); start a new run"
        )
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    k = recipe.privacy.noise_multiplicity if recipe.dp_sgd else 1
    return _Job(
        recipe=recipe,
        images=images,
        run_dir=run_dir,
        dist=dist,
        device=device,
        ledger=ledger,
        schedule=schedule,
        settings=step_settings(recipe, len(images.class_names), device, k),
        scheduler=build_noise_scheduler(recipe.model),
        x_all=torch.from_numpy(images.train_images),
        y_all=torch.from_numpy(images.train_labels),
    )


def _trainable_model(job: _Job) -> tuple[UNet2DModel, dict]:
    """The UNet the stage starts from (the pre-trained weights of this run, covered by its
    ledger, or the recipe's seeded initialisation) on the device with only `training.trainable`
    parameters trainable, and what is trained (privacy.json's trained_parameters)."""
    model = seeded_unet(job.recipe, job.images.image_size, job.n_classes)
    if has_pretraining(job.recipe):
        model.load_state_dict(load_unet(job.run_dir.pretrained / "unet").state_dict())
    of = count_parameters(model)
    lora = job.recipe.training.lora
    names = trainable_names(model, job.recipe.training.trainable)
    if lora is not None:
        with torch.random.fork_rng():  # the adapters' A: seeded, like the rest of the model
            torch.manual_seed(job.recipe.training.seed)
            model = add_lora(model, lora)
        names += [n for n, _ in model.named_parameters() if ".lora_" in n]
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    model.to(job.device)
    trainable = {
        "patterns": job.recipe.training.trainable,
        "parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "of": of,
    }
    if lora is not None:
        trainable["lora"] = {"rank": lora.rank, "alpha": lora.alpha or lora.rank,
                             "modules": len(lora_layers(model)), "merged_into_final_weights": True}  # fmt: skip
    return model, trainable


def _start_or_resume(job: _Job, model: UNet2DModel, saved: dict | None) -> TrainState:
    """Optimizer, EMA and generators for the model: fresh, or where the checkpoint left them."""
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=job.recipe.training.learning_rate
    )
    decay = job.recipe.training.ema_decay
    ema = EMAModel(model.parameters(), decay=decay) if decay else None
    dp_seed, dp_seed_source = dp_randomness(job.recipe, saved, job.dist)
    ledger_id = (
        saved["ledger_id"]
        if saved
        else new_id(job.run_dir.run_id, "dp_sgd" if job.recipe.dp_sgd else "training")
    )
    state = TrainState(
        model=model,
        optimizer=optimizer,
        ema=ema,
        train_gen=generator(job.recipe.training.seed + 1),
        sample_gen=generator(dp_seed),
        noise_gen=generator(dp_seed + 1, job.device),
        dp_seed=dp_seed,
        dp_seed_source=dp_seed_source,
        ledger_id=broadcast_object(ledger_id, job.dist),
    )
    if saved:
        state.restore(saved, job.device)
        log.info("resuming training at step %d of %d", state.step, job.schedule.steps)
    return state


def _private_stage(job: _Job, state: TrainState):
    """DP-SGD (Opacus) around the model and optimizer for the steps left, in state.private;
    returns the iterator of its Poisson batches (None for a recipe that opted out of DP)."""
    if not job.recipe.dp_sgd:
        return None
    state.private = make_private(
        state.model,
        state.optimizer,
        n_train=len(job.y_all),
        expected_batch_size=job.recipe.training.expected_batch_size,
        steps=job.schedule.steps - state.step,
        noise_multiplier=job.schedule.noise_multiplier,
        max_grad_norm=job.recipe.privacy.max_grad_norm,
        accountant=job.recipe.privacy.accountant,
        sample_generator=state.sample_gen,
        noise_generator=state.noise_gen,
        mode=job.recipe.privacy.per_example_gradients,
        world=job.dist.world,
    )
    # The accountant counts this training's own steps: from the checkpoint's count, or from zero.
    state.private.accountant.history = [tuple(h) for h in state.start_history]
    return iter(state.private.sampler)


def _train_loop(job: _Job, state: TrainState, batches, progress: bool) -> float:
    """Step until the planned total, one train_log.jsonl line per step, a checkpoint every
    `training.checkpoint_every` steps and at the end (the ledger first). Returns the training
    seconds, earlier attempts included."""
    started = time.perf_counter()
    steps_total, every = job.schedule.steps, job.recipe.training.checkpoint_every
    main = job.dist.main
    if main:
        _truncate_log(job.run_dir.train_log, state.step)
    with (
        open(job.run_dir.train_log if main else os.devnull, "a") as logfile,
        progress_bar(steps_total, "train", "step", progress and main, initial=state.step) as bar,
    ):
        while state.step < steps_total:
            batch, loss = _one_step(job, state, batches)
            state.step += 1
            logfile.write(log_line(state.step, batch, loss) + "\n")
            bar.update(1)
            bar.set_postfix(batch=batch, loss=f"{loss:.4f}")
            if state.step % every == 0 or state.step == steps_total:
                logfile.flush()
                if main:
                    RunLedger(job.run_dir.ledger).record(
                        state.mechanism(job)
                    )  # before the state that uses it
                    state.save(job, time.perf_counter() - started + state.seconds)
    return time.perf_counter() - started + state.seconds


def _one_step(job: _Job, state: TrainState, batches) -> tuple[int, float]:
    """One step on the next batch (Poisson under DP-SGD), then the EMA. Returns (batch size, loss)."""
    if state.private is not None:
        idx = torch.as_tensor(next(batches), dtype=torch.long)  # the whole logical batch
        dist = job.dist if job.dist.enabled else None
        x0, labels = job.x_all[idx], job.y_all[idx]
        loss = dp_step(state.private, job.scheduler, x0, labels, state.train_gen, job.settings, dist)
    else:
        n_train, batch = len(job.y_all), job.recipe.training.expected_batch_size
        idx = torch.randperm(n_train, generator=state.train_gen)[:batch]
        x0, labels = job.x_all[idx], job.y_all[idx]
        loss = plain_step(
            state.model, state.optimizer, job.scheduler, x0, labels, state.train_gen, job.settings
        )
    if state.ema is not None:
        state.ema.step(state.model.parameters())
    return int(len(idx)), loss


def _finish(job: _Job, state: TrainState, trainable: dict, seconds: float) -> TrainResult:
    """The ledger's last entry, privacy.json read out of the ledger, the final checkpoint with the
    ledger beside each model folder; then delete the resumable state, the DP secret (rank 0;
    every rank waits for it)."""
    model, run_dir = state.model, job.run_dir
    spread = max_parameter_spread(model, job.dist) if job.dist.enabled else None  # every rank takes part
    model.to("cpu").eval()
    record = None
    if job.dist.main:
        run_ledger = RunLedger(run_dir.ledger)
        run_ledger.record(state.mechanism(job))
        ledger = run_ledger.read()
        record = _final_record(job, state, ledger, trainable, seconds, spread)
        info = {
            "class_names": job.images.class_names,
            "null_class": null_class(job.recipe, job.n_classes),
            "use_ema": job.recipe.sampling.use_ema and state.ema is not None,
            "ema_decay": job.recipe.training.ema_decay,
            "steps": state.step,
            "run_id": run_dir.run_id,
        }
        save_final(model, state.ema, job.scheduler, run_dir.final_checkpoint, info, ledger)
        PrivacyRecord.model_validate(record).write(run_dir.privacy)
        run_dir.train_state.unlink(missing_ok=True)  # the DP secret: a finished run needs no resume
    record = broadcast_object(record, job.dist)
    barrier(job.dist)
    return TrainResult(
        steps=state.step,
        epsilon=record["epsilon"],
        checkpoint=run_dir.final_checkpoint,
        privacy=record,
        seconds=seconds,
    )


def _final_record(
    job: _Job, state: TrainState, ledger: Ledger, trainable: dict, seconds: float, spread: float | None
) -> dict:
    """privacy.json: the ledger read out and how the model was trained; refuses an ε over the
    target."""
    recipe, pretrain_json = job.recipe, job.run_dir.pretrained / "pretrain.json"
    pretrained = read_json(pretrain_json) if has_pretraining(recipe) and pretrain_json.exists() else None
    record = privacy_record(
        recipe, job.images, ledger, job.schedule, state.dp_seed_source, trainable, pretrained
    )
    record["train_seconds"] = round(seconds, 1)
    record["device"] = str(job.device)
    record["ema_decay"] = recipe.training.ema_decay
    record["label_dropout"] = recipe.training.label_dropout
    record["timesteps"] = recipe.training.timesteps.model_dump()
    if recipe.dp_sgd and record["epsilon"] > recipe.privacy.target_epsilon + 1e-9:
        raise RuntimeError(f"accountant ε {record['epsilon']:.4f} exceeds the target; refusing to go on")
    if job.dist.enabled:
        record["distributed"] = {
            "world_size": job.dist.world,
            "backend": torch.distributed.get_backend(),
            "max_parameter_spread_across_ranks": spread,
            "noise": "added once per step, on rank 0 (Opacus DistributedDPOptimizer)",
        }
    return record
