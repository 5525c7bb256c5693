"""DP training throughput in one process against `torchrun --nproc_per_node=N`, side by side in
one run, on the same recipe and data (the logical batch is the same; N processes split it).

    python benchmarks/distributed_train.py                        # demo recipe, 30 steps, N = 2
    python benchmarks/distributed_train.py --recipe recipes/ct_organamnist.yaml --steps 20 --nproc 4

On a CPU the processes share the machine's cores (each gets cores/N threads), so this measures
the overhead of the split, not a speed-up; on N GPUs each process has its own device. Prints
examples/s (steps × expected batch / training seconds, from each run's privacy.json) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from synthfactory.run import check, create_run
from synthfactory.rundir import read_json


def train(run_dir: Path, nproc: int, threads: int) -> dict:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [str(bin_dir / "synthfactory"), "train", str(run_dir), "-q"]
    if nproc > 1:
        cmd = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *cmd]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return read_json(run_dir / "privacy.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    out = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    overrides = {
        "training.steps": args.steps,
        "training.checkpoint_every": args.steps,
        "privacy.noise_seed": 1,
    }
    results = {}
    for nproc in (1, args.nproc):
        checked = check(args.recipe, overrides)
        run_dir = create_run(checked, out / f"n{nproc}")
        rec = train(run_dir.root, nproc, max(1, cores // nproc))
        results[nproc] = rec
        eps = rec["steps_taken"] * rec["expected_batch_size"] / rec["train_seconds"]
        print(
            f"{nproc} process(es) × {max(1, cores // nproc)} threads: {rec['train_seconds']:.1f} s for "
            f"{rec['steps_taken']} steps, {eps:.1f} examples/s, ε {rec['epsilon']:.4f}"
        )
    a, b = results[1], results[args.nproc]
    ratio = (a["train_seconds"]) / (b["train_seconds"])
    print(f"speed ratio {args.nproc} processes / 1: {ratio:.2f} (same ε: {a['epsilon'] == b['epsilon']})")


if __name__ == "__main__":
    main()
