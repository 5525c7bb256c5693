"""Gather `benchmarks/gpu_check.sh`'s parts into OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.

    python benchmarks/gpu_check_summary.py OUT_DIR

A part that failed or ran out of time is listed with its exit status (124: its time limit) and
the last line of its log; nothing is filled in for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PARTS = ("train_fp32", "train_bf16", "sample_fp32", "sample_bf16", "audit")


def read_part(out: Path, name: str) -> dict:
    rc_file, data = out / f"{name}.rc", out / f"{name}.json"
    part = {"rc": int(rc_file.read_text()) if rc_file.is_file() else None}
    if data.is_file():
        part["result"] = json.loads(data.read_text())
    elif (out / f"{name}.log").is_file():
        lines = (out / f"{name}.log").read_text().strip().splitlines()
        part["last_line"] = lines[-1] if lines else ""
    return part


def train_table(parts: dict) -> list[str]:
    lines = [
        "| precision | mode | K | examples/s | peak MiB | DP / non-private |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("train_fp32", "train_bf16"):
        results = parts[name].get("result", {}).get("results", [])
        base = {r["k"]: r["examples_per_s"] for r in results if r["mode"] == "nonprivate"}
        for r in results:
            ratio = r["examples_per_s"] / base[r["k"]] if r["k"] in base else float("nan")
            lines.append(
                f"| {name[6:]} | {r['mode']} | {r['k']} | {r['examples_per_s']:.0f} | {r['peak_mib']:.0f} | {ratio:.2f}× |"
            )
    return lines


def other_lines(parts: dict) -> list[str]:
    lines = []
    for name in ("sample_fp32", "sample_bf16"):
        r = parts[name].get("result")
        if r:
            lines.append(
                f"- sampling, {name[7:]}: {r['images_per_s']:.1f} images/s ({r['image_size']} px, {r['ddim_steps']} DDIM steps, batch {r['batch']})"
            )
    a = parts["audit"].get("result")
    if a:
        pairs = a["n"] ** 2
        lines.append(
            f"- pixel-L2 exact search, {a['n']:,} x {a['n']:,} at {a['size']} px: {a['pixel_l2_torch_s']:.1f} s ({pairs / a['pixel_l2_torch_s']:,.0f} pairs/s)"
        )
        if "faiss_flat_s" in a:
            lines.append(f"- faiss-cpu IndexFlatL2 on the same: {a['faiss_flat_s']:.1f} s")
        spaces = ", ".join(f"{k} {v:.2f} s" for k, v in a["spaces_s"].items())
        lines.append(f"- each space, {a['space_n']:,} x {a['space_n']:,} at {a['space_size']} px: {spaces}")
    for name, p in parts.items():
        if p["rc"] != 0:
            why = "time limit" if p["rc"] == 124 else f"exit {p['rc']}"
            lines.append(f"- **{name} did not finish** ({why}): {p.get('last_line', '')}")
    return lines


def main() -> None:
    out = Path(sys.argv[1])
    parts = {name: read_part(out, name) for name in PARTS}
    env = (out / "env.txt").read_text() if (out / "env.txt").is_file() else ""
    (out / "gpu_check.json").write_text(json.dumps({"env": env, "parts": parts}, indent=1))
    device = next(
        (p["result"]["device"] for p in parts.values() if "result" in p and "device" in p["result"]), "?"
    )
    md = [f"# synthfactory GPU check: {device}", "", *train_table(parts), "", *other_lines(parts), ""]
    (out / "gpu_check.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
