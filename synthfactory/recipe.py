"""Recipes: the YAML file a user writes, validated into typed pydantic models.

This module is a leaf: it imports nothing else from synthfactory. It never touches image
pixels and never writes a file. Every error names the recipe file and the dotted field.

Paths *inside* a recipe that point at input data are resolved relative to the recipe file's
own folder (so a recipe travels with its data); output locations are relative to the working
directory the command runs in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1


class RecipeError(ValueError):
    """A recipe is invalid. The message names the file and the field; nothing was written."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


Seed = Annotated[int, Field(ge=0, lt=2**63)]
MAX_STEPS = 10_000_000


class CTWindow(_Strict):
    """CT display window in Hounsfield units, applied to DICOM and NIfTI CT before scaling to [-1, 1]."""

    center: float = 40.0
    """Window centre in Hounsfield units."""
    width: float = Field(400.0, gt=0)
    """Window width in Hounsfield units."""


class PhantomSpec(_Strict):
    """Size and seed of the built-in procedural data set."""

    n_train: int = Field(2000, ge=2, le=1_000_000)
    """Training images of the built-in phantom set."""
    n_heldout: int = Field(500, ge=2, le=1_000_000)
    """Held-out images of the built-in phantom set."""
    seed: Seed = 0
    """Seed of the phantom set."""


class NiftiSpec(_Strict):
    """How NIfTI volumes become 2D slices (see synthfactory/data/nifti.py)."""

    axis: int = Field(2, ge=0, le=2)
    """Slicing axis after reorientation to RAS+: 0 sagittal, 1 coronal, 2 axial."""
    volume: int = Field(0, ge=0)
    """Which volume of a 4D file."""
    slices: tuple[int, int, int] | None = None
    """`[start, stop, step]` along the axis; null: every slice."""

    @field_validator("slices")
    @classmethod
    def _slices(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and (v[0] < 0 or v[1] <= v[0] or v[2] < 1):
            raise ValueError("need 0 <= start < stop and step >= 1")
        return v


class _DataBase(_Strict):
    """Fields every data source has."""

    source: str
    """`phantom` (built in, no download), `npz`, `folder`, `dicom`, `hf` (a `datasets` folder) or `nifti`:
    selects which of the fields below apply."""
    image_size: int = Field(ge=8, le=1024)
    """Images are padded to a centred square (black) and resized to this size (bilinear, antialiased)."""
    classes: list[str] = Field(min_length=1)
    """Class names to keep, in label order; each must exist in the data."""
    split_seed: Seed = 0
    """Seed of the `max_*_images` subsets (and of `heldout_fraction`'s split where the source has one)."""
    max_train_images: int | None = Field(None, ge=2, json_schema_extra={"smoke": 400})
    """A random subset (seed `split_seed`) of at most this many training images."""
    max_heldout_images: int | None = Field(None, ge=2, json_schema_extra={"smoke": 200})
    """A random subset (seed `split_seed`) of at most this many held-out images."""

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v


class PhantomData(_DataBase):
    """The built-in procedural set: no download, for demos and tests."""

    source: Literal["phantom"] = "phantom"
    phantom: PhantomSpec = PhantomSpec()
    """Size and seed of the built-in set."""


class _StoredData(_DataBase):
    """A source read from a file or folder with a training and a held-out split."""

    path: Path
    """File or folder of the source; relative to the recipe file's folder, `~` and `$VARS` expand."""
    train_split: str = "train"
    """npz key prefix, folder name, `datasets` split or split-column value of the training images."""
    heldout_split: str = "test"
    """The held-out split: never trained on; it calibrates the audit and evaluates TSTR/TRTR."""


class NpzData(_StoredData):
    """A MedMNIST-style `.npz`: `<split>_images`, `<split>_labels` (and `<split>_group` for patients)."""

    source: Literal["npz"] = "npz"


class HFData(_StoredData):
    """A Hugging Face `datasets` DatasetDict saved with save_to_disk: an `image` column and a `ClassLabel` `label`."""

    source: Literal["hf"] = "hf"


class _SplittableData(_StoredData):
    """A source of files that may come without splits: split here, by file or by patient."""

    heldout_fraction: float | None = Field(None, gt=0, lt=1)
    """Without split folders or a split column: a stratified random split by file (by group with
    `group_by`)."""
    group_by: str | None = None
    """Images of one patient stay on one side of the split: `regex:PATTERN` (first capture group in the
    file's path under `data.path`), and for DICOM `patient` (PatientID, else StudyInstanceUID), for DICOM
    and NIfTI `column:NAME` (a `labels_csv` column). With split folders or a split column, a patient on
    both sides is refused. Patients are kept as SHA-256 prefixes."""

    @model_validator(mode="after")
    def _check_group_by(self) -> _SplittableData:
        if self.group_by is None:
            return self
        kind, _, arg = self.group_by.partition(":")
        if self.group_by == "patient":
            if self.source != "dicom":
                raise ValueError("group_by: 'patient' reads DICOM headers (source: dicom)")
        elif kind == "column" and arg:
            if not hasattr(self, "labels_csv"):
                raise ValueError(
                    "group_by: 'column:NAME' reads data.labels_csv, which only dicom and nifti have"
                )
            if self.labels_csv is None:
                raise ValueError("group_by: 'column:NAME' reads data.labels_csv, which is not set")
        elif kind == "regex" and arg:
            try:
                re.compile(arg)
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"group_by: not a valid regular expression ({e})") from None
        else:
            raise ValueError("group_by: 'patient', 'column:NAME' or 'regex:PATTERN'")
        return self


class FolderData(_SplittableData):
    """PNG/JPEG files in one folder per class, under split folders or split by `heldout_fraction`."""

    source: Literal["folder"] = "folder"


