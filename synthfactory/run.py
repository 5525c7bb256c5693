"""Stage order and the run directory: create a run, run or resume its stages.

Every stage reads what the previous one wrote in the run directory and writes its own part,
so any stage can be rerun alone. Nothing is written before the recipe and its data are valid.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import __version__
from .audit import run_audit
from .audit.models import train_audit_models, wants_audit_models
from .data import DataError, ImageSet, load_images
from .distributed import barrier, from_env
from .evaluate import evaluate
from .export import release
from .ledger import Ledger, LedgerRefused, RunLedger, Verdict
from .model import load_unet, resolve_device, seeded_unet, uses_ema
from .pretrain import PublicData, checkpoint_verdict, planned_ledger, pretrain
from .public import PublicDataRefused, load_public
from .recipe import Recipe, RecipeError, check_against_data, load_recipe, load_run_recipe
from .records import RunRecords
from .rundir import STAGES, RunDir, new_run_id, read_json, write_json_atomic
from .sample import generate, merge_shards
from .train import Schedule, has_pretraining, train, trainable_names, training_finished, training_schedule

log = logging.getLogger(__name__)


@dataclass
class CheckedRecipe:
    """A recipe that validated against its data: the private images, the public pre-training
    data (if any), what the checkpoint or data set it brings is to this run (`brought`), and the
    DP-SGD schedule (σ calibrated for everything that composes)."""

    recipe: Recipe
    images: ImageSet
    schedule: Schedule
    public: PublicData | None = None
    brought: list[Verdict] = field(default_factory=list)


def _load(
    recipe: Recipe, recipe_path: str | Path, screened: dict | None = None
) -> tuple[ImageSet, PublicData | None]:
    """The private images and the declared-public ones (read, their verdict, screened)."""
    try:
        images = load_images(recipe.data, recipe.modality)
    except DataError as e:
        raise RecipeError(f"{recipe_path}: data.{e.field}: {e}") from None
    if recipe.pretrain is None or recipe.pretrain.data is None:
        return images, None
    try:
        return images, load_public(recipe, images, screened)
    except DataError as e:
        raise RecipeError(f"{recipe_path}: pretrain.data.{e.field}: {e}") from None
    except (PublicDataRefused, LedgerRefused) as e:
        raise RecipeError(f"{recipe_path}: pretrain.data: {e}") from None


def _brought(
    recipe: Recipe, recipe_path: str | Path, images: ImageSet, public: PublicData | None
) -> list[Verdict]:
    """What `pretrain.checkpoint` or `pretrain.data` brings into this run (its ledger's verdict)."""
    try:
        use = checkpoint_verdict(recipe, images)
    except LedgerRefused as e:
        raise RecipeError(f"{recipe_path}: pretrain.checkpoint: {e}") from None
    return [v for v in (use, public.verdict if public else None) if v is not None]


def _schedule(recipe: Recipe, recipe_path: str | Path, images: ImageSet, ledger: Ledger) -> Schedule:
    """DP-SGD's schedule after everything in `ledger` that composes (this run's training left out)."""
    own = ledger.training()
    prior = ledger.history(images.item_ids(), exclude=[own.id] if own else [])
    try:
        return training_schedule(recipe, len(images.train_labels), prior)
    except ValueError as e:
        raise RecipeError(
            f"{recipe_path}: privacy.target_epsilon: cannot be reached with these steps and batch size ({e})"
        ) from None


def check(recipe_path: str | Path, overrides: dict | None = None, smoke: bool = False) -> CheckedRecipe:
    """Validate a recipe (with overrides, or its smoke variant) and its data without writing
    anything. Raises RecipeError."""
    recipe = load_recipe(recipe_path, overrides, smoke)
    images, public = _load(recipe, recipe_path)
    check_against_data(recipe, recipe_path, len(images.train_labels))
    brought = _brought(recipe, recipe_path, images, public)
    schedule = _schedule(recipe, recipe_path, images, planned_ledger(recipe, images, brought))
    model = seeded_unet(recipe, images.image_size, len(images.class_names))
    try:
        trainable_names(model, recipe.training.trainable)
    except ValueError as e:
        raise RecipeError(f"{recipe_path}: training.trainable: {e}") from None
    if recipe.pretrain is not None and recipe.pretrain.checkpoint is not None:
        try:
            model.load_state_dict(load_unet(recipe.pretrain.checkpoint).state_dict())
        except (RuntimeError, OSError, ValueError) as e:
            raise RecipeError(
                f"{recipe_path}: pretrain.checkpoint: cannot be loaded into the recipe's model "
                f"(classes + null class = {model.config.num_class_embeds} embeddings): {str(e)[:300]}"
            ) from None
    try:
        resolve_device(recipe.training.device)
    except ValueError as e:
        raise RecipeError(f"{recipe_path}: {e}") from None
    return CheckedRecipe(recipe, images, schedule, public, brought)


def _versions() -> dict:
    import datasets
    import diffusers
    import opacus
    import pydicom
    import torch

    return {
        "synthfactory": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "opacus": opacus.__version__,
        "datasets": datasets.__version__,
        "pydicom": pydicom.__version__,
    }


def write_data_stage(run_dir: RunDir, images: ImageSet, public: PublicData | None = None) -> None:
    run_dir.manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.manifest, "w") as fh:
        for entry in images.manifest:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    counts = {
        split: {name: int((labels == i).sum()) for i, name in enumerate(images.class_names)}
        for split, labels in (("train", images.train_labels), ("heldout", images.heldout_labels))
    }
    write_json_atomic(
        run_dir.data_report,
        {
            "manifest_sha256": images.manifest_sha256(),
            "image_size": images.image_size,
            "class_names": images.class_names,
            "counts": counts,
            "groups": images.group_counts(),
            "skipped": images.skipped,
            "preprocessing": images.preprocessing,
            "public_screen": public.screen if public else None,
        },
    )
    RunLedger(run_dir.ledger).own_data(images.item_ids(), data_description_of(run_dir, images))
    run_dir.mark_done("data", manifest_sha256=images.manifest_sha256(), skipped=len(images.skipped))


