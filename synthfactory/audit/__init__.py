"""The memorization audit: every synthetic sample against its nearest real training image, in
several similarity spaces, with a gate calibrated on held-out real images; and audits of the
generator as a whole (data-copying test, membership inference).

Reads the run directory (samples, privacy.json, the final checkpoint) and the real images;
writes audit/audit.json and audit/nearest.npz into the run directory and the reports under
`<audit_dir>/<recipe name>/<run id>/`. It decides which samples may be released; it never
releases anything itself.

Comparisons happen on the 8-bit grid the release uses: real images are rounded to it too, so
an exact copy of a training image measures exactly 0.

`run.py` runs the audit (`run_audit`), step by step in pipeline order.
"""

from __future__ import annotations

import numpy as np

from ..recipe import AuditConfig
from ..sample import uint8_to_model_range
from .gate import calibrate
from .nearest import nearest_neighbours
from .run import AuditResult, near_copy, quantize, run_audit
from .run import coverage as coverage
from .run import gate as gate
from .spaces import SPACES, search

__all__ = ["AuditResult", "run_audit", "nearest_neighbours", "near_copies", "calibrate", "quantize", "SPACES"]


def near_copies(queries: np.ndarray, train: np.ndarray, cfg: AuditConfig) -> np.ndarray:
    """Which query images are near-copies of a training image by the audit's own search and rule,
    on the release's 8-bit grid. Images float [N, 1, H, W] in [-1, 1]."""
    q, t = (uint8_to_model_range(quantize(x)) for x in (queries, train))
    _, distance = search("pixel_l2", q, t, cfg.block_size, backend=cfg.search)
    return near_copy(distance, t.shape[-2:], cfg.threshold.near_duplicate_rms)
