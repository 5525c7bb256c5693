"""Train the class-conditional diffusion model: optional public pre-training (no DP), then the
private stage with DP-SGD unless the recipe opts out.

An ordinary PyTorch loop: draw a Poisson batch, turn each example into K rows (K noise levels
and noise draws; the objective is in objective.py), compute the per-example gradient of the mean
loss over its rows, clip, add noise, step, update the EMA. Privacy (folding, clipping, noise, accounting) comes from
`privacy.py`. A logical batch is processed in physical chunks of at most
`training.max_physical_batch_size` examples; clipped gradients accumulate across chunks and the
noise is added once per logical batch.

The loop checkpoints atomically every `training.checkpoint_every` steps (model, EMA, optimizer,
RNG states, the accountant's history); a killed run resumes from its last checkpoint, replaying
the rolled-back steps with the same batches and noise, so ε is never under-reported.

Randomness: model initialisation, noise levels and diffusion noise use `training.seed`. The DP
noise and the Poisson sampling use a secret seed from the OS, kept in the resumable state
(checkpoints/train_state.pt) only while training runs: the state is deleted once the final
checkpoint and privacy.json are written, and a finished run is never trained again (that would
spend ε twice). `privacy.noise_seed` seeds them instead, for tests: such a run is NOT PRIVATE.

A run may start from the weights of another DP run on the same private data
(`pretrain.checkpoint`, see origin.py): its accountant history comes first in this run's
accountant, σ is calibrated for the composed ε, and privacy.json reports the composed ε.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from . import __version__, warmstart
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
    sum_over_ranks,
)
from .model import build_noise_scheduler, build_unet, count_parameters, load_unet, resolve_device
from .objective import Draws, denoising_loss, draw_rows, make_row_loss
from .origin import checkpoint_use, public_origin, trained_origin, write_origin
from .pipeline import ClassConditionalPipeline
from .privacy import PrivateTraining, calibrate_noise, epsilon_of, make_private, opacus_version
from .progress import progress_bar
from .recipe import Recipe, RecipeError
from .records import PRIVACY_SCHEMA, PrivacyRecord
from .rundir import RunDir, atomic_directory, atomic_path, folder_sha256, read_json, write_json_atomic

log = logging.getLogger(__name__)


# --- one step ------------------------------------------------------------------------------------


@dataclass
class StepSettings:
    draws: Draws = field(default_factory=Draws)
    max_physical: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    row_loss: Callable[..., torch.Tensor] = denoising_loss


def _chunks(n: int, size: int | None):
    size = size or n
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def dp_step(
    private: PrivateTraining,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    settings: StepSettings | None = None,
    dist: Dist | None = None,
) -> float:
    """One DP-SGD step on one Poisson batch (possibly empty): per chunk of examples, per-example
    gradients over k rows, clipped and summed; noise once at the end. Returns the mean loss.

    Distributed (`dist`): every rank gets the whole logical batch and draws its rows with the
    same generator, then works on its contiguous share of the examples; the optimizer adds the
    noise on rank 0 and sums over ranks. An empty share still takes its (collective) step."""
    settings = settings or StepSettings()
    opt = private.optimizer
    opt.zero_grad(set_to_none=True)
    n = len(x0)
    if n == 0:
        private.empty_step()
        return float("nan")
    drawn = draw_rows(x0, labels, scheduler, settings.draws, generator)
    start, stop = dist.share(n) if dist is not None else (0, n)
    total = 0.0
    chunks = _chunks(stop - start, settings.max_physical)
    if not chunks:
        private.empty_step()
    for j, (a, b) in enumerate(chunks):
        rows = tuple(
            r.to(settings.device) for r in drawn.rows(x0, scheduler, start + a, start + b, settings.draws.k)
        )
        total += private.per_example_backward(settings.row_loss, rows, b - a, settings.draws.k) * (b - a)
        last = j == len(chunks) - 1
        opt.signal_skip_step(do_skip=not last)  # accumulate clipped sums; noise only at the end
        opt.step()
        if not last:
            opt.zero_grad(set_to_none=True)  # keeps the accumulated clipped sum
    return sum_over_ranks(total, dist) / n if dist is not None else total / n


def plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    settings: StepSettings,
) -> float:
    """One non-private step (public pre-training, or a recipe that opted out of DP)."""
    optimizer.zero_grad(set_to_none=True)
    n, k = len(x0), settings.draws.k
    total = 0.0
    drawn = draw_rows(x0, labels, scheduler, settings.draws, generator)
    for a, b in _chunks(n, settings.max_physical):
        rows = tuple(r.to(settings.device) for r in drawn.rows(x0, scheduler, a, b, k))
        loss = settings.row_loss(model, *rows).sum() / (n * k)
        loss.backward()
        total += float(loss.detach()) * n
    optimizer.step()
    return total / n


# --- building the model -------------------------------------------------------------------------


def num_class_embeds(recipe: Recipe, n_classes: int) -> int:
    """Classes, plus one null class when labels are dropped for classifier-free guidance."""
    return n_classes + (1 if recipe.training.label_dropout > 0 else 0)


def null_class(recipe: Recipe, n_classes: int) -> int | None:
    return n_classes if recipe.training.label_dropout > 0 else None


def trainable_names(model: torch.nn.Module, patterns) -> list[str]:
    """Parameter names the private stage trains: all, or those matching any glob pattern."""
    names = [n for n, _ in model.named_parameters()]
    if patterns == "all":
        return names
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        raise ValueError(f"patterns {missing} match no parameter (names look like {names[:3]})")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def initial_model(recipe: Recipe, image_size: int, n_classes: int, run_dir: RunDir | None) -> UNet2DModel:
    """The recipe's UNet, from the pre-trained checkpoint of this run when there is one."""
    with torch.random.fork_rng():
        torch.manual_seed(recipe.training.seed)
        model = build_unet(recipe.model, image_size, num_class_embeds(recipe, n_classes))
    if run_dir is not None and (run_dir.pretrained / "unet").is_dir():
        model.load_state_dict(load_unet(run_dir.pretrained / "unet").state_dict())
    return model


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


