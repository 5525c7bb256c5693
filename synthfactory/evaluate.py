"""Is the released synthetic set worth using? Utility, fidelity and diversity against real data.

- TSTR / TRTR: one fixed CNN classifier (below) trained on the released synthetic set and,
  beside it, on the real training split; both tested on the real held-out split, each trained
  with `evaluation.classifier_seeds` seeds and reported as the mean with every seed beside it (one
  classifier trained on a few hundred synthetic images can put the same samples anywhere between
  0.26 and 1.00 above chance: the seed alone decides where the real images of a class fall). Model selection
  (early stopping) uses a validation split of each one's *own* training data, never the real test
  split (DPImageBench's rule). Reported: accuracy, macro one-vs-rest AUC, per-class recall, the
  TSTR/TRTR ratio, bootstrap 95 % intervals (over patients where ids exist) and each
  classifier's training curve.
- Fidelity: Fréchet distance and precision/recall/density/coverage (Naeem et al. 2020, k nearest
  neighbours) between synthetic and real held-out images, in the feature space of the TRTR
  classifier's penultimate layer. Why that space: it is available offline (no download), it is
  trained on this modality and these classes (an ImageNet network knows neither grayscale CT nor
  ultrasound), and it is fixed before the synthetic set is looked at. A real-vs-real Fréchet
  distance (training against held-out images) is reported beside it as the scale.
- Diversity: the share of synthetic samples whose nearest *other* synthetic sample is at or
  below the audit threshold (as close as a suspected copy would be to a training image).

Everything here reads the run directory (release only through `export.audited_set`, so only
audited samples are evaluated) and the real images; it writes `evaluation.json` (aggregate
numbers only, no pixels) to the run directory and beside the audit report.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from . import __version__
from .audit import quantize
from .audit.nearest import nearest_neighbours
from .data import ImageSet
from .data.common import random_subset
from .export import audited_set
from .metrics import auc_one_vs_rest
from .recipe import ClassifierConfig, EvaluationConfig, Recipe
from .records import EVALUATION_SCHEMA, AuditRecord, EvaluationRecord, PrivacyRecord
from .rundir import RunDir
from .sample import uint8_to_model_range
from .templating import environment

log = logging.getLogger(__name__)


# --- the classifier -------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A small VGG-style CNN (about 0.3M parameters): three conv stages with batch norm, a 2×2
    pooled map (not a single global average, which underfits these sets), a 128-d penultimate
    layer (the fidelity feature space) and a linear head."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            # momentum=None: running statistics are the plain average since the last reset, which
            # train_classifier does at every epoch, so they match the weights being validated.
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out, momentum=None),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(512, 128), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translation by up to max_px pixels (no flips: left/right carry meaning here)."""
    pad = F.pad(x, (max_px,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_px + 1, (2,), generator=gen).tolist()
    return pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train indices, validation indices)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


@torch.no_grad()
def predict(model: Classifier, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [N, C], penultimate features [N, 128])."""
    model.eval()
    probs, feats = [], []
    for a in range(0, len(x), batch):
        xb = torch.from_numpy(x[a : a + batch])
        f = model.features(xb)
        probs.append(model.head(f).softmax(1).numpy())
        feats.append(f.numpy())
    return np.concatenate(probs), np.concatenate(feats)


def _validation(model: Classifier, x: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy and mean cross-entropy on the validation images (NaN without any)."""
    if not len(y):
        return {"val_accuracy": float("nan"), "val_loss": float("nan")}
    probs = predict(model, x)[0]
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()
    return {"val_accuracy": float((probs.argmax(1) == y).mean()), "val_loss": float(loss)}


def _improves(val: dict, best: dict | None, rule: str) -> bool:
    """Whether this epoch's validation beats the kept one under `classifier.early_stopping`. Without
    a validation split every epoch does: the classifier trains to its last epoch."""
    if best is None or np.isnan(val["val_loss"]):
        return True
    if rule == "val_loss":
        return val["val_loss"] < best["val_loss"]
    return val["val_accuracy"] > best["val_accuracy"]


