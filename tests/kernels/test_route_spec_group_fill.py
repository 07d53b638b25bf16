"""Grouped routers whose eligible groups hold fewer than k experts (issue 26, cause 1; issue 25,
item 7): transformers masks the other groups' scores with -inf and still takes the top k over all
experts, so those fill the remaining slots (as equals: moe_fast breaks the tie by index) with
their unbiased scores as weights. The reference, the op (CPU here, CUDA in test_cuda_ops.py) and a
patched model all route that way and refuse the same inputs; a patched DeepSeek-V3 built with
transformers' own test-suite config equals stock."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import moe_fast
from moe_fast import ops, reference
from moe_fast.adapters import get_adapter
from moe_fast.kernels.routing_spec import RoutingSpec


def _stock_choice(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DeepseekV3TopkRouter rule written out (>= 5.7: -inf mask), with the -inf ties
    made explicit: [T, E] bool of the eligible experts and [T, E] bool of the experts it must pick
    (every eligible one when there are fewer than k), plus how many slots are fill-ins."""
    T, E = logits.shape
    s = torch.sigmoid(logits.float())
    c = s + (spec.selection_bias if spec.selection_bias is not None else 0.0)
    size = E // spec.n_group
    group = c.view(T, spec.n_group, size).topk(2, dim=-1).values.sum(-1)
    top_groups = torch.topk(group, spec.topk_group, dim=-1).indices
    mask = torch.zeros(T, spec.n_group, dtype=torch.bool).scatter_(1, top_groups, True)
    return mask.repeat_interleave(size, dim=1), c


def _spec(E: int, k: int, n_group: int, topk_group: int, bias: torch.Tensor | None = None, renormalize: bool = True) -> RoutingSpec:
    return RoutingSpec("sigmoid", k, renormalize, 2.5, bias, n_group, topk_group)


CASES = [  # E, k, n_group, topk_group: eligible groups hold topk_group * E / n_group < k experts
    (8, 8, 2, 1),  # transformers' DeepSeek-V3 test config: every expert routes
    (8, 6, 2, 1),
    (16, 7, 4, 1),
    (16, 8, 8, 3),
    (64, 8, 16, 1),
    (6, 5, 3, 2),
]