def _settings(recipe: Recipe, n_classes: int, device: torch.device, k: int) -> StepSettings:
    bf16 = recipe.training.precision == "bf16"
    return StepSettings(
        draws=Draws(
            k=k,
            timesteps=recipe.training.timesteps,
            label_dropout=recipe.training.label_dropout,
            null_class=null_class(recipe, n_classes),
        ),
        max_physical=recipe.training.max_physical_batch_size,
        device=device,
        row_loss=make_row_loss(device, bf16),
    )


# --- the training plan and the privacy record -----------------------------------------------------


def _planned(recipe: Recipe, n_train: int, prior: list | None = None) -> dict:
    """σ, q and steps the run will use; σ calibrated so that ε(prior + steps) ≤ target, where
    `prior` is the accountant history of a DP run this one starts from (composition)."""
    steps = recipe.training.total_steps(n_train)
    q = recipe.training.expected_batch_size / n_train
    plan = {"steps": steps, "sample_rate": q, "noise_multiplier": None, "prior_history": list(prior or [])}
    if recipe.dp_sgd:
        plan["noise_multiplier"] = calibrate_noise(
            recipe.privacy.target_epsilon, recipe.privacy.delta, q, steps, recipe.privacy.accountant,
            prior=plan["prior_history"],
        )  # fmt: skip
    return plan


def plan_training(recipe: Recipe, n_train: int, prior: list | None = None) -> dict:
    """What training would do (for `validate`): steps, q, σ and the ε both accountants give
    (composed with `prior`, if any)."""
    plan = _planned(recipe, n_train, prior)
    if recipe.dp_sgd:
        history = [*plan["prior_history"], (plan["noise_multiplier"], plan["sample_rate"], plan["steps"])]
        plan["epsilon"] = {a: epsilon_of(history, recipe.privacy.delta, a) for a in ("rdp", "prv")}
    return plan