def train_classifier(
    x: np.ndarray, y: np.ndarray, n_classes: int, cfg: ClassifierConfig, val_fraction: float
) -> tuple[Classifier, dict]:
    """Train on (x, y) with early stopping on a stratified validation split of (x, y) itself.
    Deterministic for a seed: initialisation, shuffling, shifts and dropout all draw from it, not
    from the process's global random state."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return _train_classifier(x, y, n_classes, cfg, val_fraction)


def _train_classifier(
    x: np.ndarray, y: np.ndarray, n_classes: int, cfg: ClassifierConfig, val_fraction: float
) -> tuple[Classifier, dict]:
    tr, va = split_validation(y, val_fraction, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Classifier(n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    curve, best, best_state, waited = [], None, None, 0
    for epoch in range(cfg.epochs):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        order = torch.randperm(len(xt), generator=gen)
        correct, seen = 0, 0
        for a in range(0, len(order), cfg.batch_size):
            idx = order[a : a + cfg.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two examples
            logits = model(_shift(xt[idx], gen))
            loss = F.cross_entropy(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == yt[idx]).sum())
            seen += len(idx)
        val = _validation(model, x[va], y[va])
        curve.append({"epoch": epoch + 1, "train_accuracy": correct / max(seen, 1), **val})
        if _improves(val, best, cfg.early_stopping):
            best, waited = curve[-1], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    info = {
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "epochs_run": len(curve),
        "early_stopping": cfg.early_stopping,
        "best_epoch": best["epoch"] if best else None,
        "best_val_accuracy": best["val_accuracy"] if best else float("nan"),
        "best_val_loss": best["val_loss"] if best else float("nan"),
        "curve": curve,
    }
    return model.eval(), info


# --- metrics --------------------------------------------------------------------------------------


def classification_metrics(probs: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    pred = probs.argmax(1)
    aucs = [auc_one_vs_rest(probs[:, c], y == c) for c in range(len(class_names))]
    recall = {
        name: float((pred[y == c] == c).mean()) if (y == c).any() else float("nan")
        for c, name in enumerate(class_names)
    }
    return {
        "accuracy": float((pred == y).mean()),
        "macro_auc": float(np.nanmean(aucs)),
        "per_class_recall": recall,
        "chance_accuracy": float(np.bincount(y, minlength=len(class_names)).max() / len(y)),
    }


def above_chance(tstr, trtr, chance):
    """(TSTR − chance)/(TRTR − chance), elementwise: 0 for a classifier no better than always
    answering the majority class (which the plain ratio can hide on an imbalanced test split), 1
    for TSTR = TRTR; NaN where TRTR itself is at chance."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(trtr > chance, np.subtract(tstr, chance) / np.subtract(trtr, chance), np.nan)


def bootstrap_intervals(
    tstr_pred: np.ndarray, trtr_pred: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n: int, seed: int
) -> dict | None:
    """95 % percentile intervals of TSTR and TRTR accuracy and of above chance, both classifiers
    scored on the same resample of the held-out split (scipy.stats.bootstrap, paired); with
    predictions of several classifier seeds ([seeds, n]) a unit's hits are their mean. With
    patient ids the resampled unit is the patient (a cluster bootstrap: slices of one patient are
    not independent); without, the image. Chance in a resample is the share of the held-out
    split's majority class in it (the baseline always answers that class). Above chance is
    undefined in a resample where TRTR is not above chance: those are left out of its interval
    and counted. The interval covers the test set's sampling only, not the DP noise of training
    (for that, the shipped recipes report two DP runs). None with fewer than two held-out units."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    units = np.unique(groups, return_inverse=True)[1] if groups is not None else np.arange(len(y))
    n_units, n_classes = int(units.max()) + 1, int(y.max()) + 1
    if n_units < 2:  # one held-out patient: nothing to resample
        return None
    # Per unit: correct answers of each classifier and images per class; a resample sums units.
    # Predictions may be [seeds, n]: a unit's hits are then the mean over the classifier seeds.
    tstr_hits = np.bincount(units, weights=(np.atleast_2d(tstr_pred) == y).mean(0), minlength=n_units)
    trtr_hits = np.bincount(units, weights=(np.atleast_2d(trtr_pred) == y).mean(0), minlength=n_units)
    majority = np.bincount(
        units, weights=(y == np.bincount(y, minlength=n_classes).argmax()), minlength=n_units
    )
    sizes = np.bincount(units, minlength=n_units).astype(float)

    def stats(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        total = sizes[idx].sum(axis)
        tstr, trtr = tstr_hits[idx].sum(axis) / total, trtr_hits[idx].sum(axis) / total
        return np.stack([tstr, trtr, above_chance(tstr, trtr, majority[idx].sum(axis) / total)])

    with warnings.catch_warnings():  # NaN resamples warn; they are counted and left out below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            (np.arange(n_units),), stats, n_resamples=n, vectorized=True, method="percentile",
            confidence_level=0.95, random_state=np.random.default_rng(seed),
        )  # fmt: skip
    dist = res.bootstrap_distribution  # [3, n]: scipy's percentile interval would be NaN with one NaN
    lo, hi = np.nanpercentile(dist, [2.5, 97.5], axis=-1)
    names = ("tstr_accuracy", "trtr_accuracy", "tstr_over_trtr_above_chance")
    return {
        "confidence_level": 0.95,
        "resamples": n,
        "unit": "patient" if groups is not None else "image",
        "n_units": n_units,
        **{k: [float(a), float(b)] for k, a, b in zip(names, lo, hi, strict=True)},
        "above_chance_undefined_resamples": int(np.isnan(dist[2]).sum()),
        "covers": "the held-out split's sampling only, not the DP noise of training",
    }


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled below
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            eps = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Precision, recall, density, coverage (Naeem et al. 2020) with k-NN balls."""
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    d_rr = torch.cdist(r, r)
    d_ff = torch.cdist(f, f)
    d_rf = torch.cdist(r, f)  # [real, fake]
    radius_r = d_rr.topk(k + 1, dim=1, largest=False).values[:, -1]  # k-th neighbour, self excluded
    radius_f = d_ff.topk(k + 1, dim=1, largest=False).values[:, -1]
    inside = d_rf <= radius_r[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside.any(0).double().mean()),
        "recall": float((d_rf <= radius_f[None, :]).any(1).double().mean()),
        "density": float(inside.double().sum(0).mean() / k),
        "coverage": float(inside.any(1).double().mean()),
        "k": k,
    }


