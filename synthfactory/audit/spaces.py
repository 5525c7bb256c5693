"""Similarity spaces of the memorization audit: for every query image, its nearest training image
and a score, by exact search in blocks (torch matmul).

| space            | score                        | closer when | catches                               |
| ---------------- | ---------------------------- | ----------- | ------------------------------------- |
| pixel_l2         | L2 distance of the pixels    | lower       | exact and lightly noised copies       |
| ncc              | Pearson correlation          | higher      | copies re-contrasted linearly         |
| shift_flip_ncc   | max Pearson on the overlap,  | higher      | copies shifted by up to s px and/or   |
|                  | ±s px shifts, and the flip   |             | flipped left-right (exact; optional   |
|                  |                              |             | half-resolution shortlist)            |
| rank_thumbnail   | Pearson correlation of       | higher      | copies under any monotone intensity   |
|                  | rank-transformed, blurred    |             | change (gamma, windowing), noise,     |
|                  | 8×8 thumbnails, flip-aware   |             | small shifts                          |
| lowpass_l2       | L2 distance of Gaussian      | lower       | noised, JPEG-compressed and blurred   |
|                  | low-passed images, the       |             | copies, where neighbouring slices are |
|                  | training side also blurred   |             | as close in raw pixels                |
| warp_ncc         | shift_flip_ncc over a grid   | higher      | rotated (±10°), zoomed (±10 %) and    |
|                  | of rotations and zooms of    |             | further shifted (±8 px) copies        |
|                  | the query; ±8 px unwarped    |             |                                       |
| copy_embedding   | cosine of a learned copy     | higher      | JPEG, elastic, zoomed and rotated     |
|                  | descriptor (public-trained)  |             | copies made by any library            |
| aligned_ncc      | Pearson on the overlap after | higher      | rotated, zoomed, cropped-and-resized, |
|                  | an affine registration (ECC) |             | shifted copies and compositions of    |
|                  | of the descriptor's shortlist|             | these (registration.py)               |

`rank_thumbnail` is a fixed, training-free descriptor: per-image histogram equalisation (pixel
ranks), a 3×3 blur and average pooling to 8×8. `lowpass_l2` and `warp_ncc` are exact searches
over fixed grids of edits (blur levels; rotations and zooms). None of these has learned
parameters. `copy_embedding`'s descriptor is learned on public images only (`descriptor.py`), so
its weights carry nothing of a private set either; `aligned_ncc` (`registration.py`) verifies its
shortlist by registering each candidate onto the query. Written here because the copy-detection
libraries we know ship descriptors trained on natural images, or need training on the data they
guard.

Images come in as float arrays [N, 1, H, W] or [N, H, W] on the [-1, 1] scale.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

from ..distributed import Dist, all_gather_array, best_over_ranks
from .nearest import flatten, nearest_neighbours


@dataclass(frozen=True)
class Space:
    name: str
    higher_is_closer: bool
    description: str


SPACES: dict[str, Space] = {
    s.name: s
    for s in (
        Space("pixel_l2", False, "L2 distance over the pixels (8-bit grid scaled to [-1, 1])"),
        Space("ncc", True, "Pearson correlation of the pixels (normalised cross-correlation)"),
        Space(
            "shift_flip_ncc",
            True,
            "maximum Pearson correlation, over the overlapping region, of the query translated "
            "by up to ±{shift} px (and of its left-right flip) with the training image; {search}",
        ),
        Space(
            "rank_thumbnail",
            True,
            "Pearson correlation of a fixed, training-free descriptor: per-image pixel ranks "
            "(invariant to any monotone intensity change), 3×3 blur, 8×8 average pooling; the "
            "better of the query and its left-right flip",
        ),
        Space(
            "lowpass_l2",
            False,
            "L2 distance after a Gaussian low-pass (σ = {lowpass} px) of both images, the "
            "training image also blurred by σ = {blurs} px (the smallest of these distances)",
        ),
        Space(
            "warp_ncc",
            True,
            "maximum Pearson correlation, over the overlapping region, of the query translated "
            "by up to ±{warp_shift} px, or rotated by {angles}° or zoomed by {zooms} and "
            "translated by up to ±{shift} px (each also left-right flipped), with the training "
            "image; {search}",
        ),
        Space(
            "copy_embedding",
            True,
            "cosine similarity of a learned copy descriptor (a small CNN trained contrastively on "
            "public images only, with disguises made by OpenCV and Kornia: resize, crop, pad, "
            "rotation with any fill, affine and elastic warps, flips, blur, JPEG, gamma, noise; "
            "weights SHA-256 {descriptor}); nearest training embedding by exact search, each training "
            "image also embedded zoomed by {embedding_zooms} and rotated by {embedding_angles}°",
        ),
        Space(
            "aligned_ncc",
            True,
            "maximum Pearson correlation, over the overlap, after registering each of the "
            "{align_candidates} training images most similar by the copy descriptor (weights SHA-256 "
            "{descriptor}) onto the query and onto its left-right flip: an affine warp found by "
            "OpenCV's ECC from no motion and from the phase-correlation shift (any rotation, zoom, "
            "crop-and-resize, shift or shear the shortlist reaches)",
        ),
    )
}

LOWPASS_SIGMA = 1.0  # px: noise and JPEG blocks average out, anatomy stays
WARP_INTERPOLATION = "bicubic"  # re-sampling blurs less than bilinear: rotated copies score higher
EXTRA_BLURS = (0.0, 0.7, 1.0)  # px: a copy blurred by up to σ 1 px meets its own blur level
# (angle in degrees, zoom): the query's edits tried by warp_ncc; with ±8 px translations and
# correlation on the overlap, edits between grid points still score high (measured in
# benchmarks/audit_planted_copies.py: rotations of ±5 and ±10°, zooms of 0.9-1.1).
WARPS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0), (5.0, 1.0), (-5.0, 1.0), (10.0, 1.0), (-10.0, 1.0),
    (0.0, 1 / 1.1), (0.0, 1 / 1.05), (0.0, 1.05), (0.0, 1.1),
)  # fmt: skip


def describe(
    name: str, shift: int, warp_shift: int, candidates: int | None, align_candidates: int = 16
) -> str:
    """A space's description with this audit's settings filled in."""
    search_text = (
        f"exact for the {candidates} best candidates per query found at half resolution"
        if candidates
        else "exact search over every training image"
    )
    return SPACES[name].description.format(
        shift=shift,
        warp_shift=warp_shift,
        search=search_text,
        lowpass=f"{LOWPASS_SIGMA:g}",
        blurs=", ".join(f"{b:g}" for b in EXTRA_BLURS),
        angles=", ".join(f"{a:+g}" for a, z in WARPS if z == 1.0 and a),
        zooms=", ".join(f"{z:.3g}" for a, z in WARPS if z != 1.0),
        descriptor=_descriptor_sha()[:12] if name in ("copy_embedding", "aligned_ncc") else "",
        align_candidates=align_candidates,
        embedding_zooms=", ".join(f"{z:g}" for a, z in EMBEDDING_WARPS if z != 1.0),
        embedding_angles=", ".join(f"{a:+g}" for a, z in EMBEDDING_WARPS if a),
    )


def _descriptor_sha() -> str:
    from .descriptor import load_descriptor

    return load_descriptor()[1]["weights_sha256"]


def zscore_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows (the last dimension) centred and scaled to unit norm, so that a dot product is a
    Pearson correlation. A constant row stays zero (correlation 0 with everything)."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_dot(queries: torch.Tensor, refs: torch.Tensor, block_size: int, variants: int = 1):
    """For rows of `queries` grouped `variants` at a time (variants of one query image), the
    reference with the largest dot product over all variants: (index, value) per query image."""
    n_q = queries.shape[0] // variants
    idx = np.empty(n_q, dtype=np.int64)
    val = np.empty(n_q, dtype=np.float64)
    per_block = max(1, block_size // variants)
    for a in range(0, n_q, per_block):
        b = min(n_q, a + per_block)
        s = queries[a * variants : b * variants] @ refs.T  # [(b-a)·v, N]
        s = s.view(b - a, variants, -1).amax(1)  # [(b-a), N]
        v, i = s.max(1)
        idx[a:b] = i.numpy()
        val[a:b] = v.double().numpy()
    return idx, np.clip(val, -1.0, 1.0)


def overlap_crops(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where a query translated by (dy, dx) overlaps a reference: (query crop, reference crop)."""
    q = (slice(max(-dy, 0), h - max(dy, 0)), slice(max(-dx, 0), w - max(dx, 0)))
    r = (slice(max(dy, 0), h - max(-dy, 0)), slice(max(dx, 0), w - max(-dx, 0)))
    return q, r


