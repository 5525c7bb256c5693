"""DP training under `torchrun --nproc_per_node=2` on the CPU (gloo): the same step as one
process, noise added once per step, one accountant, parameters identical on both ranks, and a
resume that changes the number of ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import dying_on_call, tiny_recipe, write_recipe

import synthfactory.train as train_module
from synthfactory.model import load_generator
from synthfactory.run import check, create_run
from synthfactory.rundir import read_json

SETTINGS = {
    "training__steps": 6,
    "training__checkpoint_every": 2,
    "training__expected_batch_size": 24,
    "training__max_physical_batch_size": 8,  # several chunks per rank
    "privacy__noise_multiplicity": 2,
    # Seeded DP randomness (NOT PRIVATE, tests only): two runs must draw the same batches and noise
    # to be compared.
    "privacy__noise_seed": 7,
}


def _fresh(base: Path, name: str, **overrides):
    checked = check(write_recipe(base / name, tiny_recipe(**{**SETTINGS, **overrides})))
    return checked, create_run(checked, base / name / "runs")


CLI = Path(sys.executable).with_name("synthfactory")


def _torchrun(program: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 program args...`, one thread per rank. A job that
    outlives `timeout` (ranks stuck in a collective) is stopped: SIGTERM lets torchrun's agent stop
    its workers (each in a session of its own), then SIGKILL; it returns -9. Output goes through
    files, so no orphaned worker holding a pipe can keep this call waiting."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(program), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = -9
        out.seek(0)
        err.seek(0)
        stderr = err.read() + (f"\n[stopped after {timeout} s]" if code == -9 else "")
        return subprocess.CompletedProcess(cmd, code, out.read(), stderr)


def _train_on_two_ranks(run_dir: Path) -> subprocess.CompletedProcess:
    return _torchrun(CLI, "train", str(run_dir), "-q", timeout=900)


def _max_weight_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for ema in (False, True):
        ma, _ = load_generator(a, ema=ema)
        mb, _ = load_generator(b, ema=ema)
        for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
            worst = max(worst, float((p - q).abs().max().detach()))
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, noise seed 7 (tests only), 6 steps."""
    base = tmp_path_factory.mktemp("single")
    checked, run_dir = _fresh(base, "ref")
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    other_checked, other = _fresh(base, "other_noise", privacy__noise_seed=8)
    train_module.train(other_checked.recipe, other_checked.images, other, progress=False)
    return run_dir, other


def test_two_ranks_take_the_single_process_step(single, tmp_path) -> None:
    ref, other_noise = single
    checked, run_dir = _fresh(tmp_path, "ddp")
    res = _train_on_two_ranks(run_dir.root)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = read_json(run_dir.privacy), read_json(ref.privacy)
    assert got["distributed"]["world_size"] == 2 and got["distributed"]["backend"] == "gloo"
    assert got["distributed"]["max_parameter_spread_across_ranks"] == 0.0  # identical on both ranks
    assert got["accountant_history"] == want["accountant_history"] and got["epsilon"] == want["epsilon"]
    assert got["steps_taken"] == want["steps_taken"] == 6
    diff = _max_weight_difference(ref.final_checkpoint, run_dir.final_checkpoint)
    # What one more noise draw per step does (another noise seed): far above the tolerance, so a
    # second rank adding its own noise would fail this test.
    noise_effect = _max_weight_difference(ref.final_checkpoint, other_noise.final_checkpoint)
    print(f"max |2 ranks − 1 process| = {diff:.3g}; effect of another noise draw = {noise_effect:.3g}")
    assert diff < 1e-5 < noise_effect / 100, (diff, noise_effect)
    assert len(run_dir.train_log.read_text().splitlines()) == 6  # rank 0 alone logs