# --- the stage ------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    evaluation: dict
    path: Path


@dataclass
class _Fit:
    """One classifier seed: TRTR and TSTR trained with it, and their answers on the test split."""

    seed: int
    trtr_model: Classifier
    test_feats: np.ndarray  # the TRTR classifier's penultimate features of the test split
    probs: dict[str, np.ndarray]  # "trtr" / "tstr" → class probabilities on the test split
    info: dict[str, dict]  # "trtr" / "tstr" → train_classifier's record


def _fit_pair(
    real_x, real_y, synth_x, synth_y, test_x, n_classes: int, cfg: EvaluationConfig, seed: int
) -> _Fit:
    classifier = cfg.classifier.model_copy(update={"seed": seed})
    trtr_model, trtr_info = train_classifier(real_x, real_y, n_classes, classifier, cfg.val_fraction)
    tstr_model, tstr_info = train_classifier(synth_x, synth_y, n_classes, classifier, cfg.val_fraction)
    trtr_probs, test_feats = predict(trtr_model, test_x)
    probs = {"trtr": trtr_probs, "tstr": predict(tstr_model, test_x)[0]}
    return _Fit(seed, trtr_model, test_feats, probs, {"trtr": trtr_info, "tstr": tstr_info})


def _over_seeds(fits: list[_Fit], which: str, y: np.ndarray, names: list[str]) -> dict:
    """The classifier's figures averaged over the seeds (accuracy, macro AUC, per-class recall),
    each seed's own beside them, and the first seed's training curve."""
    runs = [classification_metrics(f.probs[which], y, names) for f in fits]
    return {
        "accuracy": float(np.mean([r["accuracy"] for r in runs])),
        "macro_auc": float(np.mean([r["macro_auc"] for r in runs])),
        "per_class_recall": {n: float(np.mean([r["per_class_recall"][n] for r in runs])) for n in names},
        "chance_accuracy": runs[0]["chance_accuracy"],
        "classifier_seeds": [f.seed for f in fits],
        "per_seed": [
            {
                "seed": f.seed,
                "accuracy": r["accuracy"],
                "macro_auc": r["macro_auc"],
                "per_class_recall": r["per_class_recall"],
                "epochs_run": f.info[which]["epochs_run"],
                "best_val_accuracy": f.info[which]["best_val_accuracy"],
            }
            for f, r in zip(fits, runs, strict=True)
        ],
        "classifier": fits[0].info[which],
    }


