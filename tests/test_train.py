"""Training: ε from the accountant for the steps taken, never above target; a killed run resumes
from its checkpoint to the same model and the same ε as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import dying_on_call, opacus_epsilon, tiny_recipe, write_recipe

from synthfactory import train as train_module
from synthfactory.model import load_generator
from synthfactory.run import check, create_run
from synthfactory.rundir import read_json


def test_privacy_record_comes_from_the_accountant(tiny_run) -> None:
    checked, run_dir = tiny_run
    rec = read_json(run_dir.privacy)
    assert rec["private"] is True and rec["steps_taken"] == rec["steps_planned"] == 4
    assert rec["sample_rate"] == pytest.approx(16 / 64)
    assert rec["accountant_history"] == [[rec["noise_multiplier"], rec["sample_rate"], 4]]
    assert rec["epsilon"] == pytest.approx(opacus_epsilon([(rec["noise_multiplier"], 0.25, 4)], 1e-3, "rdp"))
    assert rec["epsilon_other_accountant"]["prv"] == pytest.approx(
        opacus_epsilon([(rec["noise_multiplier"], 0.25, 4)], 1e-3, "prv"), rel=1e-6
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
    # Seeded DP randomness (NOT PRIVATE, tests only): the two runs must draw the same batches and noise.
    settings = {"training__steps": 6, "training__checkpoint_every": 2, "privacy__noise_seed": 7}
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


def _recording_make_private(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record, per training run, the initial states of the DP generators and the Poisson
    batches the trainer draws."""
    runs: list[dict] = []
    real = train_module.make_private

    def recording(*args, **kwargs):
        private = real(*args, **kwargs)
        rec = {
            "sample_state": kwargs["sample_generator"].get_state().clone(),
            "noise_state": kwargs["noise_generator"].get_state().clone(),
            "batches": [],
        }
        runs.append(rec)
        sampler = private.sampler

        class Recording:
            def __iter__(self):
                for batch in sampler:
                    rec["batches"].append(sorted(int(i) for i in batch))
                    yield batch

        private.sampler = Recording()
        return private

    monkeypatch.setattr(train_module, "make_private", recording)
    return runs


def test_unseeded_runs_draw_different_secret_batches_and_noise(tmp_path: Path, monkeypatch) -> None:
    runs = _recording_make_private(monkeypatch)
    for name in ("a", "b"):
        checked, run_dir = _fresh_run(tmp_path, name, training__steps=3)
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
        rec = read_json(run_dir.privacy)
        assert rec["private"] is True and "secret seed" in rec["dp_randomness"] and "warning" not in rec
    a, b = runs
    assert not torch.equal(a["noise_state"], b["noise_state"])
    assert not torch.equal(a["sample_state"], b["sample_state"])
    assert a["batches"] != b["batches"] and len(a["batches"]) == 3


def test_a_seeded_run_is_not_private(tmp_path: Path, monkeypatch) -> None:
    runs = _recording_make_private(monkeypatch)
    checked, run_dir = _fresh_run(tmp_path, "seeded", training__steps=2, privacy__noise_seed=7)
    assert not checked.recipe.private and checked.recipe.dp_sgd and "NOT-PRIVATE" in run_dir.run_id
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    # The generators are exactly those anyone can build from the recipe.
    assert torch.equal(runs[0]["sample_state"], torch.Generator().manual_seed(7).get_state())
    assert torch.equal(runs[0]["noise_state"], torch.Generator().manual_seed(8).get_state())
    rec = read_json(run_dir.privacy)
    assert rec["private"] is False and rec["covered_by_epsilon"] == []
    assert rec["warning"].startswith("NOT PRIVATE: privacy.noise_seed") and "SEEDED" in rec["mechanism"]


