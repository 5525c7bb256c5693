"""Privacy mutation check: break one privacy property at a time in a copy of the package and
show that the tests named for it notice, for the right reason.

1. Baseline: every named test runs on an unmutated copy of `synthfactory/` and must pass (a test
   that fails there could not tell a mutation from anything else).
2. Each mutation rewrites a few lines of a fresh copy (the exact lines must be there once, so a
   refactor that moves them fails this script loudly instead of silently testing nothing), puts
   that copy first on PYTHONPATH (torchrun subprocesses inherit it), and runs its named tests. It
   is caught only when *every* named test fails (an error in collection, or a named test that
   passes, is not a catch).
3. The real data must be there (`../shared/data`, or SYNTHFACTORY_SHARED_DATA): without it some
   tests skip, and a skipped test catches nothing; the script stops with one line instead.

The script prints one line per mutation and exits 1 if any survived (or could not be applied).

    python tests/privacy_mutations.py               # all of them (`make mutations`, run by CI)
    python tests/privacy_mutations.py --list
    python tests/privacy_mutations.py no-clipping noise-twice
    python tests/privacy_mutations.py -j 1          # one at a time (default: 2 side by side)
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str  # under synthfactory/
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text)
    tests: tuple[str, ...]  # the test functions (pytest node ids) that must each fail


OPTIMIZER_BUILT = "    acc = create_accountant(mechanism=accountant)\n    dp_optimizer.attach_step_hook("


def after_optimizer(code: str) -> tuple[str, str]:
    """Insert `code` right after the DP optimizer is built in privacy.make_private."""
    return OPTIMIZER_BUILT, code + OPTIMIZER_BUILT


P = "tests/test_privacy.py::"
T = "tests/test_train.py::"
W = "tests/test_warmstart.py::"
L = "tests/test_ledger.py::"
G = "tests/test_ghost_clipping.py::"
MUTATIONS = [
    # --- DP-SGD: clipping, noise, sampling, the accountant ----------------------------------------
    Mutation(
        "ghost-unclipped-sum",
        "mixed_ghost sums the per-example gradients without their clip factors",
        "ghost_clipping.py",
        (
            (
                "    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)\n",
                "    factors = torch.ones_like(norms)\n",
            ),
        ),
        (
            P + "test_each_example_is_clipped_before_summing",
            P + "test_one_example_moves_the_clipped_sum_by_at_most_c",
            G + "test_mixed_ghost_equals_the_vmap_clipped_sum_on_shipped_unets",
        ),
    ),
    Mutation(
        "ghost-norm-without-groupnorm",
        "mixed_ghost leaves the GroupNorm layers out of each example's norm (clip factors too large)",
        "ghost_clipping.py",
        (
            (
                "        squared += layer.norms_squared()\n",
                "        squared += 0 if isinstance(layer, _GroupNorm) else layer.norms_squared()\n",
            ),
        ),
        (
            P + "test_one_example_moves_the_clipped_sum_by_at_most_c",
            G + "test_mixed_ghost_equals_the_vmap_clipped_sum_on_shipped_unets",
        ),
    ),
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
        (
            P + "test_each_example_is_clipped_before_summing",
            P + "test_one_example_moves_the_clipped_sum_by_at_most_c",
        ),
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
        (P + "test_k_rows_are_folded_into_one_gradient_per_example_before_clipping",),
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
        (P + "test_k_rows_are_folded_into_one_gradient_per_example_before_clipping",),
    ),
    Mutation(
        "bf16-norms",
        "per-example norms taken on bf16 gradients (no cast to fp32)",
        "privacy.py",
        (("    return grad_sample.to(p.dtype)", "    return grad_sample"),),
        (P + "test_one_example_moves_the_clipped_sum_by_at_most_c",),
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
        (P + "test_noise_has_the_calibrated_scale",),
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
        (P + "test_noise_has_the_calibrated_scale",),
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
        "steps.py",
        (
            (
                '    if n == 0:\n        private.empty_step()\n        return float("nan")',
                '    if n == 0:\n        return float("nan")',
            ),
        ),
        (P + "test_empty_poisson_batch_steps_with_noise_and_is_counted",),
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
        (P + "test_accountant_counts_every_step",),
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
        (P + "test_poisson_sampler_varies_batch_size_around_q_n",),
    ),
    Mutation(
        "poisson-batch-is-a-prefix",
        "the trainer steps on the first |B| examples instead of the Poisson batch's",
        "train.py",
        (
            (
                "        idx = torch.as_tensor(next(batches), dtype=torch.long)",
                "        idx = torch.arange(len(next(batches)))",
            ),
        ),
        (T + "test_the_trainer_draws_poisson_batches_of_the_whole_training_set",),
    ),
    Mutation(
        "epsilon-at-10x-delta",
        "ε evaluated at 10 δ (under-reported)",
        "privacy.py",
        (
            (
                "        return float(acc.get_epsilon(delta=delta))",
                "        return float(acc.get_epsilon(delta=10 * delta))",
            ),
        ),
        (
            P + "test_epsilon_is_opacus_at_recorded_histories",
            T + "test_privacy_record_comes_from_the_accountant",
        ),
    ),
    Mutation(
        "accountant-restarted-on-resume",
        "a resumed run's accountant starts from zero (under-reports ε)",
        "train.py",
        (
            (
                "    state.private.accountant.history = [tuple(h) for h in state.start_history]",
                "    state.private.accountant.history = []",
            ),
        ),
        (T + "test_killed_run_resumes_to_the_same_model_and_epsilon",),
    ),
    # --- the DP secret and what is private ---------------------------------------------------------
    Mutation(
        "dp-seed-not-secret",
        "the DP noise and sampling seeded with a constant instead of an OS secret",
        "train.py",
        (("broadcast_int(secrets.randbits(62), dist)", "broadcast_int(12345, dist)"),),
        (T + "test_unseeded_runs_draw_different_secret_batches_and_noise",),
    ),
    Mutation(
        "seeded-run-private",
        "a run with privacy.noise_seed claims the DP guarantee",
        "recipe.py",
        (("return self.privacy.enabled and self.privacy.noise_seed is None", "return self.privacy.enabled"),),
        (
            T + "test_a_seeded_run_is_not_private",
            "tests/test_publish.py::test_a_seeded_run_is_released_and_published_as_not_private",
        ),
    ),
    Mutation(
        "dp-secret-kept",
        "checkpoints/train_state.pt (the DP secret) kept after training",
        "train.py",
        (("        run_dir.train_state.unlink(missing_ok=True)", "        pass"),),
        (T + "test_a_finished_run_keeps_no_dp_secret_and_is_not_trained_again",),
    ),
    Mutation(
        "resume-state-per-rank",
        "under torchrun, each rank resumes from its own copy of the state, not rank 0's",
        "train.py",
        (("    saved = broadcast_object(own_copy, dist)", "    saved = own_copy"),),
        ("tests/test_distributed.py::test_resume_where_one_rank_has_no_state_file_takes_rank_0s",),
    ),
    # --- the ledger: composition, lineage, data identity -------------------------------------------
    Mutation(
        "composition-dropped",
        "a run started from a DP checkpoint of its data leaves that checkpoint's ledger out",
        "pretrain.py",
        (
            (
                '        if use.ledger.mechanisms:\n            ledger.bring_in(use.ledger, via="pretrain.checkpoint")',
                '        if False:\n            ledger.bring_in(use.ledger, via="pretrain.checkpoint")',
            ),
        ),
        (T + "test_pretrain_checkpoint_of_a_dp_run_on_the_same_data_composes",),
    ),
    Mutation(
        "nonprivate-checkpoint-accepted",
        "a non-private model of the same private data accepted as pre-training",
        "ledger.py",
        (("    if unguarded and for_private_run:", "    if False:"),),
        (T + "test_pretrain_checkpoint_without_a_dp_guarantee_on_the_same_data_is_refused",),
    ),
    Mutation(
        "data-overlap-ignored",
        "an ancestor's data never compared with this run's: every DP checkpoint passes as other data",
        "ledger.py",
        (("        return ds is None or not ds.disjoint_from(items)", "        return ds is None"),),
        (
            L + "test_the_same_images_at_another_size_compose",
            L + "test_a_chain_brings_the_first_runs_history",
        ),
    ),
    Mutation(
        "identity-from-pixels",
        "case 1: data identity from the preprocessed pixels (another image size passes as other data)",
        "data/common.py",
        (
            (
                '                "item": raw.items[i],',
                '                "item": image_sha256(arrays[split][j]),',
            ),
        ),
        (L + "test_the_same_images_at_another_size_compose",),
    ),
    Mutation(
        "chain-loses-ancestors",
        "case 2: a checkpoint carries only its own run's mechanisms, not its ancestors'",
        "train.py",
        (
            (
                "            write_artifact(tmp / name, ledger)",
                "            write_artifact(tmp / name, Ledger(ledger.datasets, ledger.own(), ledger.own_data))",
            ),
        ),
        (L + "test_a_chain_brings_the_first_runs_history",),
    ),
    Mutation(
        "release-ledger-ignored",
        "case 3: a synthfactory release used as public pre-training data, its ledger ignored",
        "public.py",
        (
            (
                '    return verdict(ledger, "the synthfactory release", private.item_ids(), recipe.private)',
                '    return Verdict("external", "declared public by the recipe")',
            ),
        ),
        (L + "test_a_release_used_as_public_data_composes",),
    ),
    Mutation(
        "place-ignored",
        "data identity by content only: the same rows stored at another size pass as other data",
        "data/common.py",
        (
            (
                '        return frozenset(m["item"] for m in self.manifest) | {\n            m["place"] for m in self.manifest if "place" in m\n        }',
                '        return frozenset(m["item"] for m in self.manifest)',
            ),
        ),
        (L + "test_the_same_rows_stored_at_another_size_compose",),
    ),
    Mutation(
        "ancestor-public-data-ignored",
        "an ancestor's pre-training on data it declared public never compared with this run's images",
        "ledger.py",
        (("    if unscreened and for_private_run:", "    if False:"),),
        (L + "test_an_ancestors_public_data_holding_this_runs_images_is_refused",),
    ),
    Mutation(
        "weights-marker-ignored",
        "synthfactory weights stripped of their ledger taken for an outside checkpoint (public)",
        "ledger.py",
        (("    if marked is not None:", "    if False:"),),
        (L + "test_weights_without_their_ledger_are_refused_not_taken_for_public",),
    ),
    # --- declared-public data ----------------------------------------------------------------------
    Mutation(
        "near-copies-accepted",
        "public pre-training data with near-copies of private images accepted (the screen refuses nothing)",
        "public.py",
        (("    if refused.any():", "    if False:"),),
        (
            T + "test_public_data_with_near_copies_of_private_images_is_refused",
            L + "test_declared_public_near_copies_are_refused_for_training_and_held_out_images",
        ),  # fmt: skip
    ),
    Mutation(
        "screen-without-turns-and-inversions",
        "the public-data screen without its rank descriptor over rotations, flips and inversions",
        "public.py",
        (
            (
                'SCREEN_SPACES = ("pixel_l2", "shift_flip_ncc", "lowpass_l2", "rank_d4")',
                'SCREEN_SPACES = ("pixel_l2", "shift_flip_ncc", "lowpass_l2")',
            ),
        ),
        (L + "test_declared_public_near_copies_are_refused_for_training_and_held_out_images",),
    ),
    Mutation(
        "exact-copy-check-train-only",
        "the exact-copy check on public data looks at the private training split only",
        "public.py",
        (
            (
                '    private_hashes = {m["sha256"] for m in private.manifest}',
                '    private_hashes = {m["sha256"] for m in private.manifest if m["split"] == "train"}',
            ),
        ),
        (T + "test_public_data_holding_an_exact_copy_of_a_held_out_image_is_refused",),
    ),
    # --- the warm start, and what reads its answer -----------------------------------------------
    Mutation(
        "warm-start-not-composed",
        "the warm start's query recorded without its accountant entry (ε under-reported)",
        "warmstart.py",
        (("        history=tuple(history(cfg)),", "        history=(),"),),
        (W + "test_reported_epsilon_includes_the_warm_start_and_sigma_is_resolved",),
    ),
    Mutation(
        "warm-start-noise-not-scaled-to-sensitivity",
        "the warm start's noise std σ instead of σ·√2 (its sensitivity is √2)",
        "warmstart.py",
        (("    std = cfg.noise_multiplier * math.sqrt(2.0)", "    std = cfg.noise_multiplier"),),
        (W + "test_noise_is_sigma_sqrt2_on_every_coordinate",),
    ),
    Mutation(
        "warm-start-counts-without-noise",
        "the warm start's class counts released without noise",
        "warmstart.py",
        (
            (
                "    counts = counts + std * torch.randn(counts.shape, generator=generator, dtype=torch.float64)",
                "    counts = counts",
            ),
        ),
        (W + "test_noise_is_sigma_sqrt2_on_every_coordinate",),
    ),
    Mutation(
        "warm-start-no-clipping",
        "the warm start's images not clipped to C before the sum",
        "warmstart.py",
        (("    x = x * scale[:, None] / c", "    x = x / c"),),
        (W + "test_one_example_moves_the_query_by_at_most_sqrt2",),
    ),
    Mutation(
        "warm-start-asked-twice",
        "the warm start's query answered again when its stage re-runs (ε spent twice)",
        "warmstart.py",
        (
            (
                "    if asker.path.is_file():\n        central = load(asker.path)",
                "    if False:\n        central = load(asker.path)",
            ),
        ),
        (W + "test_the_query_is_answered_once_per_run",),
    ),
    Mutation(
        "answer-stored-before-its-entry",
        "item 2: the warm start's answer written to disk before its ledger entry",
        "warmstart.py",
        (
            (
                "    asker.ledger.record(entry)  # first: the answer is counted before it exists anywhere else\n"
                "    save(asker.path, central)",
                "    save(asker.path, central)\n    asker.ledger.record(entry)",
            ),
        ),
        (L + "test_a_warm_start_killed_while_its_entry_is_written_leaves_no_answer",),
    ),
    Mutation(
        "stage-order-not-checked",
        "item 2: a stage runs although a stage it reads from has not finished",
        "run.py",
        (
            (
                "    missing = [s for s in needs(stage, checked.recipe) if not run_dir.is_done(s)]",
                "    missing = []",
            ),
        ),
        (L + "test_a_killed_warm_start_is_counted_and_nothing_goes_on_without_it",),
    ),
    Mutation(
        "pretrained-weights-not-required",
        "item 2: DP-SGD starts without the pre-training stage's weights and their ledger",
        "train.py",
        (
            (
                "    if has_pretraining(recipe):\n        if not (run_dir.pretrained",
                "    if False:\n        if not (run_dir.pretrained",
            ),
        ),
        (L + "test_a_killed_warm_start_is_counted_and_nothing_goes_on_without_it",),
    ),
    Mutation(
        "dp-counts-ignored",
        "sampling.class_proportions: dp_counts ignored (always equal classes)",
        "sample.py",
        (('    if cfg.class_proportions == "equal" or run_dir is None:', "    if True:"),),
        (W + "test_samples_follow_the_dp_class_counts",),
    ),
    Mutation(
        "dp-counts-not-checked",
        "item 2: the sampler uses noisy counts the generator's ledger does not name",
        "sample.py",
        (
            (
                "    warmstart.covered_answer(carried.warm_start() if carried else None, central, run_dir.central_images)\n",
                "",
            ),
        ),
        (W + "test_dp_counts_without_their_ledger_entry_are_refused",),
    ),
    # --- what leaves ---------------------------------------------------------------------------
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
        ("tests/test_export.py::test_release_holds_only_audited_passed_samples",),
    ),
    Mutation(
        "extremes-in-public-record",
        "the public audit.json keeps each space's minimum and maximum score",
        "audit/report.py",
        (('EXTREMES = ("0", "100")', "EXTREMES = ()"),),
        ("tests/test_publish.py::test_public_reports_hold_aggregates_only",),
    ),
    Mutation(
        "embedding-references-unwarped",
        "copy_embedding embeds the training images only as they are (no zoomed or rotated references)",
        "audit/spaces.py",
        (
            (
                "    (0.0, 1.0), (0.0, 0.87), (0.0, 1.1), (0.0, 1.2), (8.0, 1.0), (-8.0, 1.0), (15.0, 1.0), (-15.0, 1.0),",
                "    (0.0, 1.0),",
            ),
        ),
        (
            "tests/test_descriptor.py::test_training_images_embedded_under_warps_lift_rotated_and_zoomed_copies_above_other_images",
        ),
    ),
    Mutation(
        "registration-skipped",
        "aligned_ncc scores each candidate at its starting warp only (no ECC registration)",
        "audit/registration.py",
        (
            (
                "                _, warp = cv2.findTransformECC(q, ref, warp, cv2.MOTION_AFFINE, criteria, None, 1)",
                "                pass",
            ),
        ),
        (
            "tests/test_registration.py::test_the_registration_recovers_rotation_zoom_and_flip",
            "tests/test_registration.py::test_registered_copies_stand_further_above_other_images_than_the_descriptor_alone",
        ),
    ),
    Mutation(
        "registration-no-flip",
        "aligned_ncc registers candidates onto the query only, not onto its left-right flip",
        "audit/registration.py",
        (
            (
                "    for q in (query, np.ascontiguousarray(query[:, ::-1])):",
                "    for q in (query,):",
            ),
        ),
        (
            "tests/test_registration.py::test_the_registration_recovers_rotation_zoom_and_flip",
            "tests/test_registration.py::test_registered_copies_stand_further_above_other_images_than_the_descriptor_alone",
        ),
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


def _pytest(package: Path, tests: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run `tests` (node ids) with `package` (a folder holding synthfactory/) first on the path,
    from that folder (`python -m` puts the working directory first on sys.path, before
    PYTHONPATH), with the repository's pytest configuration."""
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))}
    config = ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO)]
    cmd = [sys.executable, "-m", "pytest", *config, "-q", "-rfE", "--tb=line", "-p", "no:cacheprovider",
           "--no-header", *(str(REPO / t) for t in tests)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=package)


