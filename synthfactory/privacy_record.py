"""privacy.json: the run's ledger read out for one run, with what ε covers and what it does not.

Built only from the ledger (ledger.py) and the accountant (privacy.py): the history ε is computed
from is the ledger's composed history, in ledger order, ending with this run's DP-SGD; the warm
start, the earlier runs a checkpoint or a data set brought in, and whether each composes are the
ledger's mechanisms. The cards, the audit's and the release's privacy blocks read this record.
"""

from __future__ import annotations

from .data import ImageSet
from .ledger import Ledger, Mechanism, epsilon_alone, lineage
from .privacy import epsilon_of, opacus_version
from .recipe import Recipe
from .records import PRIVACY_SCHEMA

COVERED_BY_EPSILON = [
    "the generator's weights (checkpoints/final: the last and the EMA weights)",
    "every image drawn from it: the whole sample store, generated from public seeds before the "
    "audit, and so each released image with its label, run id, sample seed and sample index",
]
NOT_COVERED_BY_EPSILON = [
    "which samples the memorization audit withheld: the audit compares every sample with the "
    "private training images after training, so which of them are released depends on those "
    "images beyond ε; the published generator (covered by ε) can draw the withheld ones again",
    "the audit's statistics (thresholds, distance percentiles, counts flagged, the data-copying "
    "test, the membership attack) and the evaluation's figures, all computed from real images",
    "the number of private training images N, which sets q = B/N (DP-SGD treats it as public)",
    "floating-point and timing side channels of the sampler and noise (Opacus secure_mode is not used)",
]
FROM_A_RELEASE = (
    "which samples an earlier run's audit withheld from the synthfactory release used as public "
    "pre-training data (that selection read its private images beyond its ε)"
)
SEEDED_WARNING = (
    "NOT PRIVATE: privacy.noise_seed seeds the DP noise and the Poisson sampling; anyone who "
    "knows the seed can regenerate the noise and subtract it, so the accountant's ε is no guarantee"
)
UNGUARDED_WARNING = (
    "NOT PRIVATE: an earlier run this one starts from trained on this run's data WITHOUT a DP "
    "guarantee (see ledger)"
)


def data_description(recipe: Recipe, images: ImageSet) -> str:
    """How the ledger describes a run's private data (no file name; counts only)."""
    return (
        f"the private {recipe.modality} images of synthfactory recipe '{recipe.name}' "
        f"({recipe.data.source} source, {len(images.manifest)} images in training and held-out)"
    )


def privacy_record(
    recipe: Recipe,
    images: ImageSet,
    ledger: Ledger,
    schedule,
    dp_seed_source: str,
    trainable: dict | None = None,
    pretrained: dict | None = None,
) -> dict:
    """privacy.json of a run whose ledger is `ledger` (this run's training last in it); `schedule`
    is train.Schedule (steps planned, q)."""
    items = images.item_ids()
    own = ledger.training()
    composed = ledger.composed(items)
    guarded = all(m.private for m in composed)
    rec = {
        "schema": PRIVACY_SCHEMA,
        "private": recipe.private and guarded,
        "mechanism": _mechanism(recipe),
        "n_train": int(len(images.train_labels)),
        "expected_batch_size": recipe.training.expected_batch_size,
        "sample_rate": schedule.sample_rate,
        "steps_planned": schedule.steps,
        "steps_taken": own.steps if own is not None and own.kind == "dp_sgd" else _plain_steps(own),
        "noise_multiplicity": recipe.privacy.noise_multiplicity if recipe.dp_sgd else 1,
        "per_example_gradients": recipe.privacy.per_example_gradients if recipe.dp_sgd else None,
        "data_manifest_sha256": images.manifest_sha256(),
        "recipe_sha256": recipe.sha256(),
        "preprocessing": images.preprocessing,
        **_inputs(recipe, images, ledger, trainable, pretrained),
        "covered_by_epsilon": COVERED_BY_EPSILON if recipe.private and guarded else [],
        "not_covered_by_epsilon": _not_covered(pretrained),
    }
    if pretrained:
        rec["pretraining"] = pretrained
    delta = recipe.privacy.delta if recipe.dp_sgd else None
    rec["ledger"] = lineage(ledger, items, delta, recipe.privacy.accountant if recipe.dp_sgd else None)
    if not recipe.dp_sgd:
        warning = "NOT PRIVATE: trained WITHOUT differential privacy (no clipping or noise)"
        return {**rec, "epsilon": None, "delta": None, "warning": warning}
    rec.update(_accounting(recipe, ledger, items, dp_seed_source))
    rec.update(_earlier_mechanisms(recipe, ledger, items))
    if not recipe.private:
        rec["warning"] = SEEDED_WARNING
    elif not guarded:
        rec["warning"] = UNGUARDED_WARNING
    return rec


