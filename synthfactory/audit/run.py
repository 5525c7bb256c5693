"""The memorization audit of one run, in the order it runs (`run_audit`):

1. `load_inputs`: the samples and the real images on the release's 8-bit grid, and the held-out
   images that may calibrate the gate;
2. `gate_scaled`: every synthetic and background image's nearest training image in each space
   (sharded over torchrun ranks), the gate calibrated on the background, the flags; then `decide`;
3. `neighbour_ratios_sharded`, on every rank, and `generator_checks` on rank 0: the checks of
   the generator as a whole (neighbour ratios, data-copying test, membership attack, canaries);
4. `audit_record` and `write_audit`: audit/audit.json, audit/nearest.npz and the reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import ImageSet
from ..data.common import random_subset
from ..distributed import Dist, from_env
from ..model import load_generator, resolve_device, uses_ema
from ..recipe import AuditConfig, Recipe
from ..records import AUDIT_SCHEMA, AuditRecord, PrivacyRecord
from ..rundir import RunDir
from ..sample import Samples, uint8_to_model_range
from .copying import data_copying_test, neighbour_ratios
from .gate import Calibration, calibrate, decide, ordinal
from .membership import denoising_losses, loss_attack
from .models import canary_result, has_nonprivate_reference
from .nearest import knn_distances_sharded
from .report import write_reports
from .spaces import SPACES, describe, search_sharded

# one space's search against the training images: (space, queries) → (nearest index, score)
Find = Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]


def quantize(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] [N, 1, H, W] → uint8 [N, H, W], as a released image would be stored."""
    return np.round((np.clip(images, -1, 1)[:, 0] + 1.0) * 127.5).astype(np.uint8)


def near_copy(distance: np.ndarray, shape: tuple[int, int], rms: float) -> np.ndarray:
    """The near-duplicate rule: a root-mean-square pixel difference (on the [-1, 1] scale) to the
    nearest training image of at most `rms`, from pixel-L2 distances of [H, W] images."""
    return distance / np.sqrt(shape[0] * shape[1]) <= rms


@dataclass
class AuditResult:
    decision: str  # "release" or "block"
    calibration: Calibration
    flagged: np.ndarray  # bool [M]
    flags: dict[str, np.ndarray]  # per space, bool [M]
    nn_index: np.ndarray  # pixel-L2 nearest training image
    nn_distance: np.ndarray
    report_dir: Path
    audit: dict


LIMITS = [
    "The gate reads the private training images after training: which samples it drops, and "
    "every statistic of this audit, are not covered by ε (no per-sample audit figure is released).",
    "The false-alarm rate is calibrated on held-out images of the same distribution; "
    "the share of genuine synthetic samples it drops is not bounded by it.",
    "Slices of one scan on both sides of the split (not grouped by patient) make held-out "
    "images as close to training images as a disguised copy, which loosens the gate: on the MRI "
    "slice set (no patient ids), gamma-corrected, noised and combined copies, and rotated or "
    "zoomed ones, pass (benchmarks/audit_planted_copies.py), and of copies made by other "
    "libraries 22 % are caught (benchmarks/audit_disguised_copies.py).",
]


CT_RECIPE_SPACES = ("pixel_l2", "lowpass_l2", "warp_ncc", "copy_embedding", "aligned_ncc")