def _z_crops(x: torch.Tensor, crop: tuple[slice, slice]) -> torch.Tensor:
    """z-scored crops [..., P] of images [..., H, W]."""
    return zscore_rows(x[..., crop[0], crop[1]].flatten(-2))


def _shifts(shift: int):
    for flip in (False, True):
        for dy in range(-shift, shift + 1):
            for dx in range(-shift, shift + 1):
                yield flip, dy, dx


@torch.no_grad()
def shift_flip_search(
    queries: torch.Tensor, refs: torch.Tensor, shift: int, block_size: int, candidates: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Max Pearson correlation, over the overlap, of each query [M, H, W] translated by up to
    ±shift px (and of its left-right flip) with every reference [N, H, W].

    Full search (`candidates` None, or not fewer references than that): one matrix product per
    (translation, query block). With `candidates`: a first pass at half resolution (2×2 average
    pooled, translations up to ±⌈shift/2⌉) keeps each query's `candidates` best references, and
    the full-resolution score is computed exactly for those only."""
    if not uses_shortlist(queries.shape, refs.shape[0], candidates):
        return _full_shift_flip(queries, refs, shift, block_size)
    cand = coarse_shortlist(queries, refs, shift, block_size, candidates)[1]
    return score_shortlist(queries, refs, cand, shift, block_size)


def uses_shortlist(query_shape: tuple[int, ...], n_refs: int, candidates: int | None) -> bool:
    h, w = query_shape[-2:]
    return candidates is not None and n_refs > candidates and min(h, w) >= 8


@torch.no_grad()
def coarse_shortlist(
    queries: torch.Tensor, refs: torch.Tensor, shift: int, block_size: int, candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's `candidates` best references at half resolution (2×2 average pooled,
    translations up to ±⌈shift/2⌉, and the flip): (coarse scores, reference indices), [M, K]."""
    half_q = F.avg_pool2d(queries[:, None], 2)[:, 0]
    half_r = F.avg_pool2d(refs[:, None], 2)[:, 0]
    hh, hw = half_q.shape[1:]
    s2 = (shift + 1) // 2
    k = min(candidates, refs.shape[0])
    vals = torch.empty(len(queries), k)
    idx = torch.empty(len(queries), k, dtype=torch.long)
    for a in range(0, len(queries), block_size):
        hq = half_q[a : a + block_size]
        coarse = torch.full((len(hq), refs.shape[0]), -2.0)
        for flip, dy, dx in _shifts(s2):
            qc, rc = overlap_crops(hh, hw, dy, dx)
            q = _z_crops(hq.flip(-1) if flip else hq, qc)
            torch.maximum(coarse, q @ _z_crops(half_r, rc).T, out=coarse)
        vals[a : a + len(hq)], idx[a : a + len(hq)] = coarse.topk(k, dim=1)
    return vals, idx


@torch.no_grad()
def score_shortlist(
    queries: torch.Tensor, refs: torch.Tensor, cand: torch.Tensor, shift: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact full-resolution score of each query against its shortlisted references
    `cand` [M, K]: the best (reference index, score) per query."""
    m = len(queries)
    idx = np.empty(m, dtype=np.int64)
    val = np.empty(m, dtype=np.float64)
    for a in range(0, m, block_size):
        qb, cb = queries[a : a + block_size], cand[a : a + block_size]
        best = torch.maximum(
            _overlap_corr(qb, refs[cb], shift), _overlap_corr(qb.flip(-1), refs[cb], shift)
        )  # [b, K]
        v, j = best.max(1)
        idx[a : a + len(qb)] = cb[torch.arange(len(qb)), j].numpy()
        val[a : a + len(qb)] = v.double().numpy()
    return idx, np.clip(val, -1.0, 1.0)


def _overlap_corr(q: torch.Tensor, r: torch.Tensor, shift: int) -> torch.Tensor:
    """Pearson correlation over the overlap of each query q [b, H, W] translated by every
    (dy, dx) in ±shift with each of its references r [b, K, H, W]; the best translation [b, K].
    The sums over each overlap come from sliding windows of the zero-padded query (unfold), so
    every translation is one batched matrix product."""
    b, h, w = q.shape
    win = F.unfold(F.pad(q[:, None], (shift,) * 4), (h, w))  # [b, H·W, k²]
    win_sq = F.unfold(F.pad(q[:, None] ** 2, (shift,) * 4), (h, w))
    mask = F.unfold(F.pad(torch.ones(1, 1, h, w), (shift,) * 4), (h, w))[0]  # [H·W, k²]
    n = mask.sum(0)  # overlap sizes [k²]
    rf = r.flatten(2)  # [b, K, H·W]
    s_qr = torch.bmm(rf, win)  # [b, K, k²]
    s_r, s_r2 = rf @ mask, (rf**2) @ mask  # [b, K, k²]
    s_q, s_q2 = win.sum(1)[:, None], win_sq.sum(1)[:, None]  # [b, 1, k²]
    cov = s_qr - s_q * s_r / n
    var = (s_q2 - s_q**2 / n).clamp_min(0) * (s_r2 - s_r**2 / n).clamp_min(0)
    corr = torch.where(var > 1e-12, cov / var.clamp_min(1e-24).sqrt(), torch.zeros_like(cov))
    return corr.amax(-1)


@torch.no_grad()
def _full_shift_flip(
    queries: torch.Tensor, refs: torch.Tensor, shift: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    m, h, w = queries.shape
    best = torch.full((m,), -2.0, dtype=torch.float64)
    best_idx = torch.zeros(m, dtype=torch.long)
    for flip, dy, dx in _shifts(shift):
        q_all = queries.flip(-1) if flip else queries
        qc, rc = overlap_crops(h, w, dy, dx)
        r = _z_crops(refs, rc)
        for a in range(0, m, block_size):
            v, i = (_z_crops(q_all[a : a + block_size], qc) @ r.T).max(1)
            v = v.double()
            better = v > best[a : a + len(v)]
            best[a : a + len(v)] = torch.where(better, v, best[a : a + len(v)])
            best_idx[a : a + len(v)] = torch.where(better, i, best_idx[a : a + len(v)])
    return best_idx.numpy(), np.clip(best.numpy(), -1.0, 1.0)


def rank_thumbnail(images: np.ndarray, size: int = 8) -> torch.Tensor:
    """The fixed descriptor: [N, size·size] z-scored rows."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    h = w = int(round(np.sqrt(x.shape[1])))
    ranks = rankdata(x, axis=1).astype(np.float32) / x.shape[1]  # ties share their mean rank
    t = torch.from_numpy(ranks).view(-1, 1, h, w)
    t = F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
    t = F.adaptive_avg_pool2d(t, size)
    return zscore_rows(t.flatten(1))


def lowpass(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of images [N, H, W] (edge pixels extended), float32."""
    x = np.asarray(images, dtype=np.float32)
    return gaussian_filter(x, (0, sigma, sigma), mode="nearest") if sigma > 0 else x


def lowpass_search(
    queries: np.ndarray, train: np.ndarray, block_size: int, backend: str = "torch"
) -> tuple[np.ndarray, np.ndarray]:
    """`lowpass_l2`: the nearest training image after a low-pass of both sides, the training
    side also blurred by each of `EXTRA_BLURS` (blurs compose: σ² add), the smallest distance."""
    q = lowpass(queries, LOWPASS_SIGMA)
    idx = np.zeros(len(q), dtype=np.int64)
    best = np.full(len(q), np.inf)
    for extra in EXTRA_BLURS:
        i, v = nearest_neighbours(
            q, lowpass(train, math.hypot(LOWPASS_SIGMA, extra)), block_size, backend=backend
        )
        closer = v < best
        idx[closer], best[closer] = i[closer], v[closer]
    return idx, best


def warped(images: torch.Tensor, angle: float, zoom: float) -> torch.Tensor:
    """Images [M, H, W] rotated by `angle` degrees and magnified by `zoom` about their centre
    (`WARP_INTERPOLATION`; outside the image, the nearest edge pixel)."""
    if angle == 0 and zoom == 1:
        return images
    a = math.radians(angle)
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    theta = theta.expand(len(images), 2, 3)
    grid = F.affine_grid(theta, [len(images), 1, *images.shape[-2:]], align_corners=False)
    out = F.grid_sample(
        images[:, None], grid, mode=WARP_INTERPOLATION, padding_mode="border", align_corners=False
    )
    return out[:, 0]


def best_over_warps(queries: torch.Tensor, score, far: int, near: int) -> tuple[np.ndarray, np.ndarray]:
    """The best (reference index, score) per query over the `WARPS` of the query, where
    `score(warped queries, shift)` gives (index, score) arrays: translations up to ±`far` px for
    the unwarped query, ±`near` px for the rotated and zoomed ones (a copy is rotated, zoomed or
    shifted far, not all at once; a third of the cost of ±`far` everywhere)."""
    idx = np.zeros(len(queries), dtype=np.int64)
    best = np.full(len(queries), -np.inf)
    for angle, zoom in WARPS:
        unwarped = angle == 0 and zoom == 1
        i, v = score(warped(queries, angle, zoom), far if unwarped else min(near, far))
        better = v > best
        idx[better], best[better] = i[better], v[better]
    return idx, best


@torch.no_grad()
def warp_search(
    queries: torch.Tensor,
    refs: torch.Tensor,
    far: int,
    near: int,
    block_size: int,
    candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`warp_ncc`: `shift_flip_search` of every warp of the query, the best (see
    `best_over_warps` for the translations). With a shortlist, one half-resolution pass on the
    unwarped query (translations up to ±⌈far/2⌉) picks the candidates that every warp is then
    scored against exactly."""
    if not uses_shortlist(queries.shape, refs.shape[0], candidates):
        return best_over_warps(queries, lambda q, s: _full_shift_flip(q, refs, s, block_size), far, near)
    cand = coarse_shortlist(queries, refs, far, block_size, candidates)[1]
    return best_over_warps(queries, lambda q, s: score_shortlist(q, refs, cand, s, block_size), far, near)


def _images2d(x: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(a.reshape(len(a), a.shape[-2], a.shape[-1]))


def search(
    name: str,
    queries: np.ndarray,
    train: np.ndarray,
    block_size: int = 1024,
    shift: int = 4,
    candidates: int | None = None,
    backend: str = "torch",
    warp_shift: int = 8,
    align_candidates: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training image and score of every query in one space (`backend`, torch or faiss,
    for the pixel searches)."""
    if name == "pixel_l2":
        return nearest_neighbours(queries, train, block_size, backend=backend)
    if name == "lowpass_l2":
        q2, t2 = (x.reshape(len(x), x.shape[-2], x.shape[-1]) for x in (queries, train))
        return lowpass_search(q2, t2, block_size, backend)
    if name == "warp_ncc":
        q2, t2 = _images2d(queries), _images2d(train)
        return warp_search(q2, t2, warp_shift, shift, min(block_size, 64), candidates)
    if name == "ncc":
        return max_dot(zscore_rows(flatten(queries)), zscore_rows(flatten(train)), block_size)
    if name == "shift_flip_ncc":
        return shift_flip_search(
            _images2d(queries), _images2d(train), shift, min(block_size, 256), candidates
        )
    if name == "rank_thumbnail":
        q = _images2d(queries)
        both = torch.stack([q, q.flip(-1)], 1).flatten(0, 1).numpy()
        return max_dot(rank_thumbnail(both), rank_thumbnail(train), block_size, variants=2)
    if name == "copy_embedding":
        return embedding_search(queries, train, block_size, backend)
    if name == "aligned_ncc":
        from .registration import aligned_search

        return aligned_search(
            _images2d(queries).numpy(), _images2d(train).numpy(), align_candidates, block_size
        )
    raise ValueError(f"unknown similarity space {name!r}; known: {', '.join(SPACES)}")


# (angle in degrees, zoom): the edits of every *training* image that `copy_embedding` also
# embeds, so that a copy rotated or zoomed further than the descriptor learned to ignore meets a
# like-edited version of its source. Fixed from the ranges a copy benchmark should cover (zooms
# 0.85-1.2, crops of 80-85 % resized back, rotations up to 15°) before it was measured
# (benchmarks/embedding_reference_warps.py: the space alone caught 136 -> 219 of 320 Pillow and
# scikit-image copies on ultrasound at the same 1 % false alarms).
EMBEDDING_WARPS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0), (0.0, 0.87), (0.0, 1.1), (0.0, 1.2), (8.0, 1.0), (-8.0, 1.0), (15.0, 1.0), (-15.0, 1.0),
)  # fmt: skip
_REFERENCE_CACHE: dict[str, tuple[torch.Tensor, np.ndarray]] = {}


def reference_embeddings(train: np.ndarray, warps=EMBEDDING_WARPS) -> tuple[torch.Tensor, np.ndarray]:
    """Unit embeddings of every training image under each warp (`warped`), and each row's
    training index. The last result is kept: an audit searches the same training images for
    the held-out background and for the samples."""
    from .descriptor import embed

    a = np.ascontiguousarray(train, dtype=np.float32)
    a = a.reshape(len(a), *a.shape[-2:])  # [N, 1, H, W] and [N, H, W] share one cache entry
    key = hashlib.sha256(a.tobytes() + repr((a.shape, warps)).encode()).hexdigest()
    if key not in _REFERENCE_CACHE:
        x = torch.from_numpy(a)
        rows = torch.cat([embed(warped(x, angle, zoom).clamp(-1, 1)[:, None]) for angle, zoom in warps])
        _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[key] = rows, np.tile(np.arange(len(a)), len(warps))
    return _REFERENCE_CACHE[key]


def embedding_search(
    queries: np.ndarray, train: np.ndarray, block_size: int, backend: str = "torch", warps=EMBEDDING_WARPS
) -> tuple[np.ndarray, np.ndarray]:
    """`copy_embedding`: the training image with the most similar descriptor (cosine of unit
    vectors), each training image embedded as it is and under `warps`. torch: blocked exact
    products; faiss: exact L2 search, whose nearest unit vector is the most similar one
    (cosine = 1 - d²/2)."""
    from .descriptor import embed

    q = embed(queries)
    t, owner = reference_embeddings(train, warps)
    refs = np.flatnonzero(t.norm(dim=1).numpy() > 0)  # flat training images match nothing
    if not len(refs) or not len(q):
        return np.zeros(len(q), dtype=np.int64), np.zeros(len(q))
    if backend == "faiss":
        idx, dist = nearest_neighbours(q.numpy(), t[refs].numpy(), block_size, backend="faiss")
        score = np.clip(1.0 - dist**2 / 2.0, -1.0, 1.0)
    else:
        idx, score = max_dot(q, t[refs], block_size)
    score[q.norm(dim=1).numpy() == 0] = 0.0  # a flat sample: similar to nothing, as in ncc
    return owner[refs[idx]], score


def search_sharded(
    name: str,
    queries: np.ndarray,
    train: np.ndarray,
    d: Dist,
    block_size: int = 1024,
    shift: int = 4,
    candidates: int | None = None,
    backend: str = "torch",
    warp_shift: int = 8,
    align_candidates: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """`search` with the training images split across the ranks of a torchrun job: each rank
    searches its contiguous share, then the best score per query is reduced over the ranks (ties
    to the lowest index). Exact searches give the one-process answer; with a `candidates`
    shortlist (shift_flip_ncc, warp_ncc) the ranks first agree on one global shortlist per query (see
    `_shortlist_sharded`), so the answer is the one-process answer there too. `aligned_ncc`
    splits the queries instead: every rank shortlists over all training images and registers its
    share of the queries. Every rank returns the full result."""
    if not d.enabled:
        return search(
            name, queries, train, block_size, shift, candidates, backend, warp_shift, align_candidates
        )
    if name == "aligned_ncc":
        from .registration import aligned_search

        q, t = _images2d(queries).numpy(), _images2d(train).numpy()
        return _split_queries(len(q), d, lambda a, b: aligned_search(q[a:b], t, align_candidates, block_size))
    if name in ("shift_flip_ncc", "warp_ncc") and uses_shortlist(queries.shape, len(train), candidates):
        block = min(block_size, 256 if name == "shift_flip_ncc" else 64)
        far = shift if name == "shift_flip_ncc" else warp_shift

        def exact(q: torch.Tensor, t: torch.Tensor, cand: torch.Tensor):
            if name == "shift_flip_ncc":
                return score_shortlist(q, t, cand, shift, block)
            return best_over_warps(q, lambda w, s: score_shortlist(w, t, cand, s, block), far, shift)

        return _shortlist_sharded(_images2d(queries), _images2d(train), d, far, block, candidates, exact)
    higher = SPACES[name].higher_is_closer
    a, b = d.share(len(train))
    idx = np.zeros(len(queries), dtype=np.int64)
    score = np.full(len(queries), -np.inf if higher else np.inf)
    if b > a:
        idx, score = search(name, queries, train[a:b], block_size, shift, candidates, backend, warp_shift)
        idx = idx + a
    return best_over_ranks(idx, score, d, higher)


def _shortlist_sharded(
    queries: torch.Tensor, train: torch.Tensor, d: Dist, shift: int, block_size: int, candidates: int, exact
) -> tuple[np.ndarray, np.ndarray]:
    """shift_flip_ncc or warp_ncc with a shortlist across ranks, as in one process: each rank
    shortlists its share of the training images at half resolution; the ranks' lists are gathered
    and the `candidates` best overall kept (the one-process shortlist); the exact scores of those
    (`exact(queries, train, candidates)`) are then split by query across the ranks and gathered."""
    a, b = d.share(len(train))
    k = candidates
    vals = np.full((len(queries), k), -np.inf)
    idx = np.zeros((len(queries), k), dtype=np.int64)
    if b > a:
        v, i = coarse_shortlist(queries, train[a:b], shift, block_size, k)
        vals[:, : v.shape[1]], idx[:, : v.shape[1]] = v.double().numpy(), i.numpy() + a
    all_vals = all_gather_array(vals, d).transpose(1, 0, 2).reshape(len(queries), -1)  # [M, world·K]
    all_idx = all_gather_array(idx, d).transpose(1, 0, 2).reshape(len(queries), -1)
    top = np.argsort(-all_vals, axis=1, kind="stable")[:, :k]  # ties: lower rank, then list order
    cand = torch.from_numpy(np.take_along_axis(all_idx, top, axis=1))
    return _split_queries(len(queries), d, lambda a, b: exact(queries[a:b], train, cand[a:b]))


def _split_queries(n: int, d: Dist, score) -> tuple[np.ndarray, np.ndarray]:
    """`score(a, b)` → (index, score) of queries a..b, run by each rank on its share of the `n`
    queries and gathered, so that every rank holds all `n`."""
    qa, qb = d.share(n)
    width = -(-n // d.world)  # the largest query share, for equal-sized gathers
    mine = np.full((2, width), np.nan)
    if qb > qa:
        i, v = score(qa, qb)
        mine[0, : qb - qa], mine[1, : qb - qa] = i, v
    parts = all_gather_array(mine, d)  # [world, 2, width]
    sizes = [hi - lo for lo, hi in (d.share(n, r) for r in range(d.world))]
    out = np.concatenate([parts[r, :, :size] for r, size in enumerate(sizes)], axis=1)
    return out[0].astype(np.int64), out[1]
