"""Publish a release on the Hugging Face Hub: the released DatasetDict (datasets' own
`push_to_hub`), a generated dataset card, the public audit summary and the recipe.

Only `release/` leaves: the dataset built from it holds audited, passed samples; the audit
summary holds statistics only; `internal/` reports never go. Refusal rules: a run whose training
was not private, or whose audit decided `block`, is not published unless forced with an explicit
flag, and the card's first line then says so.

Order of the push, so that an interrupted push leaves nothing half-said: (1) create the repository
(private unless asked otherwise), (2) one commit with the card, the audit summary, the recipe and
the public ledger (synthfactory_ledger.json),
(3) `DatasetDict.push_to_hub`, which uploads the Parquet shards and merges its `dataset_info` /
`configs` metadata into that card. Nothing local is modified; a rerun repeats every step
idempotently and completes an interrupted push. The token comes from huggingface_hub's usual
places (`HF_TOKEN`, `hf auth login`); synthfactory never prints or stores it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import __version__
from .model import uses_ema
from .recipe import drop_fields_the_source_never_read
from .records import AuditRecord, PrivacyRecord
from .rundir import RunDir, write_json_atomic
from .templating import environment


class PublishRefused(RuntimeError):
    """The run may not be published (not private, blocked, or nothing released)."""


TASK = "image-classification"
MODALITY_TAG = {"mri": "mri", "ct": "ct", "us": "ultrasound"}
MODALITY_WORDS = {"mri": "MRI", "ct": "CT", "us": "ultrasound"}


def _stage(run_dir: RunDir) -> dict:
    return run_dir.info().get("stages", {})


def check_publishable(
    run_dir: RunDir, force_not_private: bool = False, force_blocked: bool = False
) -> list[str]:
    """The warnings a forced publish must carry (empty when nothing is forced). Raises
    PublishRefused when the run may not be published."""
    if not run_dir.privacy.exists() or not run_dir.audit_json.exists():
        raise PublishRefused(f"{run_dir.root}: not trained and audited yet; nothing to publish")
    privacy, audit = PrivacyRecord.read(run_dir.privacy), AuditRecord.read(run_dir.audit_json)
    warnings = []
    if not privacy.private:
        why = privacy.warning or "NOT PRIVATE: this run was trained WITHOUT differential privacy"
        if not force_not_private:
            raise PublishRefused(
                f"{why}. Publishing it could leak the private images. Pass --force-not-private to "
                "publish anyway (the card will say so)"
            )
        warnings.append(f"{why}.")
    if audit.decision == "block":
        if not force_blocked:
            raise PublishRefused(
                f"the memorization audit blocked this release ({audit.summary['n_flagged']} suspected "
                "copies). Pass --force-blocked to publish the samples that passed anyway (the card will say so)"
            )
        warnings.append(
            f"AUDIT BLOCKED: the memorization audit flagged {audit.summary['n_flagged']} samples "
            "and decided to block this release; it was published anyway, without those samples."
        )
    return warnings


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def dataset_card(run_dir: RunDir, counts: dict[str, int], warnings: list[str] | None = None) -> str:
    """README.md of the dataset repository, from the run's own records (no number is typed in):
    the text is templates/dataset-card.md.j2, the metadata `huggingface_hub`'s DatasetCardData,
    the whole a DatasetCard."""
    from huggingface_hub import DatasetCard, DatasetCardData

    recipe = yaml.safe_load(run_dir.recipe.read_text())
    privacy, audit = PrivacyRecord.read(run_dir.privacy), AuditRecord.read(run_dir.audit_json)
    modality, outputs, n = recipe["modality"], recipe.get("outputs", {}), sum(counts.values())
    meta = DatasetCardData(
        license=outputs.get("license", "other"),
        task_categories=[TASK],
        tags=["synthetic", "medical", "differential-privacy", MODALITY_TAG[modality], "synthfactory"],
        pretty_name=f"synthfactory {recipe['name']} (synthetic {MODALITY_WORDS[modality]})",
        size_categories=[size_category(n)],
    )
    return _card(
        DatasetCard,
        meta,
        "dataset-card.md.j2",
        p=privacy,
        a=audit,
        n=n,
        counts=counts,
        warnings=warnings or [],
        name=recipe["name"],
        words=MODALITY_WORDS[modality],
        phantom=recipe["data"]["source"] == "phantom",
        model=recipe.get("model", {}),
        sampling=recipe.get("sampling", {}),
        ema=uses_ema(run_dir.final_checkpoint),
        fmt=_fmt,
        version=__version__,
        run_id=run_dir.run_id,
        versions=run_dir.info().get("versions", {}),
    )


def _card(card_class, meta, template: str, **context) -> str:
    """A huggingface_hub card: `meta` (CardData) as its YAML header, the template's text below."""
    body = environment(markdown=True, strict=True).get_template(template).render(**context)
    return str(card_class("---\n" + meta.to_yaml() + "\n---\n\n" + body))


