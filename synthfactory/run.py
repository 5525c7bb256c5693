"""Stage order and the run directory: create a run, run or resume its stages.

Every stage reads what the previous one wrote in the run directory and writes its own part,
so any stage can be rerun alone. Nothing is written before the recipe and its data are valid.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import __version__
from .audit import run_audit
from .data import DataError, ImageSet, load_images
from .export import release
from .recipe import Recipe, RecipeError, check_against_data, load_recipe
from .rundir import STAGES, RunDir, new_run_id, read_json, write_json_atomic
from .sample import generate
from .train import plan_training, train

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """A recipe that validated against its data, with the data and the training plan."""

    recipe: Recipe
    images: ImageSet
    plan: dict


def check(recipe_path: str | Path) -> Checked:
    """Validate a recipe and its data without writing anything. Raises RecipeError."""
    recipe = load_recipe(recipe_path)
    try:
        images = load_images(recipe.data, recipe.modality)
    except DataError as e:
        raise RecipeError(f"{recipe_path}: data.{e.field}: {e}") from None
    check_against_data(recipe, recipe_path, len(images.train_labels))
    try:
        plan = plan_training(recipe, len(images.train_labels))
    except ValueError as e:
        raise RecipeError(
            f"{recipe_path}: privacy.target_epsilon: cannot be reached with these steps and batch size ({e})"
        ) from None
    return Checked(recipe, images, plan)


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


def write_data_stage(run_dir: RunDir, images: ImageSet) -> None:
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
            "skipped": images.skipped,
            "preprocessing": images.preprocessing,
        },
    )
    run_dir.mark_done("data", manifest_sha256=images.manifest_sha256(), skipped=len(images.skipped))


def create_run(checked: Checked, destination: Path | None = None) -> RunDir:
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
    write_data_stage(run_dir, checked.images)
    return run_dir


def open_run(path: str | Path) -> tuple[Recipe, ImageSet, RunDir]:
    """Reload a run's recipe and data, and check the data is what the run started from."""
    run_dir = RunDir(Path(path))
    if not run_dir.run_json.exists():
        raise RecipeError(f"{path}: not a run directory (no run.json)")
    recipe = load_recipe(run_dir.recipe)
    try:
        images = load_images(recipe.data, recipe.modality)
    except DataError as e:
        raise RecipeError(f"{run_dir.recipe}: data.{e.field}: {e}") from None
    expected = read_json(run_dir.data_report)["manifest_sha256"]
    if images.manifest_sha256() != expected:
        raise RecipeError(
            f"{run_dir.recipe}: data: the images differ from those this run started with "
            f"(manifest {images.manifest_sha256()[:12]} ≠ {expected[:12]}); start a new run"
        )
    return recipe, images, run_dir


@dataclass
class StageOptions:
    progress: bool = True
    audit_root: Path | None = None


def run_stage(stage: str, recipe: Recipe, images: ImageSet, run_dir: RunDir, opts: StageOptions) -> None:
    """Run one stage and record it in run.json; later stages are invalidated first."""
    run_dir.invalidate_from(stage)
    if stage == "data":
        write_data_stage(run_dir, images)
        return
    if stage == "train":
        result = train(recipe, images, run_dir, progress=opts.progress)
        run_dir.mark_done(
            "train", steps=result.steps, epsilon=result.epsilon, seconds=round(result.seconds, 1)
        )
    elif stage == "sample":
        samples = generate(recipe, run_dir, len(images.class_names), progress=opts.progress)
        run_dir.mark_done("sample", n_samples=int(len(samples.labels)))
    elif stage == "audit":
        res = run_audit(recipe, run_dir, images, opts.audit_root)
        run_dir.mark_done("audit", decision=res.decision, report=str(res.report_dir))
    elif stage == "release":
        folder, info = release(run_dir, list(recipe.outputs.formats), recipe.private)
        run_dir.mark_done("release", folder=str(folder), n_released=info["n_released"])
    else:
        raise ValueError(f"unknown stage {stage}")


def run_remaining(recipe: Recipe, images: ImageSet, run_dir: RunDir, opts: StageOptions) -> None:
    """Run every stage not yet done, in order (this is how an interrupted run resumes)."""
    for stage in STAGES:
        if not run_dir.is_done(stage):
            log.info("stage %s", stage)
            run_stage(stage, recipe, images, run_dir, opts)


def summary(run_dir: RunDir) -> dict:
    """What the CLI prints at the end: read back from the run directory, never recomputed."""
    info = run_dir.info()
    out: dict = {
        "run_dir": str(run_dir.root),
        "run_id": run_dir.run_id,
        "stages": list(info.get("stages", {})),
    }
    if run_dir.privacy.exists():
        out["privacy"] = read_json(run_dir.privacy)
    if run_dir.audit_json.exists():
        audit = read_json(run_dir.audit_json)
        out["audit"] = {
            "decision": audit["decision"],
            "threshold": audit["threshold"]["value"],
            "percentile": audit["threshold"]["percentile"],
            **audit["summary"],
        }
        out["report"] = info.get("stages", {}).get("audit", {}).get("report")
    rel = info.get("stages", {}).get("release")
    if rel:
        out["release"] = rel["folder"]
    return out


__all__ = [
    "STAGES",
    "Checked",
    "StageOptions",
    "check",
    "create_run",
    "open_run",
    "run_stage",
    "run_remaining",
    "summary",
]
