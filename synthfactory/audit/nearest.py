"""Exact nearest-neighbour search in pixel space, in blocks.

Squared L2 distances come from one matrix product per block (‖a‖² + ‖b‖² − 2ab), which is fast
but loses precision near zero in float32. So each query keeps its `candidates` best references
from the matrix product, and those are re-measured exactly (float64 differences): an exact copy
comes out at distance 0, not at a rounding error. Memory is one [block, N] float32 matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from ..distributed import Dist, all_gather_array


def flatten(images: np.ndarray) -> torch.Tensor:
    """[M, 1, H, W] or [M, H, W] → float32 [M, H·W]."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1))


def faiss_candidates(q: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [M, k] of each query's k nearest references by faiss-cpu's exact IndexFlatL2."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("audit.search: faiss needs faiss-cpu: pip install 'synthfactory[faiss]'") from e
    index = faiss.IndexFlatL2(r.shape[1])
    index.add(np.ascontiguousarray(r.numpy()))
    _, idx = index.search(np.ascontiguousarray(q.numpy()), k)
    return torch.from_numpy(idx.astype(np.int64))


def _remeasured_candidates(
    q: torch.Tensor, r: torch.Tensor, n_cand: int, block_size: int, exclude_self: bool, backend: str
):
    """Blocks of (first query row, candidate indices [b, n_cand], their exact float64 distances).
    Candidates come from one matrix product per block (torch) or from faiss for all queries."""
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} pixels, references {r.shape[1]}")
    if exclude_self and q.shape[0] != r.shape[0]:
        raise ValueError("exclude_self needs the queries to be the references")
    use_faiss = backend == "faiss" and not exclude_self
    all_cand = faiss_candidates(q, r, n_cand) if use_faiss else None
    r_sq = None if use_faiss else r.pow(2).sum(1)
    for start in range(0, len(q), block_size):
        qb = q[start : start + block_size]
        if all_cand is not None:
            cand = all_cand[start : start + len(qb)]
        else:
            d2 = qb.pow(2).sum(1, keepdim=True) + r_sq[None] - 2.0 * (qb @ r.T)
            if exclude_self:
                rows = torch.arange(len(qb))
                d2[rows, start + rows] = float("inf")
            cand = d2.topk(n_cand, dim=1, largest=False).indices  # [b, n_cand]
        exact = (qb.double()[:, None, :] - r[cand].double()).pow(2).sum(-1).sqrt()  # [b, n_cand]
        yield start, cand, exact


@torch.no_grad()
def nearest_neighbours(
    queries: np.ndarray,
    refs: np.ndarray,
    block_size: int = 1024,
    candidates: int = 8,
    exclude_self: bool = False,
    backend: str = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index of its nearest reference and the L2 distance to it.
    `exclude_self`: queries are the references; query i never matches reference i.
    `backend`: "torch" (blocked matrix products; on the GPU when there is one) or
    "faiss" (faiss-cpu IndexFlatL2, exact) for the candidates; either way the candidates are
    re-measured in float64."""
    dev = "cuda" if torch.cuda.is_available() and backend == "torch" else "cpu"
    q, r = flatten(queries).to(dev), flatten(refs).to(dev)
    n_cand = min(candidates, r.shape[0] - int(exclude_self))
    idx = np.empty(len(q), dtype=np.int64)
    dist = np.empty(len(q), dtype=np.float64)
    for start, cand, exact in _remeasured_candidates(q, r, n_cand, block_size, exclude_self, backend):
        best = exact.argmin(1)
        rows = torch.arange(len(cand))
        idx[start : start + len(cand)] = cand[rows, best].cpu().numpy()
        dist[start : start + len(cand)] = exact[rows, best].cpu().numpy()
    return idx, dist


@torch.no_grad()
def knn_distances(queries: np.ndarray, refs: np.ndarray, k: int, block_size: int = 1024) -> np.ndarray:
    """Sorted L2 distances [M, k] from each query to its k nearest references (the candidates
    from the matrix product re-measured exactly, as above)."""
    q, r = flatten(queries), flatten(refs)
    k = min(k, r.shape[0])
    n_cand = min(r.shape[0], max(2 * k, 8))
    out = np.empty((len(q), k), dtype=np.float64)
    for start, _, exact in _remeasured_candidates(q, r, n_cand, block_size, False, "torch"):
        out[start : start + len(exact)] = exact.sort(1).values[:, :k].numpy()
    return out


def knn_distances_sharded(
    queries: np.ndarray, refs: np.ndarray, k: int, d: Dist, block_size: int = 1024
) -> np.ndarray:
    """`knn_distances` with the references split across the ranks of a torchrun job: each rank
    finds the k nearest in its shard, and the k smallest of all ranks' lists are kept."""
    if not d.enabled:
        return knn_distances(queries, refs, k, block_size)
    k = min(k, len(refs))
    a, b = d.share(len(refs))
    local = np.full((len(queries), k), np.inf)
    if b > a:
        found = knn_distances(queries, refs[a:b], k, block_size)
        local[:, : found.shape[1]] = found
    merged = all_gather_array(local, d).transpose(1, 0, 2).reshape(len(queries), -1)  # [M, world·k]
    return np.sort(merged, axis=1)[:, :k]