def evaluate_arrays(
    synth_u8: np.ndarray, synth_y: np.ndarray, images: ImageSet, cfg: EvaluationConfig, threshold: float
) -> dict:
    """TSTR/TRTR, fidelity and diversity for 8-bit synthetic images [M, H, W] with labels."""
    names = images.class_names
    n_classes = len(names)
    if len(synth_y) < 2 * n_classes:
        raise ValueError(f"only {len(synth_y)} synthetic samples: too few to train a classifier")

    # The same 8-bit grid as the release, for real and synthetic images alike.
    synth_x = uint8_to_model_range(synth_u8)
    synth_y = synth_y.astype(np.int64)
    keep = random_subset(len(images.train_labels), cfg.max_real_train, cfg.classifier.seed)
    real_x = uint8_to_model_range(quantize(images.train_images[keep]))
    real_y = images.train_labels[keep]
    test_x = uint8_to_model_range(quantize(images.heldout_images))
    test_y = images.heldout_labels

    seeds = [cfg.classifier.seed + i for i in range(cfg.classifier_seeds)]
    fits = [_fit_pair(real_x, real_y, synth_x, synth_y, test_x, n_classes, cfg, s) for s in seeds]
    trtr, tstr = _over_seeds(fits, "trtr", test_y, names), _over_seeds(fits, "tstr", test_y, names)
    intervals = None
    if cfg.bootstrap_resamples:
        intervals = bootstrap_intervals(
            np.stack([f.probs["tstr"].argmax(1) for f in fits]), np.stack([f.probs["trtr"].argmax(1) for f in fits]),
            test_y, images.heldout_groups(), cfg.bootstrap_resamples, cfg.classifier.seed,
        )  # fmt: skip
    trtr_model, test_feats = fits[0].trtr_model, fits[0].test_feats

    # Fidelity in the TRTR classifier's feature space.
    pick = random_subset(len(test_feats), cfg.max_real_features, cfg.classifier.seed + 1)
    real_feats = test_feats[pick]
    synth_feats = predict(trtr_model, synth_x)[1]
    train_pick = random_subset(len(real_x), cfg.max_real_features, cfg.classifier.seed + 2)
    train_feats = predict(trtr_model, real_x[train_pick])[1]
    fidelity = {
        "feature_space": "penultimate layer (128-d) of the TRTR classifier",
        "n_real": int(len(real_feats)),
        "n_synthetic": int(len(synth_feats)),
        "frechet_distance": frechet_distance(real_feats, synth_feats),
        "frechet_distance_real_train_vs_heldout": frechet_distance(real_feats, train_feats),
        **prdc(real_feats, synth_feats, min(cfg.prdc_k, len(synth_feats) - 1, len(real_feats) - 1)),
    }

    # Diversity: near-identical synthetic pairs (mode collapse), on the audit's scale.
    _, nn_synth = nearest_neighbours(synth_x, synth_x, exclude_self=True)
    diversity = {
        "threshold": threshold,
        "threshold_from": "the memorization audit's global pixel-L2 threshold (held-out → train percentile)",
        "share_near_duplicate": float((nn_synth <= threshold).mean()),
        "nn_distance_median": float(np.median(nn_synth)),
    }
    ratio = tstr["accuracy"] / trtr["accuracy"] if trtr["accuracy"] > 0 else float("nan")
    chance = tstr["chance_accuracy"]
    skill = float(above_chance(tstr["accuracy"], trtr["accuracy"], chance))
    per_seed = [
        float(above_chance(a["accuracy"], b["accuracy"], chance))
        for a, b in zip(tstr["per_seed"], trtr["per_seed"], strict=True)
    ]
    return {
        "class_names": names,
        "n_synthetic": int(len(synth_y)),
        "n_real_train": int(len(real_y)),
        "n_real_test": int(len(test_y)),
        "tstr": tstr,
        "trtr": trtr,
        "tstr_over_trtr_accuracy": ratio,
        "tstr_over_trtr_above_chance": skill,
        "above_chance_per_seed": per_seed,
        "intervals": intervals,
        "fidelity": fidelity,
        "diversity": diversity,
    }


def _diversity_threshold(audit: AuditRecord, near_duplicate_rms: float) -> float:
    """The gate's global pixel-L2 threshold; without that space, the audit's near-duplicate rule."""
    t = audit.threshold.get("value")
    if t is not None:
        return float(t)
    h, w = audit.data["image_size"]
    return near_duplicate_rms * float(np.sqrt(h * w))


def evaluate(
    recipe: Recipe, images: ImageSet, run_dir: RunDir, report_dir: Path | None = None
) -> EvaluationResult:
    """Evaluate the released (audited) samples of a run; writes evaluation.json."""
    started = time.perf_counter()
    rs, audit = audited_set(run_dir)
    numbers = evaluate_arrays(
        rs.all_images(),
        rs.labels,
        images,
        recipe.evaluation,
        _diversity_threshold(audit, recipe.audit.threshold.near_duplicate_rms),
    )
    privacy = PrivacyRecord.read(run_dir.privacy)
    evaluation = {
        "schema": EVALUATION_SCHEMA,
        "synthfactory_version": __version__,
        "run_id": run_dir.run_id,
        "recipe_name": recipe.name,
        "recipe_sha256": recipe.sha256(),
        "epsilon": privacy.epsilon,
        "delta": privacy.delta,
        "private": privacy.private,
        **numbers,
        "seconds": round(time.perf_counter() - started, 1),
        "rules": [
            "model selection on a validation split of each classifier's own training data; the real "
            "held-out split is used once, for the reported numbers",
            "all images on the 8-bit grid of the release",
        ],
    }
    record = EvaluationRecord.model_validate(evaluation)
    record.write(run_dir.evaluation)
    if report_dir is not None and report_dir.is_dir():
        record.write(report_dir / "evaluation.json")
        (report_dir / "evaluation.md").write_text(evaluation_markdown(evaluation))
    return EvaluationResult(evaluation, run_dir.evaluation)


def evaluation_markdown(ev: dict) -> str:
    """evaluation.md: the record's figures in words and tables (templates/evaluation.md.j2)."""
    template = environment(markdown=True, strict=True).get_template("evaluation.md.j2")
    return template.render(ev=ev, nan=float("nan"))