@pytest.mark.parametrize("E,k,n_group,topk_group", CASES)
def test_reference_fills_from_ineligible_groups_by_index_with_stock_weights(E, k, n_group, topk_group):
    g = torch.Generator().manual_seed(E * 100 + k)
    logits = torch.randn(200, E, generator=g) * 2
    logits[:40] = logits[:40].round()  # ties in scores and in group scores
    bias = torch.randn(E, generator=g) * 0.1
    spec = _spec(E, k, n_group, topk_group, bias)
    r = reference.route_spec(logits, spec)
    eligible, c = _stock_choice(logits, spec)
    n_eligible = topk_group * (E // n_group)
    ids = r.ids.long()
    for t in range(logits.shape[0]):
        elig = eligible[t].nonzero().flatten()
        # The eligible experts come first, by biased score, ties to the lower index ...
        want_first = sorted(elig.tolist(), key=lambda e: (-float(c[t, e]), e))
        assert ids[t, :n_eligible].tolist() == want_first, t
        # ... then the others, by index (they are -inf alike in transformers' choice).
        others = [e for e in range(E) if not bool(eligible[t, e])]
        assert ids[t, n_eligible:].tolist() == others[: k - n_eligible], t
    # Weights: the unbiased scores of the chosen experts, renormalized, times the scaling.
    s = torch.sigmoid(logits).gather(1, ids)
    torch.testing.assert_close(r.weights, s / (s.sum(-1, keepdim=True) + 1e-20) * 2.5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("E,k,n_group,topk_group", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_equals_reference_with_fill_in_slots(E, k, n_group, topk_group, dtype):
    g = torch.Generator().manual_seed(7 * E + k)
    logits = (torch.randn(300, E, generator=g) * 2).to(dtype)
    logits[:60] = logits[:60].round()  # ties
    logits[60, :] = float("nan")
    logits[61, 0] = float("inf")
    bias = torch.randn(E, generator=g) * 0.1
    keep = torch.ones(E, dtype=torch.bool)
    keep[E // n_group] = False  # one masked expert: its group scores its other experts
    for spec in (_spec(E, k, n_group, topk_group, bias), _spec(E, k, n_group, topk_group, None, renormalize=False)):
        for beta, kp in ((None, None), (0.3, None), (None, keep if keep.sum() >= k else None)):
            got = ops.route_spec(logits, spec, beta, kp)
            want = reference.route_spec(logits, spec, beta, kp)
            for name in ("ids", "counts", "offsets", "perm"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (name, spec.renormalize, beta)
            torch.testing.assert_close(got.weights, want.weights, rtol=1e-6, atol=1e-6)


def test_op_opcheck_with_fill_in_slots():
    logits = torch.randn(12, 8)
    spec = _spec(8, 6, 2, 1, torch.randn(8) * 0.1)
    args = ops.routing_op_args(spec)
    k, renormalize = args.pop("k"), args.pop("renormalize")
    torch.library.opcheck(torch.ops.moe_fast.route.default, (logits, k, renormalize, [0.2], None), args)


def test_reference_and_op_refuse_the_same_inputs():
    logits = torch.randn(4, 6)
    spec = _spec(6, 2, 4, 1)  # 4 groups do not divide 6 experts
    with pytest.raises(ValueError, match="do not split into n_group = 4"):
        reference.route_spec(logits, spec)
    with pytest.raises(RuntimeError, match=r"n_group \(4\) must divide the number of experts E \(6\)"):
        ops.route_spec(logits, spec)
    # What the op used to refuse, both now route: eligible groups of 3 hold fewer than k = 5.
    spec = _spec(6, 5, 2, 1)
    assert torch.equal(ops.route_spec(logits, spec).ids, reference.route_spec(logits, spec).ids)


def _test_suite_config() -> DeepseekV3Config:
    """DeepseekV3ModelTester's config in transformers' tests (8 experts, 2 groups, topk_group 1, k 8)."""
    return DeepseekV3Config(
        vocab_size=99, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=8, first_k_dense_replace=1,
        norm_topk_prob=True, hidden_act="silu", max_position_embeddings=512, initializer_range=0.02,
        use_cache=True, pad_token_id=0,
    )


def _build(seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(_test_suite_config()).eval()
    with torch.no_grad():  # spread the routing (the test suite's init leaves the router near 0)
        for name, p in model.named_parameters():
            if "mlp.gate.weight" in name:
                p.normal_(0.0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model


def test_patched_deepseek_v3_with_the_test_suite_config_equals_stock(one_thread):
    stock, patched = _build(0), moe_fast.patch(_build(0)).model
    ids = torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(0))
    x = torch.randn(21, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = stock(ids).logits, patched(ids).logits
        for s_ref, p_ref in zip(get_adapter(stock).moe_blocks(stock), get_adapter(patched).moe_blocks(patched)):
            s_logits, s_w, s_ids = s_ref.router(x)
            p_logits, p_w, p_ids = p_ref.router(x)
            assert torch.equal(p_logits, s_logits)
            # Every token routes to all 8 experts with stock's weights, in any slot order.
            assert torch.equal(p_ids.sort(-1).values, torch.arange(8).expand(21, 8))
            torch.testing.assert_close(p_w.gather(-1, p_ids.argsort(-1)), s_w.gather(-1, s_ids.argsort(-1)),
                                       rtol=1e-6, atol=1e-7)
        out_p = patched.generate(ids, max_new_tokens=5, do_sample=False)
        out_s = stock.generate(ids, max_new_tokens=5, do_sample=False)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert torch.equal(out_p, out_s)


def test_stock_router_with_k_below_the_fill_agrees_on_the_eligible_part(one_thread):
    """k = 6 > 4 eligible: stock picks its two fill-ins among -inf ties in an order of torch's
    choosing; the eligible experts and every weight of an expert both pick agree."""
    cfg = _test_suite_config()
    cfg.num_experts_per_tok = 6
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    router = get_adapter(model).moe_blocks(model)[0].router
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.e_score_correction_bias.normal_(0.0, 0.1)
        x = torch.randn(50, 32)
        _, s_w, s_ids = router(x)
        moe_fast.patch(model)
        _, p_w, p_ids = router(x)
    logits = torch.nn.functional.linear(x, router.weight)
    spec = get_adapter(model).routing(get_adapter(model).moe_blocks(model)[0].block)
    eligible, _ = _stock_choice(logits, spec)
    for t in range(50):
        elig = set(eligible[t].nonzero().flatten().tolist())
        assert elig <= set(s_ids[t].tolist()) and elig == set(p_ids[t, :4].tolist())
        assert set(p_ids[t, 4:].tolist()) == set(sorted(set(range(8)) - elig)[:2])
    s = torch.sigmoid(logits)
    for w, i in ((s_w, s_ids), (p_w, p_ids)):  # both: unbiased scores over their sum, times 2.5
        picked = s.gather(1, i)
        torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-5, atol=1e-6)
    assert not math.isnan(float(p_w.sum()))
