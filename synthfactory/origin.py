"""Where a model's weights come from, and what that allows when they start another run.

Every UNet folder synthfactory saves carries `synthfactory_origin.json`: whether the weights saw
private images, which data set (its manifest hash), whether that training was private, and its
accountant history. `pretrain.checkpoint` reads it (or, for a folder inside an older run
directory, that run's privacy.json) and decides:

- weights that saw no private image (public pre-training, an outside checkpoint declared
  public): public;
- weights trained on other private data, provably no training image in common (the source run's
  manifest is there to compare): public to this run;
- weights trained with DP on this data (or on data that cannot be shown to be other): the run
  *composes* with them: their accountant history enters this run's accountant, and the ε
  reported is the composed one;
- weights trained on this data without DP, or with seeded DP noise: refused.

A checkpoint stripped of its origin file and moved out of its run directory cannot be
recognised; the recipe then declares it public, and the record says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .records import PrivacyRecord
from .rundir import RunDir, read_json, write_json_atomic

ORIGIN_FILE = "synthfactory_origin.json"


class CheckpointRefused(ValueError):
    """A checkpoint that may not start a private run on this data."""


def write_origin(model_folder: Path, origin: dict) -> None:
    write_json_atomic(Path(model_folder) / ORIGIN_FILE, origin)


def trained_origin(run_id: str, manifest_sha256: str, privacy: dict) -> dict:
    """The origin of weights a run trained on its private images (privacy: its privacy record)."""
    return {
        "run_id": run_id,
        "trained_on_private_data": True,
        "data_manifest_sha256": manifest_sha256,
        "private": bool(privacy["private"]),
        "accountant_history": privacy.get("accountant_history") or [],
        "delta": privacy.get("delta"),
        "epsilon": privacy.get("epsilon"),
    }


def public_origin(statement: str) -> dict:
    """The origin of weights that saw no private image (public pre-training)."""
    return {"trained_on_private_data": False, "statement": statement}


def enclosing_run(path: Path) -> RunDir | None:
    """The synthfactory run directory a path lies in (the nearest folder with run.json and
    recipe.yaml)."""
    for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
        if (folder / "run.json").is_file() and (folder / "recipe.yaml").is_file():
            return RunDir(folder)
    return None


def read_origin(checkpoint: Path) -> dict | None:
    """The checkpoint's origin: its own file, else (an older run) its run directory's privacy
    record; None for a folder synthfactory did not write."""
    own = Path(checkpoint) / ORIGIN_FILE
    if own.is_file():
        return read_json(own)
    run = enclosing_run(checkpoint)
    if run is None:
        return None
    if not run.privacy.is_file():
        raise CheckpointRefused(
            f"{checkpoint} lies in the run directory {run.root}, which has not finished training; "
            "what it was trained on cannot be told"
        )
    privacy = PrivacyRecord.read(run.privacy)
    return trained_origin(run.run_id, privacy.data_manifest_sha256, privacy.to_dict())


def _training_hashes(run: RunDir) -> set[str] | None:
    if not run.manifest.is_file():
        return None
    lines = (json.loads(x) for x in run.manifest.read_text().splitlines() if x.strip())
    return {m["sha256"] for m in lines if m.get("split") == "train"}


@dataclass
class CheckpointUse:
    """What a checkpoint is to this run: public, or a DP run to compose with."""

    kind: str  # "external", "public", "other_data", "composed" or "not_private"
    statement: str
    origin: dict | None = None
    prior_history: list = field(default_factory=list)  # composed: the source's accountant history


def checkpoint_use(
    checkpoint: Path, train_hashes: set[str], manifest_sha256: str, for_private_run: bool = True
) -> CheckpointUse:
    """Decide how `checkpoint` may start a run whose private training images have these hashes.
    Raises CheckpointRefused (only for a run that is to be private: a NOT PRIVATE run may start
    from a non-private model of its data, and stays NOT PRIVATE)."""
    origin = read_origin(checkpoint)
    if origin is None:
        return CheckpointUse("external", "not written by synthfactory; declared public by the recipe")
    if not origin.get("trained_on_private_data"):
        return CheckpointUse("public", origin.get("statement", "saw no private image"), origin)
    run = enclosing_run(checkpoint)
    theirs = _training_hashes(run) if run is not None else None
    same = origin.get("data_manifest_sha256") == manifest_sha256
    if not same and theirs is not None and not theirs & train_hashes:
        return CheckpointUse(
            "other_data",
            f"trained by synthfactory run {origin.get('run_id')} on other data (no training image "
            "in common with this run's); public to this run",
            origin,
        )
    overlap = "the same data" if same or theirs is not None else "data that cannot be shown to be other"
    if not origin.get("private"):
        if not for_private_run:
            return CheckpointUse(
                "not_private",
                f"weights of run {origin.get('run_id')} on {overlap}, trained without a DP guarantee; "
                "this run is NOT PRIVATE either",
                origin,
            )
        raise CheckpointRefused(
            f"{checkpoint} was trained by run {origin.get('run_id')} on {overlap} WITHOUT a DP guarantee "
            "(no DP-SGD, or seeded DP noise); a non-private model of the private images cannot start a "
            "private run"
        )
    history = [tuple(h) for h in origin.get("accountant_history") or []]
    return CheckpointUse(
        "composed",
        f"weights of the DP run {origin.get('run_id')} on {overlap}: its accountant history "
        f"({sum(h[2] for h in history)} steps) is composed into this run's ε",
        origin,
        history,
    )


__all__ = [
    "ORIGIN_FILE",
    "CheckpointRefused",
    "CheckpointUse",
    "checkpoint_use",
    "enclosing_run",
    "public_origin",
    "read_origin",
    "trained_origin",
    "write_origin",
]
