"""Exact nearest-neighbour search in pixel space, in blocks.

Squared L2 distances come from one matrix product per block (‖a‖² + ‖b‖² − 2ab), which is fast
but loses precision near zero in float32. So each query keeps its `candidates` best references
from the matrix product, and those are re-measured exactly (float64 differences): an exact copy
comes out at distance 0, not at a rounding error. Memory is one [block, N] float32 matrix.
"""

from __future__ import annotations

import numpy as np
import torch


def flatten(images: np.ndarray) -> torch.Tensor:
    """[M, 1, H, W] or [M, H, W] → float32 [M, H·W]."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1))


@torch.no_grad()
def nearest_neighbours(
    queries: np.ndarray,
    refs: np.ndarray,
    block_size: int = 1024,
    candidates: int = 8,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index of its nearest reference and the L2 distance to it.
    `exclude_self`: queries are the references; query i never matches reference i."""
    q, r = flatten(queries), flatten(refs)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} pixels, references {r.shape[1]}")
    r_sq = r.pow(2).sum(1)
    if exclude_self and q.shape[0] != r.shape[0]:
        raise ValueError("exclude_self needs the queries to be the references")
    k = min(candidates, r.shape[0] - int(exclude_self))
    idx = np.empty(len(q), dtype=np.int64)
    dist = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), block_size):
        qb = q[start : start + block_size]
        d2 = qb.pow(2).sum(1, keepdim=True) + r_sq[None] - 2.0 * (qb @ r.T)
        if exclude_self:
            rows = torch.arange(len(qb))
            d2[rows, start + rows] = float("inf")
        cand = d2.topk(k, dim=1, largest=False).indices  # [b, k]
        exact = (qb.double()[:, None, :] - r[cand].double()).pow(2).sum(-1).sqrt()  # [b, k]
        best = exact.argmin(1)
        rows = torch.arange(len(qb))
        idx[start : start + len(qb)] = cand[rows, best].numpy()
        dist[start : start + len(qb)] = exact[rows, best].numpy()
    return idx, dist
