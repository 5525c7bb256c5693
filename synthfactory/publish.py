"""Publish a release on the Hugging Face Hub: the released DatasetDict (datasets' own
`push_to_hub`), a generated dataset card, the public audit summary and the recipe.

Only `release/` leaves: the dataset built from it holds audited, passed samples; the audit
summary holds statistics only; `internal/` reports never go. Refusal rules: a run whose training
was not private, or whose audit decided `block`, is not published unless forced with an explicit
flag, and the card's first line then says so.

Order of the push, so that an interrupted push leaves nothing half-said: (1) create the repository
(private unless asked otherwise), (2) one commit with the card, the audit summary and the recipe,
(3) `DatasetDict.push_to_hub`, which uploads the Parquet shards and merges its `dataset_info` /
`configs` metadata into that card. Nothing local is modified; a rerun repeats every step
idempotently and completes an interrupted push. The token comes from huggingface_hub's usual
places (`HF_TOKEN`, `hf auth login`); synthfactory never prints or stores it.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import __version__
from .model import uses_ema
from .records import AuditRecord, PrivacyRecord
from .rundir import RunDir, write_json_atomic


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


def _guarantee_lines(privacy: PrivacyRecord, summary: dict, n_released: int) -> list[str]:
    """The DP statement of a private run: the mechanism in numbers, what ε covers and what not."""
    s = summary
    composed, warm = privacy.composed_with, privacy.warm_start
    lines = [
        f"The generator was trained with DP-SGD (Opacus): each example's gradient clipped to norm "
        f"{privacy.max_grad_norm:g}, Gaussian noise with multiplier σ = {privacy.noise_multiplier:.4f}, "
        f"Poisson sampling at rate q = {privacy.sample_rate:.4g}, {privacy.steps_taken} steps"
        + (
            f", starting from the weights of an earlier DP run on the same data (its ε "
            f"{composed['epsilon_alone']:.3f} alone; the figure below is the composed one)"
            if composed
            else ""
        )
        + (
            f", after a DP warm start: one Gaussian-mechanism query of the per-class mean images at "
            f"{warm['image_size']}×{warm['image_size']} px (σ = {warm['noise_multiplier']:g}; its ε "
            f"{_fmt(warm.get('epsilon_alone'))} alone), on which the model was pre-trained"
            if warm
            else ""
        )
        + f". The {privacy.accountant.upper()} accountant gives **(ε = {privacy.epsilon:.3f}, "
        f"δ = {privacy.delta:g})**-differential privacy at the level of one training image "
        f"(target ε {privacy.target_epsilon:g}; the other accountant: "
        + ", ".join(f"{k} {v:.3f}" for k, v in privacy.epsilon_other_accountant.items())
        + ").",
        "",
        "**What ε covers.** The generator's weights, and every image it drew: all "
        f"{s['n_samples']} samples, generated from public seeds before the audit. Whether or not any "
        "single patient image was in the training set changes the probability of any such outcome by "
        f"at most a factor e^{privacy.epsilon:.2f}, except with probability δ. Each column of this "
        "dataset (image, label, run id, sample seed, sample index) is such an outcome.",
        "",
        f"**What ε does not cover.** Which samples were released: the memorization audit compared "
        f"every sample with the private training images and withheld {s['n_samples'] - n_released} of "
        f"them ({n_released} released), so the selection depends on those images beyond ε; and the "
        "audit statistics below (thresholds, distance percentiles, counts, the data-copying test, the "
        "membership attack), computed from the private images. In full: "
        + "; ".join(privacy.not_covered_by_epsilon)
        + ".",
        "",
        "Treated as public: " + "; ".join(privacy.public_inputs) + ".",
        "",
    ]
    return lines


def dataset_card(run_dir: RunDir, counts: dict[str, int], warnings: list[str] | None = None) -> str:
    """README.md of the dataset repository, from the run's own records (no number is typed in):
    `huggingface_hub`'s DatasetCard, its metadata a DatasetCardData."""
    from huggingface_hub import DatasetCard, DatasetCardData

    recipe = yaml.safe_load(run_dir.recipe.read_text())
    privacy, audit = PrivacyRecord.read(run_dir.privacy), AuditRecord.read(run_dir.audit_json)
    info = run_dir.info()
    modality = recipe["modality"]
    model = recipe.get("model", {})
    sampling = recipe.get("sampling", {})
    outputs = recipe.get("outputs", {})
    n = sum(counts.values())
    meta = DatasetCardData(
        license=outputs.get("license", "other"),
        task_categories=[TASK],
        tags=["synthetic", "medical", "differential-privacy", MODALITY_TAG[modality], "synthfactory"],
        pretty_name=f"synthfactory {recipe['name']} (synthetic {MODALITY_WORDS[modality]})",
        size_categories=[size_category(n)],
    )
    lines = []
    for w in warnings or []:
        lines.append(f"**WARNING: {w}**")
        lines.append("")
    s = audit.summary
    lines += [
        f"# Synthetic {MODALITY_WORDS[modality]} images: {recipe['name']}",
        "",
        f"{n} **synthetic** {MODALITY_WORDS[modality]} images ({audit.data['image_size'][0]}×"
        f"{audit.data['image_size'][1]}, 8-bit grayscale) in {len(counts)} classes, generated by "
        "synthfactory from a class-conditional diffusion model trained "
        + ("with differentially private SGD" if privacy.private else "**without a privacy guarantee**")
        + " on "
        + (
            "synthfactory's built-in phantom images (a demonstration; no patient data)"
            if recipe["data"]["source"] == "phantom"
            else "a private set of real images"
        )
        + ", and screened by a memorization audit before release.",
        "",
        "**What this is not.** No image shows a real patient, and none may be used for diagnosis or "
        "clinical decisions. The images are not validated for any clinical task; labels are the "
        "classes the generator was asked for, not readings by a clinician.",
        "",
        "## Generator",
        "",
        f"- model: diffusers `UNet2DModel`, block channels {model.get('block_out_channels')}, "
        f"{model.get('num_train_timesteps', 1000)} training timesteps, `{model.get('beta_schedule', 'squaredcos_cap_v2')}` "
        "schedule, ε-prediction, class-conditional",
        f"- training: {privacy.steps_taken} steps, expected batch {privacy.expected_batch_size}, "
        f"{privacy.n_train} private training images"
        + (
            f", after {privacy.warm_start['steps']} pre-training steps on the DP warm start's "
            "class-mean images"
            if privacy.warm_start
            else ""
        ),
        f"- sampler: DDIM, {sampling.get('ddim_steps')} steps, guidance scale {sampling.get('guidance_scale', 1.0)}, "
        + ("EMA weights" if uses_ema(run_dir.final_checkpoint) else "last weights"),
        "",
        "## Privacy guarantee",
        "",
    ]
    if privacy.private:
        lines += _guarantee_lines(privacy, audit.summary, n)
    else:
        lines += [f"**None.** {privacy.warning or 'NOT PRIVATE'}.", ""]
    c = audit.calibration
    mia = audit.membership_inference or {}
    dc = audit.data_copying or {}
    ca = audit.canary_audit or {}
    lines += [
        "## Memorization audit",
        "",
        "The figures in this section are computed from the private images and are not covered by ε.",
        "",
        f"Every generated sample was compared with its nearest real training image in "
        f"{len(audit.spaces)} similarity spaces ({', '.join(audit.spaces)}); a sample closer than "
        f"the {c['false_alarm_target_percent']:g} % most extreme held-out real images in any space is a "
        f"suspected copy (action `{audit.action}`). Generated {s['n_samples']}, suspected copies "
        f"{s['n_flagged']}, dropped {s['n_dropped']}, released {s['n_released']}; decision **{audit.decision}**.",
        "",
        "Flagged when (global thresholds; per class where a class had enough held-out images): "
        + ", ".join(
            f"{n} {'>' if sp['closer_is'] == 'higher' else '<'} {sp['threshold']:.4g}"
            for n, sp in audit.spaces.items()
        )
        + f"; {c['heldout_near_duplicates']} held-out near-copies of training images left out of the calibration.",
        "",
        "| check | result |",
        "| --- | --- |",
        f"| data-copying test C_T (Meehan et al. 2020) | {_fmt(dc.get('c_t'), '.2f')} |",
        f"| membership inference (loss attack) ROC AUC | {_fmt(mia.get('auc'))} |",
        f"| membership inference TPR at 1 % FPR | {_fmt(mia.get('tpr_at_1pct_fpr'))} |",
    ]
    if mia.get("nonprivate_reference"):
        lines.append(
            f"| same attack on a non-private reference model, AUC | {mia['nonprivate_reference']['auc']:.3f} |"
        )
    if ca:
        lines.append(
            f"| canary audit: empirical ε lower bound ({ca['confidence']:.0%}) | {ca['epsilon_lower_bound']:.3f} "
            f"(accountant ε {_fmt(ca['accountant_epsilon'])}) |"
        )
    if mia.get("nonprivate_reference"):
        lines += ["", "The non-private reference's figures come from a model trained without DP on the "
                  "private images (never released): they are not covered by ε."]  # fmt: skip
    if ca and privacy.private and ca.get("accountant_epsilon") is not None:
        lines += [
            "",
            f"The canary figure comes from a second DP training run on the same private images "
            f"(accountant ε {ca['accountant_epsilon']:.3f}, never released): the dataset and the canary "
            f"figure together are covered by ε = {privacy.epsilon + ca['accountant_epsilon']:.3f} by "
            "basic composition; the dataset alone by the released model's ε.",
        ]
    lines += [
        "",
        "The full statistics are in `privacy_audit/audit-summary.md` in this repository.",
        "",
        "## Classes",
        "",
        "| class | images |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in counts.items()],
        "",
        "## Columns",
        "",
        "`image` (PIL, 8-bit grayscale), `label` (ClassLabel), `run_id`, `sample_seed` (the seed of the "
        "image's starting noise), `sample_index` (its index among all generated samples). Nothing else: "
        "no per-image audit figure, since any distance to a private image would leak outside ε.",
        "",
        "## Intended uses and limitations",
        "",
        "- Intended: method development, teaching, pre-training and augmentation experiments, sharing a "
        "dataset's look and class structure where the real images cannot be shared.",
        "- Not intended: diagnosis, clinical validation, or estimating disease prevalence.",
        "- Image quality is limited by the privacy budget and the model size; measure utility on your task "
        "(the run's TSTR/TRTR figures are in the synthfactory report).",
        f"- Memorization audit: {audit.limits[0]} It reads the private images (see 'Not covered by ε').",
        "",
        "## Reproduce",
        "",
        f"- recipe: `recipe.yaml` in this repository (sha256 `{privacy.recipe_sha256}`)",
        f"- synthfactory {__version__}; run `{run_dir.run_id}`; "
        + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if k != "synthfactory"),
        "- `synthfactory run recipe.yaml` with the same data reproduces the pipeline"
        + (" (DP noise is drawn from a secret seed, so the images differ)" if privacy.private else ""),
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("<this repo id>")',
        "```",
        "",
    ]
    return str(DatasetCard("---\n" + meta.to_yaml() + "\n---\n\n" + "\n".join(lines)))