def prior_history(run_dir: RunDir) -> list:
    """The accountant history DP-SGD composes with (pretrain.json): that of the DP run whose
    weights the pre-training stage loaded, then the warm start's query; else none."""
    path = run_dir.pretrained / "pretrain.json"
    rec = read_json(path) if path.exists() else {}
    histories = [(rec.get("composed_with") or {}).get("accountant_history", []),
                 (rec.get("warm_start") or {}).get("accountant_history", [])]  # fmt: skip
    return [tuple(entry) for history in histories for entry in history]


def recipe_prior(recipe: Recipe, composed: list | None) -> list:
    """The same history known from the recipe before anything runs (validate, plan)."""
    return [*(composed or []), *(warmstart.history(recipe.warm_start) if recipe.warm_start else [])]


COVERED_BY_EPSILON = [
    "the generator's weights (checkpoints/final: the last and the EMA weights)",
    "every image drawn from it: the whole sample store, generated from public seeds before the "
    "audit, and so each released image with its label, run id, sample seed and sample index",
]
NOT_COVERED_BY_EPSILON = [
    "which samples the memorization audit withheld: the audit compares every sample with the "
    "private training images after training, so which of them are released depends on those "
    "images beyond ε",
    "the audit's statistics (thresholds, distance percentiles, counts flagged, the data-copying "
    "test, the membership attack) and the evaluation's figures, all computed from real images",
    "the number of private training images N, which sets q = B/N (DP-SGD treats it as public)",
    "floating-point and timing side channels of the sampler and noise (Opacus secure_mode is not used)",
]
SEEDED_WARNING = (
    "NOT PRIVATE: privacy.noise_seed seeds the DP noise and the Poisson sampling; anyone who "
    "knows the seed can regenerate the noise and subtract it, so the accountant's ε is no guarantee"
)


def privacy_record(
    recipe: Recipe,
    images: ImageSet,
    plan: dict,
    history: list,
    steps_taken: int,
    dp_seed_source: str,
    trainable: dict | None = None,
    pretrained: dict | None = None,
) -> dict:
    """The privacy ledger written to privacy.json and carried into every report. `history` is
    the accountant's whole history: the composed prior run's (plan["prior_history"]), then this
    run's steps."""
    rec = {
        "schema": PRIVACY_SCHEMA,
        "private": recipe.private,
        "mechanism": _mechanism(recipe),
        "n_train": int(len(images.train_labels)),
        "expected_batch_size": recipe.training.expected_batch_size,
        "sample_rate": plan["sample_rate"],
        "steps_planned": plan["steps"],
        "steps_taken": steps_taken,
        "noise_multiplicity": recipe.privacy.noise_multiplicity if recipe.dp_sgd else 1,
        "per_example_gradients": recipe.privacy.per_example_gradients if recipe.dp_sgd else None,
        "data_manifest_sha256": images.manifest_sha256(),
        "recipe_sha256": recipe.sha256(),
        "preprocessing": images.preprocessing,
        **_inputs(recipe, images, trainable, pretrained),
        "covered_by_epsilon": COVERED_BY_EPSILON if recipe.private else [],
        "not_covered_by_epsilon": NOT_COVERED_BY_EPSILON,
    }
    if pretrained:
        rec["pretraining"] = pretrained
    if not recipe.dp_sgd:
        warning = "NOT PRIVATE: trained WITHOUT differential privacy (no clipping or noise)"
        return {**rec, "epsilon": None, "delta": None, "warning": warning}
    rec.update(_accounting(recipe, plan, history, steps_taken, dp_seed_source))
    rec.update(_earlier_mechanisms(recipe, pretrained or {}))
    if not recipe.private:
        rec["warning"] = SEEDED_WARNING
    return rec


