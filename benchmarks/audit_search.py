"""Exact nearest-neighbour search of the memorization audit at scale: time and peak memory.

    python benchmarks/audit_search.py --n-synth 50000 --n-train 50000 --size 64

Random 8-bit images (the search cost does not depend on content). Prints the wall time, the
peak resident memory of this process, and a check on 200 queries against brute force.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from synthfactory.audit.nearest import nearest_neighbours
from synthfactory.sample import uint8_to_model_range


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-synth", type=int, default=50_000)
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=1024)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    train = uint8_to_model_range(rng.integers(0, 256, (args.n_train, args.size, args.size), dtype=np.uint8))
    synth = uint8_to_model_range(rng.integers(0, 256, (args.n_synth, args.size, args.size), dtype=np.uint8))
    synth[:10] = train[:10]  # planted exact copies
    start = time.perf_counter()
    idx, dist = nearest_neighbours(synth, train, block_size=args.block_size)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    assert idx[:10].tolist() == list(range(10)) and (dist[:10] == 0).all()
    check = rng.choice(args.n_synth, 200, replace=False)
    t = train.reshape(args.n_train, -1).astype(np.float64)
    for i in check:
        d = np.sqrt(((t - synth[i].reshape(-1)) ** 2).sum(1))
        assert idx[i] == d.argmin() and abs(dist[i] - d.min()) < 1e-9
    print(
        f"{args.n_synth} synthetic x {args.n_train} training at {args.size}x{args.size}: "
        f"{seconds:.1f} s, peak RSS {peak_gib:.2f} GiB; exact copies found; 200 queries match brute force"
    )


if __name__ == "__main__":
    main()
