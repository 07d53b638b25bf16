"""GPU benchmark of the moe_fast CUDA kernels, each against a baseline run in the same process.

Rows (CUDA-event medians after warm-up, random data, bf16 logits):
  * route: moe_fast.ops.route vs transformers' Mixtral router + one_hot/where dispatch
    (MixtralTopKRouter.forward after its F.linear, then MixtralExperts.forward's index work) and vs
    the fastest plain-torch formulation (softmax, topk, stable sort of the flat ids, bincount);
    T in {1, 64, 4096, 65536}, E in {8, 64}, k = 2.
  * route DeepSeek-V3: moe_fast.ops.route_spec (sigmoid, selection bias, 8 groups with 4 eligible,
    k = 8, E = 256, scaling 2.5) vs DeepseekV3TopkRouter.forward after its F.linear + the
    one_hot/where dispatch (hf_routers.py); T in {64, 4096, 65536}.
  * subset_loss: C(8,4) = 70 candidates over 262144 tokens, and a 64-expert greedy step
    (64 candidates), vs the same objective in plain torch on the GPU (moe_fast.reference's math).
  * Mixtral-8x7B MoE block (hidden 4096, ffn 14336, 8 experts, top-2, bf16), prefill T=4096 and
    decode T=1: transformers grouped_mm vs moe_fast.patch without and with median-beta skipping.
  * pruning search for one Mixtral-8x7B-sized layer on 262144 tokens at R=6 and R=4 (seconds per
    layer, projected to 32 layers).
  * roofline: per kernel (route, expert_gram, subset_loss) the achieved bandwidth (compulsory
    bytes: every input read once, every output written once) and FLOP/s next to the H200's limits
    (about 4.3 TB/s HBM, 790 bf16 TFLOP/s dense, 34 fp64 TFLOP/s on CUDA cores), and which limit
    bounds it: the kernel furthest below its bound is the one to work on.

    python benchmarks/bench_gpu.py [--quick]     # writes $OUT/gpu_table.md, gpu_roofline.md and gpu_results.json if $OUT is set
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
from moe_fast.kernels.routing_spec import RoutingSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_routers import deepseek_v3_route_dispatch  # noqa: E402
from timing import format_table  # noqa: E402

log = logging.getLogger("bench_gpu")
HEADERS = ["group", "case", "baseline", "baseline ms", "moe_fast ms", "speedup", "note"]
ROOFLINE_HEADERS = ["kernel", "case", "ms", "GB/s", "% of HBM", "TFLOP/s", "% of peak", "peak used", "bound by",
                    "roofline ms", "x from roofline"]

# H200 limits (SXM, approximate sustained values).
H200_BYTES_PER_S = 4.3e12
H200_BF16_FLOPS = 790e12  # dense tensor cores
H200_FP64_FLOPS = 34e12  # CUDA cores (subset_loss computes in float64 without tensor cores)


# ----------------------------------------------------------------------------------------------
# Compulsory traffic and arithmetic per kernel call (pure functions: tests/benchmarks/test_bench_gpu.py)
# ----------------------------------------------------------------------------------------------
def route_cost(T: int, E: int, k: int, logit_bytes: int = 2) -> tuple[int, int]:
    """(bytes, flops) of ops.route: logits read once; weights, ids, perm [T, k] (4 bytes each),
    counts [E] and offsets [E + 1] (int32) written once. FLOPs: a softmax-sized handful per logit
    (exp, compare, add): 4 per logit, negligible next to the bytes."""
    return T * E * logit_bytes + 3 * T * k * 4 + (2 * E + 1) * 4, 4 * T * E


def gram_cost(T: int, M: int, H: int, elem_bytes: int = 2, target: bool = False) -> tuple[int, int]:
    """(bytes, flops) of ops.expert_gram: outputs [T, M, H] (and target [T, H]) read once; gram
    [T, M(M+1)/2], cross [T, M] and target_sq [T] (float32) written once. One multiply-add (2 FLOPs)
    per element of every dot product: M(M+1)/2 of them, plus M + 1 with a target."""
    pairs = M * (M + 1) // 2
    dots = pairs + (M + 1 if target else 0)
    read = T * M * H * elem_bytes + (T * H * elem_bytes if target else 0)
    written = T * pairs * 4 + (T * M * 4 + T * 4 if target else 0)
    return read + written, 2 * T * H * dots


def subset_loss_cost(T: int, E: int, M: int, k: int, C: int, G: int, layerwise: bool = True,
                     renormalize: bool = True) -> tuple[int, int]:
    """(bytes, float64 flops) of ops.subset_loss. Bytes: per token gram (M(M+1)/2 float32), ids and
    target weights or cross (M each, 4 bytes), logits (E float32, read even with renormalize for
    the top logit), target_sq (4), group and order (8 each); the C x G float64 result. FLOPs, an
    estimate per candidate and token: the weights (M mask tests, k exps at ~20 FLOPs, k divides),
    the quadratic form over n = 2k (layer-wise) or k (progressive) nonzero slots (3 FLOPs per
    pair), and with renormalize=False a partition sum over E experts (~21 FLOPs each)."""
    pairs = M * (M + 1) // 2
    per_token = pairs * 4 + M * 4 + E * 4 + M * 4 + (0 if layerwise else 4) + 16
    n = 2 * k if layerwise else k
    per_pair = M + 21 * k + 3 * n * (n + 1) // 2 + (0 if renormalize else 21 * E)
    return T * per_token + C * G * 8, C * T * per_pair


def roofline(seconds: float, nbytes: int, flops: int, peak_flops: float) -> dict[str, float | str]:
    """Achieved rates, their share of the H200's limits, and the roofline time max(bytes/BW, flops/peak)."""
    t_mem, t_math = nbytes / H200_BYTES_PER_S, flops / peak_flops
    best = max(t_mem, t_math)
    return {
        "gb_s": nbytes / seconds / 1e9,
        "hbm_pct": 100.0 * nbytes / seconds / H200_BYTES_PER_S,
        "tflop_s": flops / seconds / 1e12,
        "peak_pct": 100.0 * flops / seconds / peak_flops,
        "bound": "memory" if t_mem >= t_math else "compute",
        "roofline_ms": best * 1e3,
        "x_from_roofline": seconds / best if best > 0 else float("inf"),
    }


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