def _mechanism(recipe: Recipe) -> str:
    if not recipe.dp_sgd:
        return "NOT PRIVATE: plain SGD (Adam), no clipping or noise"
    mechanism = f"DP-SGD (Opacus {opacus_version()}): per-example clipping, Gaussian noise, Poisson sampling"
    if not recipe.private:
        mechanism += "; noise and sampling SEEDED from the recipe (privacy.noise_seed): NOT PRIVATE"
    return mechanism


def _inputs(recipe: Recipe, images: ImageSet, trainable: dict | None, pretrained: dict | None) -> dict:
    """What the model learnt from: public inputs, and the private ones ε covers."""
    pretrained = pretrained or {}
    public = ["model architecture and hyper-parameters from the recipe (no data)"]
    if pretrained.get("statement"):
        public.append(pretrained["statement"])
    split = getattr(recipe.data, "train_split", "train")
    private = {
        "data": f"the '{split}' split of the {recipe.data.source} source "
        f"({len(images.train_labels)} images, classes {images.class_names})",
        "trained_parameters": trainable,
    }
    if pretrained.get("warm_start"):
        private["warm_start"] = pretrained["warm_start"]["mechanism"]
    return {"public_inputs": public, "private_inputs": private}


def _accounting(recipe: Recipe, plan: dict, history: list, steps_taken: int, dp_seed_source: str) -> dict:
    """ε from the accountant for the steps taken (and the other accountant's figure beside it)."""
    delta, acc = recipe.privacy.delta, recipe.privacy.accountant
    other = "prv" if acc == "rdp" else "rdp"
    return {
        "accountant": acc,
        "target_epsilon": recipe.privacy.target_epsilon,
        "delta": delta,
        "epsilon": epsilon_of(history, delta, acc),
        "epsilon_other_accountant": {other: epsilon_of(history, delta, other)},
        # σ as the accountant recorded it for this run's steps (the last entry), not the plan's
        "noise_multiplier": history[-1][0] if steps_taken else plan["noise_multiplier"],
        "max_grad_norm": recipe.privacy.max_grad_norm,
        "accountant_history": [list(h) for h in history],
        "dp_randomness": dp_seed_source,
    }


def _earlier_mechanisms(recipe: Recipe, pretrained: dict) -> dict:
    """The DP mechanisms composed before DP-SGD: the warm start's query, a prior DP run."""
    out = {}
    if pretrained.get("warm_start"):
        out["warm_start"] = {
            **pretrained["warm_start"],
            "reading": "one Gaussian-mechanism query of the per-class mean images before DP-SGD; its "
            "entry (σ, q = 1, 1 step) precedes DP-SGD's in accountant_history, DP-SGD's σ was "
            "calibrated for the composed ε, and epsilon is the composed ε",
        }
    if pretrained.get("composed_with"):
        prior = pretrained["composed_with"]
        delta, acc = recipe.privacy.delta, recipe.privacy.accountant
        out["composed_with"] = {
            **prior,
            "epsilon_alone": epsilon_of(prior["accountant_history"], delta, acc),
            "reading": "this run started from the weights of a DP run on the same private data; "
            "its accountant history is the first part of accountant_history, and epsilon is the "
            "composed ε of both",
        }
    return out


# --- checkpoints ----------------------------------------------------------------------------------


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


def save_final(
    model: UNet2DModel,
    ema: EMAModel | None,
    scheduler: DDPMScheduler,
    folder: Path,
    info: dict,
    origin: dict,
) -> None:
    """checkpoints/final/{model_index.json, unet, unet_ema, scheduler, synthfactory.json}: a
    `ClassConditionalPipeline` folder, moved in atomically; each UNet folder carries its origin
    (what it was trained on, and how privately)."""
    ema_model = None
    if ema is not None:
        ema_model = UNet2DModel.from_config(model.config)
        ema.copy_to(ema_model.parameters())
    pipe = ClassConditionalPipeline(model, scheduler, ema_model, info["use_ema"], info["null_class"])
    with atomic_directory(folder) as tmp:
        pipe.save_pretrained(tmp)  # model_index.json, unet/, unet_ema/, scheduler/ (safetensors)
        for name in ("unet", "unet_ema") if ema is not None else ("unet",):
            write_origin(tmp / name, origin)
        write_json_atomic(tmp / "synthfactory.json", info)


