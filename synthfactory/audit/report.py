"""Audit reports under privacy_audits/<recipe>/<run id>/.

Public (statistics only: no real pixels, no per-sample figure): `audit.json` (the run's audit
without its `samples` list; the per-sample nearest-training indices, distances and scores stay
in the run directory), `audit-summary.md` and the same as a page, `audit-summary.html`, `distances.png` (per-space
histograms) and `membership_roc.png`. Their statistics are computed from the private images and are not covered
by ε; each says so. Internal: `internal/audit.html`,
one self-contained page (figures inline) that *shows real training images* beside the synthetic
samples closest to them; it says so at the top, is git-ignored, and is never part of a release or
a Hub push.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..records import AuditRecord  # noqa: E402
from ..templating import environment
from .gate import ordinal  # noqa: E402

INTERNAL_BANNER = "INTERNAL: SHOWS REAL TRAINING IMAGES. NEVER RELEASE."
N_PAIRS = 16


def _patients(c: dict) -> str:
    """The calibration's patient rule in a few words ("patients not checked" in older reports)."""
    n = c.get("heldout_of_training_patients")
    if "patient_rule" not in c:
        return "patients not checked"
    if n is None:
        return "no patient ids in the data"
    if not c.get("patients_left_out", True):
        return f"{n} held-out images of training patients kept (too few of other patients)"
    return f"{n} held-out images of training patients left out"


def _save(fig, path: Path | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def space_histograms(audit: dict, background: dict, synth: dict) -> plt.Figure:
    names = list(audit["spaces"])
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, n in zip(axes.flat, names, strict=False):
        both = np.concatenate([background[n], synth[n][1]])
        # the axis spans the 1st to 99th percentile, outliers in the end bins: the public figure
        # shows no one image's extreme score
        lo, hi = (float(np.percentile(both, q)) for q in (1, 99)) if len(both) else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        bg, sy = np.clip(background[n], lo, hi), np.clip(synth[n][1], lo, hi)
        bins = np.linspace(lo, hi, 50)
        ax.hist(bg, bins=bins, alpha=0.6, density=True, label=f"held-out → train (n={len(bg)})")
        ax.hist(sy, bins=bins, alpha=0.6, density=True, label=f"synthetic → train (n={len(sy)})")
        ax.axvline(audit["spaces"][n]["threshold"], color="k", linestyle="--", label="global threshold")
        ax.set_title(f"{n} (closer = {audit['spaces'][n]['closer_is']})", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def roc_figure(mia: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=100)
    ax.plot(mia["roc"]["fpr"], mia["roc"]["tpr"], label=f"loss attack, AUC {mia['auc']:.3f}")
    ref = mia.get("nonprivate_reference")
    if ref:
        ax.plot(
            ref["roc"]["fpr"], ref["roc"]["tpr"], "--", label=f"non-private reference, AUC {ref['auc']:.3f}"
        )
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def closest_pairs_figure(
    space: str, closer_high: bool, synth_u8: np.ndarray, train_u8: np.ndarray, idx: np.ndarray,
    score: np.ndarray, flagged: np.ndarray,
) -> plt.Figure:  # fmt: skip
    """Top row: the synthetic samples closest to training data in one space; bottom row: their
    nearest training images. Shows real images: internal only."""
    order = np.argsort(-score if closer_high else score, kind="stable")[:N_PAIRS]
    n = max(len(order), 1)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.8), dpi=100, squeeze=False)
    for col, i in enumerate(order):
        axes[0, col].imshow(synth_u8[i], cmap="gray", vmin=0, vmax=255)
        axes[0, col].set_title(f"#{i} {score[i]:.3g}" + (" X" if flagged[i] else ""), fontsize=6)
        axes[1, col].imshow(train_u8[idx[i]], cmap="gray", vmin=0, vmax=255)
        axes[1, col].set_title(f"train {idx[i]}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{space}: {INTERNAL_BANNER}", fontsize=7, color="red")
    fig.tight_layout()
    return fig


def _privacy_line(p: dict) -> str:
    if not p.get("private"):
        return f"**NOT PRIVATE**: {p.get('warning', 'trained without differential privacy').removeprefix('NOT PRIVATE: ')}"
    other = ", ".join(f"{k}: {v:.3f}" for k, v in p.get("epsilon_other_accountant", {}).items())
    return (
        f"ε = {p['epsilon']:.3f} (target {p['target_epsilon']:g}, {p['accountant']} accountant"
        f"{'; ' + other if other else ''}), δ = {p['delta']:g}, σ = {p['noise_multiplier']:.4f}, "
        f"q = {p['sample_rate']:.4g}, steps = {p['steps_taken']}, C = {p['max_grad_norm']:g}"
    )


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


NOT_COVERED_NOTE = (
    "statistics computed from the private training and held-out images after training: not "
    "covered by ε. Per-sample figures (nearest training image, distances, scores) are kept in "
    "the run directory only"
)


