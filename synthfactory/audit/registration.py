"""The gate's `aligned_ncc` space: retrieval, then geometric verification, as copy detection does
it. The learned copy descriptor (`descriptor.py`) shortlists, for every query, `k` training
images: those whose embeddings (each training image also embedded under
`spaces.EMBEDDING_WARPS`) are most similar, and a few most similar to the query shifted by a
sixth of its side (far-shifted copies, whose embedding moved furthest). Each candidate is then
registered onto the query, and onto its left-right flip, by OpenCV's ECC (enhanced correlation
coefficient maximisation, Evangelidis & Psarakis 2008: an affine warp, invariant to linear
changes of contrast), started from no motion and from the translation phase correlation finds.
The score is the best Pearson correlation over the region where the registered candidate covers
the query.

Why: a fixed grid of edits (`warp_ncc`) misses the same edit made another way, and the
descriptor's cosine cannot tell a copy from an adjacent slice as sharply as the pixels can. A
continuous registration recovers any rotation, zoom, crop-and-resize, shift or shear (and their
compositions) that the shortlist reached, whichever library made it. Written here because no
library pairs a copy descriptor's shortlist with an image registration; the registration itself
is OpenCV's, the shortlist torch.

Images come in as float arrays [N, H, W] on the [-1, 1] scale.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

MIN_OVERLAP = 0.5  # share of the query a registered candidate must cover to be scored
SCALES = (0.7, 1.4)  # singular values allowed for the warp's linear part: no collapse, no blow-up
ITERATIONS = 50  # ECC iterations (stops earlier once the update is below 1e-4)
SHIFTED_CANDIDATES = 4  # of the k: the best for the sample shifted by SHIFT_FRACTION of its side
SHIFT_FRACTION = 0.16  # 5 px at 28-32 px; edges replicated, as a shifted copy's edges are filled


def _shifted_views(x: torch.Tensor) -> torch.Tensor:
    """[8, M, H, W]: images [M, H, W] shifted by round(SHIFT_FRACTION·side) px in the 8
    directions, edge pixels replicated."""
    h, w = x.shape[-2:]
    s = max(1, round(SHIFT_FRACTION * min(h, w)))
    pad = torch.nn.functional.pad(x[:, None], (s, s, s, s), mode="replicate")[:, 0]
    moves = [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if dy or dx]
    return torch.stack([pad[:, s - dy : s - dy + h, s - dx : s - dx + w] for dy, dx in moves])


@torch.no_grad()
def embedding_shortlist(queries: np.ndarray, train: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """[M, min(k, N)] distinct training indices per query: the k − SHIFTED_CANDIDATES training
    images whose descriptor is most similar (each scored by its best embedding over the reference
    warps), then the SHIFTED_CANDIDATES best others for the query shifted by about a sixth of its
    side in any of 8 directions (far-shifted copies, whose descriptor moved furthest)."""
    from .descriptor import embed
    from .spaces import reference_embeddings

    n, k = len(train), min(k, len(train))
    k_shift = min(SHIFTED_CANDIDATES, k // 2)
    t, owner = reference_embeddings(train)
    unwarped = t[:n]  # rows are warp-major, the unwarped image first
    out = np.zeros((len(queries), k), dtype=np.int64)
    block = max(1, min(block_size, 256))  # [block, warps · N] similarities at a time
    for a in range(0, len(queries), block):
        q = torch.from_numpy(queries[a : a + block])
        s = (embed(q[:, None]) @ t.T).view(len(q), len(owner) // n, n).amax(1)
        base = s.topk(k - k_shift, dim=1).indices.numpy()
        s = torch.full_like(s, -2.0)
        for view in _shifted_views(q):
            s = torch.maximum(s, embed(view[:, None]) @ unwarped.T)
        order = s.topk(k, dim=1).indices.numpy()
        for i, row in enumerate(order):  # k ranked, at most k − k_shift of them already in base
            taken = set(base[i].tolist())
            out[a + i] = np.r_[base[i], [j for j in row if j not in taken][:k_shift]]
    return out


def _overlap_ncc(query: np.ndarray, ref: np.ndarray, warp: np.ndarray) -> float:
    """Pearson correlation of `query` and `ref` warped onto it, over the pixels `ref` covers;
    -1 when the warp is degenerate or covers less than `MIN_OVERLAP` of the query."""
    s = np.linalg.svd(warp[:, :2], compute_uv=False)
    if not (SCALES[0] <= s.min() and s.max() <= SCALES[1]):
        return -1.0
    h, w = query.shape
    flags = cv2.WARP_INVERSE_MAP
    moved = cv2.warpAffine(ref, warp, (w, h), flags=cv2.INTER_LINEAR | flags)
    covered = cv2.warpAffine(np.ones_like(ref), warp, (w, h), flags=cv2.INTER_NEAREST | flags) > 0.5
    if covered.mean() < MIN_OVERLAP:
        return -1.0
    a, b = query[covered], moved[covered]
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / norm if norm > 1e-9 else 0.0


def registered_ncc(query: np.ndarray, ref: np.ndarray) -> float:
    """Best overlap correlation of `ref` registered onto `query` or onto its flip (float32 [H, W])."""
    best = -1.0
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ITERATIONS, 1e-4)
    for q in (query, np.ascontiguousarray(query[:, ::-1])):
        (dx, dy), _ = cv2.phaseCorrelate(q.astype(np.float64), ref.astype(np.float64))
        starts = [np.eye(2, 3, dtype=np.float32)]
        if max(abs(dx), abs(dy)) >= 1.0:
            starts.append(np.float32([[1, 0, dx], [0, 1, dy]]))
        for warp in starts:
            best = max(best, _overlap_ncc(q, ref, warp))  # the start itself is a candidate
            try:
                _, warp = cv2.findTransformECC(q, ref, warp, cv2.MOTION_AFFINE, criteria, None, 1)
            except cv2.error:  # no convergence (e.g. a flat image): the start's score stands
                continue
            best = max(best, _overlap_ncc(q, ref, warp))
    return best


def aligned_search(
    queries: np.ndarray, train: np.ndarray, k: int, block_size: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`aligned_ncc`: per query, the shortlisted training image with the best `registered_ncc`,
    and that score. OpenCV releases the GIL: queries are scored on `threads` threads (default:
    torch's thread count)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    t = np.ascontiguousarray(train, dtype=np.float32)
    if not len(q) or not len(t):
        return np.zeros(len(q), dtype=np.int64), np.zeros(len(q))
    cand = embedding_shortlist(q, t, k, block_size)

    def one(i: int) -> tuple[int, float]:
        scores = [registered_ncc(q[i], t[j]) for j in cand[i]]
        best = int(np.argmax(scores))
        return int(cand[i, best]), scores[best]

    workers = threads or torch.get_num_threads()
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(one, range(len(q))))
    idx = np.array([f[0] for f in found], dtype=np.int64)
    return idx, np.clip(np.array([f[1] for f in found], dtype=np.float64), -1.0, 1.0)