def test_a_run_killed_in_one_process_resumes_on_two_ranks(single, tmp_path, monkeypatch) -> None:
    ref, _ = single
    checked, run_dir = _fresh(tmp_path, "resumed")
    real_step = train_module.dp_step
    dying_step = dying_on_call(real_step, 6)  # step 5, after the checkpoint at step 4
    monkeypatch.setattr(train_module, "dp_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert torch.load(run_dir.train_state, weights_only=True)["step"] == 4
    res = _train_on_two_ranks(run_dir.root)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = read_json(run_dir.privacy), read_json(ref.privacy)
    assert got["accountant_history"] == want["accountant_history"] and got["steps_taken"] == 6
    assert _max_weight_difference(ref.final_checkpoint, run_dir.final_checkpoint) < 1e-5


ELSEWHERE = """
import os
import sys

from synthfactory import rundir
from synthfactory.cli import app

if os.environ["RANK"] == "1":  # this rank's disk holds another copy of train_state.pt, or none
    rundir.RunDir.train_state = property(lambda self: self.root / "rank1" / "train_state.pt")
sys.argv = ["synthfactory", "train", sys.argv[1], "-q"]
app()
"""


def _killed_at_step_4(base: Path, name: str, monkeypatch):
    checked, run_dir = _fresh(base, name)
    monkeypatch.setattr(train_module, "dp_step", dying_on_call(train_module.dp_step, 6))
    with pytest.raises(KeyboardInterrupt):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    monkeypatch.undo()
    return run_dir


def test_resume_where_one_rank_has_no_state_file_takes_rank_0s(single, tmp_path, monkeypatch) -> None:
    """Rank 0 reads the resumable state and broadcasts it: a rank without the file (a node's
    own disk) resumes from rank 0's step, seed and generators, as one process would."""
    ref, _ = single
    run_dir = _killed_at_step_4(tmp_path, "lacking", monkeypatch)
    script = tmp_path / "elsewhere.py"
    script.write_text(ELSEWHERE)
    res = _torchrun(script, str(run_dir.root), timeout=90)  # a rank on its own seed hangs
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = read_json(run_dir.privacy), read_json(ref.privacy)
    assert got["accountant_history"] == want["accountant_history"] and got["steps_taken"] == 6
    assert _max_weight_difference(ref.final_checkpoint, run_dir.final_checkpoint) < 1e-5


def test_resume_stops_when_a_ranks_copy_disagrees_with_rank_0s(tmp_path, monkeypatch) -> None:
    run_dir = _killed_at_step_4(tmp_path, "stale", monkeypatch)
    stale = torch.load(run_dir.train_state, weights_only=True)
    stale["step"] = 2  # an older copy left on rank 1's disk
    (run_dir.root / "rank1").mkdir()
    torch.save(stale, run_dir.root / "rank1" / "train_state.pt")
    script = tmp_path / "elsewhere.py"
    script.write_text(ELSEWHERE)
    res = _torchrun(script, str(run_dir.root), timeout=90)
    assert res.returncode != 0 and "disagrees with rank 0's" in res.stderr
    assert not run_dir.privacy.exists()


SHARDED_SEARCH = """
import sys
import numpy as np
from synthfactory.distributed import from_env
from synthfactory.audit.nearest import knn_distances_sharded
from synthfactory.audit.spaces import SPACES, search_sharded
d = from_env()
rng = np.random.default_rng(0)
refs = rng.uniform(-1, 1, (301, 1, 12, 12)).astype(np.float32)
queries = np.concatenate([rng.uniform(-1, 1, (40, 1, 12, 12)).astype(np.float32), refs[[0, 150, 151, 300]]])
out = {"knn": knn_distances_sharded(queries, refs, 5, d, block_size=16)}
for name in SPACES:
    out[name + "_idx"], out[name + "_score"] = search_sharded(name, queries, refs, d, block_size=16, shift=2)
# the half-resolution shortlist of 8 per query, agreed across the ranks
out["short_idx"], out["short_score"] = search_sharded("shift_flip_ncc", queries, refs, d, 16, 2, candidates=8)
out["wshort_idx"], out["wshort_score"] = search_sharded("warp_ncc", queries, refs, d, 16, 2, candidates=8, warp_shift=3)
np.savez(sys.argv[1] + f"/rank{d.rank}.npz", **out)
"""


def test_audit_searches_sharded_over_two_ranks_match_one_process(tmp_path) -> None:
    """Every similarity space and the k-nearest distances, with the training images split over
    two ranks, give the one-process answer (copies sitting on either shard included)."""
    import numpy as np

    from synthfactory.audit.nearest import knn_distances
    from synthfactory.audit.spaces import SPACES, search

    script = tmp_path / "search.py"
    script.write_text(SHARDED_SEARCH)
    res = _torchrun(script, str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    rng = np.random.default_rng(0)
    refs = rng.uniform(-1, 1, (301, 1, 12, 12)).astype(np.float32)
    queries = np.concatenate(
        [rng.uniform(-1, 1, (40, 1, 12, 12)).astype(np.float32), refs[[0, 150, 151, 300]]]
    )
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            np.testing.assert_allclose(z["knn"], knn_distances(queries, refs, 5, block_size=16), atol=1e-12)
            for name in SPACES:
                want_idx, want_score = search(name, queries, refs, block_size=16, shift=2)
                np.testing.assert_array_equal(z[name + "_idx"], want_idx, err_msg=name)
                np.testing.assert_allclose(z[name + "_score"], want_score, atol=1e-5, err_msg=name)
                assert z[name + "_idx"][-4:].tolist() == [0, 150, 151, 300], name  # on both shards
            want_idx, want_score = search("shift_flip_ncc", queries, refs, 16, 2, candidates=8)
            np.testing.assert_array_equal(z["short_idx"], want_idx)
            np.testing.assert_allclose(z["short_score"], want_score, atol=1e-6)
            want_idx, want_score = search("warp_ncc", queries, refs, 16, 2, candidates=8, warp_shift=3)
            np.testing.assert_array_equal(z["wshort_idx"], want_idx)
            np.testing.assert_allclose(z["wshort_score"], want_score, atol=1e-6)
            assert (z["pixel_l2_score"][-4:] == 0).all()


def test_the_audit_stage_under_torchrun_writes_the_one_process_audit(run_copy, tmp_path) -> None:
    """`synthfactory audit RUN_DIR` on two ranks: the same flags, nearest images, scores and
    decision as one process (planted copies flagged), written once, by rank 0."""
    import shutil

    import numpy as np
    from test_audit import plant

    from synthfactory.audit import run_audit
    from synthfactory.rundir import RunDir

    checked, run_dir = run_copy
    plant(run_copy)
    two = RunDir(tmp_path / "two" / run_dir.run_id)
    shutil.copytree(run_dir.root, two.root)
    one = run_audit(checked.recipe, run_dir, checked.images, tmp_path / "pa-one")
    res = _torchrun(CLI, "audit", str(two.root), "--audit-dir", str(tmp_path / "pa-two"), "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = read_json(two.audit_json), one.audit
    assert got["distributed"]["world_size"] == 2 and want["distributed"] is None
    assert got["decision"] == want["decision"] and got["summary"] == want["summary"]
    assert want["summary"]["n_flagged"] >= 12  # the planted exact and near copies
    for g, w in zip(got["samples"], want["samples"], strict=True):
        assert (g["flagged"], g["flagged_by"], g["nearest_train_index"]) == (
            w["flagged"], w["flagged_by"], w["nearest_train_index"]
        )  # fmt: skip
        assert g["nn_distance"] == w["nn_distance"]
        np.testing.assert_allclose(list(g["scores"].values()), list(w["scores"].values()), atol=1e-5)
        assert g["carlini_ratio"] == pytest.approx(w["carlini_ratio"], abs=1e-9)
    for name, space in got["spaces"].items():
        assert space["threshold"] == pytest.approx(want["spaces"][name]["threshold"], abs=1e-5), name
    assert two.info()["stages"]["audit"]["decision"] == want["decision"]
    reports = list((tmp_path / "pa-two").rglob("audit.json"))
    assert len(reports) == 1  # rank 0 alone wrote the report folder