def public_recipe(run_dir: RunDir) -> str:
    """The run's recipe as published: local paths cut to their last component (a hospital's
    folder layout is nobody's business), everything else as the run used it."""
    recipe = yaml.safe_load(run_dir.recipe.read_text())
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

MODEL_FILES = ("model_index.json", "unet/", "unet_ema/", "scheduler/")  # not synthfactory_origin.json


def model_card(run_dir: RunDir, warnings: list[str] | None = None) -> str:
    """README.md of the model repository: huggingface_hub's ModelCard. The DP statement in numbers
    and words, what was public, the data described without any figure computed from it."""
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
    source = (
        "synthfactory's built-in phantom images (no patient data)"
        if data["source"] == "phantom"
        else f"a private set of real {words} images"
    )
    lines = [f"**WARNING: {w}**\n" for w in warnings or []] + [
        f"# {words} generator: {recipe['name']}",
        "",
        f"A class-conditional diffusion model (diffusers `UNet2DModel`, {data['image_size']}×"
        f"{data['image_size']} px, 8-bit grayscale) trained by synthfactory on {source}, classes: "
        + ", ".join(f"{i} = {c}" for i, c in enumerate(data["classes"]))
        + ". It draws synthetic images of a chosen class; none shows a real patient, and none may "
        "be used for diagnosis or clinical decisions.",
        "",
        "## Privacy guarantee",
        "",
    ]
    if privacy.private:
        lines += [
            f"Trained with DP-SGD (Opacus): per-example gradients clipped to norm {privacy.max_grad_norm:g}, "
            f"Gaussian noise multiplier σ = {privacy.noise_multiplier:.4f}, Poisson sampling at rate "
            f"q = {privacy.sample_rate:.4g}, {privacy.steps_taken} steps. The "
            f"{privacy.accountant.upper()} accountant gives **(ε = {privacy.epsilon:.3f}, "
            f"δ = {privacy.delta:g})**-differential privacy at the level of one training image, "
            "with everything else the run learned from the private images composed into it.",
            "",
            "**In words:** whether or not any single patient image was in the training set changes the "
            f"probability of these weights, and of anything generated from them, by at most a factor "
            f"e^{privacy.epsilon:.2f}, except with probability δ. This repository holds nothing else "
            "computed from the private images: no audit figure, no count, no data hash.",
            "",
            "Treated as public: " + "; ".join(privacy.public_inputs) + ".",
        ]
    else:
        lines += [f"**None.** {privacy.warning or 'NOT PRIVATE'}."]
    use_ema = (
        "its EMA weights (`unet_ema`)" if uses_ema(run_dir.final_checkpoint) else "its last weights (`unet`)"
    )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from synthfactory.pipeline import ClassConditionalPipeline",
        "",
        'pipe = ClassConditionalPipeline.from_pretrained("<this repo id>")',
        f"images = pipe([0, 1], num_inference_steps={(recipe.get('sampling') or {}).get('ddim_steps', 50)},",
        "              generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images",
        "```",
        "",
        f"The pipeline samples with DDIM over the training noise schedule and {use_ema}.",
        "",
        "## Intended uses and limitations",
        "",
        "- Intended: generating synthetic training or teaching data where the real images cannot be "
        "shared; method development.",
        "- Not intended: diagnosis, clinical validation, estimating prevalence.",
        "- Image quality is limited by the privacy budget, the model size and the training length; "
        "measure utility on your task. Samples are not screened for memorization here (synthfactory's "
        "audit screens a released dataset, not this model): DP bounds what any sample can reveal.",
        "",
        f"Made with synthfactory {__version__}; run `{run_dir.run_id}`.",
    ]
    return str(ModelCard("---\n" + meta.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))


def publish_model(
    run_dir: RunDir,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    force_not_private: bool = False,
    force_blocked: bool = False,
    token: str | None = None,
) -> dict:
    """Push the run's pipeline (checkpoints/final without synthfactory's origin records) and its
    model card to `repo_id` (a model repository), in one commit. Same refusal rules as the
    dataset. Returns what was pushed; also written to publish_model.json in the run directory."""
    from huggingface_hub import CommitOperationAdd

    warnings = check_publishable(run_dir, force_not_private, force_blocked)
    final = run_dir.final_checkpoint
    if not (final / "model_index.json").is_file():
        raise PublishRefused(f"{final}: no model_index.json (trained before pipelines were saved); retrain")
    files = sorted(
        p for p in final.rglob("*")
        if p.is_file() and p.relative_to(final).as_posix().startswith(MODEL_FILES)
        and p.name != "synthfactory_origin.json"
    )  # fmt: skip
    ops = [CommitOperationAdd(p.relative_to(final).as_posix(), p.read_bytes()) for p in files]
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
