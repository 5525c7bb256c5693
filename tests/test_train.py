"""Training: ε from the accountant for the steps taken, never above target; a killed run resumes
from its checkpoint to the same model and the same ε as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DELETE, dying_on_call, tiny_recipe, write_recipe

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
    assert model.config.num_class_embeds == 3 and scheduler.config.num_train_timesteps == 1000  # 2 + null
    info = read_json(run_dir.final_checkpoint / "synthfactory.json")
    assert info["null_class"] == 2 and info["class_names"] == ["no_lesion", "lesion"]


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
    real_step = train_module.dp_step
    dying_step = dying_on_call(real_step, 6)  # step 5, after the checkpoint at step 4
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
    for ema in (False, True):
        a, _ = load_generator(ref_dir.final_checkpoint, ema=ema)
        b, _ = load_generator(run_dir.final_checkpoint, ema=ema)
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), (ema, name)
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


def test_ema_weights_are_saved_and_differ_from_the_last(tiny_run) -> None:
    _, run_dir = tiny_run
    last, _ = load_generator(run_dir.final_checkpoint, ema=False)
    ema, _ = load_generator(run_dir.final_checkpoint, ema=True)
    diff = sum(
        float((p - q).detach().abs().sum()) for p, q in zip(last.parameters(), ema.parameters(), strict=True)
    )
    assert diff > 0
    assert read_json(run_dir.privacy)["ema_decay"] == 0.999


def test_lognormal_timesteps_follow_the_noise_level_distribution() -> None:
    from synthfactory.model import build_noise_scheduler
    from synthfactory.recipe import ModelConfig, TimestepSampling
    from synthfactory.train import sample_timesteps

    sched = build_noise_scheduler(ModelConfig())
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(
        20000, sched, TimestepSampling(distribution="lognormal", p_mean=-1.2, p_std=1.2), gen
    )
    log_sigma = 0.5 * torch.log((1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t])
    assert abs(log_sigma.median().item() + 1.2) < 0.05
    assert abs(log_sigma.std().item() - 1.2) < 0.1
    u = sample_timesteps(20000, sched, TimestepSampling(), gen)
    assert abs(u.float().mean().item() - 499.5) < 10


def test_public_pretraining_then_dp_fine_tuning_of_a_subset(tmp_path: Path) -> None:
    public = {
        "source": "phantom",
        "image_size": 16,
        "classes": ["no_lesion", "lesion"],
        "phantom": {"n_train": 40, "n_heldout": 8, "seed": 11},
    }
    checked, run_dir = _fresh_run(
        tmp_path,
        "pre",
        pretrain={"data": public, "steps": 3, "expected_batch_size": 8},
        training__steps=2,
        training__trainable=["*attentions*", "class_embedding.*"],
    )
    from synthfactory.run import StageOptions, run_stage

    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    record = read_json(run_dir.pretrained / "pretrain.json")
    assert record["kind"] == "data" and record["n_images"] == 40 and record["class_conditional"]
    from synthfactory.model import load_unet

    pre = load_unet(run_dir.pretrained / "unet")
    run_stage("train", checked, run_dir, StageOptions(progress=False))
    fine, _ = load_generator(run_dir.final_checkpoint)
    changed = {
        n
        for (n, p), q in zip(pre.named_parameters(), fine.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    assert changed and all("attentions" in n or n.startswith("class_embedding") for n in changed)
    assert any("attentions" in n for n in changed) and "class_embedding.weight" in changed
    rec = read_json(run_dir.privacy)
    assert any("declared public" in x for x in rec["public_inputs"])
    assert (
        rec["private_inputs"]["trained_parameters"]["parameters"]
        < rec["private_inputs"]["trained_parameters"]["of"]
    )
    assert rec["pretraining"]["manifest_sha256"] == checked.public.manifest_sha256()


def test_public_data_containing_private_images_is_refused(tmp_path: Path) -> None:
    from synthfactory.recipe import RecipeError

    same = tiny_recipe()["data"]  # the private phantom set itself, declared "public"
    path = write_recipe(tmp_path, tiny_recipe(pretrain={"data": same, "steps": 2}))
    with pytest.raises(RecipeError, match="pretrain.data: .* exact copies of private images"):
        check(path)


def test_pretrain_from_a_checkpoint(tiny_run, tmp_path: Path) -> None:
    _, src = tiny_run
    checked, run_dir = _fresh_run(
        tmp_path, "ck", pretrain={"checkpoint": str(src.final_checkpoint / "unet_ema")}, training__steps=1
    )
    from synthfactory.run import StageOptions, run_stage

    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    rec = read_json(run_dir.pretrained / "pretrain.json")
    assert rec["kind"] == "checkpoint" and len(rec["weights_sha256"]) == 64
    bad = write_recipe(
        tmp_path / "bad",
        tiny_recipe(
            pretrain={"checkpoint": str(src.final_checkpoint / "unet")},
            model__block_out_channels=[32, 32],
            model__norm_num_groups=8,
        ),
    )
    from synthfactory.recipe import RecipeError

    with pytest.raises(RecipeError, match="pretrain.checkpoint: does not fit"):
        check(bad)


def test_guidance_needs_label_dropout(tmp_path: Path) -> None:
    from synthfactory.recipe import RecipeError, load_recipe

    path = write_recipe(tmp_path, tiny_recipe(training__label_dropout=0.0, sampling__guidance_scale=3.0))
    with pytest.raises(RecipeError, match="sampling.guidance_scale"):
        load_recipe(path)
