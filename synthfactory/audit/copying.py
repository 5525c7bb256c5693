"""Does the generator as a whole copy? Meehan et al.'s data-copying test, and the
nearest-neighbour ratios of Carlini et al. (2023).

C_T (Meehan, Chaudhuri & Dasgupta, AISTATS 2020): the training set is cut into cells by k-means;
in each cell, the distances of synthetic samples to their nearest training image are compared
with those of held-out real images by a Mann-Whitney U test, as a z-score Z_U (negative: the
synthetic samples sit closer to the training data than unseen real data does, i.e. copying;
positive: they sit farther, i.e. underfitting). C_T is the average of Z_U over the cells with
enough samples of both, weighted by the held-out share of each cell. C_T well below 0 (the
paper uses -3 as a warning) flags a copying generator even when no single sample crosses the gate.

Cells are built on the fixed `rank_thumbnail` descriptor (training-free), distances are pixel L2.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.stats import mannwhitneyu

from .spaces import rank_thumbnail


def mann_whitney_z(synth: np.ndarray, heldout: np.ndarray) -> float:
    """Z of the U statistic of `synth` against `heldout` (ties averaged): negative when the
    synthetic values are smaller."""
    m, n = len(synth), len(heldout)
    u = mannwhitneyu(synth, heldout).statistic  # SciPy's U of `synth`, ties averaged
    return float((u - m * n / 2.0) / np.sqrt(m * n * (m + n + 1) / 12.0))


def data_copying_test(
    train: np.ndarray,
    heldout: np.ndarray,
    heldout_dist: np.ndarray,
    synth: np.ndarray,
    synth_dist: np.ndarray,
    n_cells: int,
    min_per_cell: int,
    seed: int,
) -> dict:
    """C_T with its cells. Images [N, H, W] on any scale; distances: each image's pixel-L2
    distance to its nearest training image."""
    k = max(1, min(n_cells, len(train) // 20))
    feats_train = rank_thumbnail(train).numpy().astype(np.float64)
    centroids, train_cell = kmeans2(feats_train, k, seed=seed, minit="++")

    def assign(x: np.ndarray) -> np.ndarray:
        f = rank_thumbnail(x).numpy().astype(np.float64)
        d = ((f[:, None, :] - centroids[None]) ** 2).sum(-1)
        return d.argmin(1)

    h_cell, s_cell = assign(heldout), assign(synth)
    cells, z_sum, w_sum = [], 0.0, 0.0
    for c in range(k):
        h, s = heldout_dist[h_cell == c], synth_dist[s_cell == c]
        row = {
            "cell": c,
            "n_train": int((train_cell == c).sum()),
            "n_heldout": int(len(h)),
            "n_synthetic": int(len(s)),
            "z_u": None,
        }
        if len(h) >= min_per_cell and len(s) >= min_per_cell:
            z = mann_whitney_z(s, h)
            row["z_u"] = z
            w = len(h) / len(heldout)
            z_sum += w * z
            w_sum += w
        cells.append(row)
    used = [c for c in cells if c["z_u"] is not None]
    return {
        "c_t": z_sum / w_sum if w_sum else None,
        "n_cells": k,
        "n_cells_used": len(used),
        "min_per_cell": min_per_cell,
        "heldout_share_covered": float(sum(c["n_heldout"] for c in used) / max(len(heldout), 1)),
        "synthetic_share_covered": float(sum(c["n_synthetic"] for c in used) / max(len(synth), 1)),
        "cells": cells,
        "reading": "C_T < 0: synthetic samples sit closer to the training data than held-out real "
        "images do (copying); > 0: farther (underfitting); Meehan et al. warn below -3",
        "cells_from": "k-means (k-means++ init) of the training images' rank_thumbnail descriptors",
        "distance": "pixel L2 to the nearest training image",
    }


def neighbour_ratios(knn: np.ndarray, n_mean: int) -> dict[str, np.ndarray]:
    """From sorted distances to the k nearest training images [M, k]: the Carlini ratio
    d1 / mean(d1..dn) and the nearest/second-nearest ratio d1 / d2 (small: one training image
    stands out, as for a copy)."""
    n = min(n_mean, knn.shape[1])
    mean_n = knn[:, :n].mean(1)
    return {
        "carlini": np.where(mean_n > 0, knn[:, 0] / np.maximum(mean_n, 1e-12), 0.0),
        "nn_over_second": np.where(knn[:, 1] > 0, knn[:, 0] / np.maximum(knn[:, 1], 1e-12), 0.0),
    }
