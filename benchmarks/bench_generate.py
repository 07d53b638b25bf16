"""Tokens/s of ``generate()`` on a small random-weight Mixtral: unpruned, skipping, pruned, both.

Variants (same prompts, greedy, KV cache, exactly --new-tokens tokens each):
  stock                transformers as loaded (its default experts path) -- the baseline
  moe_fast             patched, no skipping
  skip                 patched with betas calibrated at the median (about half the 2nd experts skipped)
  pruned 6             moe_fast.prune to 6 of 8 experts, stock transformers
  pruned 6 + skip      pruned, then patched with betas calibrated on the pruned model
Random weights make the pruning choice meaningless but not the cost. Prints a table of medians.

    python benchmarks/bench_generate.py [--dtype float32 bfloat16] [--batch 1 4] [--json out.json]
    python benchmarks/bench_generate.py --threads 1 --clock cpu    # on a busy shared machine
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_fast
from timing import add_clock_arguments, clock_from_args


def make_model(args, dtype: torch.dtype) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads // 4 or 1, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.to(dtype)



CLOCK = time.perf_counter


def generate_once(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds (of CLOCK) for one greedy generate() of exactly ``new_tokens`` tokens."""
    t = CLOCK()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
        )
    elapsed = CLOCK() - t
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return elapsed


def variants(args, dtype: torch.dtype, calib: torch.Tensor):
    """(name, model, calibration or None); every variant is its own model."""
    base = make_model(args, dtype)
    pruned, _ = moe_fast.prune(copy.deepcopy(base).float(), calib, 6, batch_size=4, progress=False)
    pruned = pruned.to(dtype)
    cal = moe_fast.calibrate_skipping(base, calib, progress=False)
    cal_pruned = moe_fast.calibrate_skipping(pruned, calib, progress=False)
    return [
        ("stock", base, None),
        ("moe_fast", moe_fast.patch(copy.deepcopy(base)).model, None),
        ("skip", moe_fast.patch(copy.deepcopy(base), betas=cal).model, cal),
        ("pruned 6", pruned, None),
        ("pruned 6 + skip", moe_fast.patch(copy.deepcopy(pruned), betas=cal_pruned).model, cal_pruned),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1792)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    add_clock_arguments(ap)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    global CLOCK
    CLOCK = clock_from_args(args)

    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(3, args.vocab, (8, 128), generator=gen)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; Mixtral hidden {args.hidden}, ffn {args.ffn}, "
          f"{args.layers} layers, 8 experts top-2; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    head = f"{'dtype':9} {'batch':>5}  {'variant':16} {'tokens/s':>9} {'x stock':>8} {'calls saved':>11}"
    print(head)
    print("-" * len(head))
    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        models = variants(args, dtype, calib)
        for batch in args.batch:
            prompts = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(2))
            times: dict[str, list[float]] = {name: [] for name, _, _ in models}
            for _, model, _ in models:  # warm-up
                generate_once(model, prompts, args.new_tokens)
            for _ in range(args.repeats):  # in turns, so that load drift hits every variant alike
                for name, model, _ in models:
                    times[name].append(generate_once(model, prompts, args.new_tokens))
            base = None
            for name, _, cal in models:
                tps = batch * args.new_tokens / statistics.median(times[name])
                base = base or tps
                saved = None if cal is None else sum(cal.saved_fraction) / len(cal.saved_fraction)
                rows.append(dict(dtype=dtype_name, batch=batch, variant=name, tokens_per_s=tps, speedup=tps / base,
                                 calls_saved=saved))
                print(f"{dtype_name:9} {batch:>5}  {name:16} {tps:9.1f} {tps / base:8.2f} "
                      f"{'' if saved is None else f'{saved:.1%}':>11}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