def data_description_of(run_dir: RunDir, images: ImageSet) -> str:
    from .privacy_record import data_description

    return data_description(load_run_recipe(run_dir.recipe), images)


def create_run(checked: CheckedRecipe, destination: Path | None = None) -> RunDir:
    """Make runs/<run id>/ with the recipe, run.json and the data stage's outputs."""
    recipe = checked.recipe
    root = Path(destination or recipe.outputs.destination) / new_run_id(recipe.name, recipe.private)
    root.mkdir(parents=True)
    run_dir = RunDir(root)
    run_dir.recipe.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(
        run_dir.run_json,
        {
            "run_id": run_dir.run_id,
            "recipe_name": recipe.name,
            "recipe_sha256": recipe.sha256(),
            "private": recipe.private,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "stages": {},
        },
    )
    write_data_stage(run_dir, checked.images, checked.public)
    return run_dir


def open_run(path: str | Path) -> tuple[CheckedRecipe, RunDir]:
    """Reload a run's recipe and data, and check the data is what the run started from."""
    run_dir = RunDir(Path(path))
    if not run_dir.run_json.exists():
        raise RecipeError(f"{path}: not a run directory (no run.json)")
    recipe = load_run_recipe(run_dir.recipe)
    report = read_json(run_dir.data_report)
    images, public = _load(recipe, run_dir.recipe, report.get("public_screen"))
    expected = report["manifest_sha256"]
    if images.manifest_sha256() != expected:
        raise RecipeError(
            f"{run_dir.recipe}: data: the images differ from those this run started with "
            f"(manifest {images.manifest_sha256()[:12]} ≠ {expected[:12]}); start a new run"
        )
    brought = _brought(recipe, run_dir.recipe, images, public)
    ledger = RunLedger(run_dir.ledger)
    done = run_dir.is_done("pretrain") and ledger.exists()
    written = ledger.read() if done else planned_ledger(recipe, images, brought)
    schedule = _schedule(recipe, run_dir.recipe, images, written)
    return CheckedRecipe(recipe, images, schedule, public, brought), run_dir


