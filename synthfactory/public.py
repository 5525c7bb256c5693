"""Data a recipe declares public (`pretrain.data`): what it is to this run, and the screen that
keeps private images out of it, before anything is trained on it without DP.

1. **A synthfactory release is not public data.** A source that lies in a release folder (its
   `synthfactory_ledger.json` in the source's folder or above) brings that ledger: each mechanism
   composes into this run's ε unless shown disjoint, and a release without a DP guarantee cannot
   start a private run (ledger.verdict). Images that carry synthfactory's synthetic marker (a PNG
   text chunk, a DICOM file's synthfactory manufacturer and conversion type SYN, a `datasets`
   table with the release's `run_id` and `sample_seed` columns) but no ledger are refused: what
   they were trained on cannot be told.
2. **The screen.** Every public image is searched against every private image, training *and*
   held-out (a held-out near-copy would be pre-trained on without DP and would then sit in the
   TSTR test set and among the membership attack's non-members), in four spaces: the audit's
   pixel L2, shift/flip NCC and low pass (audit/spaces.py), and `rank_d4`, the audit's
   rank-thumbnail descriptor over the eight rotations and flips of each public image and their
   inversions (`rank_d4_search`). A public image is refused when it is an exact copy, a pixel
   near-duplicate (RMS ≤ `audit.threshold.near_duplicate_rms`), or closer to a private image in
   any space than *every* held-out image is to its nearest training image (the gate's calibration,
   audit/gate.py, on the same background at its most extreme level) by `SCREEN_MARGINS` of the way
   to an exact copy, so that genuinely other images are hardly ever refused while a shifted,
   flipped, turned, inverted or re-contrasted copy, which scores as an exact copy, is. Small
   rotations and zooms (the audit's `warp_ncc`) are not searched: see docs/privacy.md for what the
   screen catches, measured.

The screen reads private images, once, before training; its record (counts and seconds, no
per-image figure) stays in the run directory. Written here because no kept library screens a
data set for near-copies of another; the searches are the audit's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audit import quantize
from .audit.gate import threshold_at
from .audit.run import background_candidates, near_copy
from .audit.spaces import SPACES, max_dot, rank_thumbnail, search
from .data import ImageSet, load_images
from .ledger import Verdict, find_release_ledger, verdict
from .pretrain import PublicData
from .recipe import Recipe
from .sample import uint8_to_model_range

SCREEN_SPACES = ("pixel_l2", "shift_flip_ncc", "lowpass_l2", "rank_d4")
HIGHER_IS_CLOSER = {**{n: s.higher_is_closer for n, s in SPACES.items()}, "rank_d4": True}


def rank_d4_search(queries: np.ndarray, refs: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`rank_thumbnail` (per-image ranks: any monotone intensity change, gamma included, leaves it
    unchanged) over the eight rotations and flips of each query, and their inversions: the best
    correlation with any reference. A copy turned by 90°, flipped upside down, or inverted scores
    as an exact one."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32).reshape(len(queries), *queries.shape[-2:]))
    turns = [torch.rot90(q, k, (-2, -1)) for k in range(4)]
    d4 = torch.stack([v for t in turns for v in (t, t.flip(-1))], 1).flatten(0, 1)  # [M·8, H, W]
    desc = rank_thumbnail(d4.numpy()).view(len(q), 8, -1)
    both = torch.cat([desc, -desc], 1).flatten(0, 1)  # the inverted image's ranks are reversed
    return max_dot(both, rank_thumbnail(refs), block_size, variants=16)


class PublicDataRefused(ValueError):
    """Declared-public data that may not be trained on without DP (one line: why)."""


def release_verdict(recipe: Recipe, public: ImageSet, private: ImageSet) -> Verdict:
    """What `pretrain.data` is to this run: a synthfactory release (its ledger, composed), or data
    the recipe declares public."""
    cfg = recipe.pretrain.data
    path = getattr(cfg, "path", None)
    found = find_release_ledger(Path(path)) if path else None
    marked = public.synthfactory_marked
    if found is None:
        if marked:
            raise PublicDataRefused(
                f"{len(marked)} of its images are synthfactory synthetic images (e.g. {marked[0][0]}) with no "
                "synthfactory_ledger.json beside them: what they were trained on cannot be told; keep "
                "the release's ledger with its images"
            )
        return Verdict("external", f"{cfg.source} data declared public by the recipe")
    where, ledger = found
    runs = {m.run_id for m in ledger.mechanisms}
    strangers = [(src, run) for src, run in marked if run not in runs]
    if strangers:
        src, run = strangers[0]
        raise PublicDataRefused(
            f"{len(strangers)} of its images are synthfactory images of run {run or 'unknown'} (e.g. {src}), "
            f"which the ledger found ({where}) does not hold: releases pooled in one folder each need "
            "their own ledger"
        )
    return verdict(ledger, "the synthfactory release", private.item_ids(), recipe.private)


def exact_copies(public: ImageSet, private: ImageSet) -> int:
    """Public images whose pixels, as the model sees them, equal a private image's (any split)."""
    private_hashes = {m["sha256"] for m in private.manifest}
    return sum(m["sha256"] in private_hashes for m in public.manifest)


