"""Expert pruning: the paper's brute-force enumeration vs moe_fast.prune, same model and tokens.

Builds a Mixtral-shaped model from a config (default: hidden 1024, ffn 3584, 8 experts, top-2,
4 layers; 32 samples x 512 tokens; float32; CPU), saves it as a sharded checkpoint, then runs in
separate processes (so that each peak resident memory is its own):

* paper: load the whole model, cache every layer's MoE-block input X and output Z for every
  calibration batch on the host (one full forward per batch), then per layer and for every
  candidate dropped set re-run the stock block with the dropped logits at -inf and sum the
  per-batch Frobenius norms (float64); keep the argmin (ties: the first in enumeration order).
* moe_fast: ``moe_fast.prune(path, ids, R, out=...)``, streaming one layer at a time and writing
  the pruned checkpoint, with lazy expert outputs (the default: each token's outputs only as far
  as a candidate still in the running needs them, branch and bound over the candidates).
* moe_fast rank-bounded: the same with ``lazy=False`` (every token's k + dropped first ranks up
  front, every candidate scored).

Prints a table (time, peak RSS, ratios) and checks that all select the same experts, then the
lazy-vs-rank-bounded table: time (whole run and the expert-output + search phases), expert
outputs per token, candidates scored exactly / discarded by bound, search-state memory.

    python benchmarks/bench_prune.py                       # the full configuration
    python benchmarks/bench_prune.py --layers 2 --n-samples 8 --seq-len 256   # a shorter run
    python benchmarks/bench_prune.py --layers 2 --n-samples 8 --seq-len 512 --no-paper   # lazy vs rank-bounded only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time

from child_process import run_json_child
from results import finish

from moe_fast.host.ram import peak_rss_bytes


def add_checkpoint_arguments(p: argparse.ArgumentParser, layers: int, n_samples: int) -> None:
    """The options ``build_checkpoint`` reads (also those of bench_distributed.py, which prunes the
    same checkpoint), and the calibration batch size."""
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--n-samples", type=int, default=n_samples)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def build_checkpoint(args, path: str) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512), num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a spread of routing probabilities and expert outputs, as in trained models
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.3)
    model.save_pretrained(path, max_shard_size="500MB")
    ids = torch.randint(0, args.vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    torch.save(ids, os.path.join(path, "calib_ids.pt"))


def run_paper(path: str, keep: int, batch_size: int) -> dict:
    """The paper's algorithm (Lu et al., Expert_Sparsity layerwise_pruning), stock transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.load(os.path.join(path, "calib_ids.pt"))
    blocks = [layer.mlp for layer in model.model.layers]
    cache = {i: [] for i in range(len(blocks))}  # per layer: (X, Z) per batch, on the host

    def hook(i):
        def fn(module, args, output):
            cache[i].append((args[0].reshape(-1, args[0].shape[-1]).clone(), output.reshape(-1, output.shape[-1]).clone()))
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    with torch.inference_mode():
        for lo in range(0, ids.shape[0], batch_size):
            model(ids[lo : lo + batch_size])
    for h in handles:
        h.remove()
    E = model.config.num_local_experts
    chosen = {}
    with torch.inference_mode():
        for i, block in enumerate(blocks):
            losses = {}
            for dropped in itertools.combinations(range(E), E - keep):
                loss = 0.0
                for x, z in cache[i]:
                    logits = torch.nn.functional.linear(x, block.gate.weight).float()
                    logits[:, list(dropped)] = -math.inf
                    top, idx = torch.topk(torch.softmax(logits, dim=-1), block.gate.top_k, dim=-1)
                    top = top / top.sum(-1, keepdim=True)
                    out = block.experts(x, idx, top)
                    loss += torch.linalg.norm(z.double() - out.double()).item()
                losses[dropped] = loss
            chosen[i] = list(min(losses, key=losses.get))
    return {"seconds": time.perf_counter() - t0, "dropped": chosen, "peak_rss": peak_rss_bytes()}


def run_moe_fast(path: str, keep: int, batch_size: int, lazy: bool = True) -> dict:
    import shutil

    import moe_fast

    out = tempfile.mkdtemp(prefix="bench_prune_out_")
    os.rmdir(out)
    t0 = time.perf_counter()
    _, report = moe_fast.prune(path, os.path.join(path, "calib_ids.pt"), keep, out=out, batch_size=batch_size,
                               search="exhaustive", return_model=False, progress=False, lazy=lazy)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    layers = report.layers.values()
    E, k = report.settings["num_experts"], report.settings["top_k"]
    return {"seconds": seconds, "dropped": {i: r.dropped for i, r in report.layers.items()}, "peak_rss": peak_rss_bytes(),
            "timings": report.timings,
            "outputs_per_token": [r.expert_outputs_per_token if lazy else k + E - keep for r in layers],
            "scored": [r.scored_exactly if lazy else math.comb(E, keep) for r in layers],
            "discarded": [r.discarded_by_bound or 0 for r in layers],
            "state_bytes": max(r.search_state_bytes for r in layers),
            "detail": [r.lazy_detail for r in layers]}


