"""One Mixtral-shaped layer's experts in vLLM's CPU kernel (``cpu_fused_moe``, bf16, AMX): all top-2
rows vs the plugin's survivors path (half the second slots skipped: gather, top-1 rows, index_add)
vs slot 0 only. Where bench_vllm's decode time goes: at 32 tokens the kernel's cost follows the
experts' weights read, not the rows; at a few tokens skipping leaves experts untouched, and their
weights unread. Process CPU time, median of 7 (steady on a shared machine).

    OMP_NUM_THREADS=1 python benchmarks/bench_vllm_experts.py [--tokens 1,4,32,512]   (in vLLM's environment)
"""

from __future__ import annotations

import argparse
import time

import torch

E, H, I, K = 8, 1024, 3584, 2


def median_cpu_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,4,32,512", help="comma-separated token counts (one row each)")
    counts = [int(t) for t in p.parse_args().tokens.split(",")]
    from vllm import _custom_ops as ops

    isa = "amx" if torch.cpu._init_amx() else "vec"
    torch.manual_seed(0)
    w13 = ops.cpu_prepack_moe_weight((torch.randn(E, 2 * I, H) / 32).bfloat16(), isa)
    w2 = ops.cpu_prepack_moe_weight((torch.randn(E, H, I) / 32).bfloat16(), isa)

    def experts(x, weights, ids):
        out = torch.empty(x.shape[0], H, dtype=x.dtype)
        ops.cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", isa)
        return out

    print(f"isa {isa}; E={E}, hidden {H}, expert width {I}, top-{K}, bf16; CPU ms per call (median of 7)")
    print("| tokens | experts touched (all / survivors / slot 0) | all rows (k=2) | survivors (half of slot 1 skipped) | slot 0 only |")
    print("|---|---|---|---|---|")
    for T in counts:
        x = torch.randn(T, H).bfloat16()
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()
        w = torch.rand(T, K)
        keep = torch.ones(T, K, dtype=torch.bool)
        keep[torch.arange(T) % 2 == 0, 1] = False
        token = keep.nonzero()[:, 0]

        def survivors():
            out = experts(x.index_select(0, token), w[keep].unsqueeze(-1).contiguous(), ids[keep].unsqueeze(-1).contiguous())
            return out.new_zeros(T, H).index_add_(0, token, out)

        full = median_cpu_ms(lambda: experts(x, w, ids))
        surv = median_cpu_ms(survivors)
        first = median_cpu_ms(lambda: experts(x, w[:, :1].contiguous(), ids[:, :1].contiguous()))
        touched = f"{ids.unique().numel()} / {ids[keep].unique().numel()} / {ids[:, 0].unique().numel()}"
        print(f"| {T} | {touched} | {full:.2f} | {surv:.2f} | {first:.2f} |")


if __name__ == "__main__":
    main()