def coverage(spaces: list[str], shift: int, warp_shift: int) -> str:
    """What the audit was measured to catch: copies made with its own edits, with the default
    spaces (benchmarks/audit_planted_copies.py, CT and fetal ultrasound), and copies made with
    other libraries, with the default spaces (ultrasound, MRI) and the CT recipe's
    (benchmarks/audit_disguised_copies.py); and which of the default spaces this audit leaves out."""
    text = (
        f"With the default spaces the audit catches exact, shifted (±{shift} px), flipped, linearly or "
        "monotonically re-contrasted, noised, blurred and JPEG-compressed copies made with its own "
        f"edits, and all of these at once; rotated (±10°), zoomed (±10 %) and further shifted (±{warp_shift} "
        "px) copies 99 % to 100 % of the time, and crops re-zoomed by 10-18 % 95 % to 100 % "
        "(averaged over 200 calibrations on CT and fetal ultrasound). Copies made with other libraries (Pillow, scikit-image; 16 kinds: rotations "
        "up to 15°, zooms of 0.85-1.2, crops of 80-85 % resized back, elastic warps, compositions "
        "of several edits) are caught mostly by aligned_ncc, which registers the copy descriptor's "
        "shortlist onto each sample: 98 % on fetal ultrasound with the default spaces and 94 % on "
        "CT with the CT recipe's (every kind 90 % to 100 %, except 6 px edge-filled shifts with "
        "blur, 65-80 %, and crops of 80 % resized back on CT, 75 %), at 0.5-1.3 % false alarms; "
        "on MRI slices without patient ids 22 %: there the held-out slices that calibrate the "
        "gate, some of them the same slice as a training image at another crop, are as close as "
        "the copies."
    )
    missing = [n for n in AuditConfig().spaces if n not in spaces]
    if not missing or set(spaces) >= set(CT_RECIPE_SPACES):
        return text
    return (
        f"{text} This audit leaves out {', '.join(missing)}: the figures above were measured with "
        "all of the default spaces (and, on CT, with the CT recipe's "
        f"{', '.join(CT_RECIPE_SPACES)})."
    )


def _percentiles(x: np.ndarray) -> dict[str, float]:
    return {str(q): float(np.percentile(x, q)) for q in (0, 1, 5, 25, 50, 75, 95, 99, 100)} if len(x) else {}


PRIVACY_KEYS = (
    "private",
    "epsilon",
    "target_epsilon",
    "delta",
    "accountant",
    "epsilon_other_accountant",
    "noise_multiplier",
    "sample_rate",
    "steps_taken",
    "max_grad_norm",
    "mechanism",
    "warning",
    "composed_with",
    "warm_start",
    "ledger",
    "covered_by_epsilon",
    "not_covered_by_epsilon",
)


def membership_audit(recipe: Recipe, run_dir: RunDir, images: ImageSet, nonmember_idx: np.ndarray) -> dict:
    """The loss attack on the generator the samples came from (EMA weights if sampling used them)."""
    cfg = recipe.audit.membership
    n = min(cfg.max_examples, len(images.train_labels), len(nonmember_idx))
    rng = np.random.default_rng(cfg.seed)
    mem = np.sort(rng.choice(len(images.train_labels), size=n, replace=False))
    non = np.sort(rng.choice(nonmember_idx, size=n, replace=False))
    ts = list(cfg.timesteps)

    def attack(checkpoint: Path) -> dict:
        model, scheduler = load_generator(checkpoint)
        m_loss = denoising_losses(
            model, scheduler, images.train_images[mem], images.train_labels[mem], ts, cfg.seed
        )
        n_loss = denoising_losses(
            model, scheduler, images.heldout_images[non], images.heldout_labels[non], ts, cfg.seed + 10**6
        )
        return loss_attack(m_loss, n_loss, ts)

    out = attack(run_dir.final_checkpoint)
    out["weights"] = "EMA" if uses_ema(run_dir.final_checkpoint) else "final"
    out["nonmembers_from"] = "held-out real images, near-duplicates of training images left out"
    if cfg.nonprivate_reference and has_nonprivate_reference(run_dir):
        baseline = attack(run_dir.nonprivate_run.final_checkpoint)
        baseline["model"] = (
            "NOT PRIVATE reference: same data, model, steps, batch size and learning rate, no "
            "clipping or noise; trained only for this comparison, never released"
        )
        baseline["privacy_of_this_result"] = (
            "computed from a non-private model of the private images: these few statistics are "
            "not covered by ε"
        )
        out["nonprivate_reference"] = baseline
    return out


@dataclass
class GateResult:
    background_mask: np.ndarray  # held-out images used as background (not near-copies)
    heldout_distance: np.ndarray  # pixel L2, every held-out image to its nearest training image
    background: dict[str, np.ndarray]  # per space, the background's scores
    synth: dict[str, tuple[np.ndarray, np.ndarray]]  # per space, (nearest index, score)
    pixel_nearest: tuple[np.ndarray, np.ndarray]  # synthetic → train, pixel L2 (index, distance)
    exact_copies: np.ndarray  # bool: pixel distance 0
    calibration: Calibration
    flags: dict[str, np.ndarray]
    flagged: np.ndarray
    seconds: dict[str, float]