def test_a_finished_run_keeps_no_dp_secret_and_is_not_trained_again(run_copy) -> None:
    from synthfactory.provenance import lineage
    from synthfactory.recipe import RecipeError
    from synthfactory.run import StageOptions, run_stage
    from synthfactory.rundir import folder_sha256

    checked, run_dir = run_copy
    assert run_dir.privacy.exists() and not list(run_dir.root.rglob("train_state.pt"))
    assert lineage(run_dir)["dp_secret"].startswith("gone")
    before = folder_sha256(run_dir.final_checkpoint)
    for stage in ("train", "pretrain"):
        with pytest.raises(RecipeError, match="spend ε a second time"):
            run_stage(stage, checked, run_dir, StageOptions(progress=False))
    # Killed between privacy.json and run.json: resuming returns the record, trains nothing.
    result = train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert result.epsilon == read_json(run_dir.privacy)["epsilon"]
    assert folder_sha256(run_dir.final_checkpoint) == before


def test_an_unfinished_run_says_it_holds_the_secret(tmp_path: Path, monkeypatch) -> None:
    from synthfactory.provenance import lineage

    checked, run_dir = _fresh_run(tmp_path, "killed", training__steps=4)
    monkeypatch.setattr(train_module, "dp_step", dying_on_call(train_module.dp_step, 4))
    with pytest.raises(KeyboardInterrupt):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert run_dir.train_state.exists() and lineage(run_dir)["dp_secret"].startswith("PRESENT")


def test_empty_poisson_batches_are_logged_with_a_null_loss(tmp_path: Path) -> None:
    import json

    # q = 1/64 over 6 steps: noise seed 7 draws empty batches (tests only: the noise is known).
    checked, run_dir = _fresh_run(
        tmp_path, "empty", training__steps=6, training__expected_batch_size=1, privacy__noise_seed=7
    )
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)

    def no_constants(name: str):
        raise ValueError(f"{name} is not JSON")

    lines = [json.loads(x, parse_constant=no_constants) for x in run_dir.train_log.read_text().splitlines()]
    empty = [x for x in lines if x["batch"] == 0]
    assert len(lines) == 6 and empty and all(x["loss"] is None for x in empty)
    assert all(isinstance(x["loss"], float) for x in lines if x["batch"])


def test_ema_is_restored_onto_the_models_device() -> None:
    from diffusers.training_utils import EMAModel

    from synthfactory.train import restore_ema

    model = torch.nn.Linear(3, 2)
    saved = EMAModel(model.parameters(), decay=0.9).state_dict()  # as torch.load(map_location="cpu") gives
    ema = EMAModel(model.parameters(), decay=0.9)
    restore_ema(ema, saved, torch.device("meta"))  # the CPU test's stand-in for a CUDA device
    assert {p.device.type for p in ema.shadow_params} == {"meta"}


def test_privacy_record_takes_sigma_and_steps_from_the_ledger(tiny_run) -> None:
    """privacy.json reads the ledger, not the schedule: σ and the steps are the ledger's DP-SGD
    entry, ε Opacus' for the ledger's history."""
    from synthfactory.ledger import Ledger, Mechanism, new_data_identity
    from synthfactory.privacy_record import privacy_record
    from synthfactory.train import Schedule

    checked, _ = tiny_run
    own = new_data_identity(checked.images.item_ids(), "tiny")
    ledger = Ledger(datasets={own.key: own}, own_data=own.key)
    ledger.add(Mechanism("r:dp_sgd:1", "dp_sgd", "r", own.key, ((2.0, 0.25, 3),), True))
    rec = privacy_record(checked.recipe, checked.images, ledger, Schedule(4, 0.25, 1.0), "secret")
    assert rec["noise_multiplier"] == 2.0 and rec["steps_taken"] == 3 and rec["steps_planned"] == 4
    assert rec["epsilon"] == pytest.approx(opacus_epsilon([(2.0, 0.25, 3)], 1e-3, "rdp"))


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
    from synthfactory.objective import sample_timesteps
    from synthfactory.recipe import ModelConfig, TimestepSampling

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


