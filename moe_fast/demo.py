"""``moe-fast demo``: the paper's comparison, end to end, on the shipped small Mixtral.

Why: a newcomer with no GPU and no network sees the whole method work on a real (small) MoE
and real text. Everything comes with the package: the model (``builtin:small-mixtral``) and
the data (``builtin:python-prose`` / ``builtin:python-code``, test splits for evaluation,
calibration splits for pruning and skipping).

Runs, evaluating each on the prose and the code test splits:
* unpruned;
* layer-wise and progressive reconstruction-loss pruning (``moe_fast.prune``), r = 6 and 4,
  prose calibration;
* task-specific: layer-wise with code calibration vs prose calibration, r = 4 and 2;
* dynamic skipping (median betas, prose calibration), alone and on the layer-wise r = 6 model;
* baselines (:mod:`moe_fast.baselines`): random (3 seeds: mean and spread), frequency and
  router-weighted saliency, r = 6, 4 and 2.

Writes ``report.md`` (the table laid out like the paper's), ``report.json`` and
``perplexity_vs_experts.png`` into the output directory (written to a temporary directory and
moved in whole) and prints the table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import statistics
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_fast.staging import staged_directory

log = logging.getLogger(__name__)

PROSE, CODE = "builtin:python-prose", "builtin:python-code"


@dataclass
class Settings:
    """Sizes of one demo run; ``quick()`` is the shortened run the tests use."""

    model: str = "builtin:small-mixtral"
    n_samples: int = 64  # calibration sequences
    seq_len: int = 256  # calibration and perplexity window
    eval_tokens: int = 16384  # tokens scored per test split
    gen_prompts: int = 5
    new_tokens: int = 32
    keeps: tuple[int, ...] = (6, 4)  # task-agnostic pruning
    task_keeps: tuple[int, ...] = (4, 2)  # task-specific comparison
    baseline_keeps: tuple[int, ...] = (6, 4, 2)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    progressive: bool = True
    seed: int = 42
    quick: bool = False

    @classmethod
    def quick_settings(cls, model: str = "builtin:small-mixtral") -> "Settings":
        return cls(
            model=model, n_samples=8, seq_len=128, eval_tokens=1024, gen_prompts=1, new_tokens=4, keeps=(6,),
            task_keeps=(4,), baseline_keeps=(6,), random_seeds=(0, 1), progressive=True, quick=True,
        )


@dataclass
class Variant:
    """One row of the comparison before averaging: a method at one r."""

    method: str
    keep: int
    calib: str | None
    path: str
    skip: bool = False
    seed: int | None = None
    result: dict = field(default_factory=dict)
    kept: dict | None = None
    prune_seconds: float = 0.0


# -------------------------------------------------------------------------------- running
def _prune_ours(base: str, calib: torch.Tensor, keep: int, mode: str, out: str, s: Settings) -> tuple[dict, float]:
    from moe_fast.pruning import prune

    t0 = time.perf_counter()
    result = prune(base, calib, keep, out=out, mode=mode, seed=s.seed, return_model=False, progress=False)
    return {str(k): v for k, v in result.report.kept.items()}, time.perf_counter() - t0


def _evaluate(v: Variant, data: dict[str, str], s: Settings, calib_ids: dict[str, torch.Tensor]) -> dict:
    from moe_fast.evaluation import evaluate, load_model
    from moe_fast.patching import patch

    model, tokenizer, path = load_model(v.path)
    extra: dict[str, Any] = {}
    betas = None
    if v.skip:
        from moe_fast.skipping import calibrate_skipping

        cal = calibrate_skipping(model, calib_ids[v.calib], quantile=0.5, progress=False)
        betas = cal
        extra["betas"] = cal.betas
        extra["calibration_skip_rate"] = cal.skip_rate
    # every variant runs the same routing and experts code, so speed differences are the method's
    patch(model, betas=betas)
    result = evaluate(
        model, tokenizer, data, name=f"{v.method} r={v.keep}", path=path, max_tokens=s.eval_tokens, seq_len=s.seq_len,
        gen_prompts=s.gen_prompts, new_tokens=s.new_tokens, measure_skips=v.skip,
    ).to_dict()
    result["extra"].update(extra)
    return result


def run_demo(out: str, settings: Settings | None = None, keep_checkpoints: bool = False, progress: bool = True) -> dict:
    """Runs the whole comparison; writes the report directory ``out``; returns report.json's content."""
    from tqdm import tqdm

    from moe_fast.baselines import prune_baseline, routing_stats
    from moe_fast.calibration import load_calibration
    from moe_fast.evaluation import data_texts
    from moe_fast.models import resolve_model
    from transformers import AutoTokenizer

    s = settings or Settings()
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"demo output directory {out!r} exists and is not empty")
    t_start = time.perf_counter()
    base = resolve_model(s.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = {"prose": data_texts(PROSE), "code": data_texts(CODE)}
    calib_ids = {
        spec: load_calibration(spec, tokenizer, s.n_samples, s.seq_len, s.seed) for spec in (PROSE, CODE)
    }
    timings: dict[str, float] = {}

    variants: list[Variant] = [Variant("unpruned", 8, None, base)]
    plan: list[tuple[str, str, int, str]] = []  # (method, mode, keep, calib)
    for keep in s.keeps:
        plan.append(("layer-wise", "layerwise", keep, PROSE))
        if s.progressive:
            plan.append(("progressive", "progressive", keep, PROSE))
    for keep in s.task_keeps:
        if keep not in s.keeps:
            plan.append(("layer-wise", "layerwise", keep, PROSE))
        plan.append(("layer-wise", "layerwise", keep, CODE))
    with staged_directory(out) as stage:
        ckpt = os.path.join(stage, "checkpoints")
        os.makedirs(ckpt)
        bar = tqdm(total=len(plan) + 3, desc="demo: pruning", disable=not progress)
        for method, mode, keep, calib in plan:
            path = os.path.join(ckpt, f"{mode}_r{keep}_{calib.split('-')[-1]}")
            kept, secs = _prune_ours(base, calib_ids[calib], keep, mode, path, s)
            variants.append(Variant(method, keep, calib, path, kept=kept, prune_seconds=secs))
            timings[f"prune {method} r={keep} {calib}"] = secs
            bar.update()
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM

        stats = routing_stats(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), calib_ids[PROSE], progress=False)
        timings["baseline statistics"] = time.perf_counter() - t0
        bar.update()
        for keep in s.baseline_keeps:
            for criterion in ("frequency", "saliency"):
                path = os.path.join(ckpt, f"{criterion}_r{keep}")
                kept, _ = prune_baseline(base, PROSE, keep, criterion, path, seed=s.seed, stats=stats, progress=False)
                variants.append(Variant(criterion, keep, PROSE, path, kept={str(k): v for k, v in kept.items()}))
            for seed in s.random_seeds:
                path = os.path.join(ckpt, f"random_r{keep}_s{seed}")
                kept, _ = prune_baseline(base, None, keep, "random", path, seed=seed)
                variants.append(Variant("random", keep, None, path, seed=seed, kept={str(k): v for k, v in kept.items()}))
        bar.update()
        variants.append(Variant("skipping", 8, PROSE, base, skip=True))
        r_skip = max(s.keeps)
        lw = next(v for v in variants if v.method == "layer-wise" and v.keep == r_skip and v.calib == PROSE)
        variants.append(Variant("layer-wise + skipping", r_skip, PROSE, lw.path, skip=True, kept=lw.kept))
        bar.update()
        bar.close()

        for v in tqdm(variants, desc="demo: evaluating", disable=not progress):
            t0 = time.perf_counter()
            v.result = _evaluate(v, data, s, calib_ids)
            timings[f"eval {v.method} r={v.keep} {v.calib or ''} {'' if v.seed is None else v.seed}".strip()] = time.perf_counter() - t0
        rows = summarize(variants)
        report = {
            "settings": s.__dict__,
            "environment": _environment(),
            "rows": rows,
            "variants": [
                {k: getattr(v, k) for k in ("method", "keep", "calib", "skip", "seed", "kept", "prune_seconds", "result")}
                for v in variants
            ],
            "baseline_statistics": stats.to_dict(),
            "timings_s": {k: round(t, 2) for k, t in timings.items()},
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        report["findings"] = findings(rows)
        table = markdown_table(rows)
        with open(os.path.join(stage, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(stage, "report.md"), "w") as f:
            f.write(report_markdown(report, table))
        write_plot(rows, os.path.join(stage, "perplexity_vs_experts.png"))
        if keep_checkpoints:
            for v in variants:  # keep paths in the report meaningful
                if v.path.startswith(ckpt):
                    v.path = os.path.join(os.path.abspath(out), "checkpoints", os.path.basename(v.path))
        else:
            shutil.rmtree(ckpt)
    report["table"] = table
    return report


def _environment() -> dict:
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


# -------------------------------------------------------------------------------- summary
LABELS = {
    "unpruned": "Unpruned",
    "layer-wise": "Layer-wise (recon. loss)",
    "progressive": "Progressive (recon. loss)",
    "random": "Random (mean ± sd, {n} seeds)",
    "frequency": "Frequency",
    "saliency": "Saliency (w·‖y‖)",
    "skipping": "Dynamic skipping",
    "layer-wise + skipping": "Layer-wise + skipping",
}


def summarize(variants: list[Variant]) -> list[dict]:
    """One row per (method, calibration, r); random seeds averaged (mean and sample sd)."""
    groups: dict[tuple, list[Variant]] = {}
    for v in variants:
        groups.setdefault((v.method, v.calib, v.keep), []).append(v)
    base = next(v for v in variants if v.method == "unpruned").result
    base_speed = base.get("tokens_per_s") or float("nan")
    rows = []
    for (method, calib, keep), vs in groups.items():
        res = [v.result for v in vs]
        row: dict[str, Any] = {
            "method": method,
            "label": LABELS.get(method, method).format(n=len(vs)),
            "calib": (calib or "").replace("builtin:python-", "") or "-",
            "keep": keep,
            "n": len(vs),
        }
        for split in ("prose", "code"):
            vals = [r["perplexity"][split] for r in res]
            row[f"ppl_{split}"] = statistics.fmean(vals)
            row[f"ppl_{split}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        speeds = [r["tokens_per_s"] for r in res if r.get("tokens_per_s")]
        row["tokens_per_s"] = statistics.median(speeds) if speeds else None
        row["speedup"] = row["tokens_per_s"] / base_speed if row["tokens_per_s"] else None
        row["size_mib"] = statistics.fmean(r["size_on_disk_bytes"] for r in res) / 2**20
        row["parameters"] = res[0]["parameters"]
        skips = [r["skip_rate"] for r in res if r.get("skip_rate") is not None]
        row["skip_rate"] = statistics.fmean(skips) if skips else None
        if len(vs) == 1 and vs[0].kept is not None:
            row["kept"] = vs[0].kept
        rows.append(row)
    order = ["unpruned", "layer-wise", "progressive", "random", "frequency", "saliency", "skipping", "layer-wise + skipping"]
    rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["calib"] != "prose", -r["keep"]))
    return rows


def _ppl(row: dict, split: str) -> str:
    sd = row[f"ppl_{split}_sd"]
    return f"{row[f'ppl_{split}']:.2f} ± {sd:.2f}" if row["n"] > 1 else f"{row[f'ppl_{split}']:.2f}"


def markdown_table(rows: list[dict]) -> str:
    head = ["Method", "Calib", "Experts kept", "PPL prose", "PPL code", "Tokens/s", "Speedup", "Size (MiB)", "Skip rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [
            r["label"], r["calib"], str(r["keep"]), _ppl(r, "prose"), _ppl(r, "code"),
            f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-",
            f"{r['size_mib']:.2f}",
            f"{r['skip_rate']:.1%}" if r["skip_rate"] is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _find(rows: list[dict], method: str, keep: int, calib: str = "prose") -> dict | None:
    for r in rows:
        if r["method"] == method and r["keep"] == keep and (r["calib"] == calib or r["calib"] == "-"):
            return r
    return None


def findings(rows: list[dict]) -> list[str]:
    """Plain statements comparing the methods, computed from the numbers (no spin)."""
    out = []
    keeps = sorted({r["keep"] for r in rows if r["method"] == "layer-wise"}, reverse=True)
    for keep in keeps:
        ours = [r for r in (_find(rows, "layer-wise", keep), _find(rows, "progressive", keep)) if r]
        base = [r for r in (_find(rows, m, keep) for m in ("random", "frequency", "saliency")) if r]
        if not ours or not base:
            continue
        for split in ("prose", "code"):
            best_ours = min(ours, key=lambda r: r[f"ppl_{split}"])
            best_base = min(base, key=lambda r: r[f"ppl_{split}"])
            a, b = best_ours[f"ppl_{split}"], best_base[f"ppl_{split}"]
            rel = (a - b) / b
            verdict = "beats" if rel < -0.005 else "ties with" if abs(rel) <= 0.005 else "does NOT beat"
            out.append(
                f"r={keep}, {split} test: best reconstruction-loss method ({best_ours['method']}, {a:.2f}) "
                f"{verdict} the best baseline ({best_base['method']}, {b:.2f}; {rel:+.1%})."
            )
        lw, pg = _find(rows, "layer-wise", keep), _find(rows, "progressive", keep)
        if lw and pg and lw.get("kept") is not None and lw.get("kept") == pg.get("kept"):
            out.append(f"r={keep}: progressive pruning chose the same experts as layer-wise in every layer.")
    for keep in sorted({r["keep"] for r in rows if r["method"] == "layer-wise" and r["calib"] == "code"}, reverse=True):
        code_cal, prose_cal = _find(rows, "layer-wise", keep, "code"), _find(rows, "layer-wise", keep, "prose")
        if code_cal and prose_cal:
            out.append(
                f"Task-specific r={keep}: code calibration gives code ppl {code_cal['ppl_code']:.2f} vs "
                f"{prose_cal['ppl_code']:.2f} with prose calibration; prose ppl {code_cal['ppl_prose']:.2f} vs "
                f"{prose_cal['ppl_prose']:.2f}."
            )
    skip, unpruned = _find(rows, "skipping", 8), _find(rows, "unpruned", 8)
    if skip and unpruned:
        out.append(
            f"Skipping alone skips {skip['skip_rate']:.1%} of second-expert calls; prose ppl "
            f"{unpruned['ppl_prose']:.2f} -> {skip['ppl_prose']:.2f}, code {unpruned['ppl_code']:.2f} -> "
            f"{skip['ppl_code']:.2f}; tokens/s {skip['speedup']:.2f}x of unpruned."
        )
    return out


def report_markdown(report: dict, table: str) -> str:
    s, env = report["settings"], report["environment"]
    lines = [
        "# moe-fast demo: expert pruning and skipping on the shipped small Mixtral",
        "",
        f"Model `{s['model']}` (8 experts, top-2). Calibration: {s['n_samples']} x {s['seq_len']} tokens of the "
        "calibration split (`prose` = stdlib docstrings, `code` = stdlib source). Perplexity: the first "
        f"{s['eval_tokens']} tokens of each test split (modules disjoint from training and calibration), "
        f"non-overlapping windows of {s['seq_len']}. Tokens/s: greedy generation, batch 1, "
        f"{s['new_tokens']} new tokens, best of {s['gen_prompts']} prompts; every model runs the same patched "
        "routing and experts code. Size: weight files on disk (float16).",
        "",
        table,
        "",
        "## Findings (computed from the table)",
        "",
        *[f"- {f}" for f in report["findings"]],
        "",
        "## Run",
        "",
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads "
        f"on {env['cpu_count']} CPUs; total {report['total_seconds']:.0f} s.",
        "",
        "Experts kept per layer of each single run are in report.json (`rows[].kept`, `variants[].kept`).",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- plot
COLORS = {
    "layer-wise": (31, 119, 180), "progressive": (44, 160, 44), "random": (127, 127, 127),
    "frequency": (255, 127, 14), "saliency": (148, 103, 189), "layer-wise code": (214, 39, 40),
}


def plot_series(rows: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Per method (and calibration): [(experts kept, ppl prose, ppl code)], unpruned at r = E."""
    unpruned = _find(rows, "unpruned", max(r["keep"] for r in rows))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if r["method"] in ("unpruned", "skipping", "layer-wise + skipping"):
            continue
        name = r["method"] + (" code" if r["calib"] == "code" else "")
        series.setdefault(name, []).append((r["keep"], r["ppl_prose"], r["ppl_code"]))
    for pts in series.values():
        if unpruned:
            pts.append((unpruned["keep"], unpruned["ppl_prose"], unpruned["ppl_code"]))
        pts.sort()
    return series


def write_plot(rows: list[dict], path: str) -> None:
    """PNG of perplexity (log scale) against experts kept, one panel per test split.

    Uses matplotlib when installed; otherwise a small built-in rasterizer (no dependency).
    """
    series = plot_series(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_plot_builtin(series, path)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (i, split) in zip(axes, ((1, "prose"), (2, "code"))):
        for name, pts in series.items():
            c = [x / 255 for x in COLORS.get(name, (0, 0, 0))]
            ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", color=c, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("experts kept per layer")
        ax.set_ylabel(f"perplexity ({split} test)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# A 3x5 pixel font for the built-in plot: each glyph is 5 rows of 3 bits.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "+": "000010111010000", "(": "010100100100010", ")": "010001001001010",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "=": "000111000111000", "/": "001001010100100",
}


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            for x in range(min(x0, x1), max(x0, x1) + 1):
                self.dot(x, y, c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c, width: int = 2) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(n + 1):
            t = i / n
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            self.rect(x - width // 2, y - width // 2, x + (width - 1) // 2, y + (width - 1) // 2, c)

    def text(self, x: int, y: int, s: str, c=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            g = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for col in range(3):
                    if g[r * 3 + col] == "1":
                        self.rect(x + col * scale, y + r * scale, x + col * scale + scale - 1, y + r * scale + scale - 1, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        head = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _write_plot_builtin(series: dict[str, list[tuple[int, float, float]]], path: str) -> None:
    W, H, panel_w = 1000, 420, 420
    cv = _Canvas(W, H)
    keeps = sorted({p[0] for pts in series.values() for p in pts}) or [1, 8]
    for idx, split in enumerate(("prose", "code")):
        vals = [p[idx + 1] for pts in series.values() for p in pts if p[idx + 1] > 0]
        lo, hi = (math.log(min(vals)), math.log(max(vals))) if vals else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1
        x0, y0, pw, ph = 70 + idx * (panel_w + 90), 40, panel_w, 320
        cv.text(x0, 12, f"PERPLEXITY ({split} TEST) VS EXPERTS KEPT")
        cv.rect(x0, y0 + ph, x0 + pw, y0 + ph, (0, 0, 0))
        cv.rect(x0, y0, x0, y0 + ph, (0, 0, 0))

        def X(k: int) -> float:  # more experts on the left, like a pruning curve
            span = max(keeps) - min(keeps) or 1
            return x0 + 15 + (max(keeps) - k) / span * (pw - 30)

        def Y(v: float) -> float:
            return y0 + ph - 10 - (math.log(v) - lo) / (hi - lo) * (ph - 20)

        for k in keeps:
            cv.rect(int(X(k)), y0 + ph, int(X(k)), y0 + ph + 5, (0, 0, 0))
            cv.text(int(X(k)) - 3, y0 + ph + 9, str(k))
        for j in range(5):  # log-spaced y ticks
            v = math.exp(lo + (hi - lo) * j / 4)
            cv.rect(x0 - 5, int(Y(v)), x0, int(Y(v)), (0, 0, 0))
            cv.rect(x0 + 1, int(Y(v)), x0 + pw, int(Y(v)), (230, 230, 230))
            cv.text(x0 - 62, int(Y(v)) - 5, f"{v:.1f}" if v < 100 else f"{v:.0f}")
        for name, pts in series.items():
            c = COLORS.get(name, (0, 0, 0))
            for a, b in zip(pts, pts[1:]):
                cv.line(X(a[0]), Y(a[idx + 1]), X(b[0]), Y(b[idx + 1]), c)
            for p in pts:
                cv.rect(int(X(p[0])) - 3, int(Y(p[idx + 1])) - 3, int(X(p[0])) + 3, int(Y(p[idx + 1])) + 3, c)
        cv.text(x0 + pw // 2 - 60, y0 + ph + 24, "EXPERTS KEPT")
    for i, name in enumerate(series):  # legend along the bottom
        x = 70 + i * 155
        cv.rect(x, H - 22, x + 14, H - 14, COLORS.get(name, (0, 0, 0)))
        cv.text(x + 20, H - 23, name.replace("layer-wise", "LAYERWISE"))
    with open(path, "wb") as f:
        f.write(cv.png())
