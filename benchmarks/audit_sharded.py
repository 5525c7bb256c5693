"""The audit's nearest-neighbour search in one process against `torchrun --nproc_per_node=N`
(training images split across the ranks, per-sample best reduced), side by side in one run, on
the same random images; checks that both give the same answer.

    python benchmarks/audit_sharded.py                              # 5,000 queries × 20,000 refs, 64×64
    python benchmarks/audit_sharded.py --space ncc --refs 50000 --nproc 4

On a CPU the processes share the machine's cores (each gets cores/N threads), so this measures
the overhead of the split, not a speed-up; on N GPUs each rank searches on its own device.
Prints the search seconds of each (timed inside the processes, after the data is made and the
process group is up) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORKER = """
import sys, time
import numpy as np
from synthfactory.distributed import from_env, barrier
from synthfactory.audit.spaces import search_sharded
space, n_q, n_r, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
d = from_env()
rng = np.random.default_rng(0)
refs = rng.uniform(-1, 1, (n_r, size, size)).astype(np.float32)
queries = np.concatenate([rng.uniform(-1, 1, (n_q - 10, size, size)).astype(np.float32), refs[:: n_r // 10][:10]])
barrier(d)
t0 = time.perf_counter()
idx, score = search_sharded(space, queries, refs, d)
seconds = time.perf_counter() - t0
if d.main:
    np.savez(out, idx=idx, score=score, seconds=seconds)
"""


def run(nproc: int, threads: int, args, out: Path) -> dict:
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("RANK", None)
    result = out / f"n{nproc}.npz"
    cmd = [sys.executable, str(script)]
    if nproc > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", str(script)]
    cmd += [args.space, str(args.queries), str(args.refs), str(args.size), str(result)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    with np.load(result) as z:
        return {k: z[k] for k in z.files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default="pixel_l2")
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--refs", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    out = Path(tempfile.mkdtemp(prefix="audit-sharded-"))
    print(
        f"{args.space}: {args.queries:,} queries × {args.refs:,} training images of {args.size}×{args.size}"
    )
    results = {}
    for nproc in (1, args.nproc):
        t0 = time.perf_counter()
        results[nproc] = run(nproc, max(1, cores // nproc), args, out)
        print(
            f"{nproc} process(es) × {max(1, cores // nproc)} threads: search {float(results[nproc]['seconds']):.1f} s "
            f"(whole job with start-up and data {time.perf_counter() - t0:.1f} s)"
        )
    a, b = results[1], results[args.nproc]
    same = bool((a["idx"] == b["idx"]).all()) and float(np.abs(a["score"] - b["score"]).max()) <= 1e-5
    print(
        f"speed ratio {args.nproc} processes / 1: {float(a['seconds']) / float(b['seconds']):.2f}; "
        f"same nearest images and scores: {same}"
    )


if __name__ == "__main__":
    main()
