"""Choose one recipe value on a public proxy run as if private, never on the private test split.

Runs the proxy recipe once per candidate value (`synthfactory run … --set KEY=VALUE`, one after
the other, each a full DP run with its own report), then prints a markdown table of the proxy's
TSTR, TRTR and above-chance figures and the value the rule picks:

    python benchmarks/proxy_sweep.py benchmarks/proxy/mri_alzheimer_proxy.yaml \\
        --grid training.learning_rate=0.0003,0.001,0.003 --out runs

Rule: the highest above-chance figure (the evaluation's, from TSTR and TRTR averaged over its
classifier seeds, as the run's report prints it); a candidate
within `--tie` of the incumbent (`--incumbent`, the private recipe's current value) does not
replace it, since one DP run per candidate cannot separate smaller differences.

A candidate whose run directory already holds `evaluation.json` is not run again (resume); runs
are found by name (`<recipe name>_<key>_<value>-*`) under `--out`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml


def run_name(recipe_name: str, key: str, value: str) -> str:
    return f"{recipe_name}_{key.rsplit('.', 1)[-1]}_{value}".replace(".", "p")


def finished_run(out: Path, name: str) -> Path | None:
    done = sorted(p for p in out.glob(f"{name}-*") if (p / "evaluation.json").is_file())
    return done[-1] if done else None


def run_candidate(recipe: Path, out: Path, name: str, key: str, value: str, extra: list[str]) -> Path:
    run = finished_run(out, name)
    if run is None:
        sets = [f"name={name}", f"{key}={value}", *extra]
        cli = Path(sys.executable).with_name("synthfactory")  # the console script beside this Python
        cmd = [str(cli), "run", str(recipe), "--out", str(out), "-q"]
        subprocess.run(cmd + [a for s in sets for a in ("--set", s)], check=True)
        run = finished_run(out, name)
    if run is None:
        raise SystemExit(f"{name}: the run ended without evaluation.json under {out}")
    return run


def figures(run: Path) -> dict:
    ev = json.loads((run / "evaluation.json").read_text())
    per_seed = ev["above_chance_per_seed"]
    return {
        "run": run.name,
        "epsilon": ev["epsilon"],
        "tstr": ev["tstr"]["accuracy"],
        "trtr": ev["trtr"]["accuracy"],
        "chance": ev["tstr"]["chance_accuracy"],
        "above_chance": ev[
            "tstr_over_trtr_above_chance"
        ],  # from the seeds' mean TSTR and TRTR, as reports say
        "per_seed": per_seed,
        "interval": ev["intervals"]["tstr_over_trtr_above_chance"],
        "macro_auc": ev["tstr"]["macro_auc"],
    }


def pick(rows: dict[str, dict], incumbent: str | None, tie: float) -> str:
    best = max(rows, key=lambda v: rows[v]["above_chance"])
    if incumbent in rows and rows[best]["above_chance"] - rows[incumbent]["above_chance"] <= tie:
        return incumbent
    return best


def table(key: str, rows: dict[str, dict], chosen: str) -> str:
    lines = [
        f"| {key} | ε | TRTR | TSTR | above chance: mean (95 %; seeds) | TSTR macro AUC | run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for value, r in rows.items():
        lo, hi = r["interval"]
        seeds = ", ".join(f"{s:.2f}" for s in r["per_seed"])
        mark = " **(chosen)**" if value == chosen else ""
        lines.append(
            f"| {value}{mark} | {r['epsilon']:.3f} | {r['trtr']:.3f} | {r['tstr']:.3f} | "
            f"{r['above_chance']:.2f} ({lo:.2f}–{hi:.2f}; {seeds}) | {r['macro_auc']:.2f} | `{r['run']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path, help="the proxy recipe (public data run as if private)")
    ap.add_argument("--grid", required=True, help="KEY=V1,V2,…: the recipe field and its candidates")
    ap.add_argument("--out", type=Path, default=Path("runs"), help="parent of the run directories")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="further overrides")
    ap.add_argument("--incumbent", help="the private recipe's current value (kept on a tie)")
    ap.add_argument("--tie", type=float, default=0.05, help="margin needed to replace the incumbent")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    key, _, values = args.grid.partition("=")
    name = yaml.safe_load(args.recipe.read_text())["name"]
    out = args.out.resolve()
    rows = {}
    for value in values.split(","):
        run = run_candidate(args.recipe.resolve(), out, run_name(name, key, value), key, value, args.extra)
        rows[value] = figures(run)
    chosen = pick(rows, args.incumbent, args.tie)
    print(table(key, rows, chosen))
    print(
        f"\nchosen: {key}={chosen} (rule: highest mean above chance; incumbent {args.incumbent} kept within {args.tie})"
    )
    if args.json:
        args.json.write_text(json.dumps({"key": key, "chosen": chosen, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
