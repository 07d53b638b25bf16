"""GPU benchmark of the moe_fast CUDA kernels, each against a baseline run in the same process.

Rows (CUDA-event medians after warm-up, random data, bf16 logits):
  * route: moe_fast.ops.route vs transformers' Mixtral router + one_hot/where dispatch
    (MixtralTopKRouter.forward after its F.linear, then MixtralExperts.forward's index work) and vs
    the fastest plain-torch formulation (softmax, topk, stable sort of the flat ids, bincount);
    T in {1, 64, 4096, 65536}, E in {8, 64}, k = 2.
  * subset_loss: C(8,4) = 70 candidates over 262144 tokens, and a 64-expert greedy step
    (64 candidates), vs the same objective in plain torch on the GPU (moe_fast.reference's math).
  * Mixtral-8x7B MoE block (hidden 4096, ffn 14336, 8 experts, top-2, bf16), prefill T=4096 and
    decode T=1: transformers grouped_mm vs moe_fast.patch without and with median-beta skipping.
  * pruning search for one Mixtral-8x7B-sized layer on 262144 tokens at R=6 and R=4 (seconds per
    layer, projected to 32 layers).

    python benchmarks/bench_gpu.py [--quick]     # writes $OUT/gpu_table.md and gpu_results.json if $OUT is set
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch

import moe_fast
from moe_fast import ops, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_table  # noqa: E402

log = logging.getLogger("bench_gpu")
HEADERS = ["group", "case", "baseline", "baseline ms", "moe_fast ms", "speedup", "note"]


def cuda_ms(fn: Callable[[], object], repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of fn() measured with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
def mixtral_route_dispatch(logits: torch.Tensor, k: int):
    """transformers 5.x MixtralTopKRouter.forward (after F.linear) + MixtralExperts' dispatch."""
    E = logits.shape[1]
    probs = torch.nn.functional.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    mask = torch.nn.functional.one_hot(idx, num_classes=E + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    plan = []
    for e in hit:
        e = e[0]
        if e == E:
            continue
        plan.append(torch.where(mask[e]))
    return top, idx, plan


def torch_sort_route(logits: torch.Tensor, k: int):
    """Fastest plain torch: softmax, topk, renormalize; plan from a stable sort of the flat ids."""
    E = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    return top, idx, counts, offsets, perm


def bench_route(quick: bool) -> list[list]:
    rows = []
    for E in (8, 64):
        for T in (1, 64, 4096, 65536):
            logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
            ref = reference.route(logits.float().cpu(), 2)
            got = ops.route(logits, 2)
            assert torch.equal(got.ids.cpu(), ref.ids) and torch.equal(got.perm.cpu(), ref.perm), "route mismatch"
            reps = 10 if quick else 50
            fast = cuda_ms(lambda: ops.route(logits, 2), reps)
            hf = cuda_ms(lambda: mixtral_route_dispatch(logits, 2), reps)
            plain = cuda_ms(lambda: torch_sort_route(logits, 2), reps)
            case = f"T={T} E={E} k=2 bf16"
            rows.append(["route", case, "transformers Mixtral router + one_hot/where", hf, fast, hf / fast, ""])
            rows.append(["route", case, "plain torch softmax+topk+sort", plain, fast, plain / fast, ""])
    return rows


# ----------------------------------------------------------------------------------------------
# Subset-loss evaluator
# ----------------------------------------------------------------------------------------------
def torch_subset_loss(gram, ids, logits, keep, group, num_groups, k, target_weights):
    """reference.subset_loss's layer-wise math, kept on the GPU (float64)."""
    w = reference.subset_weights(ids, logits, keep, k, True)  # [C, T, M]
    G = reference.unpack_gram(gram.double(), ids.shape[1])  # [T, M, M]
    d = w - target_weights.double().unsqueeze(0)
    err = torch.einsum("ctm,ctm->ct", torch.einsum("ctm,tmn->ctn", d, G), d)
    out = torch.zeros(keep.shape[0], num_groups, dtype=torch.float64, device=gram.device)
    return out.index_add_(1, group, err)


def subset_problem(T: int, E: int, k: int, drop: int, tokens_per_group: int = 16384):
    """Random but consistent statistics: ranked ids, Gram of random outputs, layer-wise targets."""
    M = k + drop
    logits = torch.randn(T, E, device="cuda")
    plan = ops.route(logits, M)
    ids = plan.ids
    y = torch.randn(T, M, 64, device="cuda", dtype=torch.bfloat16)
    gram = ops.expert_gram(y)[0]
    tw = torch.zeros(T, M, device="cuda")
    tw[:, :k] = ops.route(logits, k).weights
    group = torch.arange(T, device="cuda") // tokens_per_group
    return gram, ids, logits, tw, group, int(group.max().item()) + 1


def bench_subset(quick: bool) -> list[list]:
    rows = []
    T = 262144
    cases = [
        ("C(8,4)=70 candidates, k=2", 8, 2, 4, [c for c in itertools.combinations(range(8), 4)]),
        ("64-expert greedy step: 64 candidates, k=8", 64, 8, 1, [(e,) for e in range(64)]),
    ]
    for name, E, k, drop, dropped in cases:
        gram, ids, logits, tw, group, G = subset_problem(T, E, k, drop)
        keep = torch.ones(len(dropped), E, dtype=torch.bool)
        for r, d in enumerate(dropped):
            keep[r, list(d)] = False
        keep = keep.cuda()
        fast_fn = lambda: ops.subset_loss(gram, ids, logits, keep, group, G, k, True, target_weights=tw)  # noqa: E731
        base_fn = lambda: torch_subset_loss(gram, ids, logits, keep, group, G, k, tw)  # noqa: E731
        got, want = fast_fn(), base_fn()
        rel = float(((got - want).abs() / want.abs().clamp_min(1e-300)).max())
        reps = 3 if quick else 10
        fast = cuda_ms(fast_fn, reps, warmup=2)
        base = cuda_ms(base_fn, reps, warmup=1)
        rows.append(["subset_loss", f"{name}, T={T}", "plain torch on GPU (float64)", base, fast, base / fast,
                     f"max rel diff {rel:.1e}"])
        del gram, ids, logits, tw, group, keep
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Mixtral-8x7B block and pruning search (need moe_fast.patch / moe_fast.prune)
# ----------------------------------------------------------------------------------------------
def mixtral_one_layer(vocab: int = 32000):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = MixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def bench_block(quick: bool) -> list[list]:
    if not hasattr(moe_fast, "patch"):
        return [["block", "Mixtral-8x7B block", "TODO: needs moe_fast.patch", "", "", "", ""]]
    model = mixtral_one_layer()
    model.set_experts_implementation("grouped_mm")
    block = model.model.layers[0].mlp
    rows = []
    inputs = {T: torch.randn(1, T, 4096, device="cuda", dtype=torch.bfloat16) for T in (4096, 1)}
    reps = 5 if quick else 20
    with torch.inference_mode():
        base = {T: cuda_ms(lambda: block(x), reps, 3) for T, x in inputs.items()}
        moe_fast.patch(model)
        plain = {T: cuda_ms(lambda: block(x), reps, 3) for T, x in inputs.items()}
        # Median beta on the prefill input itself: about half of its tokens skip their second expert.
        logits = torch.nn.functional.linear(inputs[4096].reshape(-1, 4096), block.gate.weight).float()
        top = torch.topk(logits, 2, dim=-1).values
        beta = float(torch.exp(top[:, 1] - top[:, 0]).median())
        moe_fast.patch(model, beta)
        skipped = float((ops.route(logits, 2, True, beta).ids[:, 1] == 8).float().mean())
        skip = {T: cuda_ms(lambda: block(x), reps, 3) for T, x in inputs.items()}
    for T in (4096, 1):
        phase = "prefill" if T > 1 else "decode"
        case = f"{phase} T={T}"
        rows.append(["block", case + ", moe_fast patched", "transformers grouped_mm", base[T], plain[T],
                     base[T] / plain[T], "no skipping"])
        rows.append(["block", case + ", moe_fast patched + skipping", "transformers grouped_mm", base[T], skip[T],
                     base[T] / skip[T], f"median beta {beta:.4f}, {skipped:.0%} of prefill tokens skip slot 1"])
    del model, block, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def bench_search(quick: bool) -> list[list]:
    if not hasattr(moe_fast, "prune"):
        return [["search", "one layer, 262144 tokens", "TODO: needs moe_fast.prune", "", "", "", ""]]
    rows = []
    n_seq, seq_len = (32, 2048) if quick else (128, 2048)
    for keep in (6, 4):
        model = mixtral_one_layer()
        ids = torch.randint(0, model.config.vocab_size, (n_seq, seq_len))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, report = moe_fast.prune(model, ids, keep, device="cuda", progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        timings = getattr(report, "timings", {}) or {}
        per_layer = sum(float(timings.get(key, 0.0)) for key in ("forward", "expert_outputs", "search")) or seconds
        note = ", ".join(f"{key} {float(v):.2f}s" for key, v in timings.items() if isinstance(v, (int, float)))
        rows.append(["search", f"R={keep}, one layer, {n_seq * seq_len} tokens", "paper: ~30 min (R=6) / 90 min (R=4) for 32 layers",
                     "", per_layer * 1000, "", f"{per_layer:.2f} s/layer, {32 * per_layer / 60:.2f} min for 32 layers; {note}"])
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure")
        return 0
    if not moe_fast._extension.HAS_CUDA_KERNELS:
        print("bench_gpu: moe_fast was built without CUDA kernels (MOE_FAST_CUDA=1 pip install --no-build-isolation -e .)")
        return 1
    torch.manual_seed(0)
    rows: list[list] = []
    failed = 0
    for section in (bench_route, bench_subset, bench_block, bench_search):
        t0 = time.perf_counter()
        try:
            rows += section(args.quick)
        except Exception as err:  # one broken section must not hide the others
            failed += 1
            traceback.print_exc()
            rows.append([section.__name__, "FAILED", f"{type(err).__name__}: {err}"[:200], "", "", "", ""])
        log.info("%s done in %.1f s", section.__name__, time.perf_counter() - t0)
        gc.collect()
        torch.cuda.empty_cache()
    title = (f"moe_fast GPU benchmark: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d %H:%M')}; medians of CUDA-event timings")
    table = title + "\n\n" + format_table(HEADERS, rows) + "\n"
    print(table)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        for name, text in (("gpu_table.md", table), ("gpu_results.json", json.dumps(
                {"title": title, "headers": HEADERS, "rows": rows}, indent=1, default=str))):
            fd, tmp = tempfile.mkstemp(dir=out)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, os.path.join(out, name))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