def _child(which: str, path: str, keep: int, batch_size: int) -> dict:
    return run_json_child(__file__, "--child", which, "--path", path, "--child-keep", str(keep), "--batch-size", str(batch_size))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, layers=4, n_samples=32)
    p.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--no-paper", action="store_true", help="skip the paper's enumeration (lazy vs rank-bounded only)")
    p.add_argument("--child", choices=["paper", "moe_fast", "moe_fast_rank"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--child-keep", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "paper":
            result = run_paper(args.path, args.child_keep, args.batch_size)
        else:
            result = run_moe_fast(args.path, args.child_keep, args.batch_size, lazy=args.child == "moe_fast")
        print(json.dumps(result))
        return

    import torch

    print(f"config: hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, {args.layers} layers, "
          f"vocab {args.vocab}; {args.n_samples} x {args.seq_len} tokens, batch {args.batch_size}; float32 CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        ckpt = os.path.join(tmp, "model")
        build_checkpoint(args, ckpt)
        for keep in args.keep:
            rank = _child("moe_fast_rank", ckpt, keep, args.batch_size)
            fast = _child("moe_fast", ckpt, keep, args.batch_size)
            paper = None if args.no_paper else _child("paper", ckpt, keep, args.batch_size)
            norm = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731
            same = norm(rank["dropped"]) == norm(fast["dropped"]) and (paper is None or norm(paper["dropped"]) == norm(fast["dropped"]))
            phases = lambda r: r["timings"]["expert_outputs"] + r["timings"]["search"]  # noqa: E731
            row = {"keep": keep, "moe_fast_s": fast["seconds"], "rank_s": rank["seconds"], "lazy_speedup": rank["seconds"] / fast["seconds"],
                   "lazy_phase_speedup": phases(rank) / phases(fast), "outputs_per_token": fast["outputs_per_token"],
                   "rank_outputs_per_token": rank["outputs_per_token"], "scored": fast["scored"], "discarded": fast["discarded"],
                   "state_bytes": fast["state_bytes"], "rank_state_bytes": rank["state_bytes"], "moe_fast_peak_rss": fast["peak_rss"],
                   "rank_peak_rss": rank["peak_rss"], "same_selection": same, "dropped": fast["dropped"],
                   "moe_fast_timings": fast["timings"], "rank_timings": rank["timings"], "detail": fast["detail"]}
            if paper is not None:
                row.update({"paper_s": paper["seconds"], "speedup": paper["seconds"] / fast["seconds"], "paper_peak_rss": paper["peak_rss"],
                            "memory_ratio": paper["peak_rss"] / fast["peak_rss"], "paper_dropped": paper["dropped"]})
            rows.append(row)
            print(f"R={keep}: rank-bounded {rank['seconds']:.1f} s, lazy {fast['seconds']:.1f} s"
                  + ("" if paper is None else f", paper {paper['seconds']:.1f} s") + f", same selection: {same}", flush=True)
    print()
    if not args.no_paper:
        print(f"| R | C(E,R) | paper (s) | moe_fast (s) | speedup | paper peak RSS (MiB) | moe_fast peak RSS (MiB) | memory ratio | same experts |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['keep']} | {math.comb(args.experts, r['keep'])} | {r['paper_s']:.1f} | {r['moe_fast_s']:.1f} | {r['speedup']:.1f}x | "
                  f"{r['paper_peak_rss'] / 2**20:.0f} | {r['moe_fast_peak_rss'] / 2**20:.0f} | {r['memory_ratio']:.2f}x | {r['same_selection']} |")
        print()
    print("lazy expert outputs vs the rank-bounded search (same tokens, same run; phases = expert outputs + search)")
    print("| R | rank-bounded (s) | lazy (s) | speedup | phases speedup | outputs/token rank-bounded | outputs/token lazy (per layer) "
          "| scored exactly / discarded by bound (per layer) | search state MiB rank-bounded / lazy | same experts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_layer = ", ".join(f"{v:.2f}" for v in r["outputs_per_token"])
        counts = ", ".join(f"{a}/{b}" for a, b in zip(r["scored"], r["discarded"]))
        mean = sum(r["outputs_per_token"]) / len(r["outputs_per_token"])
        print(f"| {r['keep']} | {r['rank_s']:.1f} | {r['moe_fast_s']:.1f} | {r['lazy_speedup']:.2f}x | {r['lazy_phase_speedup']:.2f}x | "
              f"{r['rank_outputs_per_token'][0]} | {mean:.2f} ({per_layer}) | {counts} | "
              f"{r['rank_state_bytes'] / 2**20:.1f} / {r['state_bytes'] / 2**20:.1f} | {r['same_selection']} |")
    print()
    print("where the lazy outputs go (per layer): candidates still open after each round; share of tokens per computed depth;")
    print("the winner's own need (an oracle that knew the answer would still compute this to score it exactly)")
    for r in rows:
        for i, d in enumerate(r["detail"]):
            print(f"R={r['keep']} layer {i}: open by round {d['open_by_round']}; depth share {d['depth_share']}; "
                  f"winner needs {d['floor_outputs_per_token']:.2f}/token, depth share {d['floor_share']}")
    for r in rows:
        for name in ("moe_fast", "rank"):
            print(f"R={r['keep']} {name} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r[f"{name}_timings"].items()))
    finish(args, rows)


if __name__ == "__main__":
    main()
