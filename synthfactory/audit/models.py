"""The audit's own training runs: models trained on the private images only to be attacked,
never sampled from and never released.

- the canary run (`audit.canary`): the recipe's DP training on the private images plus the
  included canaries (see `canary.py`), in `audit_models/canary/`;
- the non-private reference (`audit.membership.nonprivate_reference`): the same model, data,
  steps and batch size without clipping or noise, in `audit_models/nonprivate/`, so that the
  membership attack has a baseline that shows what DP changes.

Each is an ordinary run directory of its own (checkpoints, privacy.json, train log), trained by
`train.train`, so an interrupted audit run resumes like any training run.
"""

from __future__ import annotations

import shutil
import time

import numpy as np

from ..data import ImageSet
from ..ledger import RunLedger, mark_weights, read_artifact, require_covered, write_artifact
from ..model import load_generator, load_unet, seeded_unet, uses_ema
from ..recipe import PrivacyConfig, Recipe
from ..records import PrivacyRecord
from ..rundir import RunDir, atomic_directory, read_json, write_json_atomic
from ..train import train
from .canary import audit_scores, canary_scores, draw_inclusion, make_canaries, with_canaries
from .membership import denoising_losses


def _inherit_ledger(run_dir: RunDir, sub: RunDir) -> None:
    """The audit model's run ledger starts with what the released model's pre-training rests on
    (the warm start's query, the ledgers a checkpoint or release brought): the same answers, read
    again, so they compose into the audit model's ε as well."""
    if not run_dir.pretrained.is_dir():
        return
    carried = require_covered(
        run_dir.pretrained / "unet", RunLedger(run_dir.ledger).read(), "the pre-training"
    )
    sub_ledger = RunLedger(sub.ledger)
    if carried.mechanisms and not carried.ids() <= sub_ledger.read().ids():
        sub_ledger.bring_in(carried, via=f"the pre-training of run {run_dir.run_id}")


def _share_pretraining(run_dir: RunDir, sub: RunDir) -> None:
    """The audit model starts where the released one started: from the public pre-training."""
    _inherit_ledger(run_dir, sub)
    if run_dir.pretrained.is_dir() and not sub.pretrained.is_dir():
        shutil.copytree(run_dir.pretrained, sub.pretrained)


def nonprivate_recipe(recipe: Recipe) -> Recipe:
    """The recipe without DP: same data, model, steps, batch size and learning rate."""
    return recipe.model_copy(
        update={"privacy": PrivacyConfig(enabled=False, i_understand_this_is_not_private=True)}
    )


def train_nonprivate_reference(recipe: Recipe, run_dir: RunDir, images: ImageSet, progress: bool) -> dict:
    sub = run_dir.nonprivate_run
    _share_pretraining(run_dir, sub)
    result = train(nonprivate_recipe(recipe), images, sub, progress=progress)
    return {"steps": result.steps, "seconds": round(result.seconds, 1)}


def _canary_pretraining(
    recipe: Recipe, run_dir: RunDir, sub: RunDir, image_size: int, n_real: int, m: int
) -> None:
    """The public pre-trained weights for the canary model: the same, with m fresh class
    embeddings (one per canary) inserted before the null class."""
    _inherit_ledger(run_dir, sub)
    if not run_dir.pretrained.is_dir() or sub.pretrained.is_dir():
        return
    old = load_unet(run_dir.pretrained / "unet").state_dict()
    model = seeded_unet(recipe, image_size, n_real + m)
    state = model.state_dict()
    for name, value in old.items():
        if name == "class_embedding.weight":
            state[name][:n_real] = value[:n_real]
            if len(value) > n_real:  # the null class
                state[name][n_real + m] = value[n_real]
        else:
            state[name] = value
    model.load_state_dict(state)
    with atomic_directory(sub.pretrained) as tmp:
        model.save_pretrained(tmp / "unet")
        mark_weights(tmp / "unet", sub.run_id)
        write_artifact(tmp / "unet", read_artifact(run_dir.pretrained / "unet"))
        shutil.copy(run_dir.pretrained / "pretrain.json", tmp / "pretrain.json")