class _ScannerData(_SplittableData):
    """Scanner files: intensities scaled by a CT window or by per-image percentiles."""

    ct_window: CTWindow = CTWindow()
    """CT: the window applied before scaling."""
    percentiles: tuple[float, float] = (0.5, 99.5)
    """Not CT: per-image (NIfTI: per-slice) percentile scaling, `[low, high]`."""

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError("need 0 <= low < high <= 100")
        return v

    @property
    def window(self) -> tuple[float, float]:
        """`ct_window` as (centre, width) in HU, as the readers take it."""
        return self.ct_window.center, self.ct_window.width


class DicomData(_ScannerData):
    """DICOM files: labelled by class folders or by `labels_csv`."""

    source: Literal["dicom"] = "dicom"
    labels_csv: Path | None = None
    """CSV `file,label[,split]` (files relative to `data.path`); else one folder per class."""


class NiftiData(_ScannerData):
    """NIfTI volumes cut into 2D slices (nibabel), listed with their labels in `labels_csv`."""

    source: Literal["nifti"] = "nifti"
    labels_csv: Path
    """CSV `file,label[,split][,slice][,mask]`; files relative to `data.path`."""
    nifti: NiftiSpec = NiftiSpec()
    """How NIfTI volumes become 2D slices."""


DATA_SOURCES: dict[str, type[_DataBase]] = {
    "phantom": PhantomData,
    "npz": NpzData,
    "folder": FolderData,
    "dicom": DicomData,
    "hf": HFData,
    "nifti": NiftiData,
}
"""The data sources by the `source` value that selects them."""

DataConfig = Annotated[
    PhantomData | NpzData | FolderData | DicomData | HFData | NiftiData, Field(discriminator="source")
]
"""A recipe's `data` block: one source's model, chosen by `source`."""


class ModelConfig(_Strict):
    """A class-conditional diffusers UNet2DModel and its DDPM noise schedule."""

    block_out_channels: list[int] = Field(
        default_factory=lambda: [32, 64], min_length=1, max_length=6, json_schema_extra={"smoke": [16, 32]}
    )
    """UNet widths per level; the image size must be divisible by 2^(levels−1)."""
    layers_per_block: int = Field(1, ge=1, le=4, json_schema_extra={"smoke": 1})
    """ResNet layers per level."""
    attention: bool = Field(True, json_schema_extra={"smoke": True})
    """Self-attention at the lowest-resolution level and in the middle block (costs more CPU than it gives at
    32 px)."""
    norm_num_groups: int = Field(8, ge=1, json_schema_extra={"smoke": 4})
    """GroupNorm groups: must divide every width and leave ≥ 2 channels per group (else GroupNorm erases the
    time and class conditioning)."""
    attention_head_dim: int = Field(8, ge=1, json_schema_extra={"smoke": 8})
    """Must divide the attention level's width."""
    num_train_timesteps: int = Field(1000, ge=10)
    """DDPM steps of the noise schedule."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """DDPM noise schedule."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups: {self.norm_num_groups} does not divide block width {width}"
                )
            if width // self.norm_num_groups < 2:
                # One channel per group makes GroupNorm an instance norm that subtracts the
                # per-channel mean, which is exactly the time/class embedding added before it.
                raise ValueError(
                    f"norm_num_groups: {self.norm_num_groups} groups for width {width} leaves one "
                    "channel per group, and GroupNorm would then erase the time and class "
                    "conditioning; use fewer groups"
                )
        if self.attention and self.block_out_channels[-1] % self.attention_head_dim:
            raise ValueError(
                f"attention_head_dim: {self.attention_head_dim} does not divide the width "
                f"{self.block_out_channels[-1]} of the attention level"
            )
        return self


class TimestepSampling(_Strict):
    """Which noise levels a training example is drawn at.

    `uniform`: DDPM timesteps uniformly (on the cosine schedule the median noise level is
    σ = √((1−ᾱ)/ᾱ) ≈ 1). `lognormal`: EDM-style, ln σ ~ N(p_mean, p_std²), each draw mapped to the
    nearest DDPM timestep. The loss stays epsilon-MSE (not EDM's preconditioned, weighted loss), so
    DPDM's own setting (−1.2, 1.2, with EDM weighting) does not transfer; the default (0.5, 1.5)
    puts more rows at high noise than `uniform`, which DPDM found to matter under DP. Not yet
    measured for utility here.
    """

    distribution: Literal["uniform", "lognormal"] = "uniform"
    """`uniform` DDPM timesteps, or `lognormal`: EDM-style noise levels σ = √((1−ᾱ)/ᾱ), ln σ ~ N(p_mean,
    p_std²), mapped to the nearest DDPM timestep. The loss stays epsilon-MSE (no EDM weighting), so DPDM's
    (−1.2, 1.2) would put most rows at low noise here; the default leans to high noise, as DPDM found best
    under DP."""
    p_mean: float = 0.5
    """`lognormal`: mean of ln σ."""
    p_std: float = Field(1.5, gt=0)
    """`lognormal`: standard deviation of ln σ."""


