"""``moe-fast prune --plan``: memory and expert-FLOP budget of a pruning run, from the config only.

Lets a user size a run (for example Mixtral-8x22B on one card, or on N ranks) before any weight
is read. Parameter counts come from the model built on the meta device (no memory); the rest
follows the pipeline's memory model (moe_fast.pruning.pipeline): streaming holds the embedding, one decoder layer, the
calibration hidden states (two streams in progressive mode), the layer's per-token statistics
and one chunk of rank-bounded expert outputs. Grouped routers (``topk_group < n_group``) are
budgeted at their worst case: every expert's output on every token (``grouped_outputs``).
"""

from __future__ import annotations

import json
import math
import os

import torch

from moe_fast.adapters import get_adapter
from moe_fast.checkpoint.loading import resolve_dtype
from moe_fast.pruning.grouped_search import balanced_count
from moe_fast.pruning.settings import check_grouped_keep, grouped_routing

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_plan(
    model: str,
    keep: int,
    *,
    n_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 8,
    mode: str = "layerwise",
    dtype: str = "auto",
    chunk_tokens: int = 4096,
    world_size: int = 1,
) -> dict:
    """The budget of ``prune(model, ..., keep)`` per rank; ``model`` is a directory with config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model!r} has no config.json")
    config = AutoConfig.from_pretrained(model)
    adapter = get_adapter(config)
    E, k = adapter.num_experts, adapter.top_k
    num_keep = keep
    if not k <= num_keep < E:
        raise ValueError(f"keep must satisfy top-k ({k}) <= keep < number of experts ({E}); got {num_keep}")
    grouped = grouped_routing(adapter)
    if grouped is not None:
        check_grouped_keep(adapter, num_keep)
    dt = resolve_dtype(dtype, config)
    nbytes = _BYTES[dt]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    layers = adapter.decoder_layers(skeleton)
    H = int(config.hidden_size)
    rank_bound = k + (E - num_keep)  # M: experts run and kept per token
    batches = math.ceil(n_samples / batch_size)
    if batches < world_size:
        raise ValueError(f"{batches} calibration batches cannot be shared by {world_size} ranks")
    tokens = math.ceil(batches / world_size) * batch_size * seq_len  # per rank (upper bound)
    streams = 2 if mode == "progressive" else 1
    hidden_bytes = streams * tokens * H * nbytes
    target = rank_bound * 4 if mode == "layerwise" else rank_bound * 4 + 4
    stats_per_token = (rank_bound * (rank_bound + 1) // 2) * 4 + rank_bound * 4 + E * 4 + 8 + target
    outputs_per_token = rank_bound  # expert outputs run per token
    candidates = math.comb(E, num_keep)  # the paper's enumeration: one block forward each
    if grouped is not None:
        # The grouped search (grouped_outputs) keeps the block inputs, logits, batch ids, the unpruned
        # top-k (ids, weights), the [T, E] pool map and the outputs computed: data-dependent, between
        # k and E per token; the budget takes E (the pool's capacity may double: 2 E rows at most).
        outputs_per_token = E
        candidates = balanced_count(E, grouped.n_group, E - num_keep)
        target = H * nbytes if mode == "progressive" else 0
        stats_per_token = H * nbytes + E * 4 + 8 + k * 12 + E * 8 + 2 * E * H * nbytes + target
    embed_bytes = _numel(skeleton.get_input_embeddings()) * nbytes
    rows = []
    for i, layer in enumerate(layers):
        block = adapter.moe_block(layer)
        row = {"layer": i, "moe": block is not None, "weight_bytes": _numel(layer) * nbytes}
        if block is not None:
            expert_params = _numel(block.experts) / E
            flops_expert = 2 * expert_params  # one expert MLP on one token
            row.update({
                "stats_bytes": tokens * stats_per_token,
                "expert_outputs_chunk_bytes": min(chunk_tokens, tokens) * (k if grouped else rank_bound) * H * nbytes,
                "expert_flops": tokens * outputs_per_token * flops_expert,
                "paper_expert_flops": tokens * (1 + candidates) * k * flops_expert,
            })
        else:
            row.update({"stats_bytes": 0, "expert_outputs_chunk_bytes": 0, "expert_flops": 0, "paper_expert_flops": 0})
        row["peak_bytes"] = embed_bytes + row["weight_bytes"] + hidden_bytes + row["stats_bytes"] + row["expert_outputs_chunk_bytes"]
        rows.append(row)
    model_bytes = _numel(skeleton) * nbytes
    flops = sum(r["expert_flops"] for r in rows)
    paper = sum(r["paper_expert_flops"] for r in rows)
    return {
        "model": model, "model_type": config.model_type, "dtype": str(dt).replace("torch.", ""),
        "num_experts": E, "top_k": k, "keep": num_keep, "rank_bound": rank_bound, "mode": mode,
        "n_samples": n_samples, "seq_len": seq_len, "batch_size": batch_size, "world_size": world_size,
        "tokens_per_rank": tokens, "model_bytes": model_bytes, "embedding_bytes": embed_bytes,
        "hidden_state_bytes": hidden_bytes, "peak_bytes": max(r["peak_bytes"] for r in rows),
        "expert_flops": flops, "paper_expert_flops": paper,
        "flop_ratio": paper / flops if flops else None, "layers": rows,
        **({"grouped_search": f"equal experts per group (n_group={grouped.n_group}, per group {num_keep // grouped.n_group} "
                              f"of {E // grouped.n_group}); outputs per token between {k} and {E}: the budget takes {E}"}
           if grouped is not None else {}),
    }


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def plan_table(plan: dict) -> str:
    """Readable plan; consecutive layers with the same budget share one row."""
    head = (
        f"{plan['model_type']} {plan['dtype']}: E={plan['num_experts']} top-{plan['top_k']}, keep {plan['keep']} "
        + (f"(grouped search: up to {plan['num_experts']} outputs per token)" if "grouped_search" in plan else f"(rank bound M={plan['rank_bound']})")
        + f", {plan['mode']}, {plan['n_samples']} x {plan['seq_len']} tokens "
        f"on {plan['world_size']} rank(s): {plan['tokens_per_rank']} tokens per rank"
    )
    lines = [head, f"{'layers':>9} {'weights GiB':>12} {'hidden GiB':>11} {'stats GiB':>10} {'chunk GiB':>10} {'peak GiB':>9} {'expert TFLOP':>13} {'paper TFLOP':>12}"]
    groups: list[list[dict]] = []
    key = lambda r: tuple(v for k, v in r.items() if k != "layer")  # noqa: E731
    for r in plan["layers"]:
        if groups and key(groups[-1][-1]) == key(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    for g in groups:
        r = g[0]
        span = f"{g[0]['layer']}" if len(g) == 1 else f"{g[0]['layer']}-{g[-1]['layer']}"
        lines.append(
            f"{span:>9} {_gib(r['weight_bytes']):>12} {_gib(plan['hidden_state_bytes']):>11} {_gib(r['stats_bytes']):>10} "
            f"{_gib(r['expert_outputs_chunk_bytes']):>10} {_gib(r['peak_bytes']):>9} {r['expert_flops'] / 1e12:>13.2f} "
            f"{r['paper_expert_flops'] / 1e12:>12.2f}"
        )
    ratio = plan["flop_ratio"]
    lines.append(
        f"whole model {_gib(plan['model_bytes'])} GiB; streaming peak about {_gib(plan['peak_bytes'])} GiB per rank "
        f"(embedding {_gib(plan['embedding_bytes'])} GiB included); expert FLOPs {plan['expert_flops'] / 1e12:.1f} T "
        f"vs the paper's enumeration {plan['paper_expert_flops'] / 1e12:.1f} T"
        + (f" ({ratio:.1f}x fewer)" if ratio else "")
    )
    return "\n".join(lines)


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)