def gate(
    cfg: AuditConfig,
    train_u8: np.ndarray,
    heldout_u8: np.ndarray,
    heldout_y: np.ndarray,
    synth_u8: np.ndarray,
    synth_y: np.ndarray,
) -> GateResult:
    """Score every synthetic and held-out image in every space, calibrate, flag. Images uint8
    [N, H, W]."""
    scaled = (uint8_to_model_range(x) for x in (train_u8, heldout_u8, synth_u8))
    train_f, heldout_f, synth_f = scaled
    return gate_scaled(cfg, train_f, heldout_f, heldout_y, synth_f, synth_y)


def gate_scaled(
    cfg: AuditConfig,
    train_f: np.ndarray,
    heldout_f: np.ndarray,
    heldout_y: np.ndarray,
    synth_f: np.ndarray,
    synth_y: np.ndarray,
    dist: Dist | None = None,
) -> GateResult:
    """`gate` for images already on the [-1, 1] scale of the 8-bit grid, [N, H, W]. Under
    torchrun (`dist`), every search splits the training images across the ranks and reduces the
    per-query best; every rank returns the same result."""
    dist = dist or Dist()

    def find(space: str, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        args = (
            cfg.block_size,
            cfg.shift,
            cfg.shift_candidates,
            cfg.search,
            cfg.warp_shift,
            cfg.align_candidates,
        )
        return search_sharded(space, queries, train_f, dist, *args)

    bg, h_dist = _calibration_background(
        find, heldout_f, train_f.shape[-2:], cfg.threshold.near_duplicate_rms
    )
    background, synth, s_pixel, seconds = _search_spaces(find, cfg.spaces, heldout_f, bg, h_dist, synth_f)
    cal, flags, exact, flagged = _calibrate_and_flag(cfg, background, synth, s_pixel, heldout_y[bg], synth_y)
    return GateResult(bg, h_dist, background, synth, s_pixel, exact, cal, flags, flagged, seconds)


def _calibration_background(
    find: Find, heldout_f: np.ndarray, shape: tuple[int, int], rms: float
) -> tuple[np.ndarray, np.ndarray]:
    """Which held-out images may calibrate the gate (bool), and every held-out image's pixel-L2
    distance to its nearest training image: those that are near-exact copies of a training image
    are left out (the split leaks there)."""
    _, h_dist = find("pixel_l2", heldout_f)
    bg = ~near_copy(h_dist, shape, rms)
    if bg.sum() < 20:
        raise ValueError(
            f"only {int(bg.sum())} held-out images are not near-copies of a training image: "
            "too few to calibrate the gate"
        )
    return bg, h_dist


def _search_spaces(
    find: Find,
    spaces: list[str],
    heldout_f: np.ndarray,
    bg: np.ndarray,
    h_dist: np.ndarray,
    synth_f: np.ndarray,
) -> tuple[dict, dict, tuple[np.ndarray, np.ndarray], dict[str, float]]:
    """The nearest training image in each space: the background's scores, and each synthetic
    image's (nearest index, score); the synthetic images' pixel-L2 search (searched first, whether
    or not pixel_l2 is among the spaces), and the seconds each space took."""
    background: dict[str, np.ndarray] = {}
    synth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    s_pixel = find("pixel_l2", synth_f)
    for name in spaces:
        if name == "pixel_l2":
            background[name] = h_dist[bg]
            synth[name] = s_pixel
            seconds[name] = round(time.perf_counter() - t0, 2)
            continue
        t0 = time.perf_counter()
        background[name] = find(name, heldout_f[bg])[1]
        synth[name] = find(name, synth_f)
        seconds[name] = round(time.perf_counter() - t0, 2)
    return background, synth, s_pixel, seconds


def _calibrate_and_flag(
    cfg: AuditConfig,
    background: dict[str, np.ndarray],
    synth: dict[str, tuple[np.ndarray, np.ndarray]],
    s_pixel: tuple[np.ndarray, np.ndarray],
    background_y: np.ndarray,
    synth_y: np.ndarray,
) -> tuple[Calibration, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The thresholds calibrated on the background; the synthetic images each space flags, the
    exact copies, and every sample flagged by any of them."""
    higher = {n: SPACES[n].higher_is_closer for n in cfg.spaces}
    cal = calibrate(background, higher, background_y, cfg.threshold.percentile, cfg.threshold.min_per_class)
    flags = cal.flags({n: s for n, (_, s) in synth.items()}, synth_y)
    exact = s_pixel[1] == 0  # an exact copy is suspected whatever the thresholds
    flagged = exact.copy()
    for f in flags.values():
        flagged |= f
    return cal, flags, exact, flagged


@dataclass(frozen=True)
class PatientRule:
    """What the calibration did with held-out images of training patients."""

    n_same_patient: int | None  # held-out images whose patient has training images; None: no ids
    left_out: bool  # whether they were left out of the background
    text: str


def background_candidates(images: ImageSet, limit: int | None, seed: int) -> tuple[np.ndarray, PatientRule]:
    """Indices of the held-out images that may calibrate the gate (a seeded subset of at most
    `limit`), leaving out images of patients who also have training images (a neighbouring slice
    of a training patient is as close as a copy, and a sample that close is itself a disclosure) —
    unless fewer than 20 others remain: then all are used, and the report says so."""
    same = images.heldout_of_training_patients()
    everyone = np.arange(len(images.heldout_labels))
    if same is None:
        rule = PatientRule(None, False, "the data gives no patient ids: held-out images of training "
                           "patients, if any, stay in the background and make the thresholds stricter")  # fmt: skip
        return everyone[random_subset(len(everyone), limit, seed)], rule
    others = np.flatnonzero(~same)
    ids = "PatientID, else StudyInstanceUID; or the npz '<split>_group' array"
    if len(others) < 20:
        rule = PatientRule(int(same.sum()), False, (
            f"only {len(others)} held-out images are of patients without training images, too few to "
            f"calibrate on ({ids}): all held-out images calibrate, so the thresholds are stricter "
            "and a sample as close as a training patient's other slice can pass; split by patient"
        ))  # fmt: skip
        return everyone[random_subset(len(everyone), limit, seed)], rule
    rule = PatientRule(int(same.sum()), True, (
        f"held-out images whose patient ({ids}) also has training images are left out of the "
        "background and of the membership attack's non-members"
    ))  # fmt: skip
    return others[random_subset(len(others), limit, seed)], rule


@dataclass
class AuditInputs:
    """What the steps of `run_audit` read: the run, its samples, and the real images on the
    release's 8-bit grid (`_u8`, uint8 [N, H, W]) and on its [-1, 1] scale (`_f`)."""

    recipe: Recipe
    run_dir: RunDir
    images: ImageSet
    samples: Samples
    privacy: PrivacyRecord
    pick: np.ndarray  # the held-out images that may calibrate the gate (indices)
    patients: PatientRule
    train_u8: np.ndarray
    heldout_u8: np.ndarray  # the held-out images in `pick`
    heldout_y: np.ndarray
    train_f: np.ndarray
    heldout_f: np.ndarray
    synth_f: np.ndarray

    @property
    def cfg(self) -> AuditConfig:
        return self.recipe.audit


@dataclass
class GeneratorChecks:
    """The audit of the generator as a whole, beside the per-sample gate."""

    ratios: dict[str, np.ndarray]  # neighbour ratios of the synthetic images
    background_ratios: dict[str, np.ndarray]  # and of the calibration background
    copying: dict | None  # the data-copying test
    membership: dict | None  # the membership attack
    canary: dict | None  # the canary audit


def run_audit(
    recipe: Recipe, run_dir: RunDir, images: ImageSet, audit_root: Path | None = None
) -> AuditResult | None:
    """The audit of a run's samples. Under torchrun every rank takes a share of the training
    images in each nearest-neighbour search (the expensive part); rank 0 then runs the rest
    (data-copying test, membership inference) and writes everything; the other ranks return
    None."""
    started = time.perf_counter()
    dist = from_env(resolve_device(recipe.training.device).type)
    inputs = load_inputs(recipe, run_dir, images)
    gated = gate_scaled(
        recipe.audit,
        inputs.train_f,
        inputs.heldout_f,
        inputs.heldout_y,
        inputs.synth_f,
        inputs.samples.labels,
        dist,
    )
    decision = decide(gated.flagged, recipe.audit.action)
    ratios = neighbour_ratios_sharded(inputs, gated.background_mask, dist)
    if not dist.main:
        return None  # rank 0 finishes the audit and writes it
    checks = generator_checks(inputs, gated, *ratios)
    audit = audit_record(inputs, gated, decision, checks, dist, started)
    report_dir = write_audit(inputs, gated, audit, audit_root)
    nn_idx, nn_dist = gated.pixel_nearest
    return AuditResult(
        decision, gated.calibration, gated.flagged, gated.flags, nn_idx, nn_dist, report_dir, audit
    )


def load_inputs(recipe: Recipe, run_dir: RunDir, images: ImageSet) -> AuditInputs:
    """Read the samples and privacy.json, put the real images on the release's 8-bit grid, and pick
    the held-out images that may calibrate the gate."""
    samples = Samples.load(run_dir.samples)
    privacy = PrivacyRecord.read(run_dir.privacy)
    cfg = recipe.audit
    train_u8 = quantize(images.train_images)
    if samples.images.shape[1:] != train_u8.shape[1:]:
        raise ValueError(f"samples are {samples.images.shape[1:]}, training images {train_u8.shape[1:]}")
    pick, patients = background_candidates(images, cfg.threshold.max_heldout, cfg.threshold.seed)
    heldout_u8 = quantize(images.heldout_images[pick])
    heldout_y = images.heldout_labels[pick]
    train_f, heldout_f, synth_f = (uint8_to_model_range(x) for x in (train_u8, heldout_u8, samples.images))
    return AuditInputs(
        recipe=recipe,
        run_dir=run_dir,
        images=images,
        samples=samples,
        privacy=privacy,
        pick=pick,
        patients=patients,
        train_u8=train_u8,
        heldout_u8=heldout_u8,
        heldout_y=heldout_y,
        train_f=train_f,
        heldout_f=heldout_f,
        synth_f=synth_f,
    )


def neighbour_ratios_sharded(
    inputs: AuditInputs, bg: np.ndarray, dist: Dist
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The neighbour ratios (pixel L2) of the synthetic images and of the calibration background
    `bg`; every rank searches its share of the training images."""
    cfg = inputs.cfg
    ratios = neighbour_ratios(
        knn_distances_sharded(inputs.synth_f, inputs.train_f, cfg.neighbours, dist, cfg.block_size),
        cfg.neighbours,
    )
    bg_ratios = neighbour_ratios(
        knn_distances_sharded(inputs.heldout_f[bg], inputs.train_f, cfg.neighbours, dist, cfg.block_size),
        cfg.neighbours,
    )
    return ratios, bg_ratios


def generator_checks(
    inputs: AuditInputs,
    gated: GateResult,
    ratios: dict[str, np.ndarray],
    background_ratios: dict[str, np.ndarray],
) -> GeneratorChecks:
    """Rank 0's checks of the generator as a whole: the data-copying test, the membership attack
    (each if enabled) and the canary audit's result, beside the neighbour ratios."""
    cfg, bg = inputs.cfg, gated.background_mask
    copying = None
    if cfg.copying_test.enabled:
        copying = data_copying_test(
            inputs.train_u8, inputs.heldout_u8[bg], gated.heldout_distance[bg], inputs.samples.images,
            gated.pixel_nearest[1], cfg.copying_test.n_cells, cfg.copying_test.min_per_cell, cfg.threshold.seed,
        )  # fmt: skip
    membership = None
    if cfg.membership.enabled:
        membership = membership_audit(inputs.recipe, inputs.run_dir, inputs.images, inputs.pick[bg])
    canary = canary_result(inputs.run_dir) if cfg.canary.enabled else None
    return GeneratorChecks(ratios, background_ratios, copying, membership, canary)


def audit_record(
    inputs: AuditInputs, gated: GateResult, decision: str, checks: GeneratorChecks, dist: Dist, started: float
) -> dict:
    """audit.json: every figure of the audit, per space, per class and per sample."""
    recipe, cfg = inputs.recipe, inputs.cfg
    spaces_json = _spaces_json(inputs, gated)
    return {
        "schema": AUDIT_SCHEMA,
        "synthfactory_version": __version__,
        "run_id": inputs.run_dir.run_id,
        "recipe_name": recipe.name,
        "recipe_sha256": recipe.sha256(),
        "modality": recipe.modality,
        "samples_sha256": inputs.samples.sha256(),
        "privacy": inputs.privacy.pick(PRIVACY_KEYS),
        "data": _data_json(inputs),
        "calibration": _calibration_json(inputs, gated),
        "spaces": spaces_json,
        "threshold": {"space": "pixel_l2", "value": spaces_json.get("pixel_l2", {}).get("threshold")},
        "neighbour_ratios": _neighbour_ratios_json(cfg.neighbours, checks),
        "data_copying": checks.copying,
        "membership_inference": checks.membership,
        "canary_audit": checks.canary,
        "action": cfg.action,
        "decision": decision,
        "summary": _summary_json(gated, decision),
        "per_class": _per_class_json(inputs, gated),
        "samples": _samples_json(inputs, gated, checks.ratios),
        "limits": [coverage(cfg.spaces, cfg.shift, cfg.warp_shift), *LIMITS],
        "distributed": {
            "world_size": dist.world,
            "split": "the training images of every nearest-neighbour search, one contiguous share per rank",
        }
        if dist.enabled
        else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _data_json(inputs: AuditInputs) -> dict:
    images = inputs.images
    h, w = inputs.train_u8.shape[1:]
    return {
        "n_train": int(len(inputs.train_u8)),
        "n_heldout": int(len(images.heldout_labels)),
        "manifest_sha256": images.manifest_sha256(),
        "class_names": images.class_names,
        "image_size": [int(h), int(w)],
    }


def _calibration_json(inputs: AuditInputs, gated: GateResult) -> dict:
    """How the gate was calibrated: the rule, the background, and what it leaves out."""
    cfg, cal, patients = inputs.cfg, gated.calibration, inputs.patients
    bg, dup = gated.background_mask, ~gated.background_mask
    h, w = inputs.train_u8.shape[1:]
    return {
        "rule": "heldout_percentile",
        "false_alarm_target_percent": cal.false_alarm_target,
        "false_alarm_in_sample_percent": cal.false_alarm_in_sample,
        "level_percentile": cal.level,
        "derived_from": (
            "each held-out real image's score against its nearest training image, per space; "
            f"one shared percentile level (here the {ordinal(round(cal.level, 3))}) chosen so "
            "that at most the target share of held-out images is flagged by any space; "
            f"per-class thresholds for classes with at least {cfg.threshold.min_per_class} "
            "held-out images"
        ),
        "n_heldout_used": int(len(inputs.pick)),
        "n_background": int(bg.sum()),
        "heldout_near_duplicates": int(dup.sum()),
        "heldout_of_training_patients": patients.n_same_patient,
        "patients_left_out": patients.left_out,
        "patient_rule": patients.text,
        "near_duplicate_rule": (
            f"root-mean-square pixel difference to the nearest training image ≤ "
            f"{cfg.threshold.near_duplicate_rms:g} on the [-1, 1] scale "
            f"(L2 ≤ {cfg.threshold.near_duplicate_rms * np.sqrt(h * w):.3g})"
        ),
        "warning": (
            f"only {int(bg.sum())} held-out images: a {cal.false_alarm_target:g} % false-alarm rate "
            f"over {len(cfg.spaces)} spaces cannot be resolved (each threshold is one of the few "
            "most extreme held-out scores); expect more false alarms than the target"
        )
        if bg.sum() * cal.level / 100.0 < 1.0
        else None,
        "uses_private_images": (
            "yes, after training: the thresholds come from distances to the private training "
            "images. They decide what is dropped; they are not covered by ε"
        ),
    }


def _spaces_json(inputs: AuditInputs, gated: GateResult) -> dict:
    """Per space: what it measures, its thresholds, the score percentiles, what it flagged."""
    cfg, names = inputs.cfg, inputs.images.class_names
    spaces_json = {}
    for n in cfg.spaces:
        t = gated.calibration.thresholds[n]
        spaces_json[n] = {
            "description": describe(n, cfg.shift, cfg.warp_shift, cfg.shift_candidates, cfg.align_candidates),
            "closer_is": "higher" if t.higher_is_closer else "lower",
            "threshold": t.value,
            "threshold_per_class": {names[c]: v for c, v in t.per_class.items()},
            "heldout_percentiles": _percentiles(gated.background[n]),
            "synthetic_percentiles": _percentiles(gated.synth[n][1]),
            "n_flagged": int(gated.flags[n].sum()),
            "seconds": gated.seconds[n],
        }
    return spaces_json


def _neighbour_ratios_json(n: int, checks: GeneratorChecks) -> dict:
    ratios, bg_ratios = checks.ratios, checks.background_ratios
    return {
        "n": n,
        "carlini_synthetic_percentiles": _percentiles(ratios["carlini"]),
        "carlini_heldout_percentiles": _percentiles(bg_ratios["carlini"]),
        "nn_over_second_synthetic_percentiles": _percentiles(ratios["nn_over_second"]),
        "nn_over_second_heldout_percentiles": _percentiles(bg_ratios["nn_over_second"]),
        "reading": "pixel L2; small values mean one training image stands out as the nearest",
    }


def _summary_json(gated: GateResult, decision: str) -> dict:
    flagged, nn_dist = gated.flagged, gated.pixel_nearest[1]
    n_dropped = int(flagged.sum()) if decision == "release" else 0
    released = 0 if decision == "block" else int(len(flagged) - n_dropped)
    return {
        "n_samples": int(len(flagged)),
        "n_flagged": int(flagged.sum()),
        "n_flagged_by_space": {n: int(f.sum()) for n, f in gated.flags.items()},
        "n_exact_copies": int(gated.exact_copies.sum()),
        "n_dropped": n_dropped,
        "n_released": released,
        "nn_distance_min": float(nn_dist.min()),
        "nn_distance_median": float(np.median(nn_dist)),
    }


def _per_class_json(inputs: AuditInputs, gated: GateResult) -> list[dict]:
    cfg, names, labels = inputs.cfg, inputs.images.class_names, inputs.samples.labels
    bg_y = inputs.heldout_y[gated.background_mask]
    return [
        {
            "class": names[c],
            "n_samples": int((labels == c).sum()),
            "n_flagged": int(gated.flagged[labels == c].sum()),
            "n_heldout_background": int((bg_y == c).sum()),
            "per_class_thresholds": any(c in gated.calibration.thresholds[n].per_class for n in cfg.spaces),
        }
        for c in range(len(names))
    ]


def _samples_json(inputs: AuditInputs, gated: GateResult, ratios: dict[str, np.ndarray]) -> list[dict]:
    """Every sample: its nearest training image, its score in each space, what flagged it."""
    cfg, samples, flags = inputs.cfg, inputs.samples, gated.flags
    nn_idx, nn_dist = gated.pixel_nearest
    return [
        {
            "index": i,
            "label": int(samples.labels[i]),
            "seed": int(samples.seeds[i]),
            "nearest_train_index": int(nn_idx[i]),
            "nn_distance": float(nn_dist[i]),
            "scores": {n: float(gated.synth[n][1][i]) for n in cfg.spaces},
            "carlini_ratio": float(ratios["carlini"][i]),
            "flagged": bool(gated.flagged[i]),
            "flagged_by": [n for n in cfg.spaces if flags[n][i]]
            + (["exact_copy"] if gated.exact_copies[i] else []),
        }
        for i in range(len(gated.flagged))
    ]


def write_audit(inputs: AuditInputs, gated: GateResult, audit: dict, audit_root: Path | None) -> Path:
    """audit/audit.json and audit/nearest.npz in the run directory; the reports under
    `<audit_root>/<recipe name>/<run id>/`, whose path this returns."""
    recipe, run_dir, spaces = inputs.recipe, inputs.run_dir, inputs.cfg.spaces
    nn_idx, nn_dist = gated.pixel_nearest
    synth, background = gated.synth, gated.background
    run_dir.audit_json.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        run_dir.nearest,
        nn_index=nn_idx,
        nn_distance=nn_dist,
        heldout_index=inputs.pick,
        heldout_distance=gated.heldout_distance,
        heldout_near_duplicate=~gated.background_mask,
        flagged=gated.flagged,
        **{f"{n}_index": synth[n][0] for n in spaces},
        **{f"{n}_score": synth[n][1] for n in spaces},
        **{f"{n}_background": background[n] for n in spaces},
    )
    AuditRecord.model_validate(audit).write(run_dir.audit_json)
    report_dir = (audit_root or recipe.outputs.audit_dir) / recipe.name / run_dir.run_id
    write_reports(report_dir, audit, background, synth, inputs.samples.images, inputs.train_u8, gated.flagged)
    return report_dir