class LoraSettings(_Strict):
    """LoRA adapters (peft) on the pre-trained UNet: the DP stage trains only the low-rank factors
    (and `training.trainable`), and the final checkpoint merges them into a plain UNet2DModel."""

    rank: int = Field(ge=1, le=256)
    """r: the rank of each adapter (B·A, B zero at the start)."""
    alpha: float | None = Field(None, gt=0)
    """lora_alpha: the update is scaled by alpha / rank; default rank (scale 1)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
    )
    """Module names (peft's suffix match) that get an adapter; names the model lacks are passed
    over (attention-free UNets have no `to_q`), but at least one must be there."""


class TrainingConfig(_Strict):
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, json_schema_extra={"smoke": 2})
    """Optimizer steps (give exactly one of `steps` and `epochs`); at most 10,000,000."""
    epochs: float | None = Field(None, gt=0, json_schema_extra={"smoke": None})
    """Passes at sampling rate q: steps = ⌈epochs·N/B⌉."""
    expected_batch_size: int = Field(ge=1, json_schema_extra={"smoke_at_most": 16})
    """B: Poisson sampling with q = B/N, so batches vary and may be empty; the loss is normalised by B, not
    by the batch drawn."""
    max_physical_batch_size: int = Field(32, ge=1, json_schema_extra={"smoke": 16})
    """Examples per forward/backward pass (× K rows); memory only: clipped gradients accumulate across chunks
    and the noise is added once per logical batch."""
    learning_rate: float = Field(gt=0, le=1)
    """Adam's learning rate."""
    seed: Seed = 0
    """Model initialisation, noise levels and diffusion noise (not the DP noise, which is seeded from the
    OS)."""
    checkpoint_every: int = Field(50, ge=1, json_schema_extra={"smoke": 1})
    """Steps between atomic checkpoints (an interrupted run resumes from the last)."""
    timesteps: TimestepSampling = TimestepSampling()
    """Which noise levels a training example is drawn at."""
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    """EMA of the weights (diffusers `EMAModel`, warm-up (1+t)/(10+t)); null for none. Post-processing: no
    privacy cost."""
    label_dropout: float = Field(0.1, ge=0, lt=1)
    """Share of rows trained with the null label (classifier-free guidance, class-agnostic pre-training); 0
    for none."""
    trainable: Literal["all"] | list[str] = "all"
    """`all`, or glob patterns of parameter names trained in the DP stage, e.g. `["*attentions*",
    "class_embedding.*"]` (DP-LDM-style); the others stay as pre-trained. With `lora`: the
    parameters trained beside the adapters (`[]` for the adapters alone)."""
    lora: LoraSettings | None = None
    """LoRA adapters for the DP stage (needs pre-trained weights: `pretrain` or `warm_start`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`cpu`, `cuda`, or `auto` (CUDA when present)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: bf16 autocast for the forward pass; per-example gradients are cast to fp32 before their norms
    are taken, so every clipped norm stays ≤ C."""

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("steps: give exactly one of 'steps' or 'epochs'")
        if self.lora is not None and self.trainable == "all":
            raise ValueError(
                "trainable: with training.lora, list the parameters trained beside the adapters "
                "(e.g. ['class_embedding.*']), or [] for the adapters alone"
            )
        if self.lora is None and isinstance(self.trainable, list) and not self.trainable:
            raise ValueError("trainable: 'all', or a non-empty list of parameter-name patterns")
        return self

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps planned: `steps`, or `epochs` passes at sampling rate B/N."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * n_train / self.expected_batch_size))


class PrivacyConfig(_Strict):
    enabled: bool = True
    """DP-SGD on. `false` also needs `i_understand_this_is_not_private: true`; every output then says NOT
    PRIVATE."""
    target_epsilon: float | None = Field(None, gt=0, le=1000)
    """σ is calibrated so that ε after the planned steps (composed with the warm start's query and with the
    run `pretrain.checkpoint` comes from, if that was a DP run on this data) is at most this; at most
    1000."""
    delta: float | None = Field(None, gt=0, lt=1)
    """δ; must be < 1/N."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Per-example clipping norm C."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """`rdp` or `prv` (Opacus); the other is reported for reference."""
    noise_multiplicity: int = Field(4, ge=1, le=64, json_schema_extra={"smoke": 2})
    """K noise draws per example, averaged inside the example before clipping: one clipped gradient per
    example, ε unchanged."""
    per_example_gradients: Literal["hooks", "functorch", "vmap", "mixed_ghost"] = "vmap"
    """`vmap` (torch.func over examples), `hooks` (Opacus hooks, with the contiguity fix), `functorch`
    (Opacus) or `mixed_ghost` (book-keeping with per-layer ghost or instantiated norms: the clipped sum
    without per-example weight gradients; Conv2d, Linear, GroupNorm and Embedding layers)."""
    noise_seed: Seed | None = None
    """Tests only: seeds the DP noise and sampling (otherwise a secret OS seed). Anyone who reads the recipe
    can regenerate the noise, so such a run is NOT PRIVATE: its run id, release folder, card and reports
    say so, and `publish` refuses it without `--force-not-private`."""
    i_understand_this_is_not_private: bool = False
    """Needed with `enabled: false`."""

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.enabled:
            if self.target_epsilon is None:
                raise ValueError("target_epsilon: required when privacy is enabled")
            if self.delta is None:
                raise ValueError("delta: required when privacy is enabled")
        elif not self.i_understand_this_is_not_private:
            raise ValueError(
                "enabled: training without differential privacy needs "
                "'i_understand_this_is_not_private: true' as well"
            )
        return self


class SamplingConfig(_Strict):
    images_per_class: int = Field(ge=1, json_schema_extra={"smoke": 4})
    """Samples generated per class, before the audit."""
    ddim_steps: int = Field(50, ge=1, le=1000, json_schema_extra={"smoke": 2})
    """DDIM steps."""
    seed: Seed = 0
    """Base seed; each image has its own derived seed."""
    batch_size: int = Field(64, ge=1)
    """Images per forward pass."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance w: ε = ε∅ + w(ε_y − ε∅); 1 = none (other values need `training.label_dropout`
    > 0)."""
    use_ema: bool = True
    """Sample from the EMA weights (recorded in the pipeline's model_index.json)."""
    class_proportions: Literal["equal", "dp_counts"] = "equal"
    """`equal`: `images_per_class` of every class; `dp_counts`: the same total shared in proportion to the
    warm start's noisy class counts (DP, covered by ε), so the released set keeps the data's class
    balance; needs `warm_start`."""


class PretrainConfig(_Strict):
    """Public pre-training, without DP, before the private (DP) stage.

    Either `data` (a source the recipe declares public; trained here for `steps`) or
    `checkpoint` (a diffusers UNet2DModel folder saved with save_pretrained). Nothing of the
    private set may be in it: exact duplicates of private images are refused.
    """

    data: DataConfig | None = Field(
        None, json_schema_extra={"smoke": {"max_train_images": 200, "max_heldout_images": 20}}
    )
    """A data source the recipe declares public: trained without DP before the private stage. It is
    screened against every private image, training and held-out, in the audit's pixel-L2, shift/flip-NCC
    and low-pass spaces and a rank descriptor over rotations, flips and inversions: an image that is a
    copy or near-copy is refused (public.py). A synthfactory
    release is recognised by its `synthfactory_ledger.json` and composes into this run's ε. Other class
    names than the private ones: class-agnostic pre-training with the null label."""
    checkpoint: Path | None = None
    """Or a diffusers `UNet2DModel` folder (save_pretrained, safetensors) that fits the recipe's model. A
    synthfactory model is recognised by its `synthfactory_ledger.json` (the mechanisms of its run and of
    all its ancestors): each composes into this run's ε unless its data is shown disjoint from this run's
    (by source item, so another image size is the same data); one without a DP guarantee on this data →
    refused. Anything else is declared public by the recipe."""
    steps: int = Field(500, ge=1, json_schema_extra={"smoke": 2})
    """Steps of the public stage."""
    expected_batch_size: int = Field(64, ge=1)
    """Batch size of the public stage."""
    learning_rate: float = Field(1e-3, gt=0, le=1)
    """Learning rate of the public stage."""
    seed: Seed = 0
    """Seed of the public stage."""
    class_embeddings: Literal["random", "from_null"] = "random"
    """After a class-agnostic public stage (other class names than the private ones), where the class
    rows of the class embedding start: `random` (as initialised, never trained) or `from_null` (each
    a copy of the null label's row, the one the public stage trained, so every class starts as the
    public prior and the private stages move them apart)."""

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if (self.data is None) == (self.checkpoint is None):
            raise ValueError("data: give exactly one of 'data' (public images) or 'checkpoint'")
        if self.class_embeddings == "from_null" and self.data is None:
            raise ValueError("class_embeddings: from_null follows a class-agnostic pretrain.data stage")
        return self


class WarmStartConfig(_Strict):
    """DP warm start from central images (DP-FETA): one Gaussian-mechanism query of the per-class
    mean images over the whole private training set, at low resolution, composed into the
    accountant; the UNet is pre-trained on them (augmented) before DP-SGD. See warmstart.py."""

    image_size: int = Field(14, ge=2, le=64)
    """Resolution of the central images."""
    noise_multiplier: float = Field(gt=0)
    """σ of the one Gaussian-mechanism query: per-class sums of the training images (at `image_size`, in [0,
    1], clipped to L2 norm C) and per-class counts, noise std σ·√2 (sensitivity √2). It enters the
    accountant as (σ, q = 1, 1 step) before DP-SGD, whose σ is calibrated for the composed ε."""
    clip_norm: float | None = Field(None, gt=0)
    """C on images in [0, 1]; null: `image_size`, the largest norm such an image can have (no clipping).
    Choose it on public data, never on the private images."""
    steps: int = Field(300, ge=1, json_schema_extra={"smoke": 2})
    """Pre-training steps on the noisy class means (after `pretrain`, if any); post-processing of the DP
    answer, no further ε."""
    expected_batch_size: int = Field(64, ge=1)
    """Batch size of that pre-training."""
    learning_rate: float = Field(1e-3, gt=0, le=1)
    """Learning rate of that pre-training."""
    shift: int = Field(2, ge=0, le=8)
    """Augmentation: random translations up to ±shift px (full resolution)."""
    intensity: float = Field(0.1, ge=0, lt=1)
    """Augmentation: gain and offset up to ±this."""
    public_replay: float = Field(0.0, ge=0, lt=1)
    """Share of each batch drawn from `pretrain.data` (with the labels of the public stage) instead
    of the class means, so that training on a few mean images does not overwrite what the public
    stage learned. Needs `pretrain.data`; public images and the DP answer only: no further ε."""
    seed: Seed = 0
    """The pre-training's own randomness (not the mechanism's noise)."""


class ClassifierConfig(_Strict):
    """The fixed CNN used for TSTR and TRTR (and as the feature extractor for fidelity)."""

    # Long enough for the classifier to fit real data (training accuracy > 0.9 on the MRI set at
    # 32 px needs ~50 epochs; with patience 5 it stopped at 10 epochs and 0.78).
    epochs: int = Field(60, ge=1, json_schema_extra={"smoke": 1})
    """Maximum epochs."""
    patience: int = Field(15, ge=1)
    """Early stopping on a validation split of the classifier's own training data."""
    early_stopping: Literal["val_loss", "val_accuracy"] = "val_loss"
    """What picks the epoch kept: the validation cross-entropy, or the validation accuracy (the
    first epoch to reach its best). On synthetic images the validation accuracy reaches 1.0 within
    ~20 epochs, while the classifier is still fragile on real images: on the demo's seed-1
    phantoms, 10 classifier seeds scored 0.83-1.00 above chance with `val_accuracy` and 1.00 with
    `val_loss` (docs/results.md). Runs before 2026-12-06 evening used `val_accuracy`."""
    batch_size: int = Field(128, ge=1)
    """Batch size."""
    learning_rate: float = Field(1e-3, gt=0)
    """Adam's learning rate."""
    seed: Seed = 0
    """Seed."""


class EvaluationConfig(_Strict):
    enabled: bool = True
    """Run the evaluate stage."""
    classifier: ClassifierConfig = ClassifierConfig()
    """The fixed CNN for TSTR/TRTR and the fidelity features."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """The classifier's validation split."""
    max_real_train: int | None = Field(None, ge=10)
    """Cap on the real training images for TRTR (CPU time)."""
    max_real_features: int = Field(5000, ge=10, json_schema_extra={"smoke": 200})
    """Real images in the fidelity metrics (random subset)."""
    prdc_k: int = Field(5, ge=1)
    """k of precision/recall/density/coverage."""
    classifier_seeds: int = Field(3, ge=1, le=20, json_schema_extra={"smoke": 1})
    """TSTR and TRTR are each trained with this many seeds (`classifier.seed`, +1, …) and reported
    as their mean, every seed beside it: on a few hundred synthetic images one seed alone moved
    the same demo samples from 0.26 to 1.00 above chance."""
    bootstrap_resamples: int = Field(2000, ge=0, json_schema_extra={"smoke": 200})
    """Resamples of the held-out split (of its patients where ids exist) for the 95 % intervals
    of TSTR, TRTR and above chance; 0: none."""


class ThresholdRule(_Strict):
    """Calibration of the gate on held-out real images (see synthfactory/audit/gate.py)."""

    rule: Literal["heldout_percentile"] = "heldout_percentile"
    """How the gate is calibrated."""
    percentile: float = Field(1.0, gt=0, le=50)
    """The gate's false-alarm rate: at most this percent of held-out images flagged by any space."""
    min_per_class: int = Field(200, ge=1, json_schema_extra={"smoke": 50})
    """Per-class thresholds for classes with this many held-out images."""
    near_duplicate_rms: float = Field(0.02, ge=0)
    """Held-out images this close (RMS pixel difference on [-1, 1]) to a training image are left out of the
    background and counted."""
    max_heldout: int | None = Field(5000, ge=20)
    """Held-out images in the background (random subset; search cost)."""
    seed: Seed = 0
    """Seed of that subset."""


SpaceName = Literal[
    "pixel_l2",
    "ncc",
    "shift_flip_ncc",
    "rank_thumbnail",
    "lowpass_l2",
    "warp_ncc",
    "copy_embedding",
    "aligned_ncc",
]


class CopyingTestConfig(_Strict):
    enabled: bool = True
    """Run the data-copying test C_T."""
    n_cells: int = Field(20, ge=1)
    """k-means cells of the training set."""
    min_per_cell: int = Field(5, ge=2)
    """Samples and held-out images a cell needs to count."""


class MembershipConfig(_Strict):
    enabled: bool = True
    """Run the loss-based membership-inference attack."""
    max_examples: int = Field(500, ge=10, json_schema_extra={"smoke": 50})
    """Members and non-members each."""
    timesteps: list[int] = Field(default_factory=lambda: [10, 50, 100, 200, 400], min_length=1)
    """Timesteps of the denoising loss."""
    seed: Seed = 0
    """Seed of the examples and noise."""
    nonprivate_reference: bool = False
    """Also train a non-private model (same data, model, steps, batch size; never released) and attack it for
    comparison. Costs one more training run."""


class CanaryConfig(_Strict):
    """Canary audit (Steinke, Nasr & Jagielski 2023): one more DP training run with m generated
    canaries, each included with probability ½; never released. Costs one more training run."""

    enabled: bool = False
    """Run the canary audit: one more training run with m canaries, each included with probability ½; reports
    an empirical ε lower bound."""
    m: int = Field(1000, ge=10, json_schema_extra={"smoke": 40})
    """Number of canaries."""
    seed: Seed = 0
    """Canary patterns, labels and which canaries go in (the auditor's randomness)."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Confidence of the lower bound."""
    timesteps: list[int] = Field(default_factory=lambda: [10, 50, 100, 200, 400], min_length=1)
    """Timesteps of the canary score."""


class AuditConfig(_Strict):
    spaces: list[SpaceName] = Field(
        default_factory=lambda: [
            "pixel_l2", "ncc", "shift_flip_ncc", "rank_thumbnail", "lowpass_l2", "warp_ncc", "aligned_ncc"
        ],
        min_length=1,
    )  # fmt: skip
    """Similarity spaces of the gate: any of `pixel_l2`, `ncc`, `shift_flip_ncc`, `rank_thumbnail`,
    `lowpass_l2`, `warp_ncc`, `copy_embedding` (a learned copy descriptor trained on public
    images only; not in the default list: with few held-out images to calibrate on, another
    space raised ultrasound's false alarms; docs/audit.md), `aligned_ncc` (the descriptor's
    shortlist registered onto each sample; in the default list since it lifted copies made by
    other libraries from 37 % to 94 % on the public CT val split at the same false alarms)."""
    shift: int = Field(4, ge=0, le=8)
    """`shift_flip_ncc`, and `warp_ncc`'s rotated and zoomed queries: translations up to ±shift px."""
    warp_shift: int = Field(8, ge=0, le=12)
    """`warp_ncc`: translations up to ±warp_shift px of the unwarped query."""
    align_candidates: int = Field(16, ge=1, le=256)
    """`aligned_ncc`: training images per sample, shortlisted by the copy descriptor, that are
    registered onto it (cost grows linearly; the source's recall in the shortlist is measured by
    `benchmarks/audit_disguised_copies.py`)."""
    shift_candidates: int | None = Field(None, ge=1)
    """`shift_flip_ncc` and `warp_ncc`: null scores every training image (exact); a number scores only that
    many candidates per sample from one half-resolution pass (faster; its recall is measured by
    `benchmarks/audit_planted_copies.py --shift-candidates N`)."""
    threshold: ThresholdRule = ThresholdRule()
    """Calibration of the gate on held-out real images."""
    action: Literal["drop", "block"] = "drop"
    """`drop` the suspected copies, or `block` the whole release."""
    block_size: int = Field(1024, ge=1)
    """Rows per block in the exact search."""
    search: Literal["torch", "faiss"] = "torch"
    """Pixel-L2 search: `torch` or `faiss` (faiss-cpu `IndexFlatL2`, extra `[faiss]`); both exact."""
    neighbours: int = Field(50, ge=2)
    """n of the Carlini ratio."""
    copying_test: CopyingTestConfig = CopyingTestConfig()
    """The data-copying test C_T (Meehan et al. 2020)."""
    membership: MembershipConfig = MembershipConfig()
    """The loss-based membership-inference attack."""
    canary: CanaryConfig = CanaryConfig()
    """The canary audit (Steinke, Nasr & Jagielski 2023)."""

    @field_validator("spaces")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a space is listed twice")
        return v


class OutputsConfig(_Strict):
    formats: list[Literal["hf", "png", "dicom", "nifti"]] = Field(
        default_factory=lambda: ["hf"], min_length=1
    )
    """Any of `hf` (datasets `save_to_disk`), `png`, `dicom`, `nifti` (one 2D NIfTI-1 per slice)."""
    nifti_spacing_mm: float | None = Field(None, gt=0, le=100)
    """Pixel spacing written into the `nifti` files' affine, in mm: the field of view you resample
    to divided by `data.image_size`. Null: spacing 1, units unknown. Never measured from the
    private volumes (their fields of view differ, and a statistic of them would leave outside ε)."""
    destination: Path = Path("runs")
    """Parent folder of run directories (`--out` overrides)."""
    audit_dir: Path = Path("privacy_audits")
    """Parent folder of reports (`--audit-dir` overrides)."""
    license: str = "other"
    """The dataset card's licence (a Hub licence id such as `cc-by-4.0`); follow the source data's."""
    validation_fraction: float | None = Field(None, gt=0, lt=1)
    """`publish` also pushes a class-stratified validation split of this fraction."""


class Recipe(_Strict):
    schema_version: Literal[1] = 1
    """Version of the recipe schema."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    """Letters, digits, `_.-`; names the run and the report folder."""
    description: str = ""
    """Free text."""
    modality: Literal["mri", "ct", "us"]
    """`mri`, `ct` or `us`."""
    data: DataConfig
    """The private data set."""
    model: ModelConfig = ModelConfig()
    """A class-conditional diffusers UNet2DModel and its DDPM noise schedule."""
    training: TrainingConfig
    """Training: DP-SGD when `privacy.enabled`."""
    privacy: PrivacyConfig
    """The privacy budget and DP-SGD's settings."""
    sampling: SamplingConfig
    """Generating the synthetic set."""
    pretrain: PretrainConfig | None = None
    """Public pre-training, without DP, before the private stage."""
    warm_start: WarmStartConfig | None = None
    """DP warm start from central images (DP-FETA), composed into ε."""
    audit: AuditConfig = AuditConfig()
    """The memorization audit and the release gate."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Utility (TSTR/TRTR) and fidelity."""
    outputs: OutputsConfig = OutputsConfig()
    """Release formats and where outputs go."""

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        t_max = self.model.num_train_timesteps
        for block in ("membership", "canary"):
            if any(not 0 <= t < t_max for t in getattr(self.audit, block).timesteps):
                raise ValueError(
                    f"audit.{block}.timesteps: each must be in [0, {t_max}) (model.num_train_timesteps)"
                )
        levels = len(self.model.block_out_channels)
        factor = 2 ** (levels - 1)
        if self.data.image_size % factor:
            raise ValueError(
                f"data.image_size: {self.data.image_size} is not divisible by {factor}, "
                f"which {levels} UNet levels need"
            )
        if self.sampling.guidance_scale != 1.0 and self.training.label_dropout == 0:
            raise ValueError(
                "sampling.guidance_scale: classifier-free guidance needs an unconditional model; "
                "set training.label_dropout > 0 or guidance_scale: 1.0"
            )
        if self.pretrain is not None and self.pretrain.data is not None:
            self._check_public_data(self.pretrain)
        if self.training.lora is not None and self.pretrain is None and self.warm_start is None:
            raise ValueError(
                "training.lora: adapters on a randomly initialised UNet learn nothing the full "
                "model would not; add a pretrain or warm_start block, or drop lora"
            )
        if self.sampling.class_proportions == "dp_counts" and self.warm_start is None:
            raise ValueError(
                "sampling.class_proportions: dp_counts takes the class counts from the warm start; "
                "add a warm_start block or use equal"
            )
        if self.warm_start is not None:
            self._check_warm_start(self.warm_start)
        if (
            self.privacy.enabled
            and self.privacy.noise_multiplicity > 1
            and self.training.max_physical_batch_size * self.privacy.noise_multiplicity > 8192
        ):
            raise ValueError(
                "training.max_physical_batch_size: times privacy.noise_multiplicity exceeds "
                "8192 rows per forward pass"
            )
        return self

    def _check_public_data(self, pre: PretrainConfig) -> None:
        pd = pre.data
        if pd.image_size != self.data.image_size:
            raise ValueError(
                f"pretrain.data.image_size: {pd.image_size} differs from data.image_size "
                f"{self.data.image_size}"
            )
        if pd.classes != self.data.classes and self.training.label_dropout == 0:
            raise ValueError(
                "pretrain.data.classes: differ from data.classes, so pre-training is "
                "class-agnostic (the null label), which needs training.label_dropout > 0"
            )
        if pd.classes == self.data.classes and pre.class_embeddings == "from_null":
            raise ValueError(
                "pretrain.class_embeddings: from_null needs a class-agnostic public stage, but "
                "pretrain.data has the private classes (class-conditional pre-training)"
            )

    def _check_warm_start(self, ws: WarmStartConfig) -> None:
        if ws.public_replay and (self.pretrain is None or self.pretrain.data is None):
            raise ValueError(
                "warm_start.public_replay: replays images of pretrain.data; add a pretrain.data "
                "block or set it to 0"
            )
        if ws.image_size > self.data.image_size:
            raise ValueError(
                f"warm_start.image_size: {ws.image_size} exceeds data.image_size {self.data.image_size}"
            )

    @property
    def dp_sgd(self) -> bool:
        """Whether training runs DP-SGD (clipping, noise, Poisson sampling, accountant)."""
        return self.privacy.enabled

    @property
    def private(self) -> bool:
        """Whether the run can claim (ε, δ): DP-SGD with secret randomness. A run whose DP noise
        and sampling are seeded from the recipe (`privacy.noise_seed`) runs the same mechanism,
        but anyone who reads the recipe can regenerate and subtract the noise: it is not private."""
        return self.privacy.enabled and self.privacy.noise_seed is None

    _sha256_as_recorded: str | None = PrivateAttr(None)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Recipe:
        """A copy; a changed copy is another recipe, so it does not keep a recorded hash."""
        copy = super().model_copy(update=update, deep=deep)
        if update:
            copy._sha256_as_recorded = None
        return copy

    def sha256(self) -> str:
        """Hash of the validated recipe (canonical JSON), recorded in every report; for a run
        recorded in the older layout, the hash it was recorded with (`load_run_recipe`)."""
        return self._sha256_as_recorded or _canonical_sha256(self.model_dump(mode="json"))


def _canonical_sha256(mapping: dict) -> str:
    canonical = json.dumps(mapping, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _field_name(loc: tuple[Any, ...], msg: str) -> tuple[str, str]:
    """Dotted field path of a pydantic error; validator messages may name a sub-field first. The
    source tag pydantic puts after `data` (`data.npz.path`) is left out: users wrote `data.path`."""
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "data" and p in DATA_SOURCES)]
    prefix, sep, rest = msg.partition(": ")
    if sep and prefix.replace("_", "").replace(".", "").isalnum() and " " not in prefix:
        parts.append(prefix)
        msg = rest
    return ".".join(parts) or "<top level>", msg


