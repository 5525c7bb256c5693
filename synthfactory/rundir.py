"""The run directory: the one hand-off between stages, and the record a reviewer opens.

    runs/<run id>/                    run id = <recipe name>[-NOT-PRIVATE]-<UTC time>-<4 hex>
      recipe.yaml                     the validated recipe, input paths made absolute
      run.json                        id, recipe hash, versions, stages done (and when)
      ledger.jsonl                    the privacy ledger (ledger.py): every mechanism that read the
                                      private images, and every ancestor's a checkpoint or data set
                                      brought in; append-only, written before each answer is used
      data/manifest.jsonl             one line per real image: split, index, label, sha256, source,
                                      item (the identity of its source item, for the ledger)
      data/data_report.json           counts per split and class, skipped files and why,
                                      preprocessing, manifest hash
      checkpoints/pretrained/         public pre-training and/or the warm start (if the recipe has
                                      them): unet/ (with its synthfactory_ledger.json), pretrain.json
      checkpoints/public_stage.pt,    the pretrain stage's resumable states (public pre-training;
      checkpoints/warm_start_stage.pt the warm start's training on its DP answer), every
                                      `training.checkpoint_every` steps; deleted when it ends
      checkpoints/central_images.npz  the warm start's DP answer: noisy class means and counts
                                      (covered by ε; asked once per run, reused on a re-run)
      checkpoints/train_state.pt      resumable training state (model, EMA, optimizer, accountant
                                      history, RNG states, step); written atomically
      checkpoints/final/              a ClassConditionalPipeline folder (model_index.json):
      checkpoints/final/unet/         diffusers UNet2DModel, last weights (save_pretrained); each
                                      model folder carries synthfactory_ledger.json (its lineage)
      checkpoints/final/unet_ema/     the EMA of the weights (what sampling uses by default)
      checkpoints/final/scheduler/    diffusers DDPMScheduler (save_pretrained)
      checkpoints/final/synthfactory.json  class names, null (unconditional) class, EMA decay
      privacy.json                    ε spent (accountant, steps taken), δ, σ, q, steps, C, ...
      train_log.jsonl                 step, batch size, loss (computed on private data: internal)
      samples/store/                  the samples: images.npy (uint8 [M, H, W], plain .npy, read
                                      memory-mapped or one at a time), labels.npy, seeds.npy
                                      (per-sample seeds)
      samples/shard-i-of-n.npz        one sampling shard (`--shard i/n`, torchrun), until merged
      audit_models/canary/            the canary audit's DP model (if the recipe asks): its own
                                      checkpoints/, privacy.json, train_log.jsonl and canary.json
                                      (canaries in/out, scores, bound); never sampled or released
      audit_models/nonprivate/        a NON-private reference model for the membership attack (if
                                      the recipe asks); never sampled or released
      audit/audit.json                the memorization audit (same file as under privacy_audits/)
      audit/nearest.npz               nearest training index and distance per sample,
                                      held-out→train distances
      release/ (release-NOT-PRIVATE/) dataset/ (datasets save_to_disk), png/<class>/*.png,
                                      dicom/<class>/*.dcm, sample_grid.png, release.json
                                      (what was released and why), synthfactory_ledger.json in
                                      each (the public ledger: mechanisms, no data identity)
      publish.json                    the Hub push: repository, revision, commit, splits
      evaluation.json                 TSTR/TRTR, fidelity, diversity of the released samples

Everything in a run directory except `release/` is internal: it names private images by
index and hash, and holds a model trained on them. Only `release/` is meant to leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .distributed import launched

_UMASK = os.umask(0)
os.umask(_UMASK)

STAGES = ("data", "pretrain", "train", "sample", "audit_models", "audit", "release", "evaluate")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader never sees half a file (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_path(path: Path) -> Path:
    """A temporary sibling path to write to before `os.replace(tmp, path)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and move it into place only when the block
    ends without an error (replacing any earlier folder); on an error the half-built folder is
    removed. Readers see the old folder or the complete new one, never a partial one."""
    tmp = atomic_path(final)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_sha256(folder: Path) -> str:
    """One hash over a folder's files (relative names and contents), e.g. a saved model."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def enclosing_run_dir(path: Path) -> Path | None:
    """The synthfactory run directory a path lies in (the nearest folder with run.json and
    recipe.yaml), or None."""
    for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
        if (folder / "run.json").is_file() and (folder / "recipe.yaml").is_file():
            return folder
    return None


def new_run_id(name: str, private: bool) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    marker = "" if private else "-NOT-PRIVATE"
    return f"{name}{marker}-{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifest.jsonl"

    @property
    def data_report(self) -> Path:
        return self.root / "data" / "data_report.json"

    @property
    def train_state(self) -> Path:
        return self.root / "checkpoints" / "train_state.pt"

    @property
    def pretrained(self) -> Path:
        return self.root / "checkpoints" / "pretrained"

    def stage_state(self, stage: str) -> Path:
        """The resumable state of one of the pretrain stage's trainings (`public`, `warm_start`)."""
        return self.root / "checkpoints" / f"{stage}_stage.pt"

    @property
    def central_images(self) -> Path:
        return self.root / "checkpoints" / "central_images.npz"

    @property
    def final_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "final"

    @property
    def privacy(self) -> Path:
        return self.root / "privacy.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples" / "store"

    @property
    def canary_run(self) -> RunDir:
        """The canary audit's training run: a run directory of its own, inside this one."""
        return RunDir(self.root / "audit_models" / "canary")

    @property
    def canary_json(self) -> Path:
        return self.canary_run.root / "canary.json"

    @property
    def nonprivate_run(self) -> RunDir:
        """The non-private reference model's training run (membership-attack baseline)."""
        return RunDir(self.root / "audit_models" / "nonprivate")

    @property
    def audit_json(self) -> Path:
        return self.root / "audit" / "audit.json"

    @property
    def nearest(self) -> Path:
        return self.root / "audit" / "nearest.npz"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    def release_dir(self, private: bool) -> Path:
        return self.root / ("release" if private else "release-NOT-PRIVATE")

    # -- run.json: which stages are done -------------------------------------------------
    def info(self) -> dict:
        return read_json(self.run_json) if self.run_json.exists() else {}

    def mark_done(self, stage: str, **details: Any) -> None:
        if not launched().main:
            return
        info = self.info()
        info.setdefault("stages", {})[stage] = {
            "done": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **details,
        }
        write_json_atomic(self.run_json, info)

    def is_done(self, stage: str) -> bool:
        return stage in self.info().get("stages", {})

    def invalidate_from(self, stage: str) -> None:
        """Forget `stage` and every later stage (they rest on its outputs)."""
        if not launched().main:
            return
        info = self.info()
        later = STAGES[STAGES.index(stage) :]
        info["stages"] = {k: v for k, v in info.get("stages", {}).items() if k not in later}
        write_json_atomic(self.run_json, info)
