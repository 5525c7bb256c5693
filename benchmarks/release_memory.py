"""Peak memory of a streamed release: N generated (random) S×S images written to a sample store
(the run directory's samples/store/, as the sample stage writes it), then released as a
`datasets` DatasetDict by the release stage's own writer (`export.write_hf` over a
`ReleasedSet` that reads the store one image at a time), side by side with the size of the pixel
data it would take to hold them all.

    python benchmarks/release_memory.py                 # 100,000 images of 128×128
    python benchmarks/release_memory.py --n 20000 --size 64
    python benchmarks/release_memory.py --push          # then push it (datasets' push_to_hub)

`--push` then pushes the release with `DatasetDict.push_to_hub` (what `synthfactory publish`
calls, Parquet shards of ≤ 200 MB) to the loopback stand-in Hub of the tests
(tests/hub_standin.py), run in a child process so that what it receives is not counted here.

Prints the peak resident set of this process (ru_maxrss: everything resident, including pages of
memory-mapped files) and the peak anonymous memory (RssAnon sampled every 20 ms: heap and
arrays), the pixel bytes, the ratio, the wall time and the size on disk. The images are made
from per-image seeds in chunks of 1,000, so nothing holds them all at any point.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
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


def make_store(path: Path, n: int, size: int, classes: int) -> None:
    """n random images in a sample store, written 1,000 at a time (as sampling writes batches)."""
    from synthfactory.sample import StoreWriter

    labels = np.arange(n, dtype=np.int64) % classes
    writer = StoreWriter(path, labels, np.arange(n, dtype=np.int64), (size, size))
    for a in range(0, n, 1000):
        rng = np.random.default_rng(a)
        writer.write(a, rng.integers(0, 256, (min(1000, n - a), size, size), dtype=np.uint8))
    writer.commit()


def released_set(store: Path, classes: int):
    """Every stored image released (the audit's verdicts are not what this measures)."""
    from synthfactory.export import ReleasedSet
    from synthfactory.sample import Samples, StoreImages

    s = Samples.load(store)
    k = np.arange(len(s.labels), dtype=np.int64)
    return ReleasedSet(
        store=StoreImages(store),
        labels=s.labels,
        seeds=s.seeds,
        sample_index=k,
        class_names=[f"c{i}" for i in range(classes)],
        private=True,
        run_id="benchmark",
    )


def _serve(queue) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hub_standin import StandInHub

    with StandInHub() as h:
        queue.put(h.endpoint)
        threading.Event().wait()


def start_standin_hub():
    """The tests' stand-in Hub in a child process; points huggingface_hub and datasets at it
    (set before they are imported)."""
    import multiprocessing as mp

    queue = mp.get_context("fork").Queue()
    process = mp.get_context("fork").Process(target=_serve, args=(queue,), daemon=True)
    process.start()
    endpoint = queue.get(timeout=30)
    os.environ.update(HF_ENDPOINT=endpoint, HF_TOKEN="hf_benchmark", HF_HUB_DISABLE_XET="1")
    return process, endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="folder for the release (default: a temp folder)")
    ap.add_argument("--push", action="store_true", help="also push it to a loopback stand-in Hub")
    args = ap.parse_args()
    hub = start_standin_hub() if args.push else None

    import datasets  # noqa: F401  (imported before the baseline, as the release stage has it)

    from synthfactory.export import write_hf

    out = args.out or Path(tempfile.mkdtemp(prefix="release-memory-"))
    t0 = time.perf_counter()
    make_store(out / "samples" / "store", args.n, args.size, args.classes)
    store_seconds = time.perf_counter() - t0
    before, anon_before = peak_rss_gib(), rss_anon_gib()
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        write_hf(released_set(out / "samples" / "store", args.classes), out / "release")
    seconds = time.perf_counter() - t0
    after = peak_rss_gib()
    pixel_gib = args.n * args.size**2 / 2**30
    split = out / "release" / "dataset" / "train"
    on_disk = sum(p.stat().st_size for p in split.glob("*.arrow")) / 2**30
    ds = datasets.load_from_disk(str(out / "release" / "dataset"))["train"]
    assert len(ds) == args.n
    print(
        f"images               {args.n:,} of {args.size}×{args.size} (sample store written in {store_seconds:.1f} s)"
    )
    print(f"pixel data           {pixel_gib:.2f} GiB (what holding them all would take)")
    print(f"peak RSS             {before:.2f} GiB before the release, {after:.2f} GiB after (ru_maxrss)")
    print(f"anonymous memory     {anon_before:.2f} GiB before, peak {anon.peak:.2f} GiB during the release")
    print(f"peak RSS / pixels    {after / pixel_gib:.2f}")
    print(f"wall time            {seconds:.1f} s ({args.n / seconds:,.0f} images/s)")
    print(f"on disk              {on_disk:.2f} GiB in {len(list(split.glob('*.arrow')))} Arrow shards")
    print(f"under 2 GiB          {'yes' if after < 2 else 'NO'} (peak RSS {after:.2f} GiB)")
    if hub is not None:
        process, endpoint = hub
        t0 = time.perf_counter()
        with AnonPeak() as push_anon:
            datasets.load_from_disk(str(out / "release" / "dataset")).push_to_hub(
                "benchmark/release", private=True, max_shard_size="200MB"
            )
        push_seconds = time.perf_counter() - t0
        pushed = peak_rss_gib()
        process.terminate()
        print(f"push_to_hub          {push_seconds:.1f} s to {endpoint}")
        print(
            f"push memory          peak RSS {pushed:.2f} GiB (ru_maxrss, from here on), anonymous peak "
            f"{push_anon.peak:.2f} GiB; the rest are pages of the memory-mapped Arrow shards that "
            "push_to_hub reads (file-backed, reclaimable)"
        )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