def _format_errors(path: Path, err: ValidationError) -> str:
    """Every error of a recipe on one line: `<file>: <field>: <why>; <field>: <why> ...`."""
    lines, listed = [], set()
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        field, msg = _field_name(tuple(e["loc"]), msg)
        source = _source_block(tuple(e["loc"]))
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            field, msg = field + ".source", _source_choice(e.get("input"))
        elif source and e["type"] in ("extra_forbidden", "missing"):
            msg = _source_field(e["type"], source, field.rsplit(".", 1)[-1], listed)
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and level)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{field}: {msg}")
    return f"{path}: " + "; ".join(" ".join(line.split()) for line in lines)


def _source_block(loc: tuple[Any, ...]) -> str | None:
    """The source whose data block holds the erring key itself (`data.<tag>.<key>`), if any."""
    if len(loc) >= 3 and loc[-3] == "data" and loc[-2] in DATA_SOURCES:
        return str(loc[-2])
    return None


def _source_choice(block: Any) -> str:
    tag = block.get("source") if isinstance(block, dict) else None
    return f"one of {', '.join(DATA_SOURCES)}" + (" is required" if tag is None else f" (got {tag!r})")


_SOURCE_HINTS = {("npz", "group_by"): "; npz reads patients from '<split>_group' arrays"}


