"""One Mixtral-shaped MoE block on CPU: transformers eager / grouped_mm vs moe_fast patched.

Hidden 1024, ffn 3584, 8 experts, top-2, random weights; prefill T = 2048 and decode T = 1, 8;
float32 and bfloat16. Baseline: the faster of transformers' two paths, measured in the same run.
"moe_fast skip" uses the median beta of w_1 / w_0 over 4096 other random tokens (about half
the second experts skipped; the measured rate on each input is reported). Prints a table (medians) and writes JSON with --json.

    python benchmarks/bench_moe_block.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_fast
from timing import add_clock_arguments, clock_from_args


def make_model(dtype: torch.dtype, hidden: int, ffn: int, experts: int, k: int) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=32, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, num_local_experts=experts, num_experts_per_tok=k,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(dtype)



CLOCK = time.perf_counter


def interleaved(paths: dict, repeats: int, min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per path; paths are timed in turns (round-robin) so load drift hits all alike.

    ``paths`` maps a name to (setup, call): setup switches the model to that path, call runs it.
    """
    times: dict[str, list[float]] = {name: [] for name in paths}
    for setup, call in paths.values():  # warm-up
        setup()
        call()
    rounds = 0
    while rounds < repeats or min(sum(t) for t in times.values()) < min_time:
        for name, (setup, call) in paths.items():
            setup()
            t = CLOCK()
            call()
            times[name].append(CLOCK() - t)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def median_beta(block, x: torch.Tensor) -> float:
    """The calibrated beta at quantile 0.5 (moe_fast.calibrate_skipping) on this input."""
    logits = torch.nn.functional.linear(x, block.gate.weight).float()
    top = torch.topk(logits, 2, dim=-1).values
    return float(torch.exp(top[:, 1] - top[:, 0]).median())


def run(args) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(dtype, args.hidden, args.ffn, args.experts, args.k)
        block = model.model.layers[0].mlp
        torch.manual_seed(2)  # calibration tokens: same distribution as the inputs, not the same tokens
        beta = median_beta(block, torch.randn(4096, args.hidden, dtype=dtype))
        for T in args.tokens:
            torch.manual_seed(1)
            x = torch.randn(1, T, args.hidden, dtype=dtype)
            reps = args.repeats if T > 64 else args.repeats * 20
            min_time = 0.0 if T > 64 else 0.5

            def call():
                with torch.inference_mode():
                    block(x)

            def use(impl):
                def setup():
                    moe_fast.unpatch(model)
                    model.set_experts_implementation(impl)

                return setup

            paths = {
                "eager": (use("eager"), call),
                "grouped_mm": (use("grouped_mm"), call),
                "moe_fast": (lambda: moe_fast.patch(model), call),
                "moe_fast skip": (lambda: moe_fast.patch(model, betas=[beta]), call),
            }
            res = interleaved(paths, reps, min_time)
            moe_fast.patch(model, betas=[beta])
            with torch.inference_mode():
                _, _, idx = block.gate(x.view(T, -1))
            skip_rate = float((idx[:, 1:] == args.experts).float().mean())
            moe_fast.unpatch(model)
            base = min(res["eager"], res["grouped_mm"])
            rows.append(
                dict(dtype=str(dtype).replace("torch.", ""), T=T, beta=beta, skip_rate=skip_rate,
                     ms={k: v * 1e3 for k, v in res.items()}, speedup={k: base / v for k, v in res.items()})
            )
            print_row(rows[-1])
    return rows


HEAD = f"{'dtype':9} {'T':>5} | {'eager ms':>9} {'grouped ms':>10} {'moe_fast ms':>11} {'skip ms':>9} | " \
       f"{'moe_fast x':>10} {'skip x':>7} {'skip rate':>9}"


def print_row(r: dict) -> None:
    ms, sp = r["ms"], r["speedup"]
    print(f"{r['dtype']:9} {r['T']:>5} | {ms['eager']:9.3f} {ms['grouped_mm']:10.3f} {ms['moe_fast']:11.3f} "
          f"{ms['moe_fast skip']:9.3f} | {sp['moe_fast']:10.2f} {sp['moe_fast skip']:7.2f} {r['skip_rate']:9.1%}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    add_clock_arguments(ap)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    global CLOCK
    CLOCK = clock_from_args(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; speed-ups (x) are against the faster "
          "of transformers eager / grouped_mm")
    print(HEAD)
    print("-" * len(HEAD))
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
