"""The log-prob gaps the vLLM tests measured (name -> {"unpruned", "pruned", "tolerance"} and, for the
family checkpoints, the same of the typical per-position gap: "unpruned_typical", ...), printed
after the run by conftest.py so that check_vllm.sh's output states them."""

from __future__ import annotations

GAPS: dict[str, dict[str, float]] = {}


def table() -> list[str]:
    """One line per checkpoint: its unpruned and pruned max |log p(vLLM) - log p(transformers)|."""
    lines = [f"{'checkpoint':<16} {'unpruned gap':>13} {'pruned gap':>11} {'tolerance':>10}   typical (q90): unpruned / pruned / tolerance"]
    for name, gap in sorted(GAPS.items()):
        line = f"{name:<16} {gap['unpruned']:>13.2e} {gap['pruned']:>11.2e} {gap['tolerance']:>10.2e}"
        if "unpruned_typical" in gap:
            line += f"   {gap['unpruned_typical']:.2e} / {gap['pruned_typical']:.2e} / {gap['typical_tolerance']:.2e}"
        lines.append(line)
    return lines
