"""The log-prob gaps the vLLM tests measured (name -> {"unpruned", "pruned", "tolerance"} and, for the
family checkpoints, the same of the typical per-position gap: "unpruned_typical", ...), printed
after the run by conftest.py so that check_vllm.sh's output states them."""

from __future__ import annotations

GAPS: dict[str, dict[str, float]] = {}
# Skipping exports (tests/serving/vllm/test_skipping_families.py): family -> {"gap": unskipped vLLM vs
# transformers, "skipping_gap": vLLM skipping vs moe_fast, "effect": vLLM skipping vs unskipped
# transformers}, each a (max, q90) pair over positions, and "skipped": (vLLM, moe_fast) slots per layer.
SKIP_GAPS: dict[str, dict] = {}


def table() -> list[str]:
    """One line per checkpoint: its unpruned and pruned max |log p(vLLM) - log p(transformers)|."""
    lines = [f"{'checkpoint':<16} {'unpruned gap':>13} {'pruned gap':>11} {'tolerance':>10}   typical (q90): unpruned / pruned / tolerance"]
    for name, gap in sorted(GAPS.items()):
        line = f"{name:<16} {gap['unpruned']:>13.2e} {gap['pruned']:>11.2e} {gap['tolerance']:>10.2e}"
        if "unpruned_typical" in gap:
            line += f"   {gap['unpruned_typical']:.2e} / {gap['pruned_typical']:.2e} / {gap['typical_tolerance']:.2e}"
        lines.append(line)
    return lines


def skip_table() -> list[str]:
    """One line per skipping export: max / q90 of its three differences and the skipped slots."""
    lines = [f"{'family':<14} {'unskipped gap':>19} {'skipping gap':>19} {'skipping effect':>19}   skipped slots per layer (vLLM/moe_fast)"]
    for name, g in sorted(SKIP_GAPS.items()):
        cells = " ".join(f"{g[key][0]:>9.2e}/{g[key][1]:.1e}" for key in ("gap", "skipping_gap", "effect"))
        skipped = " ".join(f"{v}/{m}" for v, m in g.get("skipped", []))
        lines.append(f"{name:<14} {cells}   {skipped}")
    return lines