def public_recipe(run_dir: RunDir) -> str:
    """The run's recipe as published: local paths cut to their last component (a hospital's
    folder layout is nobody's business), everything else as the run used it."""
    recipe = yaml.safe_load(run_dir.recipe.read_text())
    drop_fields_the_source_never_read(recipe)  # a run recorded in the older layout
    for block in (recipe.get("data"), (recipe.get("pretrain") or {}).get("data"), recipe.get("pretrain")):
        for key in ("path", "labels_csv", "checkpoint"):
            if isinstance(block, dict) and block.get(key):
                block[key] = Path(block[key]).name
    for key in ("destination", "audit_dir"):
        if (recipe.get("outputs") or {}).get(key):
            recipe["outputs"][key] = Path(recipe["outputs"][key]).name
    header = (
        f"# The recipe of synthfactory run {run_dir.run_id}; local paths cut to their last component.\n"
        "# Point data.path at your copy of the data to rerun it.\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def release_dataset(
    run_dir: RunDir, validation_fraction: float | None = None, seed: int = 0, scratch: Path | None = None
):
    """The released DatasetDict (train, and a stratified validation split if asked). A blocked
    run has no release folder; a forced publish of it builds the dataset of its unflagged
    samples in `scratch`."""
    import datasets

    from .export import audited_set, write_hf

    privacy = PrivacyRecord.read(run_dir.privacy)
    folder = run_dir.release_dir(privacy.private) / "dataset"
    if not folder.is_dir():
        if AuditRecord.read(run_dir.audit_json).decision != "block" or scratch is None:
            raise PublishRefused(f"{folder}: no released dataset; run the release stage first")
        write_hf(audited_set(run_dir, allow_blocked=True)[0], scratch)
        folder = scratch / "dataset"
    dd = datasets.load_from_disk(str(folder))
    if validation_fraction:
        parts = dd["train"].train_test_split(
            test_size=validation_fraction, seed=seed, stratify_by_column="label"
        )
        dd = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})
    return dd


def _public_ledger(run_dir: RunDir) -> bytes:
    """The generator's ledger in its public form (ledger.py): what a run that pre-trains on the
    pushed dataset composes."""
    from .ledger import read_artifact

    carried = read_artifact(run_dir.final_checkpoint / "unet")
    return json.dumps(carried.to_json(public=True), indent=2).encode()


def size_category(n: int) -> str:
    """The Hub's `size_categories` value for n rows (its tags: n<1K, 1K<n<10K, ..., n>1T)."""
    tiers = ["1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B", "100B", "1T"]
    bounds = [10**3, 10**4, 10**5, 10**6, 10**7, 10**8, 10**9, 10**10, 10**11, 10**12]
    for i, bound in enumerate(bounds):
        if n < bound:
            return f"n<{tiers[0]}" if i == 0 else f"{tiers[i - 1]}<n<{tiers[i]}"
    return "n>1T"


def hub_failure(e: BaseException) -> str | None:
    """One line for a push the Hub did not accept or could not be reached for; None for any
    other error (a bug, which keeps its traceback)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(e, LocalTokenNotFoundError):
        return "no Hub token: set HF_TOKEN or run `hf auth login`"
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            return f"the Hub refused the token (HTTP {status}): set HF_TOKEN or run `hf auth login`"
        return f"the Hub answered HTTP {status}: {' '.join(str(e).split())[:200]}"
    # httpx (or its fork httpx2) transport errors, requests' and the builtin ConnectionError
    if {c.__name__ for c in type(e).__mro__} & {"TransportError", "ConnectionError", "TimeoutError"}:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        return f"cannot reach the Hub at {constants.ENDPOINT} ({reason})"
    return None


def open_repo(repo_id: str, repo_type: str, private: bool, revision: str | None, token: str | None):
    """(HfApi, repository URL): the repository created if missing, and the branch if asked."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return api, repo