def _source_field(kind: str, source: str, key: str, listed: set[str]) -> str:
    """A key the source lacks or needs; the source's fields are listed once per message."""
    if kind == "missing":
        return f"required for the {source} source"
    msg = f"unknown key for the {source} source{_SOURCE_HINTS.get((source, key), '')}"
    if source not in listed:
        listed.add(source)
        msg += f" (its fields: {', '.join(DATA_SOURCES[source].model_fields)})"
    return msg


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expandvars(os.path.expanduser(str(p))))
    return p if p.is_absolute() else (base / p).resolve()


def parse_override(text: str) -> tuple[str, Any]:
    """`privacy.target_epsilon=1` → ("privacy.target_epsilon", 1.0); the value is YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text}: expected FIELD=VALUE, e.g. privacy.target_epsilon=1")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({e})") from None


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of a raw recipe mapping with dotted fields set."""
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {dotted}: '{k}' is not a section")
        node[keys[-1]] = value
    return out


def smoke_overrides(raw: dict) -> dict[str, Any]:
    """Shrink a recipe to seconds on the same real data: a tiny model, a few steps, a few
    hundred images. For CI and for checking a recipe end to end; the numbers mean nothing.
    The sizes are the models' own: each field's `smoke` (set to) or `smoke_at_most` (capped at)."""
    return {"name": f"{raw.get('name', 'recipe')}-smoke", **_smoke_sizes(Recipe, raw, "")}


