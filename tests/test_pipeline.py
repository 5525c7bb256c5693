"""The DP generator as a diffusers pipeline: a run's checkpoints/final loads with
`ClassConditionalPipeline.from_pretrained` and draws exactly what `synthfactory sample` drew."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthfactory.pipeline import ClassConditionalPipeline
from synthfactory.sample import Samples


def test_final_checkpoint_is_a_pipeline_that_reproduces_the_sample_store(tiny_run) -> None:
    checked, run_dir = tiny_run
    index = json.loads((run_dir.final_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DModel",
    ]
    pipe = ClassConditionalPipeline.from_pretrained(run_dir.final_checkpoint)
    assert pipe.config.use_ema == checked.recipe.sampling.use_ema and pipe.unet_ema is not None
    store = Samples.load(run_dir.samples)
    pick = np.arange(0, len(store.labels), max(1, len(store.labels) // 5))
    gens = [torch.Generator().manual_seed(int(s)) for s in store.seeds[pick]]
    out = pipe(
        store.labels[pick].tolist(), checked.recipe.sampling.ddim_steps, generator=gens, output_type="uint8"
    )
    np.testing.assert_array_equal(out.images, store.images[pick])  # bit for bit
    # the other output types are the same images on other scales
    again = pipe(store.labels[pick].tolist(), checked.recipe.sampling.ddim_steps,
                 generator=[torch.Generator().manual_seed(int(s)) for s in store.seeds[pick]])  # fmt: skip
    assert again.images.shape == (len(pick), *store.images.shape[1:], 1)
    assert np.abs(np.round(again.images[..., 0] * 255) - store.images[pick]).max() <= 1
    pil = pipe([0], 2, generator=[torch.Generator().manual_seed(0)], output_type="pil").images[0]
    assert pil.mode == "L" and pil.size == store.images.shape[1:][::-1]


def test_pipeline_refuses_mismatched_generators_and_unknown_outputs(tiny_run) -> None:
    _, run_dir = tiny_run
    pipe = ClassConditionalPipeline.from_pretrained(run_dir.final_checkpoint)
    with pytest.raises(ValueError, match="2 generators for 1 images"):
        pipe([0], 2, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], 2, output_type="jpeg")


def test_sampling_and_audit_follow_the_pipelines_weights(tiny_run, tmp_path) -> None:
    """One record says which weights sample: model_index.json's `use_ema`. `load_generator`
    (sampling, the audit's attacks) follows it, so flipping it flips the weights they load."""
    import shutil

    from synthfactory.model import load_generator, uses_ema

    _, run_dir = tiny_run
    final = tmp_path / "final"
    shutil.copytree(run_dir.final_checkpoint, final)
    ema_weights = next(load_generator(final, ema=True)[0].parameters())
    last_weights = next(load_generator(final, ema=False)[0].parameters())
    assert not torch.equal(ema_weights, last_weights)
    for use_ema, expected in ((True, ema_weights), (False, last_weights)):
        index = json.loads((final / "model_index.json").read_text())
        index["use_ema"] = use_ema
        (final / "model_index.json").write_text(json.dumps(index))
        assert uses_ema(final) is use_ema
        assert torch.equal(next(load_generator(final)[0].parameters()), expected)
        pipe = ClassConditionalPipeline.from_pretrained(final)
        assert torch.equal(next(pipe.generator_unet.parameters()), expected)
