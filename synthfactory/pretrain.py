"""The stage before DP-SGD, written to checkpoints/pretrained/ (unet/ with its ledger,
pretrain.json): public pre-training, then the DP warm start, in that order, as the recipe asks.

- Public pre-training: `pretrain.checkpoint` loaded, or `pretrain.data` (declared public and
  screened by public.py) trained on without DP. What either brings in is written to the run's
  ledger *before* it is used: the ledger of a synthfactory checkpoint, or of the synthfactory
  release the data came from; each of its mechanisms composes into this run's ε unless its data
  is shown to be disjoint from this run's (ledger.verdict), and a run that is to be private is
  refused when a mechanism that composes carries no DP guarantee.
- The DP warm start (warmstart.py): its query answered once, ledger first, then trained on.

`planned_ledger` is what this stage will write, known before anything runs: `validate`, `plan`
and the σ a run is created with read it; training reads the ledger the stage did write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import warmstart
from .data import ImageSet
from .ledger import (
    DataIdentity,
    Ledger,
    Mechanism,
    RunLedger,
    Verdict,
    mark_weights,
    new_data_identity,
    new_id,
    read_artifact,
    verdict,
    write_artifact,
)
from .model import load_unet, null_class, resolve_device, seeded_unet, weights_sha256
from .privacy_record import data_description
from .recipe import Recipe
from .rundir import RunDir, atomic_directory, write_json_atomic
from .steps import plain_training


@dataclass
class PublicData:
    """`pretrain.data` as the run uses it: the images, what they are to this run (a synthfactory
    release composes; anything else is declared public by the recipe) and the near-copy screen's
    record (public.py)."""

    images: ImageSet
    verdict: Verdict
    screen: dict


def checkpoint_verdict(recipe: Recipe, images: ImageSet) -> Verdict | None:
    """What `pretrain.checkpoint` is to this run (LedgerRefused where it may not start it)."""
    if recipe.pretrain is None or recipe.pretrain.checkpoint is None:
        return None
    carried = read_artifact(recipe.pretrain.checkpoint)
    return verdict(carried, "the checkpoint", images.item_ids(), recipe.private)


def planned_ledger(recipe: Recipe, images: ImageSet, brought: list[Verdict]) -> Ledger:
    """The ledger this run's pre-training stage will have written when DP-SGD starts: its data,
    the ledgers `brought` in (a checkpoint's, a release's), and the warm start's query if the
    recipe asks for one."""
    own = DataIdentity("planned", "this run's private data", len(images.item_ids()), images.item_ids())
    ledger = Ledger(datasets={own.key: own}, own_data=own.key)
    for v in brought:
        ledger.merge(v.ledger, via="planned")
    if recipe.warm_start is not None:
        ledger.add(
            Mechanism("planned:warm_start", "warm_start", "planned", own.key,
                      tuple(warmstart.history(recipe.warm_start)), recipe.privacy.noise_seed is None)
        )  # fmt: skip
    return ledger


def pretrain(
    recipe: Recipe, images: ImageSet, public: PublicData | None, run_dir: RunDir, progress: bool = True
) -> dict:
    """Run the stage and write checkpoints/pretrained/ (the weights with the run's ledger as it
    stands, and pretrain.json). Returns pretrain.json."""
    device = resolve_device(recipe.training.device)
    ledger = RunLedger(run_dir.ledger)
    own = ledger.own_data(images.item_ids(), data_description(recipe, images))
    model = seeded_unet(recipe, images.image_size, len(images.class_names))
    record: dict = {"kind": "warm_start", "statement": None}
    if recipe.pretrain is not None:
        record = _public_stage(model, recipe, images, public, ledger, device, progress, run_dir)
    if recipe.warm_start is not None:
        asker = warmstart.Asker(run_dir.central_images, ledger, run_dir.run_id, own.key)
        replay = public_examples(recipe, images, public) if recipe.warm_start.public_replay else None
        record["warm_start"] = warmstart.train_on_answer(
            model, recipe, images, asker, device, progress, replay, run_dir.stage_state("warm_start")
        )
    model.to("cpu").eval()
    with atomic_directory(run_dir.pretrained) as tmp:
        model.save_pretrained(tmp / "unet")
        mark_weights(tmp / "unet", run_dir.run_id)
        write_artifact(tmp / "unet", ledger.read())
        write_json_atomic(tmp / "pretrain.json", record)
    for stage in ("public", "warm_start"):
        run_dir.stage_state(stage).unlink(missing_ok=True)
    return record


def _public_stage(
    model, recipe: Recipe, images: ImageSet, public: PublicData | None, ledger: RunLedger, device, progress,
    run_dir: RunDir,
) -> dict:  # fmt: skip
    """Load `pretrain.checkpoint` into the model, or train it on `pretrain.data` without DP; the
    ledger each brings is written first. Returns pretrain.json's record."""
    cfg = recipe.pretrain
    assert cfg is not None
    if cfg.checkpoint is not None:
        use = checkpoint_verdict(recipe, images)
        assert use is not None
        if use.ledger.mechanisms:
            ledger.bring_in(use.ledger, via="pretrain.checkpoint")
        model.load_state_dict(load_unet(cfg.checkpoint).state_dict())
        digest = weights_sha256(Path(cfg.checkpoint))
        return {
            "kind": "checkpoint",
            "checkpoint": str(cfg.checkpoint),  # internal (pretrain.json); no card prints it
            "weights_sha256": digest,
            "origin": use.kind,
            "statement": f"initial weights from a checkpoint (weights sha256 {digest[:12]}): {use.statement}",
        }
    assert public is not None
    if public.verdict.ledger.mechanisms:
        ledger.bring_in(public.verdict.ledger, via="pretrain.data")
    _record_public_data(ledger, recipe, public, run_dir.run_id)
    return _train_on_public(model, recipe, images, public, device, progress, run_dir.stage_state("public"))


