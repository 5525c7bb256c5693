"""Does the release gate catch disguised copies it was not built on, and how many genuine held-out
images does it flag? Per set (modality) and per kind of disguise.

    python benchmarks/audit_disguised_copies.py [--data ../shared/data] [--per-kind 20]
        [--sets ct,us,mri] [--spaces pixel_l2,ncc,...] [--shift-candidates N] [--json out.json]

`benchmarks/audit_planted_copies.py` plants the gate's own edits (`audit/planted.py`); this one
plants `audit/disguises.py`: copies made only with Pillow and scikit-image, with other
interpolation, borders and parameters than the gate's warps (torch `grid_sample`) and the learned
descriptor's augmentations (Kornia, OpenCV): compositions of several edits, crops of 80-85 %
resized back, rotations up to 15°, zooms 0.85-1.2 and elastic warps.

Per set: training images as the private set (the same sets and loading as
audit_planted_copies.py: CT 28 px, ultrasound and MRI 64 → 32 px). The held-out images are split
in two, patient-disjoint where the npz holds ids (the rule used is printed): one half calibrates
the gate (recipe defaults: 1 % false alarms over all its spaces), the other half is presented as
samples together with `per-kind` disguised copies of distinct training images of each kind.
Printed: per kind, the copies the gate catches and those each space catches on its own at the
gate's shared level; false alarms (presented held-out images flagged) of the gate and of each
space; seconds; per space, the ROC AUC of copies against the presented held-out images and
against the 5 % of them most like a training image by NCC (on MRI: near slices). `--json` writes every figure, the library versions, the command line and the
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from audit_planted_copies import SETS  # the same sets, files and sizes as the planted-copy benchmark

from synthfactory.audit import gate, quantize
from synthfactory.audit.disguises import KINDS, disguised_copies, libraries
from synthfactory.audit.spaces import SPACES
from synthfactory.data.common import pad_square_resize, uint_to_unit_range
from synthfactory.recipe import AuditConfig

MODALITY = {"ct": "CT", "us": "ultrasound", "mri": "MRI"}
NOTES = {  # what the ids mean, from each data set's README
    "ct": "MedMNIST splits train/val/test by CT volume; the npz has no ids within a split",
    "us": "HC18 examination number; one woman may have several",
    "mri": "near-duplicate groups; the source has no patient ids, adjacent slices may be split",
}


def heldout_groups(z, split: str) -> tuple[np.ndarray | None, str]:
    """Per held-out image, the id of its patient (or group), and the npz key it came from: a
    `{split}_group(s)` / `{split}_patient(_id)` array, else the numeric prefix of
    `{split}_source_names` (HC18: `010_HC.png` and `010_2HC.png` are one examination)."""
    files = z.files
    for key in (f"{split}_patient_id", f"{split}_patient", f"{split}_groups", f"{split}_group"):
        if key in files:
            return z[key].ravel(), f"`{key}`"
    key = f"{split}_source_names"
    if key in files:
        names = [str(n) for n in z[key]]
        if all(re.match(r"\d+_", n) for n in names):
            return np.array([n.split("_")[0] for n in names]), f"numeric prefix of `{key}`"
    return None, ""


def split_heldout(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the calibrating and the shown half: whole groups, in random order, go to the
    calibrating half until it holds half the images; without groups, a random halving."""
    rng = np.random.default_rng(0)
    if groups is None:
        order = rng.permutation(n)
        return np.sort(order[: n // 2]), np.sort(order[n // 2 :])
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(len(ids))
    in_cal = np.zeros(len(ids), bool)
    in_cal[order[: int(np.searchsorted(np.cumsum(counts[order]), n / 2)) + 1]] = True
    return np.flatnonzero(in_cal[inverse]), np.flatnonzero(~in_cal[inverse])


def load(args: argparse.Namespace, key: str) -> dict:
    """Training and held-out images (the first max-train / max-heldout) and the held-out halves."""
    _, rel, downsample = SETS[key]
    split = args.heldout_split
    with np.load(args.data / rel) as z:
        files = list(z.files)
        tr, ty = z["train_images"][: args.max_train], z["train_labels"].ravel()[: args.max_train]
        te, tey = z[f"{split}_images"][: args.max_heldout], z[f"{split}_labels"].ravel()[: args.max_heldout]
        groups, source = heldout_groups(z, split)
    if groups is not None:
        groups = groups[: len(te)]
    if downsample:  # 64 → 32 as the recipes' data.image_size does
        tr, te = (quantize(pad_square_resize(list(uint_to_unit_range(x)), 32)) for x in (tr, te))
    cal, shown = split_heldout(len(te), groups)
    if groups is None:
        rule = f"random halves (no patient or group ids in the npz; {NOTES[key]})"
    else:
        shared = len(set(groups[cal]) & set(groups[shown]))
        rule = (
            f"group-disjoint halves by {source} ({NOTES[key]}): {len(set(groups[cal]))} / "
            f"{len(set(groups[shown]))} ids, {shared} shared"
        )
    return {"train": tr, "train_y": ty, "heldout": te, "heldout_y": tey, "cal": cal, "shown": shown,
            "rule": rule, "npz_keys": files}  # fmt: skip


def run_set(args: argparse.Namespace, cfg: AuditConfig, key: str) -> dict:
    """The gate on one set: every figure of the report."""
    d = load(args, key)
    te, tey, cal, shown = d["heldout"], d["heldout_y"], d["cal"], d["shown"]
    copies, picks, kinds = disguised_copies(d["train"], args.per_kind, seed=args.seed)
    start = time.perf_counter()
    g = gate(cfg, d["train"], te[cal], tey[cal],
             np.concatenate([copies, te[shown]]), np.concatenate([d["train_y"][picks], tey[shown]]))  # fmt: skip
    seconds = time.perf_counter() - start
    n, kinds = len(copies), np.asarray(kinds)
    caught, fa = g.flagged[:n], g.flagged[n:]
    per_kind = {
        k: {
            "planted": int((kinds == k).sum()),
            "caught": int(caught[kinds == k].sum()),
            "per_space": {s: int(f[:n][kinds == k].sum()) for s, f in g.flags.items()},
        }
        for k in KINDS
    }
    per_space = {
        s: {"caught": int(f[:n].sum()), "false_alarms": int(f[n:].sum()), "seconds": round(g.seconds[s], 2)}
        for s, f in g.flags.items()
    }
    recall = None
    if "aligned_ncc" in cfg.spaces:  # is each copy's source among the candidates it registers?
        from synthfactory.audit.registration import embedding_shortlist

        u = lambda x: x.reshape(len(x), *x.shape[-2:]).astype(np.float32) / 127.5 - 1  # noqa: E731
        cand = embedding_shortlist(u(copies), u(d["train"]), cfg.align_candidates, cfg.block_size)
        hit = (cand == picks[:, None]).any(1)
        recall = {k: int(hit[kinds == k].sum()) for k in KINDS}
    return {
        "aligned_shortlist_recall": recall,
        "separation": separation(g, n),
        "name": SETS[key][0], "modality": MODALITY[key], "npz_keys": d["npz_keys"],
        "train": len(d["train"]), "heldout_split_rule": d["rule"], "calibration": len(cal),
        "calibration_near_copies_left_out": int((~g.background_mask).sum()), "shown": len(shown),
        "kinds": per_kind, "caught": int(caught.sum()), "planted": n,
        "false_alarms": int(fa.sum()), "false_alarm_rate": float(fa.mean()) if len(fa) else 0.0,
        "per_space": per_space, "seconds": round(seconds, 2),
    }  # fmt: skip


def separation(g, n_copies: int, hardest: float = 0.05) -> dict:
    """Per space, how well its score tells the disguised copies from real held-out images: ROC
    AUC against every shown held-out image, and against the `hardest` share of them, those most
    like a training image by NCC (on MRI slices without patient ids: mostly near slices of
    training scans). 1 = every copy closer than every such image."""
    from sklearn.metrics import roc_auc_score

    ncc = g.synth["ncc"][1][n_copies:] if "ncc" in g.synth else None
    hard = np.argsort(-ncc)[: max(1, round(hardest * len(ncc)))] if ncc is not None else None
    out = {}
    for space, (_, score) in g.synth.items():
        closer = score if SPACES[space].higher_is_closer else -score
        copies, real = closer[:n_copies], closer[n_copies:]
        y = np.r_[np.ones(len(copies)), np.zeros(len(real))]
        row = {"auc_vs_heldout": float(roc_auc_score(y, np.r_[copies, real]))}
        if hard is not None:
            yh = np.r_[np.ones(len(copies)), np.zeros(len(hard))]
            row["auc_vs_hardest_heldout"] = float(roc_auc_score(yh, np.r_[copies, real[hard]]))
        out[space] = row
    return out


def pct(a: int, b: int) -> str:
    return f"{a}/{b} ({a / b:.0%})" if b else f"{a}/0"


def show(r: dict) -> None:
    print(
        f"{r['name']} ({r['modality']}): train {r['train']}, calibration {r['calibration']} "
        f"({r['calibration_near_copies_left_out']} near-copies left out), shown {r['shown']}; "
        f"held-out halves: {r['heldout_split_rule']}"
    )
    for k, v in r["kinds"].items():
        spaces = ", ".join(f"{s} {c}" for s, c in v["per_space"].items())
        print(f"    {k}: {pct(v['caught'], v['planted'])}; each space alone: {spaces}")
    print(
        f"    all kinds: {pct(r['caught'], r['planted'])}; false alarms {r['false_alarms']}/{r['shown']} "
        f"= {r['false_alarm_rate']:.1%}; {r['seconds']:.1f} s"
    )
    if r.get("aligned_shortlist_recall"):
        rec = r["aligned_shortlist_recall"]
        print(f"    aligned_ncc shortlist holds the source: {sum(rec.values())}/{r['planted']}; per kind {rec}")
    for s, v in r["per_space"].items():  # what each space catches on its own, at the shared level
        sep = r["separation"][s]
        hard = sep.get("auc_vs_hardest_heldout")
        print(
            f"    {s} alone: {pct(v['caught'], r['planted'])}; false alarms {v['false_alarms']}; {v['seconds']:.1f} s; "
            f"AUC copies vs held-out {sep['auc_vs_heldout']:.3f}"
            + (
                f", vs the 5 % held-out most like a training image (NCC) {hard:.3f}"
                if hard is not None
                else ""
            )
        )


def summary(results: dict[str, dict]) -> None:
    """Share caught, kind by modality."""
    print("caught by the gate, per kind and modality: " + " | ".join(r["modality"] for r in results.values()))
    for k in KINDS:
        row = " | ".join(pct(r["kinds"][k]["caught"], r["kinds"][k]["planted"]) for r in results.values())
        print(f"    {k}: {row}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-heldout", type=int, default=2000)
    ap.add_argument("--sets", default="ct,us,mri", help="comma-separated: ct, us, mri")
    ap.add_argument(
        "--spaces", default=None, help="audit.spaces, comma-separated (default: the recipe default)"
    )
    ap.add_argument("--heldout-split", default="test", help="the npz split that calibrates and is shown")
    ap.add_argument(
        "--shift-candidates", type=int, default=None, help="audit.shift_candidates (default: exact)"
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the disguises")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()
    spaces = {"spaces": args.spaces.split(",")} if args.spaces else {}
    cfg = AuditConfig(shift_candidates=args.shift_candidates, **spaces)
    libs = libraries()
    print(f"disguises: {', '.join(f'{k} {v}' for k, v in libs.items())}; spaces {', '.join(cfg.spaces)}")
    results = {}
    for key in args.sets.split(","):
        results[key] = run_set(args, cfg, key)
        show(results[key])
    if len(results) > 1:
        summary(results)
    if args.json:
        out = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "spaces": list(cfg.spaces),
            "libraries": libs,
            "machine": {"platform": platform.platform(), "processors": os.cpu_count()},
            "kinds": list(KINDS),
            "sets": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
