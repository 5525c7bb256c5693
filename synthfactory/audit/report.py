"""Audit reports: audit.json (versioned schema), audit.md and its figures.

audit.json, audit.md and distances.png hold no real pixels: they name training images by index
only (the manifest that maps an index to a hash and a source stays in the run directory). The
closest-pairs grid *shows real training images*: it goes to `internal/`, says so in the image
and in the markdown beside it, is git-ignored, and is never part of a release.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..rundir import write_json_atomic  # noqa: E402
from .gate import ordinal  # noqa: E402

INTERNAL_BANNER = "INTERNAL: SHOWS REAL TRAINING IMAGES. NEVER RELEASE."


def distance_histogram(path: Path, synth: np.ndarray, heldout: np.ndarray, threshold: float) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    hi = float(max(synth.max(initial=0), heldout.max(initial=0))) * 1.05 or 1.0
    bins = np.linspace(0, hi, 50)
    ax.hist(heldout, bins=bins, alpha=0.6, density=True, label=f"held-out real → train (n={len(heldout)})")
    ax.hist(synth, bins=bins, alpha=0.6, density=True, label=f"synthetic → train (n={len(synth)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("L2 distance to nearest training image (pixels in [-1, 1])")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def closest_pairs_grid(
    path: Path,
    synth: np.ndarray,
    train: np.ndarray,
    order: np.ndarray,
    nn_idx: np.ndarray,
    nn_dist: np.ndarray,
    flagged: np.ndarray,
    n: int = 12,
) -> None:
    """Top row: the n synthetic samples closest to training data; bottom row: their nearest
    training images. Shows real images: internal only."""
    n = min(n, len(order))
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.3 * max(n, 1), 3.2), dpi=110, squeeze=False)
    for col in range(n):
        i = order[col]
        axes[0, col].imshow(synth[i], cmap="gray", vmin=0, vmax=255)
        axes[0, col].set_title(f"#{i} d={nn_dist[i]:.2f}" + (" X" if flagged[i] else ""), fontsize=6)
        axes[1, col].imshow(train[nn_idx[i]], cmap="gray", vmin=0, vmax=255)
        axes[1, col].set_title(f"train {nn_idx[i]}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(
        INTERNAL_BANNER + "\ntop: synthetic (X = suspected copy), bottom: nearest real",
        fontsize=8,
        color="red",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _privacy_line(p: dict) -> str:
    if not p.get("private"):
        return "**NOT PRIVATE**: trained without differential privacy"
    return (
        f"ε = {p['epsilon']:.3f} (target {p['target_epsilon']:g}, {p['accountant']} accountant; "
        f"{', '.join(f'{k}: {v:.3f}' for k, v in p['epsilon_other_accountant'].items())}), "
        f"δ = {p['delta']:g}, σ = {p['noise_multiplier']:.4f}, q = {p['sample_rate']:.4g}, "
        f"steps = {p['steps_taken']}, C = {p['max_grad_norm']:g}"
    )


def write_markdown(path: Path, audit: dict) -> None:
    t = audit["threshold"]
    s = audit["summary"]
    lines = [
        f"# Memorization audit: {audit['recipe_name']} / {audit['run_id']}",
        "",
        "> This file and `distances.png` hold no real pixels. The closest-pairs grid linked below, "
        "`internal/closest_pairs.png`, **shows real training images**: it is INTERNAL, git-ignored, "
        "and never part of a release or a Hub push.",
        "",
        "| | |",
        "| --- | --- |",
        f"| privacy | {_privacy_line(audit['privacy'])} |",
        f"| data | {audit['data']['n_train']} training and {audit['data']['n_heldout']} held-out real images; "
        f"manifest sha256 `{audit['data']['manifest_sha256'][:16]}…` |",
        f"| recipe | sha256 `{audit['recipe_sha256'][:16]}…` |",
        f"| similarity | {audit['space']['description']} |",
        f"| threshold | {t['value']:.4g} = {ordinal(t['percentile'])} percentile of held-out→train distances "
        f"(n = {t['n_heldout']}; median {t['heldout_distance_percentiles']['50']:.4g}) |",
        f"| samples | {s['n_samples']} generated, {s['n_flagged']} suspected copies, "
        f"{s['n_dropped']} dropped, {s['n_released']} released |",
        f"| decision | **{audit['decision']}** (action `{audit['action']}`) |",
        "",
    ]
    if "warning" in t:
        lines += [f"**Warning:** {t['warning']}.", ""]
    lines += [
        "## Distances to the nearest training image",
        "",
        "![distances](distances.png)",
        "",
        "## Released samples",
        "",
        "![released samples](sample_grid.png) (written by the release stage: audited, passed samples only)",
        "",
        "## Closest pairs (INTERNAL: real images)",
        "",
        "[internal/closest_pairs.png](internal/closest_pairs.png): the synthetic samples closest to a "
        "training image, each above its nearest training image. Present only where the audit ran.",
        "",
        "## What this audit does not cover",
        "",
    ]
    lines += [f"- {x}" for x in audit["limits"]]
    path.write_text("\n".join(lines) + "\n")


def write_reports(
    out_dir: Path,
    audit: dict,
    nn_dist: np.ndarray,
    heldout_dist: np.ndarray,
    synth_u8: np.ndarray,
    train_u8: np.ndarray,
    nn_idx: np.ndarray,
    flagged: np.ndarray,
) -> None:
    """Everything under privacy_audits/<recipe>/<run id>/."""
    internal = out_dir / "internal"
    internal.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "audit.json", audit)
    distance_histogram(out_dir / "distances.png", nn_dist, heldout_dist, audit["threshold"]["value"])
    order = np.argsort(nn_dist, kind="stable")
    closest_pairs_grid(internal / "closest_pairs.png", synth_u8, train_u8, order, nn_idx, nn_dist, flagged)
    (internal / "README.md").write_text(
        f"# {INTERNAL_BANNER}\n\nFiles here show real training images next to the synthetic samples "
        "closest to them. Keep them inside the data owner's environment.\n"
    )
    write_markdown(out_dir / "audit.md", audit)