def _record_public_data(ledger: RunLedger, recipe: Recipe, public: PublicData, run_id: str) -> None:
    """The pre-training on data declared public, as a ledger entry with that data's identity: no
    DP mechanism (nothing composes), but a later run on other private data, which this run's
    screen never compared it with, must see what these weights were trained on without DP."""
    data = new_data_identity(
        public.images.item_ids(), f"data declared public by recipe '{recipe.name}' ({recipe.pretrain.data.source} source)",
        declared_public=True,
    )  # fmt: skip
    ledger.record_dataset(data)
    what = f"pre-training without DP for {recipe.pretrain.steps} steps on {len(public.images.train_labels)} images"
    ledger.record(
        Mechanism(new_id(run_id, "public_data"), "public_data", run_id, data.key, (), False, {"what": what})
    )


def public_examples(
    recipe: Recipe, images: ImageSet, public: PublicData | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The declared-public training images and the labels they are trained with: their own
    classes when they are the private ones, else the null label (class-agnostic)."""
    assert public is not None, "pretrain.data is needed (the recipe check says so)"
    data = public.images
    labels = torch.from_numpy(data.train_labels)
    if data.class_names != images.class_names:
        labels = torch.full_like(labels, null_class(recipe, len(images.class_names)))
    return torch.from_numpy(data.train_images), labels


def classes_from_null(model, n_classes: int) -> None:
    """Set every class's row of the class embedding to the null label's row (index n_classes), the
    only one a class-agnostic stage trained: each class then starts as the public prior."""
    with torch.no_grad():
        weight = model.class_embedding.weight
        weight[:n_classes] = weight[n_classes]


def _train_on_public(
    model, recipe: Recipe, images: ImageSet, public: PublicData, device, progress, state: Path
) -> dict:
    """Non-private training on the declared-public images (class-conditional when their classes
    are the private ones, else with the null label); it resumes from `state` if killed."""
    cfg = recipe.pretrain
    n_classes = len(images.class_names)
    data = public.images
    conditional = data.class_names == images.class_names
    x_all, labels = public_examples(recipe, images, public)
    n = len(x_all)
    batch = min(cfg.expected_batch_size, n)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(n, generator=gen)[:batch]
        return x_all[idx], labels[idx]

    plain_training(
        model, recipe, n_classes, device, (cfg.steps, cfg.learning_rate, cfg.seed), draw, progress, state
    )
    from_null = not conditional and cfg.class_embeddings == "from_null"
    if from_null:
        classes_from_null(model, n_classes)
    release = public.verdict.kind == "composed"
    statement = (
        f"pre-training without DP on {n} images from the {cfg.data.source} source, "
        + (
            "a synthfactory release (its ledger composed into ε; see ledger)"
            if release
            else "declared public by the recipe"
        )
        + f" ({cfg.steps} steps; "
        + ("class-conditional" if conditional else "class-agnostic, null label")
        + ("; every class's embedding then set to the null label's" if from_null else "")
        + "); screened against every private image, training and held-out: no copy or near-copy found"
    )
    return {
        "kind": "data",
        "source": cfg.data.source,
        "path": str(cfg.data.path) if getattr(cfg.data, "path", None) else None,  # internal
        "n_images": n,
        "classes": data.class_names,
        "class_conditional": conditional,
        "class_embeddings": "from_null" if from_null else ("trained" if conditional else "random"),
        "steps": cfg.steps,
        "manifest_sha256": data.manifest_sha256(),
        "from_release": release,
        "screen": public.screen,
        "statement": statement,
    }