@dataclass
class StageOptions:
    progress: bool = True
    audit_root: Path | None = None
    shard: tuple[int, int] | None = None  # sample: this invocation's shard (i, n)


def _data(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    write_data_stage(run_dir, checked.images, checked.public)


def _pretrain(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    recipe = checked.recipe
    if recipe.pretrain is None and recipe.warm_start is None:
        run_dir.mark_done("pretrain", skipped="the recipe has no pre-training or warm start")
        return
    record = pretrain(recipe, checked.images, checked.public, run_dir, progress=opts.progress)
    run_dir.mark_done("pretrain", kind=record["kind"])


def _train(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    result = train(checked.recipe, checked.images, run_dir, progress=opts.progress)
    run_dir.mark_done("train", steps=result.steps, epsilon=result.epsilon, seconds=round(result.seconds, 1))


def _sample(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    """The whole sample store, or this invocation's shard (`--shard`, or this torchrun rank's);
    the process that finds every shard written assembles the store."""
    recipe = checked.recipe
    n_classes = len(checked.images.class_names)
    dist = from_env(resolve_device(recipe.training.device).type)
    shard = opts.shard or ((dist.rank, dist.world) if dist.enabled else None)
    if shard is None:
        samples = generate(recipe, run_dir, n_classes, progress=opts.progress)
    else:
        generate(recipe, run_dir, n_classes, progress=opts.progress and dist.main, shard=shard)
        barrier(dist)
        samples = merge_shards(recipe, run_dir, n_classes, shard[1]) if dist.main else None
        if samples is None:
            log.warning(
                "sample shard %d/%d written; the sample store is assembled when all are there", *shard
            )
            return
    run_dir.mark_done(
        "sample",
        n_samples=int(len(samples.labels)),
        weights="ema" if uses_ema(run_dir.final_checkpoint) else "last",
        guidance_scale=recipe.sampling.guidance_scale,
    )


def _audit_models(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    if not wants_audit_models(checked.recipe):
        run_dir.mark_done("audit_models", skipped="the recipe asks for no canary or reference model")
        return
    done = train_audit_models(checked.recipe, run_dir, checked.images, progress=opts.progress)
    run_dir.mark_done("audit_models", **done)


def _audit(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    res = run_audit(checked.recipe, run_dir, checked.images, opts.audit_root)
    if res is not None:  # None: a torchrun rank other than 0, which writes nothing
        run_dir.mark_done("audit", decision=res.decision, report=str(res.report_dir))


def _audit_report(run_dir: RunDir) -> Path | None:
    """The audit stage's report folder, as run.json records it."""
    report = run_dir.info().get("stages", {}).get("audit", {}).get("report")
    return Path(report) if report else None


def _release(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    folder, info = release(run_dir, list(checked.recipe.outputs.formats), _audit_report(run_dir))
    run_dir.mark_done("release", folder=str(folder), n_released=info["n_released"])


def _evaluate(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    if not checked.recipe.evaluation.enabled:
        run_dir.mark_done("evaluate", skipped="evaluation.enabled is false")
        return
    res = evaluate(checked.recipe, checked.images, run_dir, _audit_report(run_dir))
    run_dir.mark_done("evaluate", tstr_over_trtr=res.evaluation["tstr_over_trtr_accuracy"])


# Stage name -> the function that runs it and records it in run.json (in STAGES order).
STAGE_RUNNERS: dict[str, Callable[[CheckedRecipe, RunDir, StageOptions], None]] = {
    "data": _data,
    "pretrain": _pretrain,
    "train": _train,
    "sample": _sample,
    "audit_models": _audit_models,
    "audit": _audit,
    "release": _release,
    "evaluate": _evaluate,
}


def needs(stage: str, recipe: Recipe) -> list[str]:
    """The stages whose outputs `stage` reads, which must be done before it runs."""
    reads = {
        "pretrain": ["data"],
        "train": ["data", *(["pretrain"] if has_pretraining(recipe) else [])],
        "sample": ["train"],
        "audit_models": ["train"],
        "audit": ["sample", *(["audit_models"] if wants_audit_models(recipe) else [])],
        "release": ["audit"],
        "evaluate": ["release"],
    }
    return reads.get(stage, [])


def run_stage(stage: str, checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    """Run one stage and record it in run.json; later stages are invalidated first. A stage whose
    inputs are not there (an earlier stage not done) is refused; so is a stage whose inputs the
    run's ledger does not cover (LedgerRefused, as a RecipeError naming the run)."""
    runner = STAGE_RUNNERS.get(stage)
    if runner is None:
        raise ValueError(f"unknown stage {stage}")
    missing = [s for s in needs(stage, checked.recipe) if not run_dir.is_done(s)]
    if missing:
        raise RecipeError(
            f"{run_dir.root}: stage {stage} reads what {', '.join(missing)} writes, which has not "
            f"finished; run `synthfactory resume {run_dir.root}` (or those stages first)"
        )
    if stage in ("pretrain", "train") and run_dir.is_done("train") and training_finished(run_dir):
        raise RecipeError(
            f"{run_dir.root}: training of this run has finished and its DP secret is deleted; "
            "training again on the same private data would spend ε a second time: start a new run"
        )
    run_dir.invalidate_from(stage)
    try:
        runner(checked, run_dir, opts)
    except LedgerRefused as e:
        raise RecipeError(str(e)) from None


def run_remaining(checked: CheckedRecipe, run_dir: RunDir, opts: StageOptions) -> None:
    """Run every stage not yet done, in order (this is how an interrupted run resumes)."""
    for stage in STAGES:
        if not run_dir.is_done(stage):
            log.info("stage %s", stage)
            run_stage(stage, checked, run_dir, opts)


def summary(run_dir: RunDir) -> dict:
    """What the CLI prints at the end: read back from the run directory, never recomputed."""
    run = RunRecords.read(run_dir)
    out: dict = {
        "run_dir": str(run_dir.root),
        "run_id": run_dir.run_id,
        "stages": list(run.stages),
    }
    if run.privacy:
        out["privacy"] = run.privacy
    audit = run.audit
    if audit:
        out["audit"] = {
            "decision": audit.decision,
            "spaces": list(audit.spaces),
            "false_alarm_percent": audit.calibration["false_alarm_target_percent"],
            "heldout_near_duplicates": audit.calibration["heldout_near_duplicates"],
            "c_t": (audit.data_copying or {}).get("c_t"),
            "mia_auc": audit.mia_auc,
            "mia_auc_nonprivate": audit.mia_auc_nonprivate,
            "canary_epsilon_lower_bound": audit.canary_epsilon_lower_bound,
            "canary_accountant_epsilon": audit.canary_accountant_epsilon,
            **audit.summary,
        }
        out["report"] = run.stages.get("audit", {}).get("report")
    rel = run.stages.get("release")
    if rel:
        out["release"] = rel["folder"]
    ev = run.evaluation
    if ev:
        out["evaluation"] = {
            "tstr": ev.tstr["accuracy"],
            "trtr": ev.trtr["accuracy"],
            "ratio": ev.tstr_over_trtr_accuracy,
            "above_chance": ev.tstr_over_trtr_above_chance,
            "chance": ev.tstr["chance_accuracy"],
            "classifier_seeds": len(ev.tstr.get("per_seed", [None])),
            "fd": ev.fidelity["frechet_distance"],
            "fd_real": ev.fidelity["frechet_distance_real_train_vs_heldout"],
        }
    return out


__all__ = [
    "STAGES",
    "CheckedRecipe",
    "StageOptions",
    "check",
    "create_run",
    "open_run",
    "run_stage",
    "run_remaining",
    "summary",
]
