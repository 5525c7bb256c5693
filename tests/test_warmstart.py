"""The DP warm start: the mechanism's sensitivity and noise, one answer per run, and its ε in the
accountant (the reported ε includes it, DP-SGD's σ is re-solved for the composed ε)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from conftest import opacus_epsilon, tiny_recipe

from synthfactory import warmstart
from synthfactory.ledger import RunLedger
from synthfactory.privacy import calibrate_noise
from synthfactory.publish import _fmt
from synthfactory.recipe import WarmStartConfig
from synthfactory.records import PrivacyRecord
from synthfactory.run import StageOptions, check, create_run, run_stage
from synthfactory.rundir import read_json
from synthfactory.templating import environment


def _images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    return x, rng.integers(0, 3, n)


@pytest.mark.parametrize("clip", [None, 2.0])
def test_one_example_moves_the_query_by_at_most_sqrt2(clip):
    """Neighbouring data sets (one image removed), the same noise draw: the released vectors
    differ by the removed example's contribution, whose L2 norm must be ≤ √2 (the sensitivity
    the noise is scaled to). The removed image is all white: the largest norm an image can have."""
    cfg = WarmStartConfig(image_size=8, noise_multiplier=1.0, clip_norm=clip)
    x, y = _images(40)
    x[0] = 1.0
    full = warmstart.query(x, y, 3, cfg, torch.Generator().manual_seed(5))
    less = warmstart.query(x[1:], y[1:], 3, cfg, torch.Generator().manual_seed(5))
    diff = torch.cat([(full[0] - less[0]).flatten(), full[1] - less[1]])
    assert diff.norm().item() <= math.sqrt(2) + 1e-9
    assert diff.norm().item() >= 1.0  # the count moved by one; the image by up to 1
    assert (full[1] - less[1]).abs().max().item() == pytest.approx(1.0)


def test_noise_is_sigma_sqrt2_on_every_coordinate():
    """The sums and the counts each carry noise of std σ·√2 (checked apart: the 3 counts are few
    beside the 192 sum coordinates, and a count released without noise must show)."""
    cfg = WarmStartConfig(image_size=8, noise_multiplier=3.0)
    x, y = _images(30)
    exact = warmstart.query(x, y, 3, WarmStartConfig(image_size=8, noise_multiplier=1e-12), torch.Generator())
    sums, counts = [], []
    for seed in range(400):
        s, c = warmstart.query(x, y, 3, cfg, torch.Generator().manual_seed(seed))
        sums.append((s - exact[0]).flatten())
        counts.append(c - exact[1])
    sums, counts = torch.stack(sums), torch.stack(counts)  # [400, 192], [400, 3]
    assert sums.std().item() == pytest.approx(3.0 * math.sqrt(2), rel=0.03)
    for k in range(3):  # every class's count, 400 draws: the std's standard error is 3.5 %
        assert counts[:, k].std().item() == pytest.approx(3.0 * math.sqrt(2), rel=0.15)
        assert abs(counts[:, k].mean().item()) < 0.7
    assert abs(sums.mean().item()) < 0.05


def test_the_query_is_answered_once_per_run(tmp_path):
    """A second attempt of the stage reads the stored answer instead of asking again (which
    would spend ε twice); the answer is drawn from a secret seed, so two answers differ; each
    answer is in its run's ledger before it is stored, and an answer the ledger does not name is
    refused."""
    from synthfactory.ledger import LedgerRefused

    recipe = check(
        _write(tmp_path, tiny_recipe(warm_start={"noise_multiplier": 2.0, "image_size": 8}))
    ).recipe
    x, y = _images(40)

    def asker(name: str) -> warmstart.Asker:
        return warmstart.Asker(
            tmp_path / f"{name}.npz", RunLedger(tmp_path / f"{name}.jsonl"), name, "data-x"
        )

    first = warmstart.answered_once(asker("c"), x, y, recipe, 3)
    again = warmstart.answered_once(asker("c"), x, y, recipe, 3)
    np.testing.assert_array_equal(first.means, again.means)
    entry = RunLedger(tmp_path / "c.jsonl").read().warm_start()
    assert entry.history == ((2.0, 1.0, 1),) and entry.detail["answer_sha256"] == warmstart.answer_digest(
        first
    )
    other = warmstart.answered_once(asker("d"), x, y, recipe, 3)
    assert not np.array_equal(first.means, other.means)
    assert first.noise_source.startswith("secret")
    (tmp_path / "d.npz").write_bytes((tmp_path / "c.npz").read_bytes())  # an answer d's ledger never held
    with pytest.raises(LedgerRefused, match="no entry in the ledger"):
        warmstart.answered_once(asker("d"), x, y, recipe, 3)


def _write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_reported_epsilon_includes_the_warm_start_and_sigma_is_resolved(tmp_path):
    """Through the product's stages: pretrain (the warm start) then train. privacy.json's history
    starts with the query, ε is the composed one (≤ target, more than DP-SGD's alone), and
    DP-SGD's σ is the one calibrated for the composition (larger than without the query)."""
    ws = {"noise_multiplier": 1.5, "image_size": 8, "steps": 3, "expected_batch_size": 8}
    checked = check(_write(tmp_path, tiny_recipe(warm_start=ws)))
    run_dir = create_run(checked, tmp_path / "runs")
    opts = StageOptions(progress=False)
    for stage in ("data", "pretrain", "train"):
        run_stage(stage, checked, run_dir, opts)
    priv = read_json(run_dir.privacy)
    r = checked.recipe
    q, steps, delta = priv["sample_rate"], priv["steps_taken"], r.privacy.delta
    assert priv["accountant_history"][0] == [1.5, 1.0, 1]
    assert priv["epsilon"] == pytest.approx(opacus_epsilon(priv["accountant_history"], delta, "rdp"))
    dp_sgd_alone = opacus_epsilon([priv["accountant_history"][-1]], delta, "rdp")
    assert dp_sgd_alone < priv["epsilon"] <= r.privacy.target_epsilon
    without = calibrate_noise(r.privacy.target_epsilon, delta, q, steps, "rdp")
    assert priv["noise_multiplier"] > without
    assert priv["noise_multiplier"] == pytest.approx(checked.schedule.noise_multiplier)
    assert priv["warm_start"]["epsilon_alone"] == pytest.approx(opacus_epsilon([(1.5, 1.0, 1)], delta, "rdp"))
    assert (run_dir.central_images).is_file()
    privacy_part = environment(markdown=True, strict=True).get_template("dataset-card-privacy.md.j2")
    card = privacy_part.render(p=PrivacyRecord.read(run_dir.privacy), s={"n_samples": 8}, n=8, fmt=_fmt)
    assert "DP warm start" in card and "σ = 1.5" in card
    carried = read_json(run_dir.pretrained / "unet" / "synthfactory_ledger.json")
    assert [m["history"] for m in carried["mechanisms"]] == [[[1.5, 1.0, 1]]]
    assert carried["datasets"][0]["items"] == sorted(checked.images.item_ids())


def test_augment_keeps_range_and_shape():
    x = torch.rand(5, 1, 12, 12) * 2 - 1
    out = warmstart.augment(x, 2, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)


def test_class_counts_share_the_total_by_weight():
    from synthfactory.sample import class_counts

    got = class_counts(600, np.array([120.3, 450.2, 70.1]))
    assert got.sum() == 600 and list(got) == [113, 421, 66]
    assert list(class_counts(600, np.array([-5.0, 100.0, 3.0]))) == [
        1,
        581,
        18,
    ]  # noisy counts < 0: one image
    assert class_counts(7, np.ones(3)).sum() == 7


def _unbalanced_npz(tmp_path, n: tuple[int, int]) -> dict:
    """A private npz set with n[0] images of one class and n[1] of the other (phantom pixels)."""
    from synthfactory.data.phantom import phantom_images

    imgs = [phantom_images("mri", label, k, 16, seed=5) for label, k in enumerate(n)]
    u8 = ((np.concatenate(imgs) + 1) * 127.5).round().astype(np.uint8)
    labels = np.repeat([0, 1], n)
    np.savez(tmp_path / "private.npz", train_images=u8, train_labels=labels, test_images=u8[::4],
             test_labels=labels[::4], class_names=np.array(["no_lesion", "lesion"]))  # fmt: skip
    return {
        "source": "npz",
        "path": str(tmp_path / "private.npz"),
        "image_size": 16,
        "classes": ["no_lesion", "lesion"],
    }


def test_samples_follow_the_dp_class_counts(tmp_path):
    """sampling.class_proportions: dp_counts draws the same total, shared by the warm start's
    noisy counts (read from the run's stored answer, not from the private labels). The classes
    are unbalanced (3:1), so equal classes would show."""
    from synthfactory.sample import class_counts

    ws = {"noise_multiplier": 0.5, "image_size": 8, "steps": 2, "expected_batch_size": 8}
    sampling = {
        "images_per_class": 6,
        "ddim_steps": 2,
        "seed": 0,
        "batch_size": 8,
        "class_proportions": "dp_counts",
    }
    recipe = tiny_recipe(warm_start=ws, sampling=sampling, data=_unbalanced_npz(tmp_path, (72, 24)))
    checked = check(_write(tmp_path, recipe))
    run_dir = create_run(checked, tmp_path / "runs")
    for stage in ("data", "pretrain", "train", "sample"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    counts = warmstart.load(run_dir.central_images).counts
    labels = np.load(run_dir.samples / "labels.npy")
    got = list(np.bincount(labels, minlength=2))
    assert got == list(class_counts(12, counts)) and got[0] >= 2 * got[1]


def test_dp_counts_without_their_ledger_entry_are_refused(tmp_path):
    """The sampler reads the noisy counts only when the generator's own ledger names that very
    answer: a changed answer file is refused, and no sample store is written."""
    from synthfactory.recipe import RecipeError

    ws = {"noise_multiplier": 0.5, "image_size": 8, "steps": 2, "expected_batch_size": 8}
    sampling = {
        "images_per_class": 3,
        "ddim_steps": 2,
        "seed": 0,
        "batch_size": 8,
        "class_proportions": "dp_counts",
    }
    checked = check(_write(tmp_path, tiny_recipe(warm_start=ws, sampling=sampling, training__steps=1)))
    run_dir = create_run(checked, tmp_path / "runs")
    for stage in ("data", "pretrain", "train"):
        run_stage(stage, checked, run_dir, StageOptions(progress=False))
    central = warmstart.load(run_dir.central_images)
    central.counts = np.array([60.0, 4.0], np.float32)  # not the answer the ledger holds
    warmstart.save(run_dir.central_images, central)
    with pytest.raises(RecipeError, match="no entry in the ledger"):
        run_stage("sample", checked, run_dir, StageOptions(progress=False))
    assert not run_dir.samples.exists()


def test_dp_counts_need_a_warm_start(tmp_path):
    from synthfactory.recipe import RecipeError, load_recipe

    r = tiny_recipe(sampling={"images_per_class": 4, "class_proportions": "dp_counts"})
    with pytest.raises(RecipeError, match="warm_start"):
        load_recipe(_write(tmp_path, r))


def test_the_warm_start_refuses_to_run_on_several_ranks(tmp_path, monkeypatch):
    """Under torchrun every rank would answer the query with its own secret noise (ε spent once
    per rank): the stage refuses before answering."""
    from synthfactory.recipe import RecipeError

    ws = {"noise_multiplier": 2.0, "image_size": 8, "steps": 2, "expected_batch_size": 8}
    checked = check(_write(tmp_path, tiny_recipe(warm_start=ws)))
    run_dir = create_run(checked, tmp_path / "runs")
    run_stage("data", checked, run_dir, StageOptions(progress=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="one process"):
        run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    assert not (run_dir.central_images).exists()


def test_public_replay_mixes_public_images_into_each_warm_start_batch(tmp_path, monkeypatch):
    """With `warm_start.public_replay`, that share of every warm-start batch is public images
    (pretrain.data, with the labels the public stage used) and the rest the DP class means;
    pretrain.json says so."""
    from test_train import PUBLIC_PHANTOMS

    ws = {"noise_multiplier": 2.0, "image_size": 8, "steps": 2, "expected_batch_size": 8,
          "public_replay": 0.25, "shift": 0, "intensity": 0.0}  # fmt: skip
    checked = check(
        _write(tmp_path, tiny_recipe(warm_start=ws, pretrain={"data": PUBLIC_PHANTOMS, "steps": 1}))
    )
    run_dir = create_run(checked, tmp_path / "runs")
    run_stage("data", checked, run_dir, StageOptions(progress=False))
    batches = []
    real_training = warmstart.plain_training

    def spy(model, recipe, n_classes, device, run, draw, progress, state=None):
        batches.append(draw(torch.Generator().manual_seed(0)))
        real_training(model, recipe, n_classes, device, run, draw, progress, state)

    monkeypatch.setattr(warmstart, "plain_training", spy)
    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    ((xb, yb),) = batches
    public = checked.public.images
    pub_x, pub_y = torch.from_numpy(public.train_images).flatten(1), torch.from_numpy(public.train_labels)
    means, _ = warmstart.training_images(warmstart.load(run_dir.central_images), 16)
    matches = [(pub_x == row).all(dim=1).nonzero().flatten() for row in xb.flatten(1)]
    assert [len(m) > 0 for m in matches] == [False] * 6 + [True] * 2  # 25 % of 8 rows are public
    assert all(yb[i] == pub_y[m[0]] for i, m in enumerate(matches) if len(m))
    # The other rows are the class means (no augmentation here).
    for row, label in zip(xb[:6], yb[:6], strict=True):
        assert torch.equal(row, means[label])
    record = read_json(run_dir.pretrained / "pretrain.json")
    assert (
        record["warm_start"]["public_replay"] == 0.25
        and "25% of each batch" in record["warm_start"]["statement"]
    )


def test_public_replay_needs_public_data(tmp_path):
    from synthfactory.recipe import RecipeError, load_recipe

    ws = {"noise_multiplier": 2.0, "image_size": 8, "public_replay": 0.5}
    with pytest.raises(RecipeError, match="public_replay"):
        load_recipe(_write(tmp_path, tiny_recipe(warm_start=ws)))


@pytest.mark.parametrize("killed_at", [4, 9])  # in the public stage; in the warm start's training
def test_a_killed_pretrain_stage_resumes_where_it_was_saved(tmp_path, monkeypatch, killed_at):
    """Killed mid-way, the pretrain stage goes on from its last save (every checkpoint_every
    steps) instead of starting again, and ends with the weights the stage gives when never
    killed (the same run directory re-run from the start: the same stored DP answer); the warm
    start's query is not asked again; the resumable states are gone once the stage ends."""
    from conftest import dying_on_call
    from test_train import PUBLIC_PHANTOMS

    from synthfactory import steps
    from synthfactory.model import load_unet

    ws = {"noise_multiplier": 2.0, "image_size": 8, "steps": 4, "expected_batch_size": 8}
    pre = {"data": PUBLIC_PHANTOMS, "steps": 6, "expected_batch_size": 8}
    checked = check(_write(tmp_path, tiny_recipe(warm_start=ws, pretrain=pre)))
    real_step, calls = steps.plain_step, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real_step(*args, **kwargs)

    run_dir = create_run(checked, tmp_path / "runs")
    run_stage("data", checked, run_dir, StageOptions(progress=False))
    monkeypatch.setattr(steps, "plain_step", dying_on_call(counted, killed_at))
    with pytest.raises(KeyboardInterrupt):
        run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    answer = run_dir.central_images.read_bytes() if killed_at > 6 else None
    monkeypatch.setattr(steps, "plain_step", counted)
    calls.clear()
    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    # checkpoint_every is 2: killed at the public stage's step 4, it resumes from its step 2
    # (4 + 4 steps left); killed at the warm start's step 3, from its step 2 (2 left).
    assert len(calls) == (8 if killed_at == 4 else 2)
    if answer is not None:
        assert run_dir.central_images.read_bytes() == answer  # the query was not asked again
    assert not any(run_dir.stage_state(s).exists() for s in ("public", "warm_start"))
    resumed = load_unet(run_dir.pretrained / "unet").state_dict()

    run_dir.invalidate_from("pretrain")
    calls.clear()
    run_stage("pretrain", checked, run_dir, StageOptions(progress=False))
    assert len(calls) == 10  # from the start: nothing saved is left
    never_killed = load_unet(run_dir.pretrained / "unet").state_dict()
    for name, weight in never_killed.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=0, msg=name)
