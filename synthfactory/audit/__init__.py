"""The memorization audit: every synthetic sample against its nearest real training image.

Reads the run directory (samples, privacy.json) and the real images; writes audit/audit.json
and audit/nearest.npz into the run directory and the reports under
`<audit_dir>/<recipe name>/<run id>/`. It decides which samples may be released; it never
releases anything itself.

Comparisons happen on the 8-bit grid the release uses: real images are rounded to it too, so
an exact copy of a training image measures exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import ImageSet
from ..recipe import Recipe
from ..rundir import RunDir, read_json, write_json_atomic
from ..sample import Samples, uint8_to_model_range
from .gate import Threshold, calibrate, decide, suspected_copies
from .nearest import nearest_neighbours
from .report import write_reports

SCHEMA = "synthfactory.audit/v1"

__all__ = ["AuditResult", "run_audit", "nearest_neighbours", "calibrate", "suspected_copies"]


def quantize(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] [N, 1, H, W] → uint8 [N, H, W], as a released image would be stored."""
    return np.round((np.clip(images, -1, 1)[:, 0] + 1.0) * 127.5).astype(np.uint8)


@dataclass
class AuditResult:
    decision: str  # "release" or "block"
    threshold: Threshold
    flagged: np.ndarray  # bool [M]
    nn_index: np.ndarray
    nn_distance: np.ndarray
    report_dir: Path
    audit: dict


LIMITS = [
    "Pixel L2 only: a copy that is shifted, flipped, re-contrasted or noised can be farther "
    "than the threshold and pass.",
    "The threshold is global, not per class.",
    "The gate reads the private training images after training: which samples it drops, and "
    "the nearest-neighbour distances released with them, are not covered by ε.",
    "It tests single samples, not whether the generator as a whole copies, and runs no "
    "membership-inference attack.",
]


def run_audit(
    recipe: Recipe, run_dir: RunDir, images: ImageSet, audit_root: Path | None = None
) -> AuditResult:
    samples = Samples.load(run_dir.samples)
    privacy = read_json(run_dir.privacy)
    cfg = recipe.audit
    train_u8 = quantize(images.train_images)
    heldout_u8 = quantize(images.heldout_images)
    if samples.images.shape[1:] != train_u8.shape[1:]:
        raise ValueError(f"samples are {samples.images.shape[1:]}, training images {train_u8.shape[1:]}")

    train_f = uint8_to_model_range(train_u8)
    _, heldout_dist = nearest_neighbours(uint8_to_model_range(heldout_u8), train_f, cfg.block_size)
    nn_idx, nn_dist = nearest_neighbours(uint8_to_model_range(samples.images), train_f, cfg.block_size)
    threshold = calibrate(heldout_dist, cfg.threshold.percentile)
    flagged = suspected_copies(nn_dist, threshold)
    decision = decide(flagged, cfg.action)
    n_dropped = int(flagged.sum()) if decision == "release" else 0
    released = 0 if decision == "block" else int(len(flagged) - n_dropped)
    h, w = train_u8.shape[1:]

    privacy_keys = (
        "private",
        "epsilon",
        "target_epsilon",
        "delta",
        "accountant",
        "epsilon_other_accountant",
        "noise_multiplier",
        "sample_rate",
        "steps_taken",
        "max_grad_norm",
        "mechanism",
    )
    audit = {
        "schema": SCHEMA,
        "synthfactory_version": __version__,
        "run_id": run_dir.run_id,
        "recipe_name": recipe.name,
        "recipe_sha256": recipe.sha256(),
        "modality": recipe.modality,
        "samples_sha256": samples.sha256(),
        "privacy": {k: privacy[k] for k in privacy_keys if k in privacy},
        "data": {
            "n_train": int(len(train_u8)),
            "n_heldout": int(len(heldout_u8)),
            "manifest_sha256": images.manifest_sha256(),
            "class_names": images.class_names,
        },
        "space": {
            "name": "pixel_l2",
            "description": f"L2 distance over {h}×{w} pixels on the 8-bit grid scaled to [-1, 1]; exact search",
        },
        "threshold": threshold.to_json(heldout_dist),
        "action": cfg.action,
        "decision": decision,
        "summary": {
            "n_samples": int(len(flagged)),
            "n_flagged": int(flagged.sum()),
            "n_dropped": n_dropped,
            "n_released": released,
            "nn_distance_min": float(nn_dist.min()),
            "nn_distance_median": float(np.median(nn_dist)),
        },
        "samples": [
            {
                "index": i,
                "label": int(samples.labels[i]),
                "seed": int(samples.seeds[i]),
                "nearest_train_index": int(nn_idx[i]),
                "nn_distance": float(nn_dist[i]),
                "flagged": bool(flagged[i]),
            }
            for i in range(len(flagged))
        ],
        "limits": LIMITS,
    }
    run_dir.audit_json.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        run_dir.nearest, nn_index=nn_idx, nn_distance=nn_dist, heldout_distance=heldout_dist, flagged=flagged
    )
    write_json_atomic(run_dir.audit_json, audit)
    report_dir = (audit_root or recipe.outputs.audit_dir) / recipe.name / run_dir.run_id
    write_reports(report_dir, audit, nn_dist, heldout_dist, samples.images, train_u8, nn_idx, flagged)
    return AuditResult(decision, threshold, flagged, nn_idx, nn_dist, report_dir, audit)