# Another phantom draw, declared public: the pre-training data of the fine-tuning tests.
PUBLIC_PHANTOMS = {
    "source": "phantom",
    "image_size": 16,
    "classes": ["no_lesion", "lesion"],
    "phantom": {"n_train": 40, "n_heldout": 8, "seed": 11},
}


def test_public_pretraining_then_dp_fine_tuning_of_a_subset(tmp_path: Path) -> None:
    checked, run_dir = _fresh_run(
        tmp_path,
        "pre",
        pretrain={"data": PUBLIC_PHANTOMS, "steps": 3, "expected_batch_size": 8},
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
    assert rec["pretraining"]["manifest_sha256"] == checked.public.images.manifest_sha256()
    assert rec["pretraining"]["screen"]["n_refused"] == 0 and rec["pretraining"]["screen"]["n_public"] == 40
    assert any("passed the screen against the private images" in x for x in rec["not_covered_by_epsilon"])


def test_public_data_containing_private_images_is_refused(tmp_path: Path) -> None:
    from synthfactory.recipe import RecipeError

    same = tiny_recipe()["data"]  # the private phantom set itself, declared "public"
    path = write_recipe(tmp_path, tiny_recipe(pretrain={"data": same, "steps": 2}))
    with pytest.raises(RecipeError, match="pretrain.data: .* exact copies of private images"):
        check(path)


def test_public_data_holding_an_exact_copy_of_a_held_out_image_is_refused(tmp_path: Path) -> None:
    """Held-out images are private too: an exact copy of one in data declared public is refused
    by the exact-copy check (the screen would refuse it too, by another rule)."""
    import numpy as np

    from synthfactory.audit import quantize
    from synthfactory.recipe import RecipeError

    phantoms = check(write_recipe(tmp_path / "p", tiny_recipe())).images
    train, held = quantize(phantoms.train_images), quantize(phantoms.heldout_images)
    names = np.array(["no_lesion", "lesion"])
    np.savez(tmp_path / "private.npz", train_images=train, train_labels=phantoms.train_labels,
             test_images=held, test_labels=phantoms.heldout_labels, class_names=names)  # fmt: skip
    other = quantize(
        check(write_recipe(tmp_path / "o", tiny_recipe(data__phantom__seed=42))).images.train_images
    )
    np.savez(tmp_path / "public.npz", train_images=np.concatenate([other[:5], held[:3]]),
             train_labels=np.zeros(8, np.int64), test_images=other[5:7], test_labels=np.zeros(2, np.int64),
             class_names=names)  # fmt: skip
    block = {"source": "npz", "image_size": 16, "classes": ["no_lesion", "lesion"]}
    recipe = tiny_recipe(data={**block, "path": str(tmp_path / "private.npz")},
                         pretrain={"data": {**block, "path": str(tmp_path / "public.npz")}, "steps": 1})  # fmt: skip
    with pytest.raises(
        RecipeError,
        match=r"pretrain.data: 3 of its images are exact copies of private images \(training or held-out\)",
    ):
        check(write_recipe(tmp_path / "r", recipe))


def test_pretrain_checkpoint_of_a_dp_run_on_the_same_data_composes(tiny_run, tmp_path: Path) -> None:
    """The weights of a DP run on the same private data may start another run only by
    composition: the source's accountant history comes first and ε is the composed one."""
    from synthfactory.run import StageOptions, run_stage

    _, src = tiny_run
    source = read_json(src.privacy)
    for checkpoint in (src.final_checkpoint / "unet_ema", _copied(src.final_checkpoint / "unet", tmp_path)):
        checked, run_dir = _fresh_run(
            tmp_path,
            f"ck-{checkpoint.parent.name}",
            pretrain={"checkpoint": str(checkpoint)},
            training__steps=2,
            privacy__target_epsilon=20.0,
        )
        assert list(checked.schedule.prior) == [tuple(h) for h in source["accountant_history"]]
        for stage in ("pretrain", "train"):
            run_stage(stage, checked, run_dir, StageOptions(progress=False))
        pre = read_json(run_dir.pretrained / "pretrain.json")
        assert (
            pre["kind"] == "checkpoint" and pre["origin"] == "composed" and len(pre["weights_sha256"]) == 64
        )
        rec = read_json(run_dir.privacy)
        history = rec["accountant_history"]
        assert history[0] == source["accountant_history"][0] and len(history) == 2 and history[1][2] == 2
        assert rec["epsilon"] == pytest.approx(opacus_epsilon(history, 1e-3, "rdp"))
        assert source["epsilon"] < rec["epsilon"] <= 20.0
        assert rec["composed_with"]["epsilon_alone"] == pytest.approx(source["epsilon"])
        assert rec["composed_with"]["run_id"] == src.run_id
        from synthfactory.model import weights_sha256
        from synthfactory.rundir import folder_sha256

        public = " ".join(rec["public_inputs"])  # what the cards print: no local path, no folder hash
        assert str(checkpoint) not in public and str(tmp_path) not in public
        assert weights_sha256(checkpoint)[:12] in public and folder_sha256(checkpoint)[:12] not in public
        assert rec["noise_multiplier"] == history[-1][0] == checked.schedule.noise_multiplier


def _copied(folder: Path, tmp_path: Path) -> Path:
    """A model folder copied out of its run directory (its origin file travels with it)."""
    import shutil

    dest = tmp_path / "elsewhere" / folder.name
    shutil.copytree(folder, dest)
    return dest


def test_pretrain_checkpoint_without_a_dp_guarantee_on_the_same_data_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from synthfactory.cli import app

    sources = {
        "nonprivate": {"privacy": {"enabled": False, "i_understand_this_is_not_private": True}},
        "seeded": {"privacy__noise_seed": 3},
    }
    for name, overrides in sources.items():
        checked, src = _fresh_run(tmp_path, name, training__steps=1, **overrides)
        train_module.train(checked.recipe, checked.images, src, progress=False)
        for checkpoint in (
            src.final_checkpoint / "unet",
            _copied(src.final_checkpoint / "unet_ema", tmp_path / name),
        ):
            path = write_recipe(
                tmp_path / f"use-{name}", tiny_recipe(pretrain={"checkpoint": str(checkpoint)})
            )
            out = tmp_path / f"use-{name}" / "runs"
            res = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "-q"])
            assert res.exit_code == 2, res.output
            assert "pretrain.checkpoint" in res.output and "WITHOUT a DP guarantee" in res.output
            assert len(res.output.strip().splitlines()) == 1 and not out.exists()  # nothing written
    # A run that is NOT PRIVATE itself may start from it, and stays NOT PRIVATE.
    nonprivate = {"enabled": False, "i_understand_this_is_not_private": True}
    path = write_recipe(
        tmp_path / "np-from-np", tiny_recipe(pretrain={"checkpoint": str(checkpoint)}, privacy=nonprivate)
    )
    assert not check(path).recipe.private


