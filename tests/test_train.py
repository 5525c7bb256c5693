"""Training: ε from the accountant for the steps taken, never above target; a killed run resumes
from its checkpoint to the same model and the same ε as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DELETE, tiny_recipe, write_recipe

from synthfactory import train as train_module
from synthfactory.model import load_generator
from synthfactory.privacy import epsilon_of
from synthfactory.run import check, create_run
from synthfactory.rundir import read_json


def test_privacy_record_comes_from_the_accountant(tiny_run) -> None:
    checked, run_dir = tiny_run
    rec = read_json(run_dir.privacy)
    assert rec["private"] is True and rec["steps_taken"] == rec["steps_planned"] == 4
    assert rec["sample_rate"] == pytest.approx(16 / 64)
    assert rec["accountant_history"] == [[rec["noise_multiplier"], rec["sample_rate"], 4]]
    assert rec["epsilon"] == pytest.approx(
        epsilon_of([(rec["noise_multiplier"], rec["sample_rate"], 4)], 1e-3, "rdp")
    )
    assert 0 < rec["epsilon"] <= rec["target_epsilon"] == 10.0
    assert rec["epsilon_other_accountant"]["prv"] > 0
    assert rec["data_manifest_sha256"] == checked.images.manifest_sha256()
    model, scheduler = load_generator(run_dir.final_checkpoint)
    assert model.config.num_class_embeds == 2 and scheduler.config.num_train_timesteps == 1000


def _fresh_run(tmp_path: Path, name: str, **overrides):
    path = write_recipe(tmp_path / name, tiny_recipe(**overrides))
    checked = check(path)
    return checked, create_run(checked, tmp_path / name / "runs")


def test_killed_run_resumes_to_the_same_model_and_epsilon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"training__steps": 6, "training__checkpoint_every": 2}
    ref_checked, ref_dir = _fresh_run(tmp_path, "ref", **settings)
    train_module.train(ref_checked.recipe, ref_checked.images, ref_dir, progress=False)

    checked, run_dir = _fresh_run(tmp_path, "killed", **settings)
    real_step, calls = train_module.dp_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # step 5: after the checkpoint at step 4
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "dp_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert torch.load(run_dir.train_state, weights_only=True)["step"] == 4
    assert not run_dir.privacy.exists()

    monkeypatch.setattr(train_module, "dp_step", real_step)
    result = train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    ref = read_json(ref_dir.privacy)
    got = read_json(run_dir.privacy)
    assert got["steps_taken"] == 6 and got["accountant_history"] == ref["accountant_history"]
    assert got["epsilon"] == pytest.approx(ref["epsilon"]) and result.epsilon == got["epsilon"]
    a, _ = load_generator(ref_dir.final_checkpoint)
    b, _ = load_generator(run_dir.final_checkpoint)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    steps_logged = [line for line in run_dir.train_log.read_text().splitlines() if line]
    assert len(steps_logged) == 6  # the rolled-back step 5 was logged once, then replaced


def test_resume_refuses_a_changed_recipe(tmp_path: Path) -> None:
    checked, run_dir = _fresh_run(tmp_path, "a", training__steps=2)
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    other = check(write_recipe(tmp_path / "b", tiny_recipe(training__steps=2, privacy__target_epsilon=5.0)))
    with pytest.raises(RuntimeError, match="another recipe"):
        train_module.train(other.recipe, other.images, run_dir, progress=False)


def test_dp_randomness_is_secret_unless_seeded(tiny_run, tmp_path: Path) -> None:
    checked, run_dir = _fresh_run(tmp_path, "secret", training__steps=1, privacy__noise_seed=DELETE)
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert "secret seed" in read_json(run_dir.privacy)["dp_randomness"]
    assert "testing only" in read_json(tiny_run[1].privacy)["dp_randomness"]


def test_not_private_training_is_marked(tmp_path: Path) -> None:
    checked, run_dir = _fresh_run(
        tmp_path,
        "np",
        training__steps=2,
        privacy={"enabled": False, "i_understand_this_is_not_private": True},
    )
    assert "NOT-PRIVATE" in run_dir.run_id
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    rec = read_json(run_dir.privacy)
    assert rec["private"] is False and rec["epsilon"] is None and "NOT PRIVATE" in rec["mechanism"]