def public_audit(audit: dict) -> dict:
    """The audit as the report folder holds it: every statistic, no per-sample figure, and not
    the private data's manifest hash (a hash of the exact private set would let anyone who holds
    all images but one test which candidate completes it; it stays in the run directory)."""
    out = {k: v for k, v in audit.items() if k != "samples"}
    out["data"] = {k: v for k, v in audit["data"].items() if k != "manifest_sha256"}
    out["summary"] = {k: v for k, v in audit["summary"].items() if k not in PER_SAMPLE_SUMMARY}
    out["spaces"] = {n: _aggregates_only(sp) for n, sp in audit["spaces"].items()}
    out["neighbour_ratios"] = _aggregates_only(audit["neighbour_ratios"])
    out["privacy_of_this_report"] = NOT_COVERED_NOTE
    return out


PER_SAMPLE_SUMMARY = ("nn_distance_min",)  # one sample's distance to one private image
EXTREMES = ("0", "100")  # a minimum or a maximum is one image's score, not an aggregate


def _aggregates_only(block: dict) -> dict:
    """A block of the audit with every `*_percentiles` table cut to its inner percentiles."""
    return {
        k: {q: v for q, v in val.items() if q not in EXTREMES} if k.endswith("percentiles") else val
        for k, val in block.items()
    }


def covers_lines(p: dict) -> list[str]:
    """What ε covers and what it does not, from the run's privacy record."""
    if not p.get("private"):
        return [f"No ε: {p.get('warning', 'NOT PRIVATE')}.", ""]
    return [
        f"Covered by ε = {p['epsilon']:.3f} (δ = {p['delta']:g}): "
        + "; ".join(p.get("covered_by_epsilon", []))
        + ".",
        "",
        "Not covered: " + "; ".join(p.get("not_covered_by_epsilon", [])) + ".",
        "",
    ]


def summary_markdown(audit: dict) -> str:
    """The public summary: statistics only, no real image, no index into the private set. The
    Jinja2 template synthfactory/templates/audit-summary.md.j2."""
    c = audit["calibration"]
    template = _templates(markdown=True).get_template("audit-summary.md.j2")
    return template.render(
        a=audit,
        not_covered=NOT_COVERED_NOTE,
        covers=covers_lines(audit["privacy"]),
        privacy_line=_privacy_line(audit["privacy"]),
        level=ordinal(round(c["level_percentile"], 3)),
        patients=_patients(c),
        canary=canary_lines(audit.get("canary_audit")),
    )


def canary_lines(ca: dict | None) -> list[str]:
    """The canary result in words and numbers (public: statistics of generated canaries only)."""
    if not ca:
        return ["Not run (audit.canary.enabled is false): the accountant's ε is the only bound."]
    best = next(r for r in ca["by_guesses"] if r["guesses"] == ca["at_guesses"])
    acc = ca["accountant_epsilon"]
    if acc is None:
        verdict = "the training is not private, so there is no accountant's ε to compare with"
    elif ca["epsilon_lower_bound"] > acc:
        verdict = "**above the accountant's ε: the training is not as private as claimed**"
    else:
        verdict = "not above the accountant's ε, as it must be for a correct DP implementation"
    run = ca["canary_run"]
    mech = (
        f"q = {run['sample_rate']:.4g}, σ = {run['noise_multiplier']:.4f}, {run['steps']} steps, "
        f"C = {run['max_grad_norm']:g}"
        if run["noise_multiplier"] is not None
        else f"{run['steps']} steps, NOT PRIVATE (no clipping or noise)"
    )
    return [
        f"Empirical ε lower bound **{ca['epsilon_lower_bound']:.3f}** at {ca['confidence']:.0%} "
        f"confidence (δ {ca['delta']:g}), against the canary run's accountant ε **{_fmt(acc)}** "
        f"({ca['accountant'] or 'none'}): {verdict}. {ca['m']} canaries, {ca['n_included']} included; best at "
        f"{best['guesses']} guesses with {best['correct']} correct.",
        "",
        f"- canaries: {ca['canaries']}",
        f"- score: {ca['score']}",
        f"- canary run: {run['n_train']} training images, {mech}",
        f"- method: {ca['method']}",
        f"- reading: {ca['reading']}",
        f"- privacy of this result: {ca['privacy_of_this_result']}",
    ]


def _ledger_rows(privacy: dict) -> list[list]:
    """The ε ledger as table rows: each mechanism of the generator's ledger (privacy.json's
    `ledger`, public form), its (σ, q, steps), its ε alone and whether it composes."""
    rows = []
    for m in privacy.get("ledger") or []:
        history = "; ".join(f"σ {s:.4g}, q {q:.4g}, {int(n)} steps" for s, q, n in m.get("history") or [])
        what = m["kind"].replace("_", " ") + (
            "" if m.get("via") is None else f" (ancestor run {m['run_id']})"
        )
        rows.append([
            what, (m.get("data") or {}).get("description", ""), history or "none (no DP query)",
            m.get("epsilon_alone"), "yes" if m.get("composed") else "no", m.get("reading", ""),
        ])  # fmt: skip
    return rows


