"""``moe-fast demo``: the paper's comparison, end to end, on a shipped small MoE and real text.

Why: a newcomer with no GPU and no network sees every criterion work on a real (small) MoE
and learns which one to use on which kind of model. Everything comes with the package: the
models (``builtin:small-mixtral``, 8 experts top-2; ``builtin:small-qwen3-moe``, fine-grained)
and the data (``builtin:python-prose`` / ``builtin:python-code``: calibration splits for
pruning and skipping, test splits for evaluation).

One run:
* calibrates on prose (task-agnostic) and on code (task-specific), each on several
  calibration samples (seeds) so that differences can be compared with their spread;
* from one pass per sample (:mod:`.selection`), selects experts at every r by the paper's
  reconstruction loss (exhaustive, or greedy and beam for wide models), frequency, REAP and
  EAN; progressive reconstruction runs ``moe_fast.prune`` per r; random draws five times;
* scores every selection on the masked model (:mod:`.scoring`): perplexity and the mean KL
  divergence from the unpruned model on each test split, accuracy on a fixed subset of the
  built-in tasks ``moe_fast_next_line`` and ``moe_fast_docstring`` (:mod:`moe_fast.evaluation.tasks`,
  scored as lm-eval scores them), expert FLOPs per token, size on disk; plus dynamic skipping
  alone and on the layer-wise model;
* repairs the strongest reconstruction selection at the seeded r with ``moe_fast.prune(...,
  repair="lstsq" | "merge")`` on each calibration sample (:mod:`.repair`), scored the same way;
* writes ``report.md``, ``report.json`` and ``perplexity_vs_experts.png`` (moved in whole).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from moe_fast.adapters import get_adapter
from moe_fast.data.calibration import load_calibration
from moe_fast.demo.repair import Repaired, repair_search, repaired_model
from moe_fast.demo.summary import findings, markdown_table, summarize, write_plot
from moe_fast.demo.scoring import masked, perplexity_and_kl, pruned_weight_bytes, reference, skip_betas
from moe_fast.demo.selection import (
    Selection, expert_flops_per_token, one_pass_selections, progressive_selection, random_selection,
)
from moe_fast.demo.options import CALIBS, Settings
from moe_fast.evaluation.measures import data_texts, load_model, tokenize
from moe_fast.pruning.export import export_selection
from moe_fast.host.extras import require
from moe_fast.checkpoint.staging import staged_directory
from moe_fast.evaluation.tasks.items import TASKS, task_items
from moe_fast.evaluation.tasks.scorer import accuracy, choice_loglikelihoods, encode, subset

log = logging.getLogger(__name__)

__all__ = ["Settings", "run_demo"]


def _windows(tokenizer, spec: str, tokens: int, seq_len: int) -> torch.Tensor:
    n = max(1, tokens // seq_len)
    ids = tokenize(tokenizer, data_texts(spec), n * seq_len)
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"the test split of {spec} has fewer than {seq_len} tokens")
    return ids[: n * seq_len].view(n, seq_len)


def _selections(model, tokenizer, path: str, s: Settings, bar, timings: dict) -> tuple[list[Selection], list[Repaired]]:
    adapter = get_adapter(model)
    layers = [ref.layer for ref in adapter.moe_blocks(model)]
    calibs = ["prose"] + (["code"] if s.task_specific else [])
    out: list[Selection] = []
    repaired: list[Repaired] = []
    for calib in calibs:
        for seed in s.calib_seeds:
            num_keeps = tuple(r for r in s.keeps if seed in s.seeds_for(r))
            if not num_keeps:
                continue
            ids = load_calibration(CALIBS[calib], tokenizer, s.n_samples, s.seq_len, seed)
            bar.set_postfix_str(f"one pass: {calib} seed {seed}")
            out += one_pass_selections(model, ids, num_keeps, s.criteria, s.searches, calib, seed, s.batch_size, s.beam_width)
            bar.update()
            if s.progressive and calib in s.progressive_calibs:
                for num_keep in num_keeps:
                    bar.set_postfix_str(f"progressive r={num_keep}: {calib} seed {seed}")
                    out.append(progressive_selection(path, ids, num_keep, calib, seed, s.batch_size))
                    bar.update()
            if calib in s.repair_calibs:
                for num_keep in (r for r in s.seeded_keeps if r in num_keeps):
                    for repair in s.repairs:
                        bar.set_postfix_str(f"{repair} repair r={num_keep}: {calib} seed {seed}")
                        t0 = time.perf_counter()
                        repaired.append(repaired_model(model, ids[: s.repair_samples], num_keep, repair,
                                                       repair_search(s.searches), calib, seed, s.batch_size, s.beam_width))
                        timings["repair"] = timings.get("repair", 0.0) + time.perf_counter() - t0
                        bar.update()
    for num_keep in s.keeps:
        for seed in s.random_seeds:
            out.append(random_selection(layers, adapter.num_experts, num_keep, seed))
    return out, repaired


def _selection_steps(s: Settings) -> int:
    """Steps of the selection progress bar: one pass per calibration sample, one per progressive run."""
    calibs = ["prose"] + (["code"] if s.task_specific else [])
    n = 0
    for calib in calibs:
        for seed in s.calib_seeds:
            num_keeps = [r for r in s.keeps if seed in s.seeds_for(r)]
            n += bool(num_keeps) + (len(num_keeps) if s.progressive and calib in s.progressive_calibs else 0)
            if calib in s.repair_calibs:
                n += len(s.repairs) * sum(r in s.seeded_keeps for r in num_keeps)
    return n


def run_demo(out: str, settings: Settings | None = None, keep_checkpoints: bool = False, progress: bool = True) -> dict:
    """Runs the whole comparison; writes the report directory ``out``; returns report.json's content."""
    require("demo", "the demo")  # its plot needs matplotlib: say so before minutes of work, not after
    s = settings or Settings()
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"demo output directory {out!r} exists and is not empty")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    model, tokenizer, path = load_model(s.model, torch.float32)
    adapter = get_adapter(model)
    E, k = adapter.num_experts, adapter.top_k
    s = s.for_model(E, k)
    num_moe = len(adapter.moe_blocks(model))

    t0 = time.perf_counter()
    refs = {split: reference(model, _windows(tokenizer, spec, s.eval_tokens, s.seq_len), s.batch_size)
            for split, spec in CALIBS.items()}
    timings["unpruned reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bar = tqdm(total=_selection_steps(s), desc="demo: selecting experts", disable=not progress)
    selections, repaired = _selections(model, tokenizer, path, s, bar, timings)
    bar.close()
    timings["selection"] = time.perf_counter() - t0 - timings.get("repair", 0.0)

    jobs: list[tuple[str, int, str | None, int | None, dict | None, dict | None]] = [("unpruned", E, None, None, None, None)]
    jobs += [(sel.method, sel.num_keep, sel.calib, sel.seed, sel.kept_dict, None) for sel in selections]
    if s.skipping:
        skip_ids = load_calibration(CALIBS["prose"], tokenizer, s.n_samples, s.seq_len, s.calib_seeds[0])
        jobs.append(("skipping", E, "prose", s.calib_seeds[0], None, skip_betas(model, None, skip_ids, s.skip_quantile)))
        lw = next((x for x in selections if x.method in ("layer-wise", "greedy") and x.calib == "prose"
                   and x.num_keep == max(s.keeps) and x.seed == s.calib_seeds[0]), None)
        if lw is not None:
            betas = skip_betas(model, lw.kept_dict, skip_ids, s.skip_quantile)
            jobs.append((f"{lw.method} + skipping", lw.num_keep, "prose", lw.seed, lw.kept_dict, betas))

    t0 = time.perf_counter()
    task_sets = {task: subset(task_items(task), s.task_items) for task in TASKS}
    tasks = {task: (items, encode(tokenizer, items)) for task, items in task_sets.items()}
    timings["accuracy"] = time.perf_counter() - t0  # building and tokenizing the items; scoring adds below

    t0 = time.perf_counter()
    scored: dict[tuple, dict] = {}
    variants = []
    for method, num_keep, calib, seed, kept, betas in tqdm(jobs, desc="demo: scoring", disable=not progress):
        key = (None if kept is None else tuple(sorted((l, tuple(v)) for l, v in kept.items())),
               None if betas is None else tuple(sorted((l, tuple(v)) for l, v in betas.items())))
        if key not in scored:
            scored[key] = _score(model, refs, tasks, kept, betas, num_moe, s, timings)
        result = scored[key]
        variants.append({
            "method": method, "keep": num_keep, "calib": calib, "seed": seed,
            "kept": None if kept is None else {str(l): v for l, v in kept.items()},
            "betas": None if betas is None else {str(l): v for l, v in betas.items()},
            **result,
            "expert_flops_per_token": expert_flops_per_token(model.config, result["expert_outputs_per_token"], num_moe),
            "size_bytes": pruned_weight_bytes(model, num_keep),
        })
    for rep in tqdm(repaired, desc="demo: scoring repaired", disable=not progress):
        sel = rep.selection
        result = _score(rep.model, refs, tasks, None, None, num_moe, s, timings)
        variants.append({
            "method": sel.method, "keep": sel.num_keep, "calib": sel.calib, "seed": sel.seed,
            "kept": {str(l): list(v) for l, v in sel.kept}, "betas": None, "repair": rep.layers,
            "repair_samples": s.repair_samples, **result,
            "expert_flops_per_token": expert_flops_per_token(model.config, result["expert_outputs_per_token"], num_moe),
            "size_bytes": pruned_weight_bytes(model, sel.num_keep),
        })
        scored[("repaired", sel)] = result
    del repaired
    timings["scoring"] = time.perf_counter() - t0
    timings["distinct selections scored"] = float(len(scored))

    rows = summarize(variants)
    report = {
        "settings": asdict(s),
        "model": {"path": path, "num_experts": E, "top_k": k, "moe_layers": num_moe,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "environment": _environment(),
        "routing_test": {split: ref.routing for split, ref in refs.items()},
        "rows": rows,
        "variants": variants,
        "findings": findings(rows),
        "timings_s": {name: round(t, 2) for name, t in timings.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    table = markdown_table(rows)
    with staged_directory(out) as stage:
        with open(os.path.join(stage, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(stage, "report.md"), "w") as f:
            f.write(report_markdown(report, table))
        write_plot(rows, os.path.join(stage, "perplexity_vs_experts.png"),
                   f"{os.path.basename(path)}: {E} experts, top-{k}; perplexity vs experts kept (mean ± sd over seeds)")
        if keep_checkpoints:
            _export_checkpoints(path, selections, os.path.join(stage, "checkpoints"), tokenizer)
    report["table"] = table
    return report


def _score(model, refs, tasks, kept, betas, num_moe: int, s: Settings, timings: dict) -> dict:
    result: dict = {"ppl": {}, "kl": {}, "acc": {}}
    computed = slots = tokens = 0
    with masked(model, kept, betas) as blocks:
        for split, ref in refs.items():
            result["ppl"][split], result["kl"][split] = perplexity_and_kl(model, ref, s.batch_size)
            tokens += ref.windows.numel()
        computed = sum(b.computed for b in blocks.values())  # the skip rate is that of the test splits
        slots = sum(b.slots for b in blocks.values())
        t0 = time.perf_counter()
        for task, (items, packed) in tasks.items():
            result["acc"][task] = accuracy(items, choice_loglikelihoods(model, packed))
        timings["accuracy"] += time.perf_counter() - t0
    k = slots // max(1, tokens * num_moe)
    result["expert_outputs_per_token"] = computed / max(1, tokens * num_moe)  # per MoE layer
    result["skip_rate"] = (slots - computed) / max(1, slots * (k - 1) // max(1, k)) if betas is not None else None
    return result


def _export_checkpoints(path: str, selections: list[Selection], folder: str, tokenizer) -> None:
    os.makedirs(folder)
    for sel in selections:
        if sel.seed in (None, 0) or sel.method == "random":
            name = f"{sel.method}_r{sel.num_keep}_{sel.calib or 'none'}_s{sel.seed}"
            export_selection(path, sel.kept_dict, os.path.join(folder, name),
                            {"criterion": sel.method, "keep": sel.num_keep, "calibration": sel.calib, "seed": sel.seed}, tokenizer)


def _environment() -> dict:
    import transformers

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }


def report_markdown(report: dict, table: str) -> str:
    s, m, env = report["settings"], report["model"], report["environment"]
    lines = [
        f"# moe-fast demo: expert pruning and skipping on `{s['model']}`",
        "",
        f"{m['num_experts']} experts, top-{m['top_k']}, {m['moe_layers']} MoE layers, {m['parameters'] / 1e6:.1f}M "
        f"parameters. Calibration: {s['n_samples']} x {s['seq_len']} tokens of a calibration split (`prose` = "
        f"stdlib docstrings, `code` = stdlib source), samples (seeds) {list(s['calib_seeds'])} at r in "
        f"{list(s['seeded_keeps'])}; random: {len(s['random_seeds'])} draws. Evaluation: {s['eval_tokens']} tokens "
        "of each test split (modules disjoint from training and calibration) in windows of "
        f"{s['seq_len']}; KL = mean KL(unpruned || pruned) of the next-token distribution, nats per token. "
        "Selections are scored on the unpruned model with the dropped experts masked (the exported "
        "checkpoint routes identically). Mean ± sample sd over seeds; a difference within the spread is a tie. "
        "Expert MFLOP/tok: routed-expert multiply-adds x 2 per token over all MoE layers; size: float16 weights."
        + (f" Repair rows: `moe_fast.prune(..., repair=...)` (layer-wise reconstruction selection, then the repair; "
           f"docs/REPAIR.md) at r in {list(s['seeded_keeps'])} on the first {s['repair_samples']} sequences of each "
           f"{'/'.join(s['repair_calibs'])} calibration sample, scored as exported (r experts, repaired weights)."
           if s.get("repairs") else ""),
        "",
        table,
        "",
        "## Findings (computed from the table)",
        "",
        *[f"- {f}" for f in report["findings"]],
        "",
        "## Routing of the unpruned model on the test splits (fraction of top-k slots per expert)",
        "",
    ]
    for split, layers in report["routing_test"].items():
        for i, row in enumerate(layers):
            lines.append(f"- {split}, MoE layer {i}: min {min(row):.1%}, max {max(row):.1%}: "
                         + " ".join(f"{x:.3f}" for x in row))
    lines += [
        "",
        "## Run",
        "",
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads "
        f"on {env['cpu_count']} CPUs; total {report['total_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f}' for k, v in report['timings_s'].items())}).",
        "",
        "Experts kept per layer of every run are in report.json (`variants[].kept`).",
        "",
    ]
    return "\n".join(lines)
