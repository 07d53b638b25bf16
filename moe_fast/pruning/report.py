"""What a pruning run found: one ``LayerResult`` per MoE layer, gathered into a ``PruneReport``.

The report is written as ``moe_fast_report.json`` next to the pruned checkpoint and, layer by
layer, into the resume file; its keys are part of the user-facing format and do not change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from torch import nn

REPORT_NAME = "moe_fast_report.json"


@dataclass
class LayerResult:
    kept: list[int]
    dropped: list[int]
    loss: dict[str, float]  # "<dropped ids comma-joined>" -> objective value
    search: str = "exhaustive"
    expert_outputs_per_token: float | None = None  # lazy search: (token, expert) outputs run per token
    scored_exactly: int | None = None  # lazy search: candidates with an exact score (``loss``)
    discarded_by_bound: int | None = None  # lazy exhaustive: candidates whose lower bound lost
    search_state_bytes: int | None = None  # most bytes of per-token search state held (Gram, outputs, ids, ...)
    lazy_detail: dict | None = None  # lazy search: where the outputs went (``lazy_search.LazyInfo.summary``)
    # repair: loss_before / loss_after (the run's objective, weights as stored), and per method: lstsq
    # ridge, ... (``pruning.repair``); merge strength, into, cosine, mass (``pruning.repair_merge``)
    repair: dict | None = None
    # statistic criteria (frequency, reap, ean): the per-expert scores the layer kept the largest of
    criterion_scores: list[float] | None = None

    def lazy_note(self) -> str:
        """'; 2.41 expert outputs/token, 12 scored exactly, 58 discarded by bound' (empty without lazy search)."""
        if self.expert_outputs_per_token is None:
            return ""
        note = f"; {self.expert_outputs_per_token:.2f} expert outputs/token, {self.scored_exactly} scored exactly"
        if self.discarded_by_bound is not None:
            note += f", {self.discarded_by_bound} discarded by bound"
        return note


def loss_key(dropped: Sequence[int]) -> str:
    """The key of a dropped set in ``LayerResult.loss`` (JSON keys must be strings)."""
    return ",".join(str(e) for e in dropped)


@dataclass
class PruneReport:
    layers: dict[int, LayerResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    settings: dict = field(default_factory=dict)
    world_size: int = 1  # ranks that shared the calibration tokens

    @property
    def kept(self) -> dict[int, list[int]]:
        return {i: r.kept for i, r in self.layers.items()}

    def pruning_record(self) -> dict:
        """What the pruned checkpoint's config.json records about the run."""
        s = self.settings
        record = {
            "kept_experts": {str(i): r.kept for i, r in sorted(self.layers.items())},
            "objective": s["objective"], "mode": s["mode"], "search": s["search"], "calibration": s["calibration"],
        }
        if s.get("criterion") is not None:
            record["criterion"] = s["criterion"]
        if s.get("repair") is not None:
            record["repair"] = s["repair"]
        return record

    def to_dict(self) -> dict:
        return {
            "layers": {str(i): layer_dict(r) for i, r in sorted(self.layers.items())},
            "timings": self.timings,
            "peak_memory_bytes": self.peak_memory_bytes,
            "settings": self.settings,
            "world_size": self.world_size,
        }

    def _repair_lines(self) -> list[str]:
        """The repair's per-layer table (none without a repair): the objective before and after, the
        ridge (lstsq) or merge strength (merge)."""
        rows = [(i, r.repair) for i, r in sorted(self.layers.items()) if r.repair is not None]
        if not rows:
            return []
        header = "ridge" if all(rep["method"] == "lstsq" for _, rep in rows) else "ridge/str."
        lines = [f"{'layer':>5}  {'repair':<7} {'loss before':>14} {'loss after':>14} {'change':>8} {header:>10} {'note':<8}"]
        for i, rep in rows:
            before, after = rep["loss_before"], rep["loss_after"]
            change = f"{(after - before) / before:+.1%}" if before else "-"
            value = rep.get("ridge") if rep["method"] == "lstsq" else rep.get("strength")
            ridge = "-" if value is None else f"{value:.3g}"
            note = "reverted" if rep.get("reverted") else ("unfit" if value is None else "")
            lines.append(f"{i:>5}  {rep['method']:<7} {before:>14.6g} {after:>14.6g} {change:>8} {ridge:>10} {note:<8}")
        return lines

    @classmethod
    def load(cls, path: str) -> "PruneReport":
        """A report as :meth:`save` wrote it."""
        with open(path) as f:
            data = json.load(f)
        layers = {int(i): LayerResult(**r) for i, r in data["layers"].items()}
        return cls(layers, data["timings"], data["peak_memory_bytes"], data["settings"], data.get("world_size", 1))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def table(self) -> str:
        """Readable per-layer summary: kept, dropped, the chosen set's loss and the runner-up (the
        smallest loss of another complete set the search scored: as many experts dropped; greedy
        and beam search also score smaller sets on the way, which are not candidates). A statistic
        criterion scores no candidate set: its loss columns are "-"."""
        lines = [f"{'layer':>5}  {'kept':<28} {'dropped':<16} {'loss':>14} {'runner-up':>14} {'evaluated':>9} {'bounded':>7} {'outputs/tok':>11}"]
        for i, r in sorted(self.layers.items()):
            values = r.loss.values()
            best, second = chosen_and_runner_up(r)
            bounded = "-" if r.discarded_by_bound is None else str(r.discarded_by_bound)
            outputs = "-" if r.expert_outputs_per_token is None else f"{r.expert_outputs_per_token:.2f}"
            lines.append(
                f"{i:>5}  {','.join(map(str, r.kept)):<28} {','.join(map(str, r.dropped)):<16} {_number(best, r):>14} {_number(second, r):>14}"
                f" {len(values):>9} {bounded:>7} {outputs:>11}"
            )
        lines += self._repair_lines()
        t = self.timings
        lines.append("timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in t.items()))
        lines.append(f"peak memory: {self.peak_memory_bytes / 2**20:.1f} MiB ({self.settings.get('peak_memory_kind', '')})")
        return "\n".join(lines)


def _number(value: float, result: LayerResult) -> str:
    """A loss for the table; "-" for a statistic criterion, which scores no candidate set."""
    return "-" if not result.loss else f"{value:.6g}"


def layer_dict(result: LayerResult) -> dict:
    """A layer's JSON entry; ``repair`` only where a repair ran (reports without one are unchanged)."""
    entry = dict(vars(result))
    for optional in ("repair", "criterion_scores"):
        if entry.get(optional) is None:
            entry.pop(optional, None)
    return entry


def chosen_and_runner_up(result: LayerResult) -> tuple[float, float]:
    """(the chosen dropped set's loss, the smallest loss among the other scored sets of its size);
    NaN where there is none."""
    nan = float("nan")
    chosen = loss_key(result.dropped)
    size = len(result.dropped)
    others = [v for key, v in result.loss.items() if key != chosen and len(key.split(",")) == size and key]
    return result.loss.get(chosen, nan), min(others, default=nan)


class PruneResult(NamedTuple):
    model: nn.Module | None
    report: PruneReport