def test_pretrain_checkpoint_trained_on_other_data_is_public(tmp_path: Path) -> None:
    from synthfactory.run import StageOptions, run_stage

    other, src = _fresh_run(
        tmp_path, "other", training__steps=1, privacy={"enabled": False, "i_understand_this_is_not_private": True},
        data__phantom__seed=99,
    )  # fmt: skip
    train_module.train(other.recipe, other.images, src, progress=False)
    checked, run_dir = _fresh_run(
        tmp_path, "use", pretrain={"checkpoint": str(src.final_checkpoint / "unet")}, training__steps=1
    )
    assert not checked.images.train_hashes() & other.images.train_hashes()
    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    assert read_json(run_dir.pretrained / "pretrain.json")["origin"] == "other_data"
    assert checked.schedule.prior == ()


def test_pretrain_checkpoint_must_fit_the_model(tiny_run, tmp_path: Path) -> None:
    from synthfactory.recipe import RecipeError

    _, src = tiny_run
    bad = write_recipe(
        tmp_path / "bad",
        tiny_recipe(
            pretrain={"checkpoint": str(src.final_checkpoint / "unet")},
            model__block_out_channels=[32, 32],
            model__norm_num_groups=8,
        ),
    )
    with pytest.raises(RecipeError, match="pretrain.checkpoint: cannot be loaded into"):
        check(bad)


