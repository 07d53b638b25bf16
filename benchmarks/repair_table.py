"""The repair table of benchmarks/RESULTS.md ("## repair") from demo reports.

    python benchmarks/repair_table.py DEMO_DIR [DEMO_DIR ...]

For each ``moe-fast demo`` report (report.json): at the seeded r with prose calibration, the best pure
pruning row (any criterion), the reconstruction row the repairs ran on, and each repaired row; KL
on both test splits (mean ± sd over the calibration samples), and the goal check of issue 24 (the
best repaired KL at least 15% below the best pure pruning row, by more than the larger sd).
"""

from __future__ import annotations

import json
import os
import sys

from moe_fast.demo.summary import GOAL, REPAIRED, RECONSTRUCTION, SPLITS

PURE = RECONSTRUCTION + ("frequency", "reap", "ean", "random")


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.4f} ± {row[key + '_sd']:.4f}"


def table(report: dict) -> list[str]:
    rows = report["rows"]
    keep = report["settings"]["seeded_keeps"][0]
    at = [r for r in rows if r["keep"] == keep and r["calib"] in ("prose", "-")]
    repaired = [r for r in at if r["method"] in REPAIRED]
    if not repaired:
        return [f"{report['settings']['model']}: no repair rows"]
    searched = {r["method"].split(" + ")[0] for r in repaired}
    lines = [f"{report['settings']['model']}, r = {keep} of {report['model']['num_experts']}, prose calibration, "
             f"repairs on {report['settings']['repair_samples']} sequences per sample:", "",
             "| row | n | KL prose | KL code | PPL prose | PPL code | Acc next-line |", "|---|---:|---:|---:|---:|---:|---:|"]
    best = {split: min((r for r in at if r["method"] in PURE), key=lambda r: r[f"kl_{split}"]) for split in SPLITS}
    shown = []
    for r in [best["prose"], best["code"]] + [r for r in at if r["method"] in searched] + repaired:
        if r not in shown:
            shown.append(r)
    for r in shown:
        tag = " (best pure, " + "/".join(s for s in SPLITS if best[s] is r) + ")" if any(best[s] is r for s in SPLITS) else ""
        lines.append(f"| {r['method']}{tag} | {r['n']} | {_cell(r, 'kl_prose')} | {_cell(r, 'kl_code')} | "
                     f"{r['ppl_prose']:.2f} | {r['ppl_code']:.2f} | {r.get('acc_next-line', float('nan')):.3f} |")
    lines.append("")
    for split in SPLITS:
        b = best[split]
        top = min(repaired, key=lambda r: r[f"kl_{split}"])
        gap = b[f"kl_{split}"] - top[f"kl_{split}"]
        spread = max(b[f"kl_{split}_sd"], top[f"kl_{split}_sd"])
        rel = gap / b[f"kl_{split}"]
        met = rel >= GOAL and gap > spread
        lines.append(f"- {split} test: best repaired {top['method']} {top[f'kl_{split}']:.4f} vs best pure {b['method']} "
                     f"{b[f'kl_{split}']:.4f}: {-rel:+.1%} (goal -{GOAL:.0%}; difference {gap:.4f} vs spread {spread:.4f}): "
                     f"{'met' if met else 'NOT met'}")
    return lines


def main(paths: list[str]) -> int:
    for path in paths:
        with open(os.path.join(path, "report.json")) as f:
            print("\n".join(table(json.load(f))), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