def _imports_copy(package: Path, env: dict) -> str | None:
    """None when `import synthfactory` in `package` takes the copy; else what it took."""
    probe = subprocess.run(
        [sys.executable, "-c", "import synthfactory; print(synthfactory.__file__)"],
        capture_output=True, text=True, cwd=package,
        env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))},
    )  # fmt: skip
    return None if probe.stdout.startswith(str(package)) else (probe.stdout.strip() or probe.stderr[-300:])


def outcomes(out: str) -> tuple[set[str], set[str]]:
    """(failed, errored) node ids from pytest's short summary."""
    failed = set(re.findall(r"^FAILED (\S+)", out, flags=re.M))
    errored = set(re.findall(r"^ERROR (\S+)", out, flags=re.M))
    return failed, errored


def _named(node: str, found: set[str]) -> bool:
    """Whether the test function `node` (tests/x.py::name) has a case among `found`."""
    name = node.split("::")[-1]
    return any(
        f.split("::")[0].endswith(node.split("::")[0])
        and re.match(rf"{re.escape(name)}(\[|$)", f.split("::")[-1])
        for f in found
    )


def run(m: Mutation, env: dict, verbose: bool) -> tuple[str, str]:
    """('caught' | 'SURVIVED' | 'ERROR', detail)."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{m.name}-") as tmp:
        try:
            mutated_copy(m, Path(tmp))
        except LookupError as e:
            return "ERROR", str(e)
        wrong = _imports_copy(Path(tmp), env)
        if wrong is not None:
            return "ERROR", f"the mutated copy is not the one imported ({wrong})"
        res = _pytest(Path(tmp), list(m.tests), env)
    out = res.stdout + res.stderr
    if verbose:
        print(out)
    failed, errored = outcomes(out)
    if errored:
        return "ERROR", f"errors, not failures: {sorted(errored)[0]}"
    missed = [t for t in m.tests if not _named(t, failed)]
    if not missed:
        return "caught", "by " + ", ".join(t.split("::")[-1] for t in m.tests)
    if failed:
        return "SURVIVED", f"{missed[0].split('::')[-1]} passed (other tests failed: {sorted(failed)[0]})"
    return "SURVIVED", f"every named test passed ({res.returncode})"


def baseline(chosen: list[Mutation], env: dict, jobs: int) -> str | None:
    """None when every named test passes on an unmutated copy; else why not. The tests are split
    into `jobs` shares run side by side."""
    tests = sorted({t for m in chosen for t in m.tests})
    shares = [tests[i::jobs] for i in range(jobs) if tests[i::jobs]]
    with tempfile.TemporaryDirectory(prefix="mutation-baseline-") as tmp:
        shutil.copytree(
            REPO / "synthfactory", Path(tmp) / "synthfactory", ignore=shutil.ignore_patterns("__pycache__")
        )
        wrong = _imports_copy(Path(tmp), env)
        if wrong is not None:
            return f"the copy is not the one imported ({wrong})"
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda share: _pytest(Path(tmp), share, env), shares))
    out = "".join(r.stdout + r.stderr for r in results)
    failed, errored = outcomes(out)
    skipped = re.search(r"(\d+) skipped", out)
    codes = sorted({r.returncode for r in results})
    if codes != [0] or failed or errored:
        return f"pytest exit {codes}: {sorted(failed | errored)[:3]}"
    if skipped:
        return f"{skipped.group(1)} named tests skipped on the unmutated copy: a skipped test catches nothing"
    return None


def shared_data() -> Path:
    return Path(os.environ.get("SYNTHFACTORY_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    parser.add_argument(
        "-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutations run side by side"
    )
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:44s} {m.what}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {sorted(unknown)}")
    if not shared_data().is_dir():
        print(f"error: the real data folder {shared_data()} is absent (set SYNTHFACTORY_SHARED_DATA): "
              "without it tests skip, and a skipped test catches no mutation", file=sys.stderr)  # fmt: skip
        return 2
    env = {
        **os.environ,
        "SYNTHFACTORY_REQUIRE_SHARED_DATA": "1",
        "SYNTHFACTORY_SHARED_DATA": str(shared_data()),
    }
    if args.jobs > 1:  # one thread per job: the tests' models are tiny, the jobs share the cores
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    started = time.perf_counter()
    problem = baseline(chosen, env, args.jobs)
    if problem is not None:
        print(f"error: baseline: the named tests do not all pass unmutated: {problem}", file=sys.stderr)
        return 1
    print(f"baseline  {len({t for m in chosen for t in m.tests})} named tests pass unmutated "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip

    def one(m: Mutation) -> str:
        t0 = time.perf_counter()
        verdict, detail = run(m, env, args.verbose)
        print(f"{verdict:8s} {m.name:44s} {time.perf_counter() - t0:5.0f} s  {m.what}: {detail}", flush=True)
        return verdict

    with ThreadPoolExecutor(args.jobs) as pool:
        bad = sum(v != "caught" for v in pool.map(one, chosen))
    print(f"{len(chosen) - bad} of {len(chosen)} mutations caught", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