def test_public_data_with_near_copies_of_private_images_is_refused(tiny_run, tmp_path: Path) -> None:
    import numpy as np

    from synthfactory.audit import quantize
    from synthfactory.recipe import RecipeError

    checked, _ = tiny_run
    train_u8 = quantize(checked.images.train_images)
    rng = np.random.default_rng(0)
    near = np.clip(train_u8[:5].astype(int) + rng.choice([-1, 1], train_u8[:5].shape), 0, 255)
    other = quantize(
        check(write_recipe(tmp_path / "o", tiny_recipe(data__phantom__seed=42))).images.train_images
    )
    public = np.concatenate([other[:30], near]).astype(np.uint8)  # 5 near-copies (±1 grey level)
    labels = np.zeros(len(public), np.int64)
    np.savez(tmp_path / "public.npz", train_images=public, train_labels=labels, test_images=public[:4],
             test_labels=labels[:4], class_names=np.array(["no_lesion", "lesion"]))  # fmt: skip
    pub = {
        "source": "npz",
        "path": str(tmp_path / "public.npz"),
        "image_size": 16,
        "classes": ["no_lesion", "lesion"],
    }
    with pytest.raises(RecipeError, match="pretrain.data: 5 of its 35 images are copies or near-copies"):
        check(write_recipe(tmp_path / "r", tiny_recipe(pretrain={"data": pub, "steps": 1})))
    np.savez(tmp_path / "public.npz", train_images=other[:30], train_labels=labels[:30], test_images=other[:4],
             test_labels=labels[:4], class_names=np.array(["no_lesion", "lesion"]))  # fmt: skip
    check(write_recipe(tmp_path / "r", tiny_recipe(pretrain={"data": pub, "steps": 1})))  # without them: fine


def test_guidance_needs_label_dropout(tmp_path: Path) -> None:
    from synthfactory.recipe import RecipeError, load_recipe

    path = write_recipe(tmp_path, tiny_recipe(training__label_dropout=0.0, sampling__guidance_scale=3.0))
    with pytest.raises(RecipeError, match="sampling.guidance_scale"):
        load_recipe(path)


OLD_DATA_FIELDS = {
    "path": None, "train_split": "train", "heldout_split": "test", "heldout_fraction": None,
    "labels_csv": None, "ct_window": {"center": 40.0, "width": 400.0}, "percentiles": [0.5, 99.5],
    "nifti": {"axis": 2, "volume": 0, "slices": None}, "group_by": None,
}  # fmt: skip