@dataclass
class TrainResult:
    steps: int
    epsilon: float | None
    checkpoint: Path
    privacy: dict
    seconds: float


# --- public pre-training ------------------------------------------------------------------------


def pretrain(
    recipe: Recipe, images: ImageSet, public: ImageSet | None, run_dir: RunDir, progress: bool = True
) -> dict:
    """The stage before DP-SGD, written to checkpoints/pretrained/: non-private training on data
    the recipe declares public (or a given checkpoint), then the DP warm start on central images,
    in that order, as the recipe asks. Returns the record of what was used (pretrain.json)."""
    device = resolve_device(recipe.training.device)
    model = initial_model(recipe, images.image_size, len(images.class_names), None)
    record: dict = {"kind": "warm_start", "statement": None}
    origin = public_origin("initial weights from the recipe's seed (no data)")
    if recipe.pretrain is not None:
        record, origin = _public_stage(model, recipe, images, public, device, progress)
    if recipe.warm_start is not None:
        record["warm_start"] = _warm_start_stage(model, recipe, images, run_dir, device, progress)
        history = [*(record.get("composed_with") or {}).get("accountant_history", []),
                   *record["warm_start"]["accountant_history"]]  # fmt: skip
        origin = trained_origin(
            run_dir.run_id,
            images.manifest_sha256(),
            {"private": recipe.private, "accountant_history": history, "delta": recipe.privacy.delta},
        )
    model.to("cpu").eval()
    with atomic_directory(run_dir.pretrained) as tmp:
        model.save_pretrained(tmp / "unet")
        write_origin(tmp / "unet", origin)
        write_json_atomic(tmp / "pretrain.json", record)
    return record


def _public_stage(
    model, recipe: Recipe, images: ImageSet, public: ImageSet | None, device, progress
) -> tuple:
    """Load `pretrain.checkpoint` into the model, or train it on `pretrain.data` without DP.
    Returns (record, origin of the weights)."""
    cfg = recipe.pretrain
    assert cfg is not None
    n_classes = len(images.class_names)
    if cfg.checkpoint is not None:
        model.load_state_dict(load_unet(cfg.checkpoint).state_dict())
        use = checkpoint_use(cfg.checkpoint, images.train_hashes(), images.manifest_sha256(), recipe.private)
        digest = folder_sha256(cfg.checkpoint)
        record = {
            "kind": "checkpoint",
            "checkpoint": str(cfg.checkpoint),
            "weights_sha256": digest,
            "origin": use.kind,
            "statement": f"initial weights from the checkpoint {cfg.checkpoint} (sha256 {digest[:12]}): "
            + use.statement,
        }
        if use.kind == "composed":
            record["composed_with"] = {
                "run_id": use.origin.get("run_id"),
                "accountant_history": [list(h) for h in use.prior_history],
            }
        # Weights that saw this data keep their origin, so that reusing them composes (or is refused) again.
        origin = use.origin if use.kind in ("composed", "not_private") else public_origin(record["statement"])
        return record, origin
    assert public is not None
    conditional = public.class_names == images.class_names
    labels = torch.from_numpy(public.train_labels)
    if not conditional:
        labels = torch.full_like(labels, null_class(recipe, n_classes))
    x_all = torch.from_numpy(public.train_images)
    n = len(x_all)
    batch = min(cfg.expected_batch_size, n)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(n, generator=gen)[:batch]
        return x_all[idx], labels[idx]

    _plain_training(
        model, recipe, n_classes, device, (cfg.steps, cfg.learning_rate, cfg.seed), draw, progress
    )
    record = {
        "kind": "data",
        "source": cfg.data.source,
        "path": str(cfg.data.path) if getattr(cfg.data, "path", None) else None,
        "n_images": n,
        "classes": public.class_names,
        "class_conditional": conditional,
        "steps": cfg.steps,
        "manifest_sha256": public.manifest_sha256(),
        "statement": f"pre-training without DP on {n} images from the {cfg.data.source} "
        f"source, declared public by the recipe ({cfg.steps} steps; "
        + ("class-conditional" if conditional else "class-agnostic, null label")
        + "); none of them is a copy or near-copy of a private image",
    }
    return record, public_origin(record["statement"])


