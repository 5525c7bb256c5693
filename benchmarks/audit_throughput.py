"""Pixel-L2 exact search of the memorization audit: synthfactory's blocked torch search side by
side with faiss-cpu's exact IndexFlatL2, on the same data, in one run; plus each similarity
space's throughput at a smaller size.

    python benchmarks/audit_throughput.py                      # 20,000 x 20,000 at 64x64
    python benchmarks/audit_throughput.py --run-dir runs/<id>  # also: the audit's own timings

Random 8-bit images (search cost does not depend on content), with planted exact copies. Both
searches must find the same nearest neighbours; the script says so before printing times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from synthfactory.audit.nearest import faiss_candidates, flatten, nearest_neighbours
from synthfactory.audit.spaces import SPACES, search
from synthfactory.sample import uint8_to_model_range


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000, help="queries = references = n")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--space-n", type=int, default=2_000, help="queries and references per space")
    ap.add_argument("--space-size", type=int, default=32)
    ap.add_argument("--run-dir", type=Path, help="a run directory whose audit.json timings to print")
    ap.add_argument("--skip-faiss", action="store_true", help="time synthfactory's torch search only")
    ap.add_argument("--json", type=Path, help="also write the timings here")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {_device()}")

    rng = np.random.default_rng(0)
    refs = uint8_to_model_range(rng.integers(0, 256, (args.n, args.size, args.size), dtype=np.uint8))
    queries = uint8_to_model_range(rng.integers(0, 256, (args.n, args.size, args.size), dtype=np.uint8))
    queries[:10] = refs[:10]
    pairs = args.n * args.n

    (t_idx, t_dist), t_torch = timed(lambda: nearest_neighbours(queries, refs))
    assert (t_idx[:10] == np.arange(10)).all() and (t_dist[:10] == 0).all()
    print(f"exact pixel-L2 search, {args.n} x {args.n} images of {args.size}x{args.size}:")
    print(
        f"  synthfactory torch (blocked matmul + float64 re-check): {t_torch:7.1f} s  {pairs / t_torch:,.0f} pairs/s"
    )
    timings = {"device": _device(), "n": args.n, "size": args.size, "pixel_l2_torch_s": t_torch}
    if not args.skip_faiss:
        timings.update(_faiss_side_by_side(queries, refs, t_idx, t_dist, t_torch, pairs))
    timings["space_n"], timings["space_size"] = args.space_n, args.space_size
    timings["spaces_s"] = {}
    for name, seconds in _each_space(rng, args.space_n, args.space_size):
        timings["spaces_s"][name] = seconds
        if args.json:  # after each space, so that a time limit loses only the space it cut
            args.json.write_text(json.dumps(timings, indent=1))

    if args.run_dir:
        audit = json.loads((args.run_dir / "audit" / "audit.json").read_text())
        print(f"audit of {args.run_dir.name}: {audit.get('seconds')} s in all; per space:")
        for name, sp in audit.get("spaces", {}).items():
            print(f"  {name:15s} {sp['seconds']:7.1f} s")


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def _faiss_side_by_side(queries, refs, t_idx, t_dist, t_torch, pairs) -> dict:
    f_idx, t_faiss = timed(lambda: faiss_candidates(flatten(queries), flatten(refs), 1)[:, 0].numpy())
    (s_idx, s_dist), t_sf_faiss = timed(lambda: nearest_neighbours(queries, refs, backend="faiss"))
    agree = float((t_idx == f_idx).mean())
    assert (t_idx == s_idx).all() and np.allclose(t_dist, s_dist)
    print(
        f"  faiss-cpu IndexFlatL2 (k=1, float32):                  {t_faiss:7.1f} s  {pairs / t_faiss:,.0f} pairs/s"
    )
    print(
        f"  synthfactory with the faiss backend (k=8 + re-check):  {t_sf_faiss:7.1f} s  {pairs / t_sf_faiss:,.0f} pairs/s"
    )
    print(
        f"  ratio torch / faiss IndexFlatL2 time: {t_torch / t_faiss:.2f}; same nearest neighbour for {agree:.2%}"
    )
    return {"faiss_flat_s": t_faiss, "pixel_l2_faiss_backend_s": t_sf_faiss, "same_neighbour": agree}


def _each_space(rng, n: int, size: int):
    small_r = uint8_to_model_range(rng.integers(0, 256, (n, size, size), dtype=np.uint8))
    small_q = uint8_to_model_range(rng.integers(0, 256, (n, size, size), dtype=np.uint8))
    print(f"each space, {n} x {n} images of {size}x{size}:")
    for name in SPACES:
        candidates = 64 if name == "shift_flip_ncc" else None
        _, t = timed(lambda name=name, c=candidates: search(name, small_q, small_r, 1024, 4, c))
        print(f"  {name:15s} {t:7.2f} s  {n**2 / t:,.0f} pairs/s", flush=True)
        yield name, t


if __name__ == "__main__":
    main()
