"""A run's lineage, read back from its run directory: recipe → data → checkpoint → privacy →
samples → audit → release → publication. `synthfactory inspect RUN_DIR` prints it; nothing is
recomputed except the hashes of files on disk."""

from __future__ import annotations

from .records import PrivacyRecord, RunRecords
from .rundir import RunDir, folder_sha256, read_json


def lineage(run_dir: RunDir) -> dict:
    run = RunRecords.read(run_dir)
    info = run.info
    if not info:
        raise FileNotFoundError(f"{run_dir.root}: not a run directory (no run.json)")
    stages = run.stages
    out: dict = {
        "run_id": run_dir.run_id,
        "created": info.get("created"),
        "versions": info.get("versions"),
        "stages_done": list(stages),
        "recipe": {
            "name": info.get("recipe_name"),
            "sha256": info.get("recipe_sha256"),
            "file": str(run_dir.recipe),
        },
    }
    data = read_json(run_dir.data_report) if run_dir.data_report.exists() else None
    if data:
        out["data"] = {
            "manifest_sha256": data["manifest_sha256"],
            "counts": data["counts"],
            "skipped_files": len(data.get("skipped", [])),
            "preprocessing": data.get("preprocessing"),
        }
    if (run_dir.pretrained / "pretrain.json").exists():
        out["pretraining"] = read_json(run_dir.pretrained / "pretrain.json").get("statement")
    final = run_dir.final_checkpoint
    if final.is_dir():
        out["checkpoint"] = {
            name: folder_sha256(final / name)
            for name in ("unet", "unet_ema", "scheduler")
            if (final / name).is_dir()
        }
    privacy = run.privacy
    out["dp_secret"] = dp_secret(run_dir, privacy)
    out["ledger"] = ledger_lines(run_dir)
    if privacy:
        out["privacy"] = {
            "private": privacy.private,
            "epsilon": privacy.epsilon,
            "delta": privacy.delta,
            "accountant": privacy.accountant,
            "noise_multiplier": privacy.noise_multiplier,
            "sample_rate": privacy.sample_rate,
            "steps_taken": privacy.steps_taken,
            "max_grad_norm": privacy.max_grad_norm,
            "data_manifest_sha256": privacy.data_manifest_sha256,
            "recipe_sha256": privacy.recipe_sha256,
        }
    audit = run.audit
    if audit:
        out["audit"] = {
            "decision": audit.decision,
            "samples_sha256": audit.samples_sha256,
            "spaces": list(audit.spaces),
            "n_samples": audit.summary["n_samples"],
            "n_flagged": audit.summary["n_flagged"],
            "n_released": audit.summary["n_released"],
            "report": stages.get("audit", {}).get("report"),
            "mia_auc": audit.mia_auc,
            "canary_epsilon_lower_bound": audit.canary_epsilon_lower_bound,
        }
    release = stages.get("release")
    if release:
        rel = run.release
        out["release"] = {
            "folder": release.get("folder"),
            "n_released": rel.n_released if rel else None,
            "formats": rel.formats if rel else None,
        }
    publish = run_dir.root / "publish.json"
    published = read_json(publish) if publish.exists() else None
    if published:
        out["published"] = published
    return out


def ledger_lines(run_dir: RunDir) -> list[str]:
    """The run's ledger, one line per mechanism: kind, run, accountant steps, how it came in."""
    from .ledger import RunLedger

    ledger = RunLedger(run_dir.ledger).read()
    return [
        f"{m.kind} of run {m.run_id}: {m.steps} accountant steps"
        + ("" if m.private else ", NO DP guarantee")
        + (f", brought in by {m.via}" if m.via else "")
        for m in ledger.mechanisms
    ]


def dp_secret(run_dir: RunDir, privacy: PrivacyRecord | None) -> str:
    """Whether the run directory still holds the seed and generator states of the DP noise and
    sampling (checkpoints/train_state.pt, its own or an audit model's): only while training runs."""
    held = sorted(str(p.relative_to(run_dir.root)) for p in run_dir.root.rglob("train_state.pt"))
    if held:
        return (
            f"PRESENT in {', '.join(held)}: training has not finished; whoever holds this file can "
            "regenerate the DP noise and batches (it is deleted when training ends)"
        )
    if privacy is None:
        return "none: not trained yet"
    if privacy.mechanism.startswith("DP-SGD") and not privacy.private:
        return "none to keep: the DP noise was seeded from the recipe (privacy.noise_seed): NOT PRIVATE"
    if not privacy.private:
        return "none: trained without DP"
    return "gone: deleted when training finished (checkpoints/train_state.pt removed)"