def _warm_start_stage(model, recipe: Recipe, images: ImageSet, run_dir: RunDir, device, progress) -> dict:
    """The DP warm start (warmstart.py): answer the central-image query once, then train the
    model on the noisy class means, augmented, without DP-SGD (post-processing)."""
    cfg = recipe.warm_start
    assert cfg is not None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would answer the query with its own noise
        raise RecipeError(
            f"{run_dir.root}: warm_start: run the pretrain stage in one process, not under torchrun "
            "(`synthfactory pretrain RUN_DIR`), then train under torchrun"
        )
    n_classes = len(images.class_names)
    central = warmstart.answered_once(
        run_dir.central_images,
        images.train_images,
        images.train_labels,
        recipe,
        n_classes,
    )
    x, y = warmstart.training_images(central, images.image_size)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x), (cfg.expected_batch_size,), generator=gen)
        return warmstart.augment(x[idx], cfg.shift, cfg.intensity, gen), y[idx]

    _plain_training(
        model, recipe, n_classes, device, (cfg.steps, cfg.learning_rate, cfg.seed), draw, progress
    )
    return warmstart.record(central, cfg, recipe.privacy.delta, recipe.privacy.accountant)


def _plain_training(model, recipe: Recipe, n_classes: int, device, run: tuple, draw, progress) -> None:
    """Non-private Adam steps on batches from `draw(generator)`; run = (steps, learning rate, seed)."""
    steps, lr, seed = run
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = build_noise_scheduler(recipe.model)
    settings = _settings(recipe, n_classes, device, k=1)
    gen = _generator(seed)
    with progress_bar(steps, "pretrain", "step", progress) as bar:
        for _ in range(steps):
            xb, yb = draw(gen)
            loss = plain_step(model, optimizer, scheduler, xb, yb, gen, settings)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")


# --- the private stage ----------------------------------------------------------------------------


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
    if saved["device"] != device.type:
        raise RuntimeError(f"{path} was written on {saved['device']}; resume it there")
    return saved


def restore_ema(ema: EMAModel, saved: dict, device: torch.device) -> None:
    """The EMA shadow weights from a checkpoint (read onto the CPU), moved to the model's device."""
    ema.load_state_dict(saved)
    ema.to(device=device)


def log_line(step: int, batch: int, loss: float) -> str:
    """One train_log.jsonl line; an empty Poisson batch has no loss (null, as JSON has no NaN)."""
    return json.dumps({"step": step, "batch": batch, "loss": loss if batch else None}, allow_nan=False)


def dp_randomness(recipe: Recipe, saved: dict | None, dist: Dist) -> tuple[int, str]:
    """The seed of the DP noise and Poisson sampling, and where it came from: the checkpoint's
    when resuming, else a secret from the OS drawn by rank 0 (or the recipe's, tests only)."""
    if saved:
        return saved["dp_seed"], saved["dp_seed_source"]
    if recipe.privacy.noise_seed is not None:
        return recipe.privacy.noise_seed, "seeded from the recipe (privacy.noise_seed): the noise is known"
    secret = broadcast_int(secrets.randbits(62), dist)  # rank 0's, shared by all ranks
    return secret, "secret seed from the OS, kept in the resumable state until training ends, then deleted"