def test_a_run_recorded_with_every_data_field_resumes_and_publishes_a_valid_recipe(tmp_path: Path) -> None:
    """Runs recorded before each source had its own fields keep their recipe hash: the finished
    training is recognised as theirs (not refused as another recipe's), and the recipe published
    with them validates now."""
    import hashlib
    import json

    import yaml

    from synthfactory.publish import public_recipe
    from synthfactory.recipe import load_recipe
    from synthfactory.run import StageOptions, open_run, run_stage
    from synthfactory.rundir import write_json_atomic

    checked = check(write_recipe(tmp_path, tiny_recipe()))
    run_dir = create_run(checked, tmp_path / "runs")
    for stage in ("data", "pretrain", "train"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    raw = yaml.safe_load(run_dir.recipe.read_text())
    raw["data"].update(OLD_DATA_FIELDS)  # the layout the older version wrote
    run_dir.recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    recorded = hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    for record in (run_dir.privacy, run_dir.run_json):
        write_json_atomic(record, {**read_json(record), "recipe_sha256": recorded})

    reopened, same_dir = open_run(run_dir.root)
    assert reopened.recipe.sha256() == recorded
    result = train_module.train(reopened.recipe, reopened.images, same_dir, progress=False)
    assert result.steps == read_json(run_dir.privacy)["steps_taken"]  # recognised, not retrained
    published = tmp_path / "published.yaml"
    published.write_text(public_recipe(same_dir))
    assert "ct_window" not in published.read_text()
    assert load_recipe(published).data.source == "phantom"


def test_the_trainer_draws_poisson_batches_of_the_whole_training_set(tmp_path: Path, monkeypatch) -> None:
    """What reaches the DP step is a Poisson sample of all N examples: batch sizes vary around
    B = qN, every example is drawn, and about q·T times (not, say, always the first |B|)."""
    import numpy as np

    seen: list[list[int]] = []
    real = train_module.dp_step
    checked, run_dir = _fresh_run(tmp_path, "poisson", training__steps=40, privacy__noise_seed=5)
    rows = {checked.images.train_images[i].tobytes(): i for i in range(len(checked.images.train_labels))}

    def recording(private, scheduler, x0, labels, *args, **kwargs):
        seen.append([rows[x.numpy().tobytes()] for x in x0])
        return real(private, scheduler, x0, labels, *args, **kwargs)

    monkeypatch.setattr(train_module, "dp_step", recording)
    train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    n, q, steps = 64, 16 / 64, 40
    sizes = [len(b) for b in seen]
    assert len(seen) == steps and len(set(sizes)) > 3 and abs(np.mean(sizes) - q * n) < 3
    counts = np.bincount([i for b in seen for i in b], minlength=n)
    assert counts.min() >= 1 and abs(counts.mean() - q * steps) < 1.5
    assert any(max(b) >= len(b) for b in seen if b)  # not a prefix of the training set
    assert abs(np.mean([i for b in seen for i in b]) - (n - 1) / 2) < 4


@pytest.mark.parametrize("init", ["random", "from_null"])
def test_class_agnostic_public_stage_can_start_every_class_at_the_null_label(
    tmp_path: Path, init: str
) -> None:
    """After a class-agnostic public stage only the null label's embedding row was trained;
    `pretrain.class_embeddings: from_null` copies it to every class row (each class starts as
    the public prior), `random` leaves the untrained rows; pretrain.json says which."""
    import numpy as np

    from synthfactory.audit import quantize
    from synthfactory.model import load_unet
    from synthfactory.run import StageOptions, run_stage

    other = check(write_recipe(tmp_path / "o", tiny_recipe(data__phantom__seed=42))).images.train_images
    np.savez(tmp_path / "public.npz", train_images=quantize(other[:20]), train_labels=np.zeros(20, np.int64),
             test_images=quantize(other[20:24]), test_labels=np.zeros(4, np.int64),
             class_names=np.array(["unlabelled"]))  # fmt: skip
    public = {
        "source": "npz",
        "image_size": 16,
        "classes": ["unlabelled"],
        "path": str(tmp_path / "public.npz"),
    }
    checked, run_dir = _fresh_run(
        tmp_path,
        "r",
        pretrain={"data": public, "steps": 2, "expected_batch_size": 4, "class_embeddings": init},
    )
    run_stage("data", checked, run_dir, StageOptions(progress=False))
    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    rows = load_unet(run_dir.pretrained / "unet").class_embedding.weight.detach()
    assert rows.shape[0] == 3  # two classes and the null label
    same = [torch.equal(rows[k], rows[2]) for k in range(2)]
    assert same == ([True, True] if init == "from_null" else [False, False])
    record = read_json(run_dir.pretrained / "pretrain.json")
    assert record["class_embeddings"] == init and (
        ("null label's" in record["statement"]) == (init == "from_null")
    )


def test_from_null_needs_a_class_agnostic_public_stage(tmp_path: Path) -> None:
    from synthfactory.recipe import RecipeError

    recipe = tiny_recipe(pretrain={"data": PUBLIC_PHANTOMS, "steps": 1, "class_embeddings": "from_null"})
    with pytest.raises(RecipeError, match="class_embeddings: from_null needs a class-agnostic"):
        check(write_recipe(tmp_path, recipe))
