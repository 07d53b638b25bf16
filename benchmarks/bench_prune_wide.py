"""Pruning a wide MoE (Qwen3-MoE-shaped: 128 experts, top-8) to 64 experts: lazy expert outputs
vs the rank-bounded search vs one plain forward pass, same checkpoint and tokens.

Builds a small Qwen3-MoE checkpoint (default: hidden 128, expert ffn 64, 128 experts, top-8,
4 layers; 16 x 128 calibration tokens; float32; CPU), then runs in separate processes (so that
each peak resident memory is its own):

* forward: load the model and run one forward pass over the calibration tokens (batch 8): the
  unit of "forward passes' worth" of expert outputs (k per token) and of time.
* rank-bounded: ``moe_fast.prune(..., lazy=False)``: every token's k + dropped = 72 first ranks
  up front, 72 * 73 / 2 Gram entries per token.
* lazy: ``moe_fast.prune(...)`` (default): outputs computed as far as a candidate needs them.
* lean D0/L (``--lean``): ``moe_fast.prune(..., recompute_outputs=(D0, L))``: lazy, holding per
  token its Gram entries but no outputs (earlier ranks recomputed on extension; D0 first ranks,
  extensions L ranks past the need).

for greedy (to 64) and beam search (width 4, to 64). Prints time, expert outputs per token
(mean over layers; these do not depend on machine noise), forward passes' worth (outputs / k),
the search state's peak bytes (per-token Gram entries, outputs and inputs the search holds) and
the process peak RSS, and checks that lazy and rank-bounded select the same experts.

    python benchmarks/bench_prune_wide.py                           # the full configuration
    python benchmarks/bench_prune_wide.py --layers 2 --n-samples 8  # a shorter run
    python benchmarks/bench_prune_wide.py --n-samples 64 --lean 16,4 20,4  # with lean rows
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from child_process import run_json_child
from results import finish

from moe_fast.host.ram import peak_rss_bytes


def build_checkpoint(args, path: str) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, moe_intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # a spread of routing probabilities (logit std about 2)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 2.0 / args.hidden**0.5)
    model.save_pretrained(path, max_shard_size="200MB")
    ids = torch.randint(0, args.vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    torch.save(ids, os.path.join(path, "calib_ids.pt"))


def run_forward(path: str, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.load(os.path.join(path, "calib_ids.pt"))
    with torch.inference_mode():
        model(ids[:batch_size])  # warm-up
        t0 = time.perf_counter()
        for lo in range(0, ids.shape[0], batch_size):
            model(ids[lo : lo + batch_size])
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": peak_rss_bytes()}


def run_prune(path: str, keep: int, batch_size: int, search: str, width: int, lazy: bool, recompute=False) -> dict:
    import moe_fast

    t0 = time.perf_counter()
    _, report = moe_fast.prune(path, os.path.join(path, "calib_ids.pt"), keep, batch_size=batch_size, search=search,
                               beam_width=width, return_model=False, progress=False, lazy=lazy,
                               recompute_outputs=recompute)
    seconds = time.perf_counter() - t0
    layers = list(report.layers.values())
    k, E = report.settings["top_k"], report.settings["num_experts"]
    per_token = [r.expert_outputs_per_token if lazy else k + E - keep for r in layers]
    return {"seconds": seconds, "phases": report.timings["expert_outputs"] + report.timings["search"],
            "outputs_per_token": per_token, "state_bytes": max(r.search_state_bytes for r in layers),
            "dropped": {str(i): r.dropped for i, r in report.layers.items()}, "peak_rss": peak_rss_bytes(), "top_k": k}


def _child(path: str, *extra: str) -> dict:
    return run_json_child(__file__, "--path", path, *extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--searches", nargs="+", default=["greedy", "beam"], choices=["greedy", "beam"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lean", nargs="*", default=[], metavar="D0,L",
                   help="also run the lean lazy search (recompute_outputs=(D0, L)) with these settings")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["forward", "lazy", "rank"], help=argparse.SUPPRESS)
    p.add_argument("--child-search", help=argparse.SUPPRESS)
    p.add_argument("--child-recompute", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "forward":
            result = run_forward(args.path, args.batch_size)
        else:
            recompute = tuple(int(v) for v in args.child_recompute.split(",")) if args.child_recompute else False
            result = run_prune(args.path, args.keep, args.batch_size, args.child_search, args.beam_width, args.child == "lazy",
                               recompute)
        print(json.dumps(result))
        return

    import torch

    print(f"config: Qwen3-MoE hidden {args.hidden}, expert ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, "
          f"{args.layers} layers; {args.n_samples} x {args.seq_len} tokens, batch {args.batch_size}; keep {args.keep}; "
          f"float32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    common = ["--keep", str(args.keep), "--batch-size", str(args.batch_size), "--beam-width", str(args.beam_width)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prune_wide_") as tmp:
        ckpt = os.path.join(tmp, "model")
        build_checkpoint(args, ckpt)
        fwd = _child(ckpt, "--child", "forward", *common)
        print(f"forward pass: {fwd['seconds']:.2f} s, peak RSS {fwd['peak_rss'] / 2**20:.0f} MiB", flush=True)
        for search in args.searches:
            res = {}
            for which in ("rank", "lazy", *(f"lean {v}" for v in args.lean)):
                extra = ["--child-recompute", which.split()[1]] if which.startswith("lean") else []
                child = "lazy" if which.startswith("lean") else which
                res[which] = _child(ckpt, "--child", child, "--child-search", search, *common, *extra)
                print(f"{search} {which}: {res[which]['seconds']:.1f} s", flush=True)
            same = {w: res["rank"]["dropped"] == x["dropped"] for w, x in res.items()}
            rows.append({"search": search, "forward": fwd, **res, "same_selection": same})
    k = args.top_k
    label = {"greedy": "greedy", "beam": f"beam {args.beam_width}"}
    print()
    print("| search | method | time (s) | phases (s) | time / forward pass | outputs/token (per layer) | forward passes' worth "
          "| search state (MiB) | state ratio | peak RSS (MiB) | same experts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| - | one forward pass | {fwd['seconds']:.2f} | - | 1.0 | {k} | 1.0 | - | - | {fwd['peak_rss'] / 2**20:.0f} | - |")
    for r in rows:
        for which, name in (("rank", "rank-bounded"), ("lazy", "lazy"), *((f"lean {v}", f"lean {v.replace(',', '/')}") for v in args.lean)):
            x = r[which]
            mean = sum(x["outputs_per_token"]) / len(x["outputs_per_token"])
            per_layer = ", ".join(f"{v:.2f}" for v in x["outputs_per_token"])
            ratio = r["rank"]["state_bytes"] / x["state_bytes"]
            print(f"| {label[r['search']]} | {name} | {x['seconds']:.1f} | {x['phases']:.1f} | {x['seconds'] / fwd['seconds']:.1f} | "
                  f"{mean:.2f} ({per_layer}) | {mean / k:.2f} | {x['state_bytes'] / 2**20:.1f} | {ratio:.2f}x | "
                  f"{x['peak_rss'] / 2**20:.0f} | {r['same_selection'][which]} |")
    for r in rows:
        print(f"{label[r['search']]}: lazy vs rank-bounded {r['rank']['seconds'] / r['lazy']['seconds']:.2f}x faster "
              f"(phases {r['rank']['phases'] / r['lazy']['phases']:.2f}x)")
    finish(args, rows)


if __name__ == "__main__":
    main()