def _plain_steps(own: Mechanism | None) -> int:
    return int((own.detail if own else {}).get("steps", 0))


SCREENED = (
    "that the data declared public for pre-training passed the screen against the private images "
    "(training and held-out): the screen reads them before training"
)


def _not_covered(pretrained: dict | None) -> list[str]:
    pretrained = pretrained or {}
    out = list(NOT_COVERED_BY_EPSILON)
    if pretrained.get("kind") == "data":
        out.append(SCREENED)
    if pretrained.get("from_release"):
        out.append(FROM_A_RELEASE)
    return out


def _mechanism(recipe: Recipe) -> str:
    if not recipe.dp_sgd:
        return "NOT PRIVATE: plain SGD (Adam), no clipping or noise"
    mechanism = f"DP-SGD (Opacus {opacus_version()}): per-example clipping, Gaussian noise, Poisson sampling"
    if not recipe.private:
        mechanism += "; noise and sampling SEEDED from the recipe (privacy.noise_seed): NOT PRIVATE"
    return mechanism


def _inputs(
    recipe: Recipe, images: ImageSet, ledger: Ledger, trainable: dict | None, pretrained: dict | None
) -> dict:
    """What the model learnt from: public inputs, and the private ones ε covers."""
    pretrained = pretrained or {}
    public = ["model architecture and hyper-parameters from the recipe (no data)"]
    if pretrained.get("statement"):
        public.append(pretrained["statement"])
    split = getattr(recipe.data, "train_split", "train")
    private = {
        "data": f"the '{split}' split of the {recipe.data.source} source "
        f"({len(images.train_labels)} images, classes {images.class_names})",
        "trained_parameters": trainable,
    }
    ws = ledger.warm_start()
    if ws is not None:
        private["warm_start"] = ws.detail.get("mechanism")
    return {"public_inputs": public, "private_inputs": private}


def _accounting(recipe: Recipe, ledger: Ledger, items, dp_seed_source: str) -> dict:
    """ε from the accountant for the composed history, the steps taken included (and the other
    accountant's figure beside it)."""
    delta, acc = recipe.privacy.delta, recipe.privacy.accountant
    other = "prv" if acc == "rdp" else "rdp"
    history = ledger.history(items)
    own = ledger.training()
    return {
        "accountant": acc,
        "target_epsilon": recipe.privacy.target_epsilon,
        "delta": delta,
        "epsilon": epsilon_of(history, delta, acc),
        "epsilon_other_accountant": {other: epsilon_of(history, delta, other)},
        # σ as the ledger recorded it for this run's steps, not the plan's
        "noise_multiplier": own.history[0][0] if own is not None and own.history else None,
        "max_grad_norm": recipe.privacy.max_grad_norm,
        "accountant_history": [list(h) for h in history],
        "dp_randomness": dp_seed_source,
    }


def _earlier_mechanisms(recipe: Recipe, ledger: Ledger, items) -> dict:
    """The mechanisms composed before DP-SGD: the warm start's query, earlier runs' mechanisms."""
    delta, acc = recipe.privacy.delta, recipe.privacy.accountant
    out = {}
    ws = ledger.warm_start()
    if ws is not None:
        out["warm_start"] = {
            **{k: v for k, v in ws.detail.items() if k != "answer_sha256"},
            "accountant_history": [list(h) for h in ws.history],
            "epsilon_alone": epsilon_alone(ws, delta, acc),
            "reading": "one Gaussian-mechanism query of the per-class mean images before DP-SGD; its "
            "entry (σ, q = 1, 1 step) precedes DP-SGD's in accountant_history, DP-SGD's σ was "
            "calibrated for the composed ε, and epsilon is the composed ε",
        }
    earlier = [m for m in ledger.composed(items) if m.via is not None]
    if earlier:
        history = [h for m in earlier for h in m.history]
        out["composed_with"] = {
            "run_ids": sorted({m.run_id for m in earlier}),
            "run_id": earlier[0].run_id,
            "mechanisms": len(earlier),
            "accountant_history": [list(h) for h in history],
            "epsilon_alone": epsilon_of(history, delta, acc),
            "reading": "this run started from a checkpoint or data set whose ledger holds these "
            "mechanisms on data not shown to be other than this run's; their history is the first "
            "part of accountant_history, and epsilon is the composed ε",
        }
    return out
