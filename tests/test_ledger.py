"""The privacy ledger: no DP history lost through another image size, a chain of checkpoints, a
release used as public data, or a crash; declared-public data screened against every private
image; the ledger file append-only and durable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import opacus_epsilon, tiny_recipe, write_recipe
from PIL import Image, ImageOps

from synthfactory import train as train_module
from synthfactory.audit import quantize
from synthfactory.ledger import LedgerRefused, RunLedger, read_artifact
from synthfactory.recipe import RecipeError
from synthfactory.run import StageOptions, check, create_run, run_remaining, run_stage
from synthfactory.rundir import read_json

OPTS = StageOptions(progress=False)


def _trained(tmp_path: Path, name: str, stages=("pretrain", "train"), **overrides):
    """A tiny run through `stages`: (checked recipe, run directory)."""
    checked = check(write_recipe(tmp_path / name, tiny_recipe(**overrides)))
    run_dir = create_run(checked, tmp_path / name / "runs")
    for stage in stages:
        run_stage(stage, checked, run_dir, OPTS)
    return checked, run_dir


def _history(run_dir) -> list[list]:
    return read_json(run_dir.privacy)["accountant_history"]


def test_the_same_images_at_another_size_compose(tmp_path: Path) -> None:
    """Case 1: run A is DP on a phantom set at 16 px; a run on the same set at 32 px starting
    from A's weights composes A's history (its data identity is the source items, not pixels)."""
    a_checked, a = _trained(tmp_path, "a", training__steps=2)
    checked, c = _trained(
        tmp_path, "c", stages=(), data__image_size=32, pretrain={"checkpoint": str(a.final_checkpoint / "unet")},
        training__steps=2, privacy__target_epsilon=20.0,
    )  # fmt: skip
    assert not checked.images.train_hashes() & a_checked.images.train_hashes()  # no pixel in common
    assert checked.images.item_ids() == a_checked.images.item_ids()  # the same source items
    assert [v.kind for v in checked.brought] == ["composed"]
    assert list(checked.schedule.prior) == [tuple(h) for h in _history(a)]
    for stage in ("pretrain", "train"):
        run_stage(stage, checked, c, OPTS)
    history = _history(c)
    assert history[0] == _history(a)[0] and len(history) == 2
    rec = read_json(c.privacy)
    assert (
        rec["epsilon"] == pytest.approx(opacus_epsilon(history, 1e-3))
        and rec["composed_with"]["run_id"] == a.run_id
    )
    assert [m["composed"] for m in rec["ledger"]] == [True, True]


def test_a_chain_brings_the_first_runs_history(tmp_path: Path) -> None:
    """Case 2: A is DP on X; B is DP on another set Y, starting from A; C is DP on X, starting
    from B. C's weights carry A's training on X: C composes A's history (not B's, whose data is
    shown disjoint from X), and the lineage lists all three."""
    _, a = _trained(tmp_path, "a", training__steps=2)
    _, b = _trained(tmp_path, "b", data__phantom__seed=77, pretrain={"checkpoint": str(a.final_checkpoint / "unet")},
                    training__steps=2)  # fmt: skip
    assert _history(b) == _history(b)[-1:]  # A's data is disjoint from Y: not composed into B
    assert [m["composed"] for m in read_json(b.privacy)["ledger"]] == [False, True]
    checked, c = _trained(tmp_path, "c", pretrain={"checkpoint": str(b.final_checkpoint / "unet_ema")},
                          training__steps=2, privacy__target_epsilon=20.0)  # fmt: skip
    assert list(checked.schedule.prior) == [tuple(h) for h in _history(a)]
    rec = read_json(c.privacy)
    assert rec["accountant_history"] == [_history(a)[0], rec["accountant_history"][-1]]
    assert [(m["run_id"], m["composed"]) for m in rec["ledger"]] == [
        (a.run_id, True), (b.run_id, False), (c.run_id, True)
    ]  # fmt: skip
    assert rec["epsilon"] == pytest.approx(opacus_epsilon(rec["accountant_history"], 1e-3))


def _released(tmp_path: Path):
    """A tiny DP run, audited and released (hf, png)."""
    checked, run_dir = _trained(tmp_path, "src", stages=("pretrain", "train", "sample"), training__steps=2)
    run_remaining(checked, run_dir, StageOptions(progress=False, audit_root=tmp_path / "pa"))
    return checked, run_dir


def test_a_release_used_as_public_data_composes(tmp_path: Path) -> None:
    """Case 3: a synthfactory release (any of its format folders) used as `pretrain.data` brings
    its ledger: composed; its PNG files copied away from the ledger are refused."""
    _, src = _released(tmp_path)
    release = src.release_dir(True)
    sources = {
        "hf": {
            "source": "hf",
            "path": str(release / "dataset"),
            "train_split": "train",
            "heldout_split": "train",
        },
        "folder": {"source": "folder", "path": str(release / "png"), "heldout_fraction": 0.2},
    }
    for name, block in sources.items():
        public = {**block, "image_size": 16, "classes": ["no_lesion", "lesion"]}
        checked = check(write_recipe(tmp_path / name, tiny_recipe(pretrain={"data": public, "steps": 1},
                                                                  privacy__target_epsilon=20.0)))  # fmt: skip
        assert checked.public.verdict.kind == "composed", name
        assert list(checked.schedule.prior) == [tuple(h) for h in _history(src)], name
    from synthfactory import budget

    assert budget.planned_prior(checked.recipe, checked.images) == [tuple(h) for h in _history(src)]
    other_checked, other = _trained(
        tmp_path, "other", stages=("pretrain", "train", "sample"), training__steps=3
    )
    run_remaining(other_checked, other, StageOptions(progress=False, audit_root=tmp_path / "pa2"))
    pooled = tmp_path / "pooled"
    shutil.copytree(release / "png", pooled)
    for f in (other.release_dir(True) / "png").rglob("*.png"):
        shutil.copy(f, pooled / f.parent.name / f"other-{f.name}")
    public = {
        "source": "folder",
        "path": str(pooled),
        "heldout_fraction": 0.2,
        "image_size": 16,
        "classes": ["no_lesion", "lesion"],
    }
    with pytest.raises(RecipeError, match=f"synthfactory images of run {other.run_id}.*does not hold"):
        check(write_recipe(tmp_path / "pooled-recipe", tiny_recipe(pretrain={"data": public, "steps": 1})))
    loose = tmp_path / "loose"
    shutil.copytree(release / "png", loose)
    (loose / "synthfactory_ledger.json").unlink()
    public = {
        "source": "folder",
        "path": str(loose),
        "heldout_fraction": 0.2,
        "image_size": 16,
        "classes": ["no_lesion", "lesion"],
    }
    with pytest.raises(RecipeError, match="pretrain.data: .* synthfactory synthetic images"):
        check(write_recipe(tmp_path / "loose-recipe", tiny_recipe(pretrain={"data": public, "steps": 1})))


def test_a_killed_warm_start_is_counted_and_nothing_goes_on_without_it(tmp_path: Path, monkeypatch) -> None:
    """Item 2: the warm start's query is answered, then the pre-training is killed. The ledger
    already holds the query; `train` and `sample` refuse (their inputs are not there); a resume
    reuses the answer, and privacy.json composes it."""
    from synthfactory import warmstart

    ws = {"noise_multiplier": 2.0, "image_size": 8, "steps": 3, "expected_batch_size": 8}
    checked = check(write_recipe(tmp_path, tiny_recipe(warm_start=ws, training__steps=2)))
    run_dir = create_run(checked, tmp_path / "runs")
    real = warmstart.plain_training

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(warmstart, "plain_training", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage("pretrain", checked, run_dir, OPTS)
    assert run_dir.central_images.is_file() and not run_dir.pretrained.exists()
    entry = RunLedger(run_dir.ledger).read().warm_start()
    assert entry is not None and entry.history == ((2.0, 1.0, 1),)
    for stage in ("train", "sample"):
        with pytest.raises(RecipeError, match="has not finished"):
            run_stage(stage, checked, run_dir, OPTS)
    with pytest.raises(LedgerRefused, match="pretrain stage has not finished"):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert not run_dir.privacy.exists() and not run_dir.train_state.exists()
    monkeypatch.setattr(warmstart, "plain_training", real)
    answer = warmstart.load(run_dir.central_images)
    run_remaining(checked, run_dir, StageOptions(progress=False, audit_root=tmp_path / "pa"))
    np.testing.assert_array_equal(warmstart.load(run_dir.central_images).means, answer.means)  # asked once
    rec = read_json(run_dir.privacy)
    assert rec["accountant_history"][0] == [2.0, 1.0, 1] and len(rec["accountant_history"]) == 2
    assert rec["epsilon"] == pytest.approx(opacus_epsilon(rec["accountant_history"], 1e-3))


def test_a_warm_start_killed_while_its_entry_is_written_leaves_no_answer(tmp_path: Path, monkeypatch) -> None:
    """The ledger entry comes before the answer is stored: a crash while the entry is written
    leaves no answer on disk (so none can be used uncounted), and the stage asks again."""
    ws = {"noise_multiplier": 2.0, "image_size": 8, "steps": 2, "expected_batch_size": 8}
    checked = check(write_recipe(tmp_path, tiny_recipe(warm_start=ws, training__steps=1)))
    run_dir = create_run(checked, tmp_path / "runs")
    real = RunLedger.record

    def dying(self, m):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunLedger, "record", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage("pretrain", checked, run_dir, OPTS)
    assert not run_dir.central_images.exists()
    monkeypatch.setattr(RunLedger, "record", real)
    run_stage("pretrain", checked, run_dir, OPTS)
    assert RunLedger(run_dir.ledger).read().warm_start() is not None and run_dir.central_images.is_file()


def test_a_run_whose_resumable_state_is_gone_is_not_trained_again(tmp_path: Path, monkeypatch) -> None:
    """Steps the ledger records cannot be replayed without their state (their noise): refused."""
    from conftest import dying_on_call

    checked, run_dir = _trained(tmp_path, "gone", stages=("pretrain",), training__steps=4)
    monkeypatch.setattr(train_module, "dp_step", dying_on_call(train_module.dp_step, 4))
    with pytest.raises(KeyboardInterrupt):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
    assert RunLedger(run_dir.ledger).read().training().steps == 2
    run_dir.train_state.unlink()
    with pytest.raises(LedgerRefused, match="cannot be replayed"):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)


def _shift(u8: np.ndarray, dx: int) -> np.ndarray:
    im = Image.fromarray(u8, mode="L")
    return np.asarray(im.transform(im.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, 0), fillcolor=0))


NEAR_COPIES = {
    "exact copy": lambda u8: u8,
    "1-pixel shift": lambda u8: _shift(u8, 1),
    "horizontal flip": lambda u8: np.asarray(ImageOps.mirror(Image.fromarray(u8, mode="L"))),
    "+0.05 brightness": lambda u8: np.clip(u8.astype(int) + 6, 0, 255).astype(np.uint8),  # 0.05 on [-1, 1]
    "+1 grey level": lambda u8: np.clip(u8.astype(int) + 1, 0, 255).astype(np.uint8),
    "turned by 90°": lambda u8: np.rot90(u8).copy(),
    "upside down": lambda u8: u8[::-1].copy(),
    "inverted": lambda u8: 255 - u8,
    "gamma 0.6": lambda u8: np.round(255 * (u8 / 255) ** 0.6).astype(np.uint8),
}


def _public_npz(path: Path, images: np.ndarray) -> dict:
    labels = np.zeros(len(images), np.int64)
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:2], test_labels=labels[:2],
             class_names=np.array(["no_lesion", "lesion"]))  # fmt: skip
    return {"source": "npz", "path": str(path), "image_size": 16, "classes": ["no_lesion", "lesion"]}


def test_declared_public_near_copies_are_refused_for_training_and_held_out_images(tmp_path: Path) -> None:
    """Item 3's table, on 200 phantom training images and 100 held-out: a public set made of
    disguised copies of training images, or of held-out images, is refused with the count, kind
    by kind; genuinely other phantoms (another seed) are accepted."""
    private = {"phantom": {"n_train": 200, "n_heldout": 100, "seed": 3}}
    base = check(write_recipe(tmp_path / "base", tiny_recipe(data__phantom=private["phantom"])))
    splits = {
        "training": quantize(base.images.train_images)[:20],
        "held-out": quantize(base.images.heldout_images)[:20],
    }
    for split, u8 in splits.items():
        for kind, edit in NEAR_COPIES.items():
            pub = _public_npz(tmp_path / "pub.npz", np.stack([edit(x) for x in u8]))
            recipe = tiny_recipe(data__phantom=private["phantom"], pretrain={"data": pub, "steps": 1})
            with pytest.raises(
                RecipeError,
                match=r"pretrain.data: (20 of its 20 images are copies|20 of its images are exact)",
            ):
                check(write_recipe(tmp_path / "r", recipe))
            print(split, kind, "refused")
    other = check(
        write_recipe(tmp_path / "o", tiny_recipe(data__phantom={"n_train": 60, "n_heldout": 8, "seed": 42}))
    )
    pub = _public_npz(tmp_path / "pub.npz", quantize(other.images.train_images))
    ok = check(
        write_recipe(
            tmp_path / "r", tiny_recipe(data__phantom=private["phantom"], pretrain={"data": pub, "steps": 1})
        )
    )
    assert ok.public.screen["n_refused"] == 0 and ok.public.screen["n_public"] == 60


def test_the_ledger_file_is_append_only_and_a_cut_last_line_is_dropped(tmp_path: Path) -> None:
    """Events are appended, never rewritten; a last line a crash cut short was never
    acknowledged (its answer never used): it is read as absent and cut before the next append;
    a damaged line elsewhere stops the reader."""
    from synthfactory.ledger import Mechanism

    ledger = RunLedger(tmp_path / "ledger.jsonl")
    data = ledger.own_data(frozenset({"a", "b"}), "two items")
    m = Mechanism("r:dp_sgd:1", "dp_sgd", "r", data.key, ((1.0, 0.5, 2),), True)
    ledger.record(m)
    before = ledger.path.read_bytes()
    ledger.record(Mechanism(m.id, m.kind, m.run_id, m.data, ((1.0, 0.5, 4),), True))
    assert ledger.path.read_bytes().startswith(before)  # appended
    assert ledger.read().training().steps == 4  # the latest record of a mechanism
    with open(ledger.path, "a") as fh:
        fh.write('{"event": "mechanism", "id": "cut')
    assert ledger.read().training().steps == 4
    ledger.record(Mechanism(m.id, m.kind, m.run_id, m.data, ((1.0, 0.5, 6),), True))
    assert ledger.read().training().steps == 6 and all(
        json.loads(x) for x in ledger.path.read_text().splitlines()
    )
    with pytest.raises(LedgerRefused, match="other private images"):
        ledger.own_data(frozenset({"a"}), "one item")
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join([lines[0], "{damaged", *lines[1:]]) + "\n")
    with pytest.raises(LedgerRefused, match="damaged"):
        ledger.read()


def test_every_model_folder_carries_its_ledger(tiny_run) -> None:
    """The final checkpoint's model folders carry the run's ledger, with the data identity
    (internal): what a later run compares its own items with."""
    checked, run_dir = tiny_run
    for name in ("unet", "unet_ema"):
        carried = read_artifact(run_dir.final_checkpoint / name)
        assert [m.kind for m in carried.mechanisms] == ["dp_sgd"]
        (data,) = carried.datasets.values()
        assert data.items == checked.images.item_ids() and len(data.items) == 96


def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """A private npz set (train and a test split of every 4th image), read at 16 px."""
    np.savez(path, train_images=images, train_labels=labels, test_images=images[::4], test_labels=labels[::4],
             class_names=np.array(["no_lesion", "lesion"]))  # fmt: skip
    return {"source": "npz", "path": str(path), "image_size": 16, "classes": ["no_lesion", "lesion"]}


def _phantom_u8(size: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from synthfactory.data.phantom import phantom_images

    imgs = np.concatenate([phantom_images("mri", c, n // 2, size, seed=8) for c in (0, 1)])
    return ((imgs + 1) * 127.5).round().astype(np.uint8), np.repeat([0, 1], n // 2)


def test_the_same_rows_stored_at_another_size_compose(tmp_path: Path) -> None:
    """The same images stored in two files at two sizes (as the 64 and 128 px copies of a data set)
    share no byte, but the same places (split, length, row): a run on one composes a DP run on the
    other."""
    import torch
    import torch.nn.functional as F

    big, labels = _phantom_u8(32)
    small = (
        F.interpolate(torch.from_numpy(big[:, None]).float(), size=16, mode="area")[:, 0]
        .round()
        .byte()
        .numpy()
    )
    a_data, c_data = _npz(tmp_path / "at32.npz", big, labels), _npz(tmp_path / "at16.npz", small, labels)
    _, a = _trained(tmp_path, "a", data=a_data, training__steps=2)
    checked = check(write_recipe(tmp_path / "c", tiny_recipe(
        data=c_data, pretrain={"checkpoint": str(a.final_checkpoint / "unet")}, privacy__target_epsilon=20.0)))  # fmt: skip
    assert [v.kind for v in checked.brought] == ["composed"]
    assert list(checked.schedule.prior) == [tuple(h) for h in _history(a)]


def test_an_ancestors_public_data_holding_this_runs_images_is_refused(tmp_path: Path) -> None:
    """Run A (DP on phantoms) pre-trains on data it declares public, screened against A's own
    images only; that data is run C's private set. C may not start from A's weights: they were
    trained without DP on C's images."""
    u8, labels = _phantom_u8(16)
    y = _npz(tmp_path / "y.npz", u8, labels)
    _, a = _trained(tmp_path, "a", pretrain={"data": y, "steps": 1}, training__steps=1)
    assert [m["kind"] for m in read_json(a.privacy)["ledger"]] == ["public_data", "dp_sgd"]
    with pytest.raises(RecipeError, match="pre-training WITHOUT DP on data it declared public"):
        check(
            write_recipe(
                tmp_path / "c", tiny_recipe(data=y, pretrain={"checkpoint": str(a.final_checkpoint / "unet")})
            )
        )
    # on other private data (phantoms of another seed) A's weights are fine, their lineage kept
    other = check(
        write_recipe(
            tmp_path / "o",
            tiny_recipe(data__phantom__seed=9, pretrain={"checkpoint": str(a.final_checkpoint / "unet")}),
        )
    )
    assert [v.kind for v in other.brought] == ["other_data"]