def _smoke_sizes(model: type[BaseModel], raw: dict, prefix: str) -> dict[str, Any]:
    """The smoke values of `model`'s fields, and of the blocks under it that the recipe has (or
    that exist by default); a block's own `smoke` mapping overrides those of its fields."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        smoke, value = extra.get("smoke"), raw.get(name)
        if "smoke_at_most" in extra:
            out.update(_capped(prefix + name, field, value, extra["smoke_at_most"]))
        block = _block_model(field, value)
        if block is None:
            if "smoke" in extra and not isinstance(smoke, dict):  # a dict sizes a block the recipe lacks
                out[prefix + name] = smoke
            continue
        out.update(_smoke_sizes(block, value if isinstance(value, dict) else {}, f"{prefix}{name}."))
        out.update({f"{prefix}{name}.{k}": v for k, v in (smoke or {}).items()})
    return out


def _capped(key: str, field: Any, value: Any, cap: int) -> dict[str, Any]:
    """`key` capped at `cap`: the recipe's number, else the field's default; a value that is no
    number (or a required field left out) is left for validation to report."""
    if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
        return {}
    if value is None and (field.is_required() or field.get_default() is None):
        return {}
    current = value if value is not None else field.get_default()
    return {key: min(cap, current)}


def _block_model(field: Any, value: Any) -> type[BaseModel] | None:
    """The model of a nested block the recipe has (a mapping) or gets by default; for `data`, the
    model of the source it names."""
    if value is None and not field.is_required() and field.get_default(call_default_factory=True) is None:
        return None  # an optional block the recipe leaves out
    if value is not None and not isinstance(value, dict):
        return None
    return _block_model_of(field.annotation, value or {})


def _block_model_of(annotation: Any, value: dict) -> type[BaseModel] | None:
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    args = typing.get_args(annotation)
    if any(a in DATA_SOURCES.values() for a in args):
        return DATA_SOURCES.get(value.get("source"))
    models = [m for a in args if (m := _block_model_of(a, value)) is not None]
    return models[0] if models else None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, smoke: bool = False) -> Recipe:
    """Read and validate a recipe (with `--set` overrides and the smoke variant applied);
    input paths come back absolute and checked to exist."""
    path = Path(path)
    raw = _read_mapping(path)
    if smoke:
        raw = apply_overrides(raw, smoke_overrides(raw))
    if overrides:
        raw = apply_overrides(raw, overrides)
    return _validated(raw, path)


def load_run_recipe(path: str | Path) -> Recipe:
    """A run directory's recipe.yaml. Runs started before the data block was split by source
    recorded every source's fields; those its source never read are dropped, and the recipe keeps
    the hash the run recorded (its checkpoints and records name that hash)."""
    path = Path(path)
    raw = _read_mapping(path)
    recorded = _canonical_sha256(raw)
    dropped = drop_fields_the_source_never_read(raw)
    recipe = _validated(raw, path)
    if dropped:
        recipe._sha256_as_recorded = recorded
    return recipe


def drop_fields_the_source_never_read(raw: dict) -> list[str]:
    """Remove, in place, the keys of `data` and `pretrain.data` that their source has no field
    for (a run recorded before the data block was split by source holds them all); the dotted
    keys removed."""
    pretrain = raw.get("pretrain") if isinstance(raw.get("pretrain"), dict) else {}
    dropped = []
    for prefix, block in (("data", raw.get("data")), ("pretrain.data", pretrain.get("data"))):
        if isinstance(block, dict) and block.get("source") in DATA_SOURCES:
            for key in sorted(set(block) - set(DATA_SOURCES[block["source"]].model_fields)):
                del block[key]
                dropped.append(f"{prefix}.{key}")
    return dropped


def _validated(raw: dict, path: Path) -> Recipe:
    """The recipe mapping validated, its input paths made absolute and checked to exist."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_errors(path, e)) from None
    return _with_input_paths_resolved(recipe, path)


