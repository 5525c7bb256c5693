"""Peak memory of a streamed release: N generated (random) images of S×S written as a
`datasets` DatasetDict with the release's own writer (`export.write_rows`), side by side with
the size of the pixel data it would take to hold them all.

    python benchmarks/release_memory.py                 # 100,000 images of 128×128
    python benchmarks/release_memory.py --n 20000 --size 64

Prints the peak anonymous memory of this process during the release (RssAnon sampled every
20 ms: heap and arrays, what the writer holds) and its peak resident set (ru_maxrss, which also
counts pages of the memory-mapped Arrow files that `save_to_disk` reads back; the kernel can drop
those at any time), the pixel bytes, the ratio, the wall time and the size on disk. The images are made one at a time from per-image seeds, so the benchmark
measures the writer, not a sample store.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def rss_anon_gib() -> float:
    """Anonymous resident memory (heap, arrays): what the process holds, without the pages of
    memory-mapped Arrow files, which the kernel may drop at any time (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class AnonPeak:
    """Samples RssAnon every 20 ms in a thread; `.peak` is the largest value seen."""

    def __init__(self) -> None:
        self.peak = rss_anon_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_gib())

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_gib())


def rows(n: int, size: int, classes: int):
    from PIL import Image

    for i in range(n):
        rng = np.random.default_rng(i)
        yield {
            "image": Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L"),
            "label": int(i % classes),
            "run_id": "benchmark",
            "sample_seed": i,
            "sample_index": i,
            "audit_verdict": "passed",
            "nn_distance": float(rng.random()),
            "audit_pixel_l2": float(rng.random()),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="folder for the release (default: a temp folder)")
    args = ap.parse_args()

    import datasets  # noqa: F401  (imported before the baseline, as the release stage has it)

    from synthfactory.export import hf_features, write_rows

    out = args.out or Path(tempfile.mkdtemp(prefix="release-memory-"))
    before, anon_before = peak_rss_gib(), rss_anon_gib()
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        write_rows(
            rows(args.n, args.size, args.classes),
            hf_features([f"c{i}" for i in range(args.classes)], ["pixel_l2"]),
            out,
        )
    seconds = time.perf_counter() - t0
    after = peak_rss_gib()
    pixel_gib = args.n * args.size**2 / 2**30
    on_disk = sum(p.stat().st_size for p in (out / "dataset").rglob("*") if p.is_file()) / 2**30
    ds = datasets.load_from_disk(str(out / "dataset"))["train"]
    assert len(ds) == args.n
    print(f"images               {args.n:,} of {args.size}×{args.size}")
    print(f"pixel data           {pixel_gib:.2f} GiB (what holding them all would take)")
    print(f"anonymous memory     {anon_before:.2f} GiB before, peak {anon.peak:.2f} GiB during the release")
    print(f"peak / pixel data    {anon.peak / pixel_gib:.2f} (anonymous)")
    print(
        f"peak RSS             {before:.2f} GiB before, {after:.2f} GiB after (ru_maxrss: counts the pages of"
    )
    print(
        "                     the memory-mapped Arrow files save_to_disk reads back, which the kernel can drop)"
    )
    print(f"wall time            {seconds:.1f} s ({args.n / seconds:,.0f} images/s)")
    print(
        f"on disk              {on_disk:.2f} GiB in {len(list((out / 'dataset' / 'train').glob('*.arrow')))} Arrow shards"
    )
    print(
        f"under 2 GiB          anonymous {'yes' if anon.peak < 2 else 'NO'}, RSS {'yes' if after < 2 else 'NO'}"
    )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