def test_weights_without_their_ledger_are_refused_not_taken_for_public(tiny_run, tmp_path: Path) -> None:
    """synthfactory's weights carry a marker in their safetensors metadata: copied out without
    their ledger they are refused; inside a run directory the run's own ledger stands in."""
    from synthfactory.ledger import ARTIFACT_FILE, weights_marker

    _, src = tiny_run
    assert weights_marker(src.final_checkpoint / "unet") == src.run_id
    stripped = tmp_path / "stripped"
    shutil.copytree(src.final_checkpoint / "unet", stripped)
    (stripped / ARTIFACT_FILE).unlink()
    with pytest.raises(LedgerRefused, match="without their synthfactory_ledger.json"):
        read_artifact(stripped)
    inside = tmp_path / "runs" / src.run_id
    shutil.copytree(src.root, inside)
    (inside / "checkpoints" / "final" / "unet" / ARTIFACT_FILE).unlink()
    assert (
        read_artifact(inside / "checkpoints" / "final" / "unet").ids()
        == RunLedger(inside / "ledger.jsonl").read().ids()
    )


def test_an_older_checkpoint_whose_lineage_was_not_kept_is_refused(tmp_path: Path) -> None:
    """An origin file of an older synthfactory did not carry the ancestors its run took for other
    data: copied out of its run directory, or from a run that started from such a checkpoint, it is
    refused."""
    from synthfactory.ledger import LEGACY_ORIGIN_FILE

    folder = tmp_path / "old" / "unet"
    folder.mkdir(parents=True)
    (folder / LEGACY_ORIGIN_FILE).write_text(json.dumps({"trained_on_private_data": False, "statement": "x"}))
    with pytest.raises(LedgerRefused, match="older synthfactory, moved out of its run directory"):
        read_artifact(folder)
    run = tmp_path / "run"
    (run / "checkpoints" / "pretrained").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "checkpoints" / "pretrained" / "pretrain.json").write_text(
        json.dumps({"kind": "checkpoint", "origin": "other_data"})
    )
    shutil.copytree(folder, run / "checkpoints" / "final" / "unet")
    with pytest.raises(LedgerRefused, match="lineage was not kept"):
        read_artifact(run / "checkpoints" / "final" / "unet")


