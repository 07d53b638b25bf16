"""Throughput inside vLLM: unpruned, skipping at the median beta, pruned to 6 of 8, pruned + skipping.

One Mixtral-shaped random-weight model whose experts dominate the cost (default hidden 1024, expert
width 3584, 4 layers, 8 experts, top-2, bf16), no tokenizer (token ids are fed). Each row is its own
``vllm.LLM`` on the same engine settings (bf16, eager or ``--compile``, same batch limits), in a child process (this
script with ``--child``), with moe_fast's plugin doing the skipping. Per row: offline prefill
throughput (``--prompts`` prompts of ``--prompt-len`` tokens, one new token each), decode throughput
(``--seqs`` sequences of 16-token prompts, ``--new-tokens`` new tokens each, EOS ignored; tokens/s
of generated tokens), the skip rate over skippable slots and the expert rows computed per token
(both from the plugin's counters), the share of the run spent inside vLLM's expert call, and the
checkpoint's weight bytes. Random weights make which 6 experts are kept meaningless (experts 0-5)
but not the cost.

    python benchmarks/bench_vllm.py                      # the table in benchmarks/RESULTS.md
    python benchmarks/bench_vllm.py --quick              # a small smoke run
    python benchmarks/bench_vllm.py --json out.json --workdir /tmp/bench_vllm
    OMP_NUM_THREADS=1 python benchmarks/bench_vllm.py --clock cpu     # on a busy shared machine
    OMP_NUM_THREADS=1 python benchmarks/bench_vllm.py --clock cpu --compile --rounds 2   # compiled mode

``--compile`` serves every row in vLLM's compiled mode (torch.compile/inductor on CPU) instead of
eager; ``--rounds N`` runs each row's engine N times in alternating row order and reports medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = ("unpruned", "skip", "pruned 6", "pruned 6 + skip")
CHILD_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the model runs in the child itself: the plugin's counters are readable
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (the median is reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="engines per row: the rows run this many times, in alternating order (forward, reverse, ...), "
                   "and each number is the median over rounds (load that changes during a run hits every row)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU seconds (all its threads; the model runs in it), steadier than "
                   "wall-clock when other jobs share the cores (use with OMP_NUM_THREADS=1)")
    p.add_argument("--compile", action="store_true",
                   help="serve in vLLM's compiled mode (torch.compile/inductor on CPU) instead of enforce_eager")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated subset of the rows (default all: %(default)s); the first is the baseline of x")
    p.add_argument("--quick", action="store_true", help="hidden 256, ffn 512, 2 layers, 8 x 128 prompts, 8 x 16 new tokens")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows are {list(ROWS)}")
    if args.quick:
        args.hidden, args.ffn, args.layers, args.prompts, args.prompt_len, args.seqs, args.new_tokens = 256, 512, 2, 8, 128, 8, 16
        args.repeats = 1
    return args


# ----------------------------------------------------------------------------------------------
# Checkpoints (in the parent, with transformers and moe_fast)


def build_checkpoints(args, root: str) -> dict[str, str]:
    """The four checkpoints of ROWS under ``root``; returns {row: folder}."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import moe_fast
    from moe_fast.adapters import get_adapter
    from moe_fast.pruning.export import prune_loaded_model

    folders = {row: os.path.join(root, row.replace(" ", "_").replace("+", "and")) for row in ROWS}
    cfg = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(args.hidden // 512, 1), head_dim=128,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    calibration = torch.randint(3, args.vocab, (8, 128), generator=torch.Generator().manual_seed(1))

    def model() -> MixtralForCausalLM:
        torch.manual_seed(0)
        m = MixtralForCausalLM(copy.deepcopy(cfg)).eval()  # patch() records its betas on the config
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
            for layer in m.model.layers:  # a spread of routing weights, as trained routers have
                layer.mlp.gate.weight.normal_(0.0, 0.5)
        return m.to(torch.bfloat16)

    m = model()
    moe_fast.save(m, folders["unpruned"])
    moe_fast.save(moe_fast.patch(m, betas=moe_fast.calibrate_skipping(m, calibration, progress=False)).model, folders["skip"])
    m = model()
    prune_loaded_model(m, get_adapter(m), {layer: list(range(6)) for layer in range(args.layers)}, {"keep": 6, "kept": "0-5 (benchmark)"})
    moe_fast.save(m, folders["pruned 6"])
    moe_fast.save(moe_fast.patch(m, betas=moe_fast.calibrate_skipping(m, calibration, progress=False)).model, folders["pruned 6 + skip"])
    return folders


def weight_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


# ----------------------------------------------------------------------------------------------
# One row (in a child process: one vLLM engine)


CLOCK = time.perf_counter


def time_expert_calls(compiled: bool) -> dict[str, float]:
    """Wraps vLLM's expert call (``RoutedExperts.forward_modular``) to sum its seconds (bench-only).

    Compiled: a clock cannot run inside a Dynamo-traced graph, so every row's MoE layers are entered
    through vLLM's opaque custom op (``torch.ops.vllm.moe_forward``, what the plugin does for skipping
    layers, ``moe_fast.serving.vllm_plugin.layer_hooks.opaque_entry``): the rows stay comparable, and the rest
    of the model (attention, norms, lm_head) is compiled.
    """
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    import torch

    if compiled:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        MoERunner._select_forward = lambda self: torch.ops.vllm.moe_forward if self._shared_experts is None else torch.ops.vllm.moe_forward_shared

    spent = {"seconds": 0.0, "calls": 0, "experts_touched": 0}
    inner = RoutedExperts.forward_modular

    def timed(self, x, topk_weights, topk_ids, *a, **k):
        t = CLOCK()
        try:
            return inner(self, x, topk_weights, topk_ids, *a, **k)
        finally:
            spent["seconds"] += CLOCK() - t
            # experts whose weights this call reads (the survivors' ids when the plugin skips), untimed
            spent["calls"] += 1
            spent["experts_touched"] += int(torch.unique(topk_ids).numel())

    RoutedExperts.forward_modular = timed
    return spent


def run_row(args, folder: str) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from moe_fast.serving.vllm_plugin import stats

    spent = time_expert_calls(args.compile)
    llm = LLM(
        model=folder, dtype="bfloat16", enforce_eager=not args.compile, skip_tokenizer_init=True, seed=0,
        max_model_len=args.prompt_len + 16, max_num_seqs=max(args.prompts, args.seqs), max_num_batched_tokens=8192,
        enable_prefix_caching=False,
    )
    gen = torch.Generator().manual_seed(7)
    prefill = [TokensPrompt(prompt_token_ids=torch.randint(3, args.vocab, (args.prompt_len,), generator=gen).tolist()) for _ in range(args.prompts)]
    decode = [TokensPrompt(prompt_token_ids=torch.randint(3, args.vocab, (16,), generator=gen).tolist()) for _ in range(args.seqs)]
    one = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    many = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prefill[:2], one, use_tqdm=False)  # warm-up

    def timed(prompts, params) -> tuple[float, float, dict]:
        stats.reset()
        spent.update(seconds=0.0, calls=0, experts_touched=0)
        t = CLOCK()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = CLOCK() - t
        return elapsed, spent["seconds"], stats.snapshot(), spent["experts_touched"] / max(spent["calls"], 1)

    pre = [timed(prefill, one) for _ in range(args.repeats)]
    dec = [timed(decode, many) for _ in range(args.repeats)]
    counts = pre[0][2]
    tokens = sum(c["tokens"] for c in counts.values()) / max(len(counts), 1)
    rows = sum(c["rows_computed"] for c in counts.values()) / max(len(counts), 1)
    median = lambda xs: statistics.median(xs)  # noqa: E731
    return {
        "prefill_tok_s": args.prompts * args.prompt_len / median([p[0] for p in pre]),
        "decode_tok_s": args.seqs * args.new_tokens / median([d[0] for d in dec]),
        "prefill_expert_share": median([p[1] / p[0] for p in pre]),
        "decode_expert_share": median([d[1] / d[0] for d in dec]),
        "skip_rate_prefill": stats.skip_rate(counts) if counts else 0.0,
        "skip_rate_decode": stats.skip_rate(dec[0][2]) if dec[0][2] else 0.0,
        "expert_rows_per_token": rows / tokens if counts else 2.0,  # no record: the plugin is idle, top-2 rows
        "weight_bytes": weight_bytes(folder),
        "experts_touched_prefill": pre[0][3],  # per layer call (one engine step), of 8 (6 pruned)
        "experts_touched_decode": dec[0][3],
    }


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        global CLOCK
        CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
        folder, out = args.child.split("::")
        with open(out, "w") as f:
            json.dump(run_row(args, folder), f)
        return 0
    import torch

    root = args.workdir or tempfile.mkdtemp(prefix="bench_vllm_")
    t0 = time.perf_counter()
    folders = build_checkpoints(args, root)
    print(f"checkpoints built in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
    rounds: dict[str, list[dict]] = {row: [] for row in args.rows}
    order = [row for r in range(args.rounds) for row in (args.rows if r % 2 == 0 else args.rows[::-1])]
    for row in order:
        out = os.path.join(root, f"{row.replace(' ', '_').replace('+', 'and')}.{len(rounds[row])}.json")
        child = [sys.executable, os.path.abspath(__file__), "--child", f"{folders[row]}::{out}"] + [a for a in (argv or sys.argv[1:])]
        t = time.perf_counter()
        proc = subprocess.run(child, env=os.environ | CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-5000:], file=sys.stderr)
            raise SystemExit(f"bench_vllm: the {row!r} engine failed (rc {proc.returncode})")
        with open(out[: -len(".json")] + ".log", "w") as f:  # the engine's own log (compilation, warnings)
            f.write(proc.stdout)
        with open(out) as f:
            rounds[row].append(json.load(f))
        r = rounds[row][-1]
        print(f"{row} (round {len(rounds[row])}): {time.perf_counter() - t:.0f} s; prefill {r['prefill_tok_s']:.0f} tok/s, "
              f"decode {r['decode_tok_s']:.1f} tok/s", flush=True)
    # the median of each number over the rounds
    results = {row: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for row, rs in rounds.items()}
    base = results[args.rows[0]]
    print(
        f"\nbench_vllm: Mixtral-shaped hidden {args.hidden}, expert width {args.ffn}, {args.layers} layers, 8 experts top-2, "
        f"bf16, vLLM {'compiled' if args.compile else 'eager'}; prefill {args.prompts} x {args.prompt_len} tokens, decode {args.seqs} seqs x {args.new_tokens} new tokens; "
        f"medians of {args.repeats} runs x {args.rounds} rounds (rows in alternating order), {args.clock} clock; torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}\n"
    )
    head = ["row", "prefill tok/s", "x", "decode tok/s", "x", "skip rate (prefill/decode)", "expert rows/token",
            "time in experts (prefill/decode)", "experts touched/step (prefill/decode)", "weights MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in results.items():
        lines.append(
            f"| {row} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['skip_rate_prefill']:.1%} / {r['skip_rate_decode']:.1%} | "
            f"{r['expert_rows_per_token']:.2f} | {r['prefill_expert_share']:.0%} / {r['decode_expert_share']:.0%} | "
            f"{r.get('experts_touched_prefill', float('nan')):.2f} / {r.get('experts_touched_decode', float('nan')):.2f} | "
            f"{r['weight_bytes'] / 2**20:.0f} |"
        )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": results, "rounds": rounds}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