def audit_html(audit: dict, figures: dict[str, bytes], pairs: dict[str, bytes], internal: bool = True) -> str:
    """The audit as one self-contained page: the Jinja2 template synthfactory/templates/
    audit.html.j2 (autoescaped), filled with the rows computed here. `internal`: with the closest
    pairs and the suspected copies' nearest training images (real images; internal/audit.html);
    otherwise the public summary page (statistics only, as audit-summary.md)."""
    spaces = audit["spaces"]
    dc, mia, ca = audit.get("data_copying"), audit.get("membership_inference"), audit.get("canary_audit")
    sections = [("dp-accounting", "ε ledger"), ("calibration", "Calibration"), ("spaces", "Spaces")]
    sections += [("closest-pairs", "Closest pairs")] if internal else []
    sections += [("per-class", "Per class"), ("flagged", "Suspected copies"), ("data-copying", "C_T"),
                 ("membership-inference", "Membership"), ("canary", "Canary"), ("limits", "Limits")]  # fmt: skip
    template = _templates().get_template("audit.html.j2")
    return template.render(
        a=audit,
        internal=internal,
        banner=INTERNAL_BANNER,
        sections=sections,
        privacy_line=_privacy_line(audit["privacy"]).replace("**", ""),
        ledger_rows=_ledger_rows(audit["privacy"]),
        covers=[x for x in covers_lines(audit["privacy"]) if x],
        not_covered=NOT_COVERED_NOTE,
        patients=_patients(audit["calibration"]),
        figures=figures,
        pairs=pairs if internal else {},
        space_rows=[
            [
                n,
                sp["closer_is"],
                sp["threshold"],
                sp["heldout_percentiles"]["50"],
                sp["synthetic_percentiles"]["50"],
                sp["n_flagged"],
                sp["seconds"],
            ]
            for n, sp in spaces.items()
        ],  # fmt: skip
        per_class_rows=[
            [pc["class"], pc["n_samples"], pc["n_flagged"], pc["n_heldout_background"]]
            for pc in audit["per_class"]
        ],
        flagged_rows=[
            [
                x["index"],
                audit["data"]["class_names"][x["label"]],
                x["nearest_train_index"],
                ", ".join(x["flagged_by"]),
            ]
            for x in audit.get("samples") or []
            if x["flagged"] and internal
        ][:200],  # fmt: skip
        dc_rows=[[x["cell"], x["n_train"], x["n_heldout"], x["n_synthetic"], x["z_u"]] for x in dc["cells"]]
        if dc
        else [],
        per_timestep=str({k: round(v, 3) for k, v in mia["auc_per_timestep"].items()}) if mia else "",
        canary=[x.lstrip("- ").replace("**", "") for x in canary_lines(ca) if x],
        canary_rows=[
            [r["guesses"], r["correct"], r["epsilon_lower_bound"], r["epsilon_lower_bound_delta0"]]
            for r in (ca or {}).get("by_guesses", [])
        ],
    )


def _templates(markdown: bool = False):
    """The package's template environment (templating.environment) with the audit reports'
    filter `fmt` (as `_fmt`) and `img` (a PNG inline)."""
    from markupsafe import Markup

    env = environment(markdown)
    env.filters["fmt"] = _fmt
    env.globals["img"] = lambda data, alt: Markup(_img(data, alt))
    return env


def write_reports(
    out_dir: Path,
    audit: dict,
    background: dict[str, np.ndarray],
    synth: dict[str, tuple[np.ndarray, np.ndarray]],
    synth_u8: np.ndarray,
    train_u8: np.ndarray,
    flagged: np.ndarray,
) -> None:
    """Everything under privacy_audits/<recipe>/<run id>/."""
    internal = out_dir / "internal"
    internal.mkdir(parents=True, exist_ok=True)
    public = public_audit(audit)
    AuditRecord.model_validate(public).write(out_dir / "audit.json")
    figures = {"distances": _save(space_histograms(audit, background, synth), out_dir / "distances.png")}
    if audit.get("membership_inference"):
        figures["membership_roc"] = _save(
            roc_figure(audit["membership_inference"]), out_dir / "membership_roc.png"
        )
    (out_dir / "audit-summary.md").write_text(summary_markdown(audit))
    (out_dir / "audit-summary.html").write_text(audit_html(public, figures, {}, internal=False))
    pairs = {
        n: _save(
            closest_pairs_figure(
                n, audit["spaces"][n]["closer_is"] == "higher", synth_u8, train_u8, *synth[n], flagged
            )
        )
        for n in audit["spaces"]
    }
    (internal / "audit.html").write_text(audit_html(audit, figures, pairs))
    (internal / "README.md").write_text(
        f"# {INTERNAL_BANNER}\n\nFiles here show real training images next to the synthetic samples "
        "closest to them. Keep them inside the data owner's environment.\n"
    )