# How far beyond the most extreme background score, of the way to an exact copy, a public image
# must be to be refused, per space: chosen on the public stand-ins (benchmarks/public_screen.py,
# docs/privacy.md), the smallest with no genuine public image refused on any of them.
SCREEN_MARGINS = {"pixel_l2": 0.5, "shift_flip_ncc": 0.5, "lowpass_l2": 0.5, "rank_d4": 0.6}


@dataclass
class ScreenScores:
    """Each public image's nearest private image (training, then held-out, in one reference set)
    and its score in every screen space; each space's background (held-out → training)."""

    n_train: int
    nearest: np.ndarray  # pixel L2: index into training + held-out
    scores: dict[str, np.ndarray]
    background: dict[str, np.ndarray]
    near_duplicate: np.ndarray  # pixel near-duplicates and exact copies


def screen_scores(recipe: Recipe, public_f: np.ndarray, private: ImageSet) -> ScreenScores:
    """The searches of the screen, for public images on the release's 8-bit grid ([-1, 1],
    [M, 1, H, W]) against every private image."""
    cfg = recipe.audit
    train = uint8_to_model_range(quantize(private.train_images))
    heldout = uint8_to_model_range(quantize(private.heldout_images))
    pick, _ = background_candidates(private, cfg.threshold.max_heldout, cfg.threshold.seed)
    refs = np.concatenate([train, heldout])

    def find(space: str, queries: np.ndarray, against: np.ndarray):
        return search(space, queries, against, cfg.block_size, cfg.shift, cfg.shift_candidates, cfg.search)

    shape, rms = train.shape[-2:], cfg.threshold.near_duplicate_rms
    _, bg_dist = find("pixel_l2", heldout[pick], train)
    bg = ~near_copy(bg_dist, shape, rms)  # split leaks left out of the background, as the gate does
    nearest, distance = find("pixel_l2", public_f, refs)
    scores, background = {"pixel_l2": distance}, {"pixel_l2": bg_dist[bg]}
    for name in SCREEN_SPACES[1:]:
        if name == "rank_d4":
            background[name] = rank_d4_search(heldout[pick][bg], train, cfg.block_size)[1]
            scores[name] = rank_d4_search(public_f, refs, cfg.block_size)[1]
            continue
        background[name] = find(name, heldout[pick][bg], train)[1]
        scores[name] = find(name, public_f, refs)[1]
    near = near_copy(distance, shape, rms) | (distance == 0)
    return ScreenScores(len(train), nearest, scores, background, near)