def test_a_public_ledger_cannot_prove_data_disjoint() -> None:
    """Items written into a public ledger by hand are not read; and no item set proves nothing."""
    from synthfactory.ledger import DataIdentity, Ledger

    public = {"public": True, "datasets": [{"key": "d", "description": "x", "items": []}],
              "mechanisms": [{"id": "m", "kind": "dp_sgd", "run_id": "r", "data": "d", "history": [[1.0, 0.5, 2]], "private": True}]}  # fmt: skip
    ledger = Ledger.from_json(public)
    assert ledger.datasets["d"].items is None and ledger.history(frozenset({"a"})) == [(1.0, 0.5, 2)]
    assert not DataIdentity("k", "", 0, frozenset()).disjoint_from(frozenset({"a"}))


def test_a_finished_run_whose_checkpoint_is_gone_is_not_trained_again(tmp_path: Path) -> None:
    """Training steps in the ledger without their resumable state (here: the run finished and its
    final checkpoint was moved away) are never trained again: ε would be spent twice."""
    checked, run_dir = _trained(tmp_path, "done", training__steps=2)
    shutil.move(run_dir.final_checkpoint, tmp_path / "moved")
    with pytest.raises(LedgerRefused, match="spend ε twice"):
        train_module.train(checked.recipe, checked.images, run_dir, progress=False)