def publish(
    run_dir: RunDir,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    force_not_private: bool = False,
    force_blocked: bool = False,
    token: str | None = None,
    max_shard_size: str = "200MB",
) -> dict:
    """Push the release to `repo_id` (a dataset repository). Returns what was pushed; also
    written to publish.json in the run directory. `datasets` builds each Parquet shard (at most
    `max_shard_size`) in memory and uploads it before the next, so a large release is pushed
    shard by shard."""
    from huggingface_hub import CommitOperationAdd

    warnings = check_publishable(run_dir, force_not_private, force_blocked)
    recipe = yaml.safe_load(run_dir.recipe.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-publish-")) if force_blocked else None
    try:
        dd = release_dataset(
            run_dir, (recipe.get("outputs") or {}).get("validation_fraction"), scratch=scratch
        )
        names = dd["train"].features["label"].names
        counts = {name: 0 for name in names}
        for split in dd.values():
            for label in split["label"]:
                counts[names[label]] += 1
        card = dataset_card(run_dir, counts, warnings)
        summary = Path(_stage(run_dir)["audit"]["report"]) / "audit-summary.md"
        if not summary.exists():
            raise PublishRefused(f"{summary}: the public audit summary is missing; rerun the audit stage")

        api, repo = open_repo(repo_id, "dataset", private, revision, token)
        api.create_commit(
            repo_id,
            repo_type="dataset",
            revision=revision,
            operations=[
                CommitOperationAdd("README.md", card.encode()),
                CommitOperationAdd("privacy_audit/audit-summary.md", summary.read_bytes()),
                CommitOperationAdd("recipe.yaml", public_recipe(run_dir).encode()),
                CommitOperationAdd("synthfactory_ledger.json", _public_ledger(run_dir)),
            ],
            commit_message=f"synthfactory {run_dir.run_id}: dataset card, audit summary, recipe",
        )
        commit = dd.push_to_hub(
            repo_id,
            private=private,
            revision=revision,
            token=token,
            max_shard_size=max_shard_size,
            commit_message=f"synthfactory {run_dir.run_id}: {sum(counts.values())} audited synthetic images",
        )
        out = {
            "repo_id": repo_id,
            "url": str(repo),
            "private": private,
            "revision": revision or "main",
            "commit": getattr(commit, "oid", None),
            "splits": {k: len(v) for k, v in dd.items()},
            "warnings": warnings,
            "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(run_dir.root / "publish.json", out)
        return out
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


__all__ = [
    "PublishRefused",
    "check_publishable",
    "dataset_card",
    "public_recipe",
    "publish",
    "release_dataset",
]


# --- the generator as a model repository ---------------------------------------------------------

MODEL_FILES = ("model_index.json", "unet/", "unet_ema/", "scheduler/")
INTERNAL_FILES = ("synthfactory_origin.json", "synthfactory_ledger.json")  # replaced by the public ledger


def withheld_warning(run_dir: RunDir, force_withheld: bool) -> list[str]:
    """The generator can draw again what the audit withheld from the dataset: each sample comes
    from a public seed (the release's sample_seed; the gaps in sample_index mark the withheld
    ones), and the recipe is published. Publishing the generator of such a run asks for
    `force_withheld` and says so on the card."""
    audit = AuditRecord.read(run_dir.audit_json)
    withheld = audit.summary["n_samples"] - audit.summary["n_released"]
    if not withheld:
        return []
    why = (
        f"the memorization audit withheld {withheld} of this run's {audit.summary['n_samples']} samples "
        "from its dataset as suspected copies; this generator (covered by ε) draws them again from their "
        "seeds (the gaps in the dataset's sample_index), so publishing it undoes that screen"
    )
    if not force_withheld:
        raise PublishRefused(
            f"{why}. Pass --force-withheld to publish the generator anyway (its card will say so)"
        )
    return [f"{why[0].upper()}{why[1:]}; published anyway (--force-withheld)."]


def model_card(run_dir: RunDir, warnings: list[str] | None = None) -> str:
    """README.md of the model repository: huggingface_hub's ModelCard, its text
    templates/model-card.md.j2. The DP statement in numbers and words, what was public, the data
    described without any figure computed from it."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe = yaml.safe_load(run_dir.recipe.read_text())
    privacy = PrivacyRecord.read(run_dir.privacy)
    modality, data = recipe["modality"], recipe["data"]
    words = MODALITY_WORDS[modality]
    meta = ModelCardData(
        library_name="diffusers",
        license=(recipe.get("outputs") or {}).get("license", "other"),
        tags=[
            "synthetic",
            "medical",
            "differential-privacy",
            MODALITY_TAG[modality],
            "synthfactory",
            "class-conditional",
            "diffusers:ClassConditionalPipeline",
        ],  # fmt: skip
    )
    return _card(
        ModelCard,
        meta,
        "model-card.md.j2",
        p=privacy,
        data=data,
        words=words,
        name=recipe["name"],
        warnings=warnings or [],
        ddim_steps=(recipe.get("sampling") or {}).get("ddim_steps", 50),
        ema=uses_ema(run_dir.final_checkpoint),
        version=__version__,
        run_id=run_dir.run_id,
        withheld=_withheld(run_dir),
    )


def _withheld(run_dir: RunDir) -> int:
    """How many samples the audit kept out of the run's dataset (what its generator can draw)."""
    if not run_dir.audit_json.exists():
        return 0
    s = AuditRecord.read(run_dir.audit_json).summary
    return int(s["n_samples"] - s["n_released"])


def publish_model(
    run_dir: RunDir,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    force_not_private: bool = False,
    force_blocked: bool = False,
    token: str | None = None,
    force_withheld: bool = False,
) -> dict:
    """Push the run's pipeline (checkpoints/final, each model folder with the public form of its
    ledger instead of the internal one) and its model card to `repo_id` (a model repository), in
    one commit. The dataset's refusal rules, and one more: a run whose audit withheld samples asks
    for `force_withheld` (withheld_warning). Returns what was pushed; also written to
    publish_model.json in the run directory."""
    from huggingface_hub import CommitOperationAdd

    from .ledger import ARTIFACT_FILE, read_artifact

    warnings = check_publishable(run_dir, force_not_private, force_blocked)
    warnings += withheld_warning(run_dir, force_withheld)
    final = run_dir.final_checkpoint
    if not (final / "model_index.json").is_file():
        raise PublishRefused(f"{final}: no model_index.json (trained before pipelines were saved); retrain")
    files = sorted(
        p for p in final.rglob("*")
        if p.is_file() and p.relative_to(final).as_posix().startswith(MODEL_FILES)
        and p.name not in INTERNAL_FILES
    )  # fmt: skip
    ops = [CommitOperationAdd(p.relative_to(final).as_posix(), p.read_bytes()) for p in files]
    for unet in ("unet", "unet_ema"):
        carried = read_artifact(final / unet) if (final / unet / ARTIFACT_FILE).is_file() else None
        if carried is not None:
            public = json.dumps(carried.to_json(public=True), indent=2).encode()
            ops.append(CommitOperationAdd(f"{unet}/{ARTIFACT_FILE}", public))
    ops.append(CommitOperationAdd("README.md", model_card(run_dir, warnings).encode()))
    api, repo = open_repo(repo_id, "model", private, revision, token)
    commit = api.create_commit(
        repo_id, operations=ops, repo_type="model", revision=revision,
        commit_message=f"synthfactory {run_dir.run_id}: DP generator (ClassConditionalPipeline) and model card",
    )  # fmt: skip
    out = {
        "repo_id": repo_id,
        "url": str(repo),
        "private": private,
        "revision": revision or "main",
        "commit": getattr(commit, "oid", None),
        "files": [op.path_in_repo for op in ops],
        "warnings": warnings,
        "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(run_dir.root / "publish_model.json", out)
    return out