def selection_agreement(ids: torch.Tensor, want: torch.Tensor) -> float:
    """Share of tokens whose chosen expert sets agree (order inside a row ignored: transformers'
    topk(sorted=False) does not rank them). The GPU's sigmoid (expf) may differ from the CPU's by
    an ulp, which can flip a choice between two experts whose float32 scores are that close."""
    if ids.shape[0] == 0:
        return 1.0
    same = ids.long().cpu().sort(-1).values == want.long().cpu().sort(-1).values
    return float(same.all(-1).float().mean())


def bench_route_deepseek(quick: bool) -> list[list]:
    E, k, n_group, topk_group, scaling = 256, 8, 8, 4, 2.5
    bias = torch.randn(E, device="cuda") * 0.05
    spec = RoutingSpec("sigmoid", k, True, scaling, bias, n_group, topk_group)
    rows = []
    for T in (64, 4096, 65536):
        logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        got = ops.route_spec(logits, spec)
        agree = selection_agreement(got.ids, reference.route_spec(logits.cpu(), spec.with_selection_bias(bias.cpu())).ids)
        assert agree >= 0.999, f"DeepSeek-V3 routing differs from the reference on {1 - agree:.2%} of the tokens"
        reps = 10 if quick else 50
        fast = cuda_ms(lambda: ops.route_spec(logits, spec), reps)
        hf = cuda_ms(lambda: deepseek_v3_route_dispatch(logits, bias, n_group, topk_group, k, scaling), reps)
        rows.append(["route", f"DeepSeek-V3 T={T} E={E} k={k} 8 groups bf16",
                     "transformers DeepseekV3TopkRouter + one_hot/where", hf, fast, hf / fast,
                     f"{agree:.4%} same selection as the reference"])
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
# Roofline: achieved bandwidth and FLOP/s per kernel
# ----------------------------------------------------------------------------------------------
def _roofline_row(kernel: str, case: str, ms: float, cost: tuple[int, int], peak: float, peak_name: str) -> list:
    r = roofline(ms / 1e3, cost[0], cost[1], peak)
    return [kernel, case, ms, r["gb_s"], r["hbm_pct"], r["tflop_s"], r["peak_pct"], peak_name, r["bound"],
            r["roofline_ms"], r["x_from_roofline"]]