def _read_mapping(path: Path) -> dict:
    """The recipe file's YAML, which must be a mapping of fields."""
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: <top level>: a recipe is a YAML mapping of fields")
    return raw


def _with_input_paths_resolved(recipe: Recipe, path: Path) -> Recipe:
    """The recipe with its input paths (data, pretrain.data, pretrain.checkpoint) made absolute
    against the recipe's folder and checked to exist."""
    base = path.resolve().parent
    update: dict[str, Any] = {"data": _existing_data_paths(recipe.data, "data", path, base)}
    pre = recipe.pretrain
    if pre is not None:
        pre_update: dict[str, Any] = {}
        if pre.data is not None:
            pre_update["data"] = _existing_data_paths(pre.data, "pretrain.data", path, base)
        if pre.checkpoint is not None:
            pre_update["checkpoint"] = _checked_checkpoint(
                _existing_path(pre.checkpoint, "pretrain.checkpoint", path, base), path
            )
        update["pretrain"] = pre.model_copy(update=pre_update)
    return recipe.model_copy(update=update)


def _existing_path(p: Path | None, field: str, recipe_path: Path, base: Path) -> Path | None:
    """`p` made absolute against `base` (the recipe's folder); RecipeError unless it exists."""
    try:
        p = _resolve(base, p)
        exists = p is None or p.exists()
    except (ValueError, OSError) as e:  # a NUL byte, a name too long, ...
        raise RecipeError(f"{recipe_path}: {field}: not a usable path ({e})") from None
    if not exists:
        raise RecipeError(f"{recipe_path}: {field}: no such file or folder: {p}")
    return p


