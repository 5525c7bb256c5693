"""Does the half-resolution shortlist (`audit.shift_candidates`) lose a copy's best score? For
planted copies of training images of every kind, the best `shift_flip_ncc` and `warp_ncc` score
of the exact search against the score with N candidates, per kind.

    python benchmarks/audit_shortlist_recall.py [--sets ct,demo] [--candidates 64,256]

ct: the first 5,000 OrganAMNIST training images at 28 px (the CT recipe's shortlist is 256);
demo: the demo recipe's 2,000 CT phantoms at 32 px (the demo searches exactly).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from synthfactory.audit import quantize, uint8_to_model_range
from synthfactory.audit.planted import COVERED, GEOMETRIC, planted_copies
from synthfactory.audit.spaces import search
from synthfactory.data.common import pad_square_resize
from synthfactory.data.phantom import read_phantom


def training_images(key: str, data: Path) -> np.ndarray:
    if key == "ct":
        with np.load(data / "ct_organamnist" / "organamnist_28_full.npz") as z:
            return z["train_images"][:5000]
    train, _, _ = read_phantom("ct", 32, 2000, 500, 0)
    return quantize(pad_square_resize(train.images, 32)).reshape(-1, 32, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--sets", default="ct,demo")
    ap.add_argument("--candidates", default="64,256")
    args = ap.parse_args()
    for key in args.sets.split(","):
        train = training_images(key, args.data)
        copies, _, kinds = planted_copies(train, 20, seed=1, kinds=COVERED + GEOMETRIC)
        kinds = np.asarray(kinds)
        refs, queries = uint8_to_model_range(train), uint8_to_model_range(copies)
        for space in ("shift_flip_ncc", "warp_ncc"):
            start = time.perf_counter()
            exact = search(space, queries, refs)[1]
            seconds = time.perf_counter() - start
            for n in (int(c) for c in args.candidates.split(",")):
                start = time.perf_counter()
                short = search(space, queries, refs, candidates=n)[1]
                lost = exact - short > 1e-6
                each = ", ".join(
                    f"{k} {int(lost[kinds == k].sum())}"
                    for k in COVERED + GEOMETRIC
                    if lost[kinds == k].any()
                )
                print(
                    f"{key} {space}: {len(train)} training images, {len(copies)} copies; exact {seconds:.0f} s, "
                    f"{n} candidates {time.perf_counter() - start:.0f} s; best score lost for {int(lost.sum())}"
                    + (f" ({each})" if each else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
