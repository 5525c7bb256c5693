"""Privacy mutation check: break one privacy property at a time in a copy of the package and
show that the test suite notices.

Each mutation rewrites a few lines of a temporary copy of `synthfactory/` (the exact lines must
be there once, so a refactor that moves them fails this script loudly instead of silently testing
nothing), puts that copy first on PYTHONPATH (torchrun subprocesses inherit it), and runs the
tests most likely to catch it with `pytest -x`. A mutation is caught when at least one test fails;
the script prints one line per mutation and exits 1 if any survived (or could not be applied).

    python tests/privacy_mutations.py               # all of them (`make mutations`, run by CI)
    python tests/privacy_mutations.py --list
    python tests/privacy_mutations.py no-clipping noise-twice
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str  # under synthfactory/
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text)
    tests: tuple[str, ...]  # pytest arguments


OPTIMIZER_BUILT = "    acc = create_accountant(mechanism=accountant)\n    dp_optimizer.attach_step_hook("


def after_optimizer(code: str) -> tuple[str, str]:
    """Insert `code` right after the DP optimizer is built in privacy.make_private."""
    return OPTIMIZER_BUILT, code + OPTIMIZER_BUILT


PRIVACY = ("tests/test_privacy.py",)
MUTATIONS = [
    Mutation(
        "no-clipping",
        "per-example gradients summed without clipping",
        "privacy.py",
        (
            after_optimizer(
                "    import types\n\n"
                "    def _unclipped(self):\n"
                "        for p in self.params:\n"
                "            g = self._get_flat_grad_sample(p).to(p.dtype).sum(0)\n"
                "            p.summed_grad = g if p.summed_grad is None else p.summed_grad + g\n\n"
                "    dp_optimizer.clip_and_accumulate = types.MethodType(_unclipped, dp_optimizer)\n"
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "k-rows-clipped-separately",
        "Opacus paths: the K rows of an example clipped as K examples (not folded first)",
        "privacy.py",
        (
            (
                "                p.grad_sample = p.grad_sample.view(n_examples, k, *p.shape).mean(1)",
                "                p.grad_sample = p.grad_sample",
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "k-rows-clipped-separately-vmap",
        "torch.func path: one gradient per row instead of per example",
        "privacy.py",
        (
            (
                "        shaped = [r.reshape(n, k, *r.shape[1:]) for r in rows]",
                "        shaped = [r.reshape(n * k, 1, *r.shape[1:]) for r in rows]\n        n = n * k",
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "bf16-norms",
        "per-example norms taken on bf16 gradients (no cast to fp32)",
        "privacy.py",
        (("    return grad_sample.to(p.dtype)", "    return grad_sample"),),
        ("tests/test_privacy.py::test_one_example_moves_the_clipped_sum_by_at_most_c",),
    ),
    Mutation(
        "noise-twice",
        "the Gaussian noise added twice per step",
        "privacy.py",
        (
            after_optimizer(
                "    _add_noise = dp_optimizer.add_noise\n\n"
                "    def _twice():\n"
                "        _add_noise()\n"
                "        for p in dp_optimizer.params:\n"
                "            std = dp_optimizer.noise_multiplier * dp_optimizer.max_grad_norm\n"
                "            p.grad += torch.normal(0.0, std, p.grad.shape, generator=noise_generator)\n\n"
                "    dp_optimizer.add_noise = _twice\n"
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "no-noise",
        "no noise added (the accountant still counts the calibrated σ)",
        "privacy.py",
        (
            after_optimizer(
                "    def _noiseless():\n"
                "        for p in dp_optimizer.params:\n"
                "            p.grad = p.summed_grad.view_as(p)\n\n"
                "    dp_optimizer.add_noise = _noiseless\n"
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "noise-on-every-rank",
        "under torchrun, every rank adds its own noise before the all-reduce",
        "privacy.py",
        (
            (
                "    optimizer_class = DistributedDPOptimizer if world > 1 else DPOptimizer",
                "    class _EveryRank(DistributedDPOptimizer):\n"
                "        def add_noise(self):\n"
                "            DPOptimizer.add_noise(self)\n\n"
                "    optimizer_class = _EveryRank if world > 1 else DPOptimizer",
            ),
        ),
        ("tests/test_distributed.py::test_two_ranks_take_the_single_process_step",),
    ),
    Mutation(
        "empty-batch-not-counted",
        "an empty Poisson batch skipped: no step, not counted by the accountant",
        "train.py",
        (
            (
                '    if n == 0:\n        private.empty_step()\n        return float("nan")',
                '    if n == 0:\n        return float("nan")',
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "accountant-q-differs",
        "the accountant told a sampling rate other than the sampler's",
        "privacy.py",
        (
            (
                "acc.get_optimizer_hook_fn(sample_rate=sample_rate)",
                "acc.get_optimizer_hook_fn(sample_rate=expected_batch_size / (n_train + 1))",
            ),
        ),
        PRIVACY + ("tests/test_train.py",),
    ),
    Mutation(
        "sampler-q-differs",
        "the sampler drawing at a rate other than the accountant's",
        "privacy.py",
        (
            (
                "num_samples=n_train, sample_rate=sample_rate, generator=sample_generator",
                "num_samples=n_train, sample_rate=min(1.0, 2 * sample_rate), generator=sample_generator",
            ),
        ),
        PRIVACY,
    ),
    Mutation(
        "accountant-restarted-on-resume",
        "a resumed run's accountant starts from zero (under-reports ε)",
        "train.py",
        (
            (
                '    start = saved["accountant_history"] if saved else job.plan["prior_history"]',
                '    start = job.plan["prior_history"]',
            ),
        ),
        ("tests/test_train.py",),
    ),
    Mutation(
        "composition-dropped",
        "a run started from another DP run's weights forgets that run's accountant history",
        "train.py",
        (
            (
                '    start = saved["accountant_history"] if saved else job.plan["prior_history"]',
                '    start = saved["accountant_history"] if saved else []',
            ),
        ),
        ("tests/test_train.py",),
    ),
    Mutation(
        "nonprivate-checkpoint-accepted",
        "a non-private model of the same private data accepted as pre-training",
        "origin.py",
        (
            (
                '    if not origin.get("private"):\n        if not for_private_run:',
                "    if False:\n        if not for_private_run:",
            ),
        ),
        ("tests/test_train.py",),
    ),
    Mutation(
        "near-copies-accepted",
        "public pre-training data with near-copies of private images accepted",
        "run.py",
        (("        if near:\n", "        if False:\n"),),
        ("tests/test_train.py",),
    ),
    Mutation(
        "dp-seed-not-secret",
        "the DP noise and sampling seeded with a constant instead of an OS secret",
        "train.py",
        (("broadcast_int(secrets.randbits(62), dist)", "broadcast_int(12345, dist)"),),
        ("tests/test_train.py",),
    ),
    Mutation(
        "seeded-run-private",
        "a run with privacy.noise_seed claims the DP guarantee",
        "recipe.py",
        (("return self.privacy.enabled and self.privacy.noise_seed is None", "return self.privacy.enabled"),),
        ("tests/test_train.py", "tests/test_publish.py"),
    ),
    Mutation(
        "dp-secret-kept",
        "checkpoints/train_state.pt (the DP secret) kept after training",
        "train.py",
        (("        run_dir.train_state.unlink(missing_ok=True)", "        pass"),),
        ("tests/test_train.py",),
    ),
    Mutation(
        "resume-state-per-rank",
        "under torchrun, each rank resumes from its own copy of the state, not rank 0's",
        "train.py",
        (("    saved = broadcast_object(own_copy, dist)", "    saved = own_copy"),),
        ("tests/test_distributed.py::test_resume_where_one_rank_has_no_state_file_takes_rank_0s",),
    ),
    Mutation(
        "release-column-from-audit",
        "the released dataset carries a column set by the audit",
        "export.py",
        (
            (
                '            "sample_index": datasets.Value("int64"),\n',
                '            "sample_index": datasets.Value("int64"),\n            "audit_verdict": datasets.Value("string"),\n',
            ),
            (
                '            "sample_index": int(released.sample_index[i]),\n',
                '            "sample_index": int(released.sample_index[i]),\n            "audit_verdict": "passed",\n',
            ),
        ),
        ("tests/test_export.py",),
    ),
    Mutation(
        "warm-start-not-composed",
        "the warm start's query left out of the history DP-SGD composes with (ε under-reported)",
        "train.py",
        (('(rec.get("warm_start") or {}).get("accountant_history", [])', "[]"),),
        ("tests/test_warmstart.py",),
    ),
    Mutation(
        "warm-start-noise-not-scaled-to-sensitivity",
        "the warm start's noise std σ instead of σ·√2 (its sensitivity is √2)",
        "warmstart.py",
        (("    std = cfg.noise_multiplier * math.sqrt(2.0)", "    std = cfg.noise_multiplier"),),
        ("tests/test_warmstart.py",),
    ),
    Mutation(
        "warm-start-no-clipping",
        "the warm start's images not clipped to C before the sum",
        "warmstart.py",
        (("    x = x * scale[:, None] / c", "    x = x / c"),),
        ("tests/test_warmstart.py",),
    ),
    Mutation(
        "warm-start-asked-twice",
        "the warm start's query answered again when its stage re-runs (ε spent twice)",
        "warmstart.py",
        (
            (
                "    if path.is_file():\n        central = load(path)",
                "    if False:\n        central = load(path)",
            ),
        ),
        ("tests/test_warmstart.py",),
    ),
]


def mutated_copy(m: Mutation, dest: Path) -> None:
    shutil.copytree(
        REPO / "synthfactory", dest / "synthfactory", ignore=shutil.ignore_patterns("__pycache__")
    )
    path = dest / "synthfactory" / m.file
    text = path.read_text()
    for old, new in m.edits:
        count = text.count(old)
        if count != 1:
            raise LookupError(f"{m.file}: the text to mutate occurs {count} times, not once: {old[:60]!r}")
        text = text.replace(old, new)
    path.write_text(text)


def run(m: Mutation, verbose: bool) -> tuple[str, str]:
    """('caught' | 'SURVIVED' | 'ERROR', detail)."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{m.name}-") as tmp:
        try:
            mutated_copy(m, Path(tmp))
        except LookupError as e:
            return "ERROR", str(e)
        # Run from the copy's folder (`python -m` puts the working directory first on sys.path,
        # before PYTHONPATH) with the repository's pytest configuration and tests.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        probe = subprocess.run(
            [sys.executable, "-c", "import synthfactory; print(synthfactory.__file__)"],
            capture_output=True, text=True, env=env, cwd=tmp,
        )  # fmt: skip
        if not probe.stdout.startswith(tmp):
            imported = probe.stdout.strip() or probe.stderr[-300:]
            return "ERROR", f"the mutated copy is not the one imported ({imported})"
        config = ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO)]
        tests = [str(REPO / t) for t in m.tests]
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *config,
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            *tests,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    out = res.stdout + res.stderr
    if verbose:
        print(out)
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    if res.returncode == 1 and failed:
        return "caught", f"by {failed[0][failed[0].find('tests/') :]}"
    if res.returncode == 0:
        return "SURVIVED", "every selected test passed"
    return "ERROR", f"pytest exit {res.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34s} {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {sorted(unknown)}")
    bad = 0
    for m in chosen:
        started = time.perf_counter()
        verdict, detail = run(m, args.verbose)
        bad += verdict != "caught"
        print(
            f"{verdict:8s} {m.name:34s} {time.perf_counter() - started:6.0f} s  {m.what}: {detail}",
            flush=True,
        )
    print(f"{len(chosen) - bad} of {len(chosen)} mutations caught", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