def _existing_data_paths(data: DataConfig, prefix: str, recipe_path: Path, base: Path) -> DataConfig:
    paths = {
        k: _existing_path(getattr(data, k), f"{prefix}.{k}", recipe_path, base)
        for k in ("path", "labels_csv")
        if k in type(data).model_fields
    }
    return data.model_copy(update=paths)


def _checked_checkpoint(ckpt: Path, recipe_path: Path) -> Path:
    """pretrain.checkpoint must be a diffusers model folder with safetensors weights."""
    if not (ckpt / "config.json").is_file():
        raise RecipeError(
            f"{recipe_path}: pretrain.checkpoint: {ckpt} is not a diffusers model folder (no config.json)"
        )
    if not any(ckpt.glob("diffusion_pytorch_model*.safetensors")):
        raise RecipeError(
            f"{recipe_path}: pretrain.checkpoint: {ckpt} has no safetensors weights "
            "(diffusion_pytorch_model.safetensors); other formats are not loaded"
        )
    return ckpt


def check_against_data(recipe: Recipe, recipe_path: str | Path, n_train: int) -> None:
    """Checks that need the data (class names are checked by the data layer). Raises RecipeError."""
    if n_train < 2:
        raise RecipeError(f"{recipe_path}: data: the training split holds {n_train} images")
    delta = recipe.privacy.delta
    if recipe.privacy.enabled and delta is not None and delta >= 1 / n_train:
        raise RecipeError(
            f"{recipe_path}: privacy.delta: {delta:g} must be below 1/N = 1/{n_train} "
            f"= {1 / n_train:.3g} (N = private training images); pick e.g. {0.1 / n_train:.1g}"
        )
    steps = recipe.training.total_steps(n_train)
    if steps > MAX_STEPS:
        raise RecipeError(
            f"{recipe_path}: training.epochs: {steps:.3g} steps planned, more than {MAX_STEPS:,} at this batch size"
        )
    if recipe.training.expected_batch_size > n_train:
        raise RecipeError(
            f"{recipe_path}: training.expected_batch_size: {recipe.training.expected_batch_size} "
            f"exceeds the {n_train} training images"
        )