def screen_threshold(background: np.ndarray, higher_is_closer: bool, margin: float) -> float:
    """Beyond the most extreme background score (the gate's threshold at level 0), by `margin`
    of the way to an exact copy (a correlation of 1, a distance of 0)."""
    extreme = threshold_at(background, 0.0, higher_is_closer)
    return extreme + margin * (1.0 - extreme) if higher_is_closer else extreme * (1.0 - margin)


def screen_flags(s: ScreenScores, margin: float | None = None) -> tuple[np.ndarray, dict[str, int], dict]:
    """Which public images are refused, the count by rule, and each space's threshold (at
    `SCREEN_MARGINS`, or one `margin` for every space)."""
    refused = s.near_duplicate.copy()
    by_rule, thresholds = {"pixel_near_duplicate": int(refused.sum())}, {}
    for name in SCREEN_SPACES:
        higher = HIGHER_IS_CLOSER[name]
        m = SCREEN_MARGINS[name] if margin is None else margin
        t = thresholds[name] = screen_threshold(s.background[name], higher, m)
        beyond = s.scores[name] > t if higher else s.scores[name] < t
        by_rule[name] = int(beyond.sum())
        refused |= beyond
    return refused, by_rule, thresholds


def screen(recipe: Recipe, public: ImageSet, private: ImageSet) -> dict:
    """The near-copy screen (see the module). Returns its record; raises PublicDataRefused with
    the count and the first files when any public image is refused."""
    started = time.perf_counter()
    scores = screen_scores(recipe, uint8_to_model_range(quantize(public.train_images)), private)
    refused, by_rule, _ = screen_flags(scores)
    n_pub = len(refused)
    record = {
        "spaces": list(SCREEN_SPACES),
        "rule": f"refused when an exact copy, a pixel near-duplicate (RMS ≤ {recipe.audit.threshold.near_duplicate_rms:g}), "
        "or closer to a private image (training or held-out) in any space than every held-out image of "
        f"the background is to its nearest training image, by {SCREEN_MARGINS} of the way to an exact copy",
        "n_public": int(n_pub),
        "n_private_compared": int(len(private.manifest)),
        "n_background": int(len(scores.background["pixel_l2"])),
        "n_refused": int(refused.sum()),
        "refused_by": by_rule,
        "seconds": round(time.perf_counter() - started, 1),
        "public_manifest_sha256": public.manifest_sha256(),
        "private_manifest_sha256": private.manifest_sha256(),
    }
    if refused.any():
        sources = [m["source"] for m in public.manifest if m["split"] == "train"]
        n_held = int((scores.nearest[refused] >= scores.n_train).sum())
        first = ", ".join(sources[i] for i in np.flatnonzero(refused)[:3])
        raise PublicDataRefused(
            f"{int(refused.sum())} of its {n_pub} images are copies or near-copies of private images "
            f"({int(refused.sum()) - n_held} nearest a training image, {n_held} a held-out one; by rule "
            f"{', '.join(f'{k} {v}' for k, v in by_rule.items() if v)}), first: {first}; data declared "
            "public must not contain them"
        )
    return record


def load_public(recipe: Recipe, private: ImageSet, screened: dict | None = None) -> PublicData:
    """`pretrain.data` read, its verdict, the exact-copy check and the screen (skipped when
    `screened`, the record of an earlier screen of the same public and private images, is given).
    Raises DataError (reading) or PublicDataRefused."""
    public = load_images(recipe.pretrain.data, recipe.modality)
    use = release_verdict(recipe, public, private)
    shared = exact_copies(public, private)
    if shared:
        raise PublicDataRefused(
            f"{shared} of its images are exact copies of private images (training or held-out); data "
            "declared public must not contain the private set"
        )
    same = (
        screened is not None
        and screened.get("public_manifest_sha256") == public.manifest_sha256()
        and (screened.get("private_manifest_sha256") == private.manifest_sha256())
    )
    record = screened if same else screen(recipe, public, private)
    return PublicData(public, use, record)
