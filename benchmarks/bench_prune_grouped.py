"""Expert outputs per token of the grouped search (DeepSeek-V3-shaped router: sigmoid scores,
selection bias, expert groups), exhaustive vs greedy vs beam, on one small random model.

Builds a DeepSeek-V3 model in memory (default: hidden 64, 16 experts in 4 groups of 4, 2 groups
eligible, top-4, a dense first layer, 3 MoE layers, a random selection bias per layer; float32;
CPU), prunes it to --keep experts (a multiple of n_group) with each search, and prints per search
the mean over layers of the (token, expert) outputs computed per calibration token (the unpruned
top-k included; counts do not depend on machine noise), the candidates scored, and for scale
k + dropped (what a rank-bounded search would run per token) and E (every output).

    python benchmarks/bench_prune_grouped.py
    python benchmarks/bench_prune_grouped.py --experts 32 --n-group 8 --topk-group 4 --keep 16 --searches greedy beam

``--compare-full`` also runs greedy and beam with every child scored over all tokens (no parent
state; the same selections and counts), for the time ratio of the incremental scoring.
"""

from __future__ import annotations

import argparse
import time

import torch


def build_model(args):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=args.hidden, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=args.layers + 1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k, n_group=args.n_group, topk_group=args.topk_group, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25 if "lm_head" in name or "embed" in name else 0.12)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--n-group", type=int, default=4)
    ap.add_argument("--topk-group", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3, help="MoE layers (after one dense layer)")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--searches", nargs="+", default=["exhaustive", "greedy", "beam"])
    ap.add_argument("--compare-full", action="store_true", help="greedy/beam again, children scored over all tokens")
    args = ap.parse_args()

    import moe_fast

    ids = torch.randint(3, 128, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    E, k, R = args.experts, args.top_k, args.keep
    print(f"DeepSeek-V3-shaped: E={E} in n_group={args.n_group} (topk_group={args.topk_group}), top-{k}, keep {R}, "
          f"{args.layers} MoE layers, {ids.numel()} calibration tokens")
    print(f"for scale: rank-bounded k + dropped = {k + E - R} outputs/token; every output = {E}")
    print(f"{'search':<14} {'outputs/token':>13} {'per layer':<28} {'scored':>8} {'time s':>7}  grouped_search")
    from moe_fast.pruning.grouped_outputs import GroupedOutputs

    incremental = GroupedOutputs.parent_in_frontier
    runs = [(s, False) for s in args.searches]
    if args.compare_full:
        runs += [(s, True) for s in args.searches if s != "exhaustive"]
    for search, full in runs:
        GroupedOutputs.parent_in_frontier = (lambda self, d: None) if full else incremental
        model = build_model(args)
        t0 = time.perf_counter()
        result = moe_fast.prune(model, ids, keep=R, search=search, batch_size=args.batch_size, progress=False,
                                return_model=False)
        elapsed = time.perf_counter() - t0
        layers = result.report.layers.values()
        per_layer = [r.expert_outputs_per_token for r in layers]
        mean = sum(per_layer) / len(per_layer)
        scored = sum(r.scored_exactly for r in layers)
        note = result.report.settings.get("grouped_search")
        name = search + (" (full)" if full else "")
        print(f"{name:<14} {mean:>13.3f} {','.join(f'{v:.2f}' for v in per_layer):<28} {scored:>8} {elapsed:>7.2f}  {note}")


if __name__ == "__main__":
    main()