def bench_roofline(quick: bool) -> list[list]:
    rows = []
    reps = 10 if quick else 30
    for T, E in ((65536, 8), (65536, 64), (1 << 20, 64)):
        logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        ms = cuda_ms(lambda: ops.route(logits, 2), reps)
        rows.append(_roofline_row("route", f"T={T} E={E} k=2 bf16", ms, route_cost(T, E, 2), H200_BF16_FLOPS, "bf16"))
        del logits
    for T, M, H, target in ((16384, 4, 4096, False), (16384, 4, 4096, True), (4096, 10, 4096, False)):
        y = torch.randn(T, M, H, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(T, H, device="cuda", dtype=torch.bfloat16) if target else None
        ms = cuda_ms(lambda: ops.expert_gram(y, z), reps)
        case = f"T={T} M={M} H={H} bf16" + (" + target" if target else "")
        rows.append(_roofline_row("expert_gram", case, ms, gram_cost(T, M, H, 2, target), H200_BF16_FLOPS, "bf16"))
        del y, z
    T = 262144
    for E, k, drop, renorm in ((8, 2, 4, True), (8, 2, 4, False), (64, 8, 1, True)):
        gram, ids, logits, tw, group, G = subset_problem(T, E, k, drop)
        dropped = list(itertools.combinations(range(E), drop))
        keep = torch.ones(len(dropped), E, dtype=torch.bool)
        for r, d in enumerate(dropped):
            keep[r, list(d)] = False
        group_host = group.cpu()  # as the search passes it: no host synchronization per call
        ms = cuda_ms(lambda: ops.subset_loss(gram, ids, logits, keep, group_host, G, k, renorm, target_weights=tw),
                     3 if quick else 10, warmup=2)
        cost = subset_loss_cost(T, E, k + drop, k, len(dropped), G, True, renorm)
        case = f"T={T} E={E} k={k} C={len(dropped)} renorm={renorm} layer-wise"
        rows.append(_roofline_row("subset_loss", case, ms, cost, H200_FP64_FLOPS, "fp64"))
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
    if not moe_fast.kernels.extension.HAS_CUDA_KERNELS:
        print("bench_gpu: moe_fast was built without CUDA kernels (MOE_FAST_CUDA=1 pip install --no-build-isolation -e .)")
        return 1
    torch.manual_seed(0)
    rows: list[list] = []
    failed = 0
    try:  # first: the numbers the next GPU session needs most, and the fastest to take
        roof = bench_roofline(args.quick)
    except Exception as err:
        failed += 1
        traceback.print_exc()
        roof = [["roofline", "FAILED", f"{type(err).__name__}: {err}"[:200]] + [""] * 8]
    for section in (bench_route, bench_route_deepseek, bench_subset, bench_block, bench_search):
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
    roof_table = (f"Roofline on {torch.cuda.get_device_name()}: limits {H200_BYTES_PER_S / 1e12:.1f} TB/s, "
                  f"{H200_BF16_FLOPS / 1e12:.0f} bf16 TFLOP/s, {H200_FP64_FLOPS / 1e12:.0f} fp64 TFLOP/s; compulsory "
                  "bytes, estimated FLOPs (bench_gpu.py *_cost)\n\n" + format_table(ROOFLINE_HEADERS, roof) + "\n")
    print(table)
    print(roof_table)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        results = {"title": title, "headers": HEADERS, "rows": rows, "roofline_headers": ROOFLINE_HEADERS,
                   "roofline": roof}
        for name, text in (("gpu_table.md", table), ("gpu_roofline.md", roof_table),
                           ("gpu_results.json", json.dumps(results, indent=1, default=str))):
            fd, tmp = tempfile.mkstemp(dir=out)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, os.path.join(out, name))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