@dataclass
class TrainState:
    """What training changes as it goes, and what checkpoints/train_state.pt holds: the weights,
    the EMA, the optimizer, the step, and the three generators (rows: training.seed + 1;
    Poisson sampling and DP noise: the DP seed, which is kept here too)."""

    model: UNet2DModel
    optimizer: torch.optim.Optimizer
    ema: EMAModel | None
    train_gen: torch.Generator
    sample_gen: torch.Generator
    noise_gen: torch.Generator
    dp_seed: int
    dp_seed_source: str
    step: int = 0
    seconds: float = 0.0  # training time of the attempts before this one
    private: PrivateTraining | None = None  # the DP-SGD wrapping, once built

    def accountant_history(self) -> list[tuple]:
        return [tuple(h) for h in self.private.accountant.history] if self.private else []

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

    def save(self, job: _Job, seconds: float) -> None:
        """Write checkpoints/train_state.pt atomically (it holds the DP secret)."""
        _save_state(
            job.run_dir.train_state,
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "accountant_history": self.accountant_history(),
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


# --- training: set up, the private stage, the loop, finishing ----------------------------------------


@dataclass
class _Job:
    """What one training run works from, fixed while it trains."""

    recipe: Recipe
    images: ImageSet
    run_dir: RunDir
    dist: Dist
    device: torch.device
    plan: dict  # _planned: steps, q, σ, prior history
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
    job = _prepare_job(recipe, images, run_dir, device, dist)
    model, trainable = _trainable_model(job)
    saved = read_train_state(run_dir, recipe, images, job.device, dist)
    state = _start_or_resume(job, model, saved)
    batches = _private_stage(job, state, saved)
    broadcast_parameters(model, dist)
    model.train()
    log.info(
        "training %s of %s parameters for %d steps, q=%.4g, sigma=%s, K=%d",
        trainable["parameters"],
        trainable["of"],
        job.plan["steps"],
        job.plan["sample_rate"],
        job.plan["noise_multiplier"],
        job.settings.draws.k,
    )
    seconds = _train_loop(job, state, batches, progress)
    return _finish(job, state, trainable, seconds)


def _prepare_job(recipe: Recipe, images: ImageSet, run_dir: RunDir, device: torch.device, dist: Dist) -> _Job:
    """The plan (σ calibrated for the composed ε), this rank's device, the step settings and the data."""
    plan = _planned(recipe, len(images.train_labels), prior_history(run_dir))
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if dist.enabled and not recipe.dp_sgd:
        raise ValueError("distributed training runs DP-SGD; train a non-private recipe in one process")
    k = recipe.privacy.noise_multiplicity if recipe.dp_sgd else 1
    return _Job(
        recipe=recipe,
        images=images,
        run_dir=run_dir,
        dist=dist,
        device=device,
        plan=plan,
        settings=_settings(recipe, len(images.class_names), device, k),
        scheduler=build_noise_scheduler(recipe.model),
        x_all=torch.from_numpy(images.train_images),
        y_all=torch.from_numpy(images.train_labels),
    )


def _trainable_model(job: _Job) -> tuple[UNet2DModel, dict]:
    """The initial UNet on the device with only `training.trainable` parameters trainable, and
    what is trained (privacy.json's trained_parameters)."""
    model = initial_model(job.recipe, job.images.image_size, job.n_classes, job.run_dir)
    names = trainable_names(model, job.recipe.training.trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    model.to(job.device)
    trainable = {
        "patterns": job.recipe.training.trainable,
        "parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "of": count_parameters(model),
    }
    return model, trainable


def _start_or_resume(job: _Job, model: UNet2DModel, saved: dict | None) -> TrainState:
    """Optimizer, EMA and generators for the model: fresh, or where the checkpoint left them."""
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=job.recipe.training.learning_rate
    )
    decay = job.recipe.training.ema_decay
    ema = EMAModel(model.parameters(), decay=decay) if decay else None
    dp_seed, dp_seed_source = dp_randomness(job.recipe, saved, job.dist)
    state = TrainState(
        model=model,
        optimizer=optimizer,
        ema=ema,
        train_gen=_generator(job.recipe.training.seed + 1),
        sample_gen=_generator(dp_seed),
        noise_gen=_generator(dp_seed + 1, job.device),
        dp_seed=dp_seed,
        dp_seed_source=dp_seed_source,
    )
    if saved:
        state.restore(saved, job.device)
        log.info("resuming training at step %d of %d", state.step, job.plan["steps"])
    return state


def _private_stage(job: _Job, state: TrainState, saved: dict | None):
    """DP-SGD (Opacus) around the model and optimizer for the steps left, in state.private;
    returns the iterator of its Poisson batches (None for a recipe that opted out of DP)."""
    if not job.recipe.dp_sgd:
        return None
    state.private = make_private(
        state.model,
        state.optimizer,
        n_train=len(job.y_all),
        expected_batch_size=job.recipe.training.expected_batch_size,
        steps=job.plan["steps"] - state.step,
        noise_multiplier=job.plan["noise_multiplier"],
        max_grad_norm=job.recipe.privacy.max_grad_norm,
        accountant=job.recipe.privacy.accountant,
        sample_generator=state.sample_gen,
        noise_generator=state.noise_gen,
        mode=job.recipe.privacy.per_example_gradients,
        world=job.dist.world,
    )
    # The accountant goes on from the checkpoint's history, or starts from the composed prior run's.
    start = saved["accountant_history"] if saved else job.plan["prior_history"]
    state.private.accountant.history = [tuple(h) for h in start]
    return iter(state.private.sampler)


def _train_loop(job: _Job, state: TrainState, batches, progress: bool) -> float:
    """Step until the planned total, one train_log.jsonl line per step, a checkpoint every
    `training.checkpoint_every` steps and at the end. Returns the training seconds, earlier
    attempts included."""
    started = time.perf_counter()
    steps_total, every = job.plan["steps"], job.recipe.training.checkpoint_every
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
    """Write the privacy record and the final checkpoint, then delete the resumable state: the
    DP secret (rank 0; every rank waits for it)."""
    record = _final_record(job, state, trainable, seconds)
    model, run_dir = state.model, job.run_dir
    model.to("cpu").eval()
    info = {
        "class_names": job.images.class_names,
        "null_class": null_class(job.recipe, job.n_classes),
        "use_ema": job.recipe.sampling.use_ema and state.ema is not None,
        "ema_decay": job.recipe.training.ema_decay,
        "steps": state.step,
    }
    if job.dist.main:
        origin = trained_origin(run_dir.run_id, job.images.manifest_sha256(), record)
        save_final(model, state.ema, job.scheduler, run_dir.final_checkpoint, info, origin)
        PrivacyRecord.model_validate(record).write(run_dir.privacy)
        run_dir.train_state.unlink(missing_ok=True)  # the DP secret: a finished run needs no resume
    barrier(job.dist)
    return TrainResult(
        steps=state.step,
        epsilon=record["epsilon"],
        checkpoint=run_dir.final_checkpoint,
        privacy=record,
        seconds=seconds,
    )


def _final_record(job: _Job, state: TrainState, trainable: dict, seconds: float) -> dict:
    """privacy.json: the accountant's record and how the model was trained; refuses an ε over
    the target."""
    recipe, pretrain_json = job.recipe, job.run_dir.pretrained / "pretrain.json"
    pretrained = read_json(pretrain_json) if pretrain_json.exists() else None
    record = privacy_record(
        recipe,
        job.images,
        job.plan,
        state.accountant_history(),
        state.step,
        state.dp_seed_source,
        trainable,
        pretrained,
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
            "max_parameter_spread_across_ranks": max_parameter_spread(state.model, job.dist),
            "noise": "added once per step, on rank 0 (Opacus DistributedDPOptimizer)",
        }
    return record
