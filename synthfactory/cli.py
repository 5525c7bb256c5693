"""Command line: `synthfactory run|validate|resume|<stage>|publish|inspect`.

Exit codes: 0 done; 2 invalid recipe or data (nothing written); 3 release or publish refused
(the audit blocked it, or the run is not private); 1 anything else. This is the only module that prints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .distributed import launched
from .export import ReleaseRefused
from .ledger import LedgerRefused
from .recipe import RecipeError, parse_override
from .records import PrivacyRecord
from .run import StageOptions, check, create_run, open_run, run_remaining, run_stage, summary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Differentially private, memorization-audited synthetic medical image datasets.",
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
RunDirArg = Annotated[Path, typer.Argument(help="Run directory (runs/<run id>).", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field: --set privacy.target_epsilon=1 (repeatable)."),
]
Smoke = Annotated[
    bool,
    typer.Option(
        "--smoke", help="Tiny model, few steps, a few hundred images: checks the path, not quality."
    ),
]
AuditDir = Annotated[
    Path | None,
    typer.Option("--audit-dir", help="Where reports go (default: the recipe's outputs.audit_dir)."),
]


def _fail(code: int, message: str) -> None:
    """One line on stderr (a message that quotes a library's error may hold line breaks), exit code."""
    typer.secho(" ".join(message.split()), err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RecipeError as e:
        _fail(2, f"error: {e}")
    except ReleaseRefused as e:
        _fail(3, f"release refused: {e}")
    except LedgerRefused as e:
        _fail(2, f"refused: {e}")


def _print_summary(run_path: Path) -> None:
    if not launched().main:  # torchrun: rank 0 speaks for the job
        return
    from .rundir import RunDir

    found = summary(RunDir(run_path))
    echo = typer.echo
    echo("")
    echo(f"run        {found['run_dir']}")
    if found.get("privacy"):
        _print_privacy(found["privacy"])
    if found.get("audit"):
        _print_audit(found["audit"], found["report"])
    if found.get("release"):
        echo(f"dataset    {Path(found['release']) / 'dataset'}   (datasets.load_from_disk)")
        echo(f"release    {found['release']}")
    ev = found.get("evaluation")
    if ev:
        n_seeds = ev.get("classifier_seeds", 1)
        echo(
            f"utility    TSTR {ev['tstr']:.3f} / TRTR {ev['trtr']:.3f} = {ev['ratio']:.2f} "
            f"(chance {ev['chance']:.3f}; "
            f"above chance {'n/a' if ev.get('above_chance') is None else format(ev['above_chance'], '.2f')}"
            f"{f', mean of {n_seeds} classifier seeds' if n_seeds > 1 else ''}); "
            f"Fréchet distance {ev['fd']:.2f} (real vs real {ev['fd_real']:.2f})"
        )


def _print_privacy(privacy: PrivacyRecord) -> None:
    """ε spent and how, or the NOT PRIVATE warning in red."""
    if not privacy.private:
        typer.secho(f"privacy    {privacy.warning or 'NOT PRIVATE'}", fg=typer.colors.RED)
        return
    other = ", ".join(f"{k} {v:.3f}" for k, v in privacy.epsilon_other_accountant.items())
    typer.echo(
        f"privacy    ε = {privacy.epsilon:.3f} spent of target {privacy.target_epsilon:g} "
        f"at δ = {privacy.delta:g} ({privacy.accountant}; {other}); "
        f"σ = {privacy.noise_multiplier:.4f}, q = {privacy.sample_rate:.4g}, "
        f"{privacy.steps_taken} steps, C = {privacy.max_grad_norm:g}"
    )


def _print_audit(audit: dict, report: str) -> None:
    """The audit's counts and decision, the attacks' figures it has, and where its report is."""
    typer.echo(
        f"audit      {audit['n_samples']} generated, {audit['n_flagged']} suspected copies in "
        f"{len(audit['spaces'])} spaces "
        f"(gate false alarms ≤ {audit['false_alarm_percent']:g} % of held-out), "
        f"{audit['n_dropped']} dropped, {audit['n_released']} released; decision: {audit['decision']}"
    )
    attacks = _audit_attack_figures(audit)
    if attacks:
        typer.echo(f"           {'; '.join(attacks)}")
    typer.echo(f"report     {Path(report) / 'audit-summary.md'} (internal: internal/audit.html)")


def _audit_attack_figures(audit: dict) -> list[str]:
    """Data-copying C_T, membership-inference AUCs, the canary bound and held-out leaks, where present."""
    figures = []
    if audit.get("c_t") is not None:
        figures.append(f"data-copying C_T {audit['c_t']:.2f}")
    if audit.get("mia_auc") is not None:
        figures.append(f"membership-inference AUC {audit['mia_auc']:.3f}")
    if audit.get("mia_auc_nonprivate") is not None:
        figures.append(f"(non-private reference {audit['mia_auc_nonprivate']:.3f})")
    if audit.get("canary_epsilon_lower_bound") is not None:
        figures.append(
            f"canary audit: empirical ε ≥ {audit['canary_epsilon_lower_bound']:.3f} "
            f"(accountant ε {audit['canary_accountant_epsilon']:.3f})"
        )
    if audit.get("heldout_near_duplicates"):
        figures.append(
            f"{audit['heldout_near_duplicates']} held-out near-copies of training images (split leaks)"
        )
    return figures


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _overrides(sets: list[str] | None) -> dict:
    return dict(_guard(parse_override, item) for item in sets or [])


@app.command()
def validate(recipe: RecipeArg, set_: Sets = None, smoke: Smoke = False) -> None:
    """Check a recipe and its data; print what a run would do. Writes nothing."""
    c = _guard(check, recipe, _overrides(set_), smoke)
    imgs = c.images
    typer.echo(f"{recipe}: valid")
    typer.echo(
        f"data       {len(imgs.train_labels)} training, {len(imgs.heldout_labels)} held-out images "
        f"({imgs.image_size}×{imgs.image_size}), classes {imgs.class_names}"
    )
    groups = imgs.group_counts()
    if groups is not None:
        typer.echo(
            f"groups     {groups['train']} patients (or scans) in training, {groups['heldout']} held out; "
            f"{groups['heldout_images_of_training_patients']} held-out images of training patients "
            "(the audit calibrates without them when at least 20 others remain)"
        )
    if imgs.skipped:
        typer.echo(
            f"skipped    {len(imgs.skipped)} unreadable files, e.g. {imgs.skipped[0]['file']}: {imgs.skipped[0]['reason']}"
        )
    s = c.schedule
    line = f"training   {s.steps} steps, q = {s.sample_rate:.4g}"
    if c.recipe.dp_sgd:
        eps = ", ".join(f"{k} {v:.3f}" for k, v in s.epsilon(c.recipe.privacy.delta).items())
        line += f", σ = {s.noise_multiplier:.4f} → ε {eps} at δ = {c.recipe.privacy.delta:g}"
        parts = [f"the ledger of {v.what}" for v in c.brought if v.kind == "composed"]
        if c.recipe.warm_start is not None:
            parts.append(f"the warm start's query (σ = {c.recipe.warm_start.noise_multiplier:g})")
        if parts:
            line += " (composed with " + " and ".join(parts) + ")"
    if not c.recipe.private:
        line += ", NOT PRIVATE" + (" (privacy.noise_seed: the DP noise is known)" if c.recipe.dp_sgd else "")
    typer.echo(line)


@app.command()
def plan(
    recipe: RecipeArg,
    minutes: Annotated[float, typer.Option("--minutes", help="Wall time for DP-SGD on this machine.")] = 30.0,
    n_train: Annotated[
        int | None,
        typer.Option("--n-train", help="N; else counted from the data source (nothing is trained)."),
    ] = None,
    min_steps: Annotated[int, typer.Option("--min-steps", help="Fewest DP-SGD steps to propose.")] = 100,
    set_: Sets = None,
) -> None:
    """Probe this machine's DP-SGD speed on random images, then give, for a wall-time budget,
    batch size, steps, σ and noise per step at the recipe's ε, and the --set lines to apply."""
    from . import budget as planning
    from .data import DataError, load_images
    from .recipe import load_recipe

    r = _guard(load_recipe, recipe, _overrides(set_))
    if not r.dp_sgd:
        _fail(2, f"error: {recipe}: privacy.enabled: plan is for DP-SGD recipes")
    images = None
    if n_train is None:
        try:
            images = load_images(r.data, r.modality)
        except DataError as e:
            _fail(2, f"error: {recipe}: data.{e.field}: {e}")
        n_train = len(images.train_labels)
    prior = _guard(planning.planned_prior, r, images)
    n_classes = len(r.data.classes)
    p = planning.probe(r, n_classes)
    typer.echo(
        f"probe      {p.examples_per_s:.1f} DP example-gradients/s on this machine "
        f"({r.privacy.per_example_gradients}, K = {r.privacy.noise_multiplicity}, chunks of "
        f"{r.training.max_physical_batch_size}, {p.batch} random {r.data.image_size}×{r.data.image_size} images)"
    )
    typer.echo(
        f"budget     {minutes:g} min of DP-SGD, N = {n_train}, ε = {r.privacy.target_epsilon:g}, "
        f"δ = {r.privacy.delta:g}, C = {r.privacy.max_grad_norm:g}"
        + (
            f" (composed with {len(prior)} accountant entries before DP-SGD: the warm start, a checkpoint's ledger)"
            if prior
            else ""
        )
    )
    typer.echo(f"{'B':>7} {'steps':>7} {'σ':>8} {'σC/B':>10}")
    opts = planning.options(r, n_train, p.examples_per_s, minutes, prior)
    for o in opts:
        sigma = f"{o.noise_multiplier:8.3f}" if o.noise_multiplier else f"{'-':>8}"
        noise = f"{o.noise_per_step:10.2e}" if o.noise_per_step else f"{'-':>10}"
        typer.echo(f"{o.batch:>7} {o.steps:>7} {sigma} {noise}")
    cur = planning.current(r, n_train, prior)
    typer.echo(
        f"recipe     B = {cur.batch}, {cur.steps} steps: σ = {cur.noise_multiplier:.3f}, σC/B = "
        f"{cur.noise_per_step:.2e}, about {planning.minutes_for(cur, p.examples_per_s):.0f} min here"
    )
    best = planning.choose(opts, min_steps)
    if best is None:
        _fail(2, f"error: {recipe}: no batch size reaches ε with ≥ {min_steps} steps in {minutes:g} min")
    typer.echo(
        f"proposed   B = {best.batch}, {best.steps} steps: σ = {best.noise_multiplier:.3f}, "
        f"σC/B = {best.noise_per_step:.2e} (least noise per step with ≥ {min_steps} steps)"
    )
    typer.echo("apply      " + " ".join(planning.set_lines(best)))
    if r.pretrain or r.warm_start:
        typer.echo("note       pre-training and the warm start run before DP-SGD and are not in this budget")


@app.command()
def run(
    recipe: RecipeArg,
    out: Annotated[Path | None, typer.Option("--out", help="Parent folder of the run directory.")] = None,
    audit_dir: AuditDir = None,
    set_: Sets = None,
    smoke: Smoke = False,
    quiet: Quiet = False,
) -> None:
    """Run every stage: data, pretrain, train, sample, audit-models, audit, release, evaluate."""
    c = _guard(check, recipe, _overrides(set_), smoke)
    run_dir = create_run(c, out)
    typer.echo(f"run directory: {run_dir.root}", err=True)
    _guard(run_remaining, c, run_dir, StageOptions(progress=not quiet, audit_root=audit_dir))
    _print_summary(run_dir.root)


@app.command()
def create(
    recipe: RecipeArg,
    out: Annotated[Path | None, typer.Option("--out", help="Parent folder of the run directory.")] = None,
    set_: Sets = None,
    smoke: Smoke = False,
) -> None:
    """Create a run directory (recipe + data stage) and print its path; run its stages later,
    e.g. `train` under torchrun."""
    c = _guard(check, recipe, _overrides(set_), smoke)
    typer.echo(create_run(c, out).root)


@app.command()
def resume(run_dir: RunDirArg, audit_dir: AuditDir = None, quiet: Quiet = False) -> None:
    """Finish an interrupted run: training continues from its last checkpoint."""
    checked, rd = _guard(open_run, run_dir)
    _guard(run_remaining, checked, rd, StageOptions(progress=not quiet, audit_root=audit_dir))
    _print_summary(rd.root)


def _stage_command(stage: str, doc: str):
    def command(run_dir: RunDirArg, audit_dir: AuditDir = None, quiet: Quiet = False) -> None:
        checked, rd = _guard(open_run, run_dir)
        _guard(run_stage, stage, checked, rd, StageOptions(progress=not quiet, audit_root=audit_dir))
        _print_summary(rd.root)

    command.__doc__ = doc
    return command


app.command("pretrain")(_stage_command("pretrain", "Run the public (non-DP) pre-training of a run."))
app.command("train")(_stage_command("train", "Train (or finish training) the model of a run."))


@app.command()
def sample(
    run_dir: RunDirArg,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard", help="Generate only shard i of n (e.g. 0/4); the last one assembles the sample store."
        ),
    ] = None,
    audit_dir: AuditDir = None,
    quiet: Quiet = False,
) -> None:
    """Generate the synthetic samples of a run (under torchrun: one shard per rank)."""
    shard_of_n = None
    if shard is not None:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            _fail(2, f"error: --shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
        shard_of_n = (i, n)
    checked, rd = _guard(open_run, run_dir)
    _guard(
        run_stage,
        "sample",
        checked,
        rd,
        StageOptions(progress=not quiet, audit_root=audit_dir, shard=shard_of_n),
    )
    if rd.is_done("sample"):
        _print_summary(rd.root)


app.command("audit-models")(
    _stage_command(
        "audit_models",
        "Train the audit's own models (canary run, non-private reference) if the recipe asks.",
    )
)
app.command("audit")(_stage_command("audit", "Run the memorization audit on a run's samples."))
app.command("release")(_stage_command("release", "Write the samples that passed the audit."))
app.command("evaluate")(
    _stage_command("evaluate", "TSTR/TRTR, fidelity and diversity of the released samples.")
)


@app.command()
def publish(
    run_dir: RunDirArg,
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="Dataset repository, ORG/NAME.", show_default=False)
    ],
    private: Annotated[bool, typer.Option("--private/--public", help="Repository visibility.")] = True,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to.")] = None,
    force_not_private: Annotated[
        bool, typer.Option("--force-not-private", help="Publish a run trained without DP (the card says so).")
    ] = False,
    force_blocked: Annotated[
        bool,
        typer.Option(
            "--force-blocked", help="Publish although the audit blocked the release (the card says so)."
        ),
    ] = False,
    max_shard_size: Annotated[
        str,
        typer.Option(
            "--max-shard-size", help="Largest Parquet shard uploaded (one is built in memory at a time)."
        ),
    ] = "200MB",
    model: Annotated[
        bool,
        typer.Option(
            "--model", help="Push the DP generator (a diffusers pipeline) and its model card instead."
        ),
    ] = False,
    force_withheld: Annotated[
        bool,
        typer.Option(
            "--force-withheld",
            help="With --model: publish the generator although the audit withheld samples it can draw again.",
        ),
    ] = False,
) -> None:
    """Push the released dataset, its card, the public audit summary and the recipe to the Hub
    (or, with --model, the generator and its model card to a model repository)."""
    from .publish import PublishRefused, hub_failure, publish_model
    from .publish import publish as push
    from .rundir import RunDir

    try:
        if model:
            out = publish_model(
                RunDir(run_dir), repo_id, private, revision, force_not_private, force_blocked,
                force_withheld=force_withheld,
            )  # fmt: skip
        else:
            out = push(
                RunDir(run_dir), repo_id, private, revision, force_not_private, force_blocked,
                max_shard_size=max_shard_size,
            )  # fmt: skip
    except PublishRefused as e:
        _fail(3, f"publish refused: {e}")
    except Exception as e:  # noqa: BLE001 - network and authentication failures get one line
        reason = hub_failure(e)
        if reason is None:
            raise
        _fail(1, f"error: publish {repo_id} failed: {reason}; nothing local changed")
    what = (
        f"{len(out['files'])} files (pipeline and model card)"
        if model
        else ", ".join(f"{k} {v}" for k, v in out["splits"].items())
    )
    typer.echo(
        f"published  {out['repo_id']} ({'private' if out['private'] else 'public'}, revision {out['revision']}): "
        + what
    )
    for w in out["warnings"]:
        typer.secho(f"warning    {w}", fg=typer.colors.RED)


@app.command()
def inspect(
    run_dir: RunDirArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a run's lineage: recipe, data manifest, checkpoint hashes, ε, audit, release, publication."""
    import json

    import yaml

    from .provenance import lineage
    from .rundir import RunDir

    try:
        out = lineage(RunDir(run_dir))
    except FileNotFoundError as e:
        _fail(2, f"error: {e}")
    typer.echo(
        json.dumps(out, indent=2) if as_json else yaml.safe_dump(out, sort_keys=False, allow_unicode=True)
    )


if __name__ == "__main__":  # pragma: no cover
    app()