def run_canary_audit(recipe: Recipe, run_dir: RunDir, images: ImageSet, progress: bool) -> dict:
    """Train the canary model (or resume it), score the canaries, bound ε; writes canary.json."""
    cfg = recipe.audit.canary
    started = time.perf_counter()
    n_real = len(images.class_names)
    canaries = make_canaries(cfg.m, images.image_size, cfg.seed)
    included = draw_inclusion(cfg.m, cfg.seed)
    sub = run_dir.canary_run
    _canary_pretraining(recipe, run_dir, sub, images.image_size, n_real, cfg.m)
    result = train(recipe, with_canaries(images, canaries, included), sub, progress=progress)

    ts = list(cfg.timesteps)
    model, scheduler = load_generator(sub.final_checkpoint)
    own = n_real + np.arange(cfg.m)
    null_label = recipe.training.label_dropout > 0  # the model has a null class after the canaries
    baseline_label = n_real + cfg.m if null_label else 0
    own_loss = denoising_losses(model, scheduler, canaries, own, ts, cfg.seed)
    base_loss = denoising_losses(model, scheduler, canaries, np.full(cfg.m, baseline_label), ts, cfg.seed)
    scores = canary_scores(own_loss, base_loss)
    privacy = PrivacyRecord.model_validate(result.privacy)  # the canary run's privacy.json
    # Without DP there is no δ to honour: the bound is then for pure ε-DP (δ = 0), what the
    # canaries show the non-private training leaks.
    bound = audit_scores(scores, included, privacy.delta or 0.0, cfg.confidence)
    out = {
        **bound,
        "accountant_epsilon": privacy.epsilon,
        "accountant": privacy.accountant,
        "released_model_epsilon": PrivacyRecord.read(run_dir.privacy).epsilon,
        "canary_run": {
            "n_train": privacy.n_train,
            "sample_rate": privacy.sample_rate,
            "noise_multiplier": privacy.noise_multiplier,
            "steps": privacy.steps_taken,
            "max_grad_norm": privacy.max_grad_norm,
            "train_seconds": privacy.train_seconds,
        },
        "canaries": (
            f"{cfg.m} generated 8×8-cell black/white block patterns (seed {cfg.seed}), each with a "
            "class label of its own (an extra class embedding in the canary model only), each put "
            "into the training set with probability ½; no private data"
        ),
        "score": (
            "the canary model's ε-prediction loss under the "
            + ("null label" if null_label else f"label of class {images.class_names[0]!r}")
            + " minus that under the canary's own label, mean over timesteps "
            f"{ts}, fixed noise; {'EMA' if uses_ema(sub.final_checkpoint) else 'final'} weights"
        ),
        "scores_in_mean": float(scores[included].mean()) if included.any() else None,
        "scores_out_mean": float(scores[~included].mean()) if (~included).any() else None,
        "reading": (
            "a lower bound on the ε of the training procedure, at the stated confidence; it is "
            "expected to lie far below the accountant's ε for an attack on the final model only. "
            "A bound above the accountant's ε means the training is not as private as claimed."
        ),
        "privacy_of_this_result": (
            "the canary model is a second DP training run on the same private images at the "
            f"accountant ε above (δ {privacy.delta:g}); publishing these figures with the "
            "dataset composes with the released model's guarantee (basic composition: the ε add up, "
            "and so do the δ)"
            if privacy.private
            else "NOT PRIVATE: the canary model was trained without DP on the private images; "
            "these figures are not covered by any ε"
        ),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(
        run_dir.canary_json,
        {**out, "included": included.astype(int).tolist(), "scores": scores.tolist()},
    )
    return out


def wants_nonprivate_reference(recipe: Recipe) -> bool:
    return recipe.audit.membership.enabled and recipe.audit.membership.nonprivate_reference


def wants_audit_models(recipe: Recipe) -> bool:
    """Whether the recipe asks for any audit model (else the stage is skipped)."""
    return recipe.audit.canary.enabled or wants_nonprivate_reference(recipe)


def train_audit_models(recipe: Recipe, run_dir: RunDir, images: ImageSet, progress: bool = True) -> dict:
    """The audit_models stage: whichever of the two runs the recipe asks for."""
    done: dict = {}
    if wants_nonprivate_reference(recipe):
        done["nonprivate_reference"] = train_nonprivate_reference(recipe, run_dir, images, progress)
    if recipe.audit.canary.enabled:
        c = run_canary_audit(recipe, run_dir, images, progress)
        done["canary"] = {
            "epsilon_lower_bound": c["epsilon_lower_bound"],
            "accountant_epsilon": c["accountant_epsilon"],
        }
    return done


def canary_result(run_dir: RunDir) -> dict | None:
    """canary.json without the per-canary lists (what the reports show)."""
    if not run_dir.canary_json.exists():
        return None
    out = read_json(run_dir.canary_json)
    out.pop("included", None)
    out.pop("scores", None)
    return out


def has_nonprivate_reference(run_dir: RunDir) -> bool:
    return (run_dir.nonprivate_run.final_checkpoint / "unet").is_dir()


__all__ = ["train_audit_models", "canary_result", "has_nonprivate_reference", "wants_audit_models"]
