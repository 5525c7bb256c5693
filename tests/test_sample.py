"""Sampling: labelled, 8-bit, reproducible per image whatever the batch size."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import torch

from synthfactory.model import load_generator, sampling_scheduler
from synthfactory.sample import Samples, ddim_sample, sample_seed, to_uint8


def test_samples_of_the_tiny_run(tiny_run) -> None:
    checked, run_dir = tiny_run
    s = Samples.load(run_dir.samples)
    assert s.images.dtype == np.uint8 and s.images.shape == (8, 16, 16)
    assert s.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert s.seeds.tolist() == [sample_seed(0, i) for i in range(8)] and len(set(s.seeds.tolist())) == 8
    assert s.images.std() > 0


def test_each_image_depends_on_its_seed_not_its_batch(tiny_run) -> None:
    _, run_dir = tiny_run
    model, train_sched = load_generator(run_dir.final_checkpoint)
    sched = sampling_scheduler(train_sched)
    seeds = [sample_seed(0, i) for i in range(4)]
    labels = torch.tensor([0, 1, 0, 1])
    together = ddim_sample(model, sched, labels, seeds, 3, 16)
    alone = torch.cat(
        [ddim_sample(model, sched, labels[i : i + 1], seeds[i : i + 1], 3, 16) for i in range(4)]
    )
    assert (to_uint8(together).astype(int) - to_uint8(alone).astype(int)).__abs__().max() <= 1
    other = ddim_sample(model, sched, labels, [s + 1 for s in seeds], 3, 16)
    assert not torch.allclose(together, other)


def test_sample_seeds_are_stable() -> None:
    """Pinned: a released image's `sample_seed` must regenerate it in any later version (the
    CT reference run's sample 0 recorded 7896617691693857887)."""
    assert sample_seed(0, 0) == 7896617691693857887
    assert sample_seed(0, 1) == 2918264622725855778
    assert sample_seed(1, 0) == 3717377837946358015
    assert sample_seed(123, 456) == 7895027147976378259


def test_classifier_free_guidance(tiny_run) -> None:
    import pytest

    _, run_dir = tiny_run
    model, train_sched = load_generator(run_dir.final_checkpoint, ema=True)
    sched = sampling_scheduler(train_sched)
    seeds, labels = [sample_seed(0, i) for i in range(2)], torch.tensor([0, 1])
    plain = ddim_sample(model, sched, labels, seeds, 3, 16)
    guided = ddim_sample(model, sched, labels, seeds, 3, 16, guidance_scale=3.0, null_class=2)
    same = ddim_sample(model, sched, labels, seeds, 3, 16, guidance_scale=1.0, null_class=2)
    assert torch.equal(plain, same) and not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="null class"):
        ddim_sample(model, sched, labels, seeds, 3, 16, guidance_scale=3.0, null_class=None)


def test_shards_reproduce_the_single_process_samples_bit_for_bit(run_copy) -> None:
    """Three `--shard i/3` invocations (in any order) give exactly the one-process sample store."""
    from synthfactory.run import StageOptions, run_stage
    from synthfactory.sample import Samples, shard_path

    checked, run_dir = run_copy
    recipe = checked.recipe.model_copy(
        update={
            "sampling": checked.recipe.sampling.model_copy(update={"images_per_class": 7, "batch_size": 3})
        }
    )
    checked = type(checked)(recipe, checked.images, checked.schedule, checked.public)
    run_stage("sample", checked, run_dir, StageOptions(progress=False))
    whole = Samples.load(run_dir.samples)
    shutil.rmtree(run_dir.samples)
    for i in (2, 0, 1):
        run_stage("sample", checked, run_dir, StageOptions(progress=False, shard=(i, 3)))
        assert run_dir.is_done("sample") == (i == 1) and run_dir.samples.exists() == (i == 1)
    merged = Samples.load(run_dir.samples)
    assert merged.sha256() == whole.sha256() and len(merged.labels) == 14
    assert not shard_path(run_dir, (0, 3)).exists()  # shards are removed once merged


def test_the_sample_store_is_memory_mapped_and_hashes_as_one_piece(tmp_path, monkeypatch) -> None:
    """The store is read in pieces (memory map, chunked hash) with the same hash as one
    `tobytes()`; a run directory from before the store (samples/samples.npz) still loads."""
    import pytest

    import synthfactory.sample as sample_module
    from synthfactory.sample import StoreImages, StoreWriter

    monkeypatch.setattr(sample_module, "CHUNK", 7)  # several pieces, the last one short
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 5, 6), dtype=np.uint8)
    labels, seeds = rng.integers(0, 3, 30), rng.integers(0, 2**62, 30)
    store = tmp_path / "samples" / "store"
    Samples(images, labels, seeds).save(store)
    loaded = Samples.load(store)
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable
    np.testing.assert_array_equal(loaded.images, images)
    one_piece = hashlib.sha256(images.tobytes() + labels.astype(np.int64).tobytes() + seeds.tobytes())
    assert loaded.sha256() == one_piece.hexdigest()
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]  # nothing left aside
    streamed = StoreImages(store)  # what the release reads: one image per file read
    assert len(streamed) == 30 and all(np.array_equal(streamed[k], images[k]) for k in (0, 13, 29))
    with pytest.raises(IndexError):
        streamed[30]
    writer = StoreWriter(tmp_path / "other", labels, seeds, (5, 6))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write(28, images[:3])
    writer.abort()
    assert not any(p.name.startswith(".other") for p in tmp_path.iterdir())
    shutil.rmtree(store)
    np.savez_compressed(store.parent / "samples.npz", images=images, labels=labels, seeds=seeds)
    assert Samples.load(store).sha256() == one_piece.hexdigest()
