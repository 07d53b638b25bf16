"""RoutingSpec and reference.route_spec: the routing semantics of every family, against
transformers' own router modules, today's softmax route (bit for bit), the skip rule on final
weights and its calibration ratios, and the edge cases (ties, masks, groups, NaN/inf)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    Glm4MoeConfig,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moe_fast import ops, reference
from moe_fast.adapters import ADAPTERS, get_adapter
from moe_fast.kernels.routing_spec import RoutingSpec, routing_spec_from_config, softmax_routing
from helpers.logits import special_logits

H = 16


# --- today's softmax route, frozen: route_spec must reproduce it bit for bit --------------------
def legacy_route(logits, k, renormalize=True, beta=None, keep=None) -> ops.RouteResult:
    """reference.route as it was before RoutingSpec (issue 13), kept verbatim as the yardstick."""
    T, E = logits.shape
    order, lg = reference.rank_experts(logits, keep)
    idx = order[:, :k]
    top_l = torch.gather(lg, -1, idx)
    probs = torch.softmax(lg, dim=-1) if T else lg
    top_p = torch.gather(probs, -1, idx)
    skipped = torch.zeros_like(top_p, dtype=torch.bool)
    gaps = reference.skip_gaps(beta, k)
    if gaps is not None:
        gap = top_l[:, :1].double() - top_l.double()
        thr = torch.tensor(gaps[:k], dtype=torch.float64)
        skipped = gap > thr
        skipped[:, 0] = False
    kept_p = top_p.masked_fill(skipped, 0.0)
    if renormalize:
        weights = kept_p / kept_p.sum(-1, keepdim=True)
    else:
        weights = kept_p * (top_p.sum(-1, keepdim=True) / kept_p.sum(-1, keepdim=True))
    ids = idx.masked_fill(skipped, E).to(torch.int32)
    return ops.RouteResult(weights.float(), ids, *reference.dispatch_plan(ids, E))


def assert_bitwise(got: ops.RouteResult, want: ops.RouteResult) -> None:
    for name, a, b in zip(ops.RouteResult._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name


@pytest.mark.parametrize("E,k", [(3, 2), (8, 2), (8, 1), (16, 4), (60, 4), (64, 8)])
def test_softmax_spec_is_todays_route_bit_for_bit(E: int, k: int) -> None:
    for ties in (False, True):
        x = special_logits(200, E, ties=ties)
        masks = [None, torch.randperm(E) < max(k, E - E // 3)]
        betas = [None, 0.0, 1.0, 0.3] + ([[0.9] + [0.1] * (k - 2)] if k > 2 else [])
        for keep in masks:
            for beta in betas:
                for renorm in (True, False):
                    want = legacy_route(x, k, renorm, beta, keep)
                    assert_bitwise(reference.route_spec(x, softmax_routing(k, renorm), beta, keep), want)
                    assert_bitwise(reference.route(x, k, renorm, beta, keep), want)
    empty = torch.empty(0, E)
    assert_bitwise(reference.route_spec(empty, softmax_routing(k, True), 0.5), legacy_route(empty, k, True, 0.5))


# --- transformers' routers --------------------------------------------------------------------
def make_router(family: str, k: int, renormalize: bool = True, E: int = 16):
    """(transformers router module with random weights, config) of a tiny config of one family."""
    if family == "mixtral":
        cfg = MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=k)
        router = MixtralTopKRouter(cfg)
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        cls = {"qwen2_moe": (Qwen2MoeConfig, Qwen2MoeTopKRouter), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeTopKRouter),
               "olmoe": (OlmoeConfig, OlmoeTopKRouter)}[family]
        cfg = cls[0](hidden_size=H, num_experts=E, num_experts_per_tok=k, norm_topk_prob=renormalize)
        router = cls[1](cfg)
    elif family in ("deepseek_v3", "glm4_moe"):
        cls = {"deepseek_v3": (DeepseekV3Config, DeepseekV3TopkRouter), "glm4_moe": (Glm4MoeConfig, Glm4MoeTopkRouter)}[family]
        cfg = cls[0](hidden_size=H, n_routed_experts=E, num_experts_per_tok=k, n_group=4, topk_group=2,
                     norm_topk_prob=renormalize, routed_scaling_factor=2.5)
        router = cls[1](cfg)
    elif family == "gpt_oss":
        cfg = GptOssConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=k)
        router = GptOssTopKRouter(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.7)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.uniform_(-0.3, 0.3)
        if getattr(router, "bias", None) is not None:
            router.bias.normal_(0.0, 0.5)
    return router.eval(), cfg


def spec_for(family: str, cfg, router) -> RoutingSpec:
    """The four registered families through their adapter; the new ones through the builders."""
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        return get_adapter(cfg).routing()
    spec = routing_spec_from_config(cfg)
    return spec.with_selection_bias(getattr(router, "e_score_correction_bias", None))


def assert_same_routing(got: ops.RouteResult, weights: torch.Tensor, indices: torch.Tensor, ordered: bool) -> None:
    """Same experts per token (as sets; in the same order when ``ordered``), same weight per expert."""
    ids = got.ids.long()
    if ordered:
        assert torch.equal(ids, indices.long())
    assert torch.equal(torch.sort(ids, -1).values, torch.sort(indices.long(), -1).values), "selected experts differ"
    E = int(got.offsets.numel() - 1)
    mine = torch.zeros(ids.shape[0], E).scatter_(1, ids, got.weights)
    theirs = torch.zeros(ids.shape[0], E).scatter_(1, indices.long(), weights.float())
    torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=1e-7)


FAMILY_CASES = [
    ("mixtral", 2, True), ("qwen2_moe", 4, False), ("qwen2_moe", 2, True), ("qwen3_moe", 4, True),
    ("olmoe", 2, False), ("deepseek_v3", 4, True), ("deepseek_v3", 3, False), ("glm4_moe", 4, True),
    ("glm4_moe", 2, False), ("gpt_oss", 4, True), ("gpt_oss", 1, True),
]


@pytest.mark.parametrize("family, k, renormalize", FAMILY_CASES)
def test_route_spec_equals_transformers_router(family: str, k: int, renormalize: bool) -> None:
    router, cfg = make_router(family, k, renormalize)
    spec = spec_for(family, cfg, router)
    assert spec.top_k == k
    h = torch.randn(300, H)
    with torch.no_grad():
        logits, weights, indices = router(h)
    got = reference.route_spec(logits, spec)
    # transformers sorts its softmax top-k by weight; the sigmoid routers return them unsorted.
    assert_same_routing(got, weights, indices, ordered=spec.scoring != "sigmoid")
    if spec.scoring != "sigmoid":
        assert (got.weights[:, :-1] >= got.weights[:, 1:]).all(), "routing order is largest weight first"


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_groups_and_bias_change_the_choice(family: str) -> None:
    # The comparison above only means something if groups and bias do select differently.
    router, cfg = make_router(family, 4)
    spec = spec_for(family, cfg, router)
    logits = router(torch.randn(300, H))[0].detach()
    with_groups = reference.route_spec(logits, spec).ids
    plain = RoutingSpec("sigmoid", 4, True, 2.5, spec.selection_bias)
    unbiased = RoutingSpec("sigmoid", 4, True, 2.5, None, spec.n_group, spec.topk_group)
    assert spec.grouped and spec.n_group == 4 and spec.topk_group == 2 and spec.scaling == 2.5
    assert not torch.equal(with_groups, reference.route_spec(logits, plain).ids)
    assert not torch.equal(with_groups, reference.route_spec(logits, unbiased).ids)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_masked_grouped_routing_equals_the_pruned_router(family: str) -> None:
    # The promise pruning relies on: a router with the dropped rows (and bias entries) removed,
    # the same number kept in every group, routes as the original with those experts masked.
    E, G, per_group_kept = 16, 4, 2
    router, cfg = make_router(family, 3, E=E)
    spec = spec_for(family, cfg, router)
    h = torch.randn(300, H)
    for trial in range(4):
        kept = sorted(g * (E // G) + int(i) for g in range(G) for i in torch.randperm(E // G)[:per_group_kept])
        keep_mask = torch.zeros(E, dtype=torch.bool)
        keep_mask[kept] = True
        pruned_cfg = type(cfg)(**{**cfg.to_dict(), "n_routed_experts": len(kept)})
        pruned = type(router)(pruned_cfg)
        with torch.no_grad():
            pruned.weight.copy_(router.weight[kept])
            pruned.e_score_correction_bias.copy_(router.e_score_correction_bias[kept])
            _, weights, indices = pruned(h)
            logits = router(h)[0]
        got = reference.route_spec(logits, spec, keep_mask=keep_mask)
        back = torch.tensor(kept)[indices]
        assert_same_routing(got, weights, back, ordered=False)


# --- edge cases of the sigmoid / grouped rule ---------------------------------------------------
def grouped(k: int, n_group: int = 4, topk_group: int = 2, bias=None, renormalize: bool = True) -> RoutingSpec:
    return RoutingSpec("sigmoid", k, renormalize, 1.0, bias, n_group, topk_group)


def test_sigmoid_ties_go_to_the_lower_index() -> None:
    # All equal scores: the lowest experts of the lowest eligible groups; equal group scores
    # choose the lower groups.
    x = torch.zeros(3, 8)
    assert reference.route_spec(x, grouped(3)).ids.tolist() == [[0, 1, 2]] * 3
    assert reference.route_spec(x, RoutingSpec("sigmoid", 3)).ids.tolist() == [[0, 1, 2]] * 3
    # Saturated sigmoids tie in float32 (both 1.0) although the logits differ.
    y = torch.tensor([[30.0, 40.0, -1.0, -2.0]])
    assert reference.route_spec(y, RoutingSpec("sigmoid", 2)).ids.tolist() == [[0, 1]]
    # Group 1 (experts 2, 3) ties group 0 on its two best; the lower group wins.
    z = torch.tensor([[0.0, 1.0, 1.0, 0.0, -5.0, -5.0]])
    assert reference.route_spec(z, grouped(2, n_group=3, topk_group=1)).ids.tolist() == [[1, 0]]


def test_group_score_is_the_sum_of_the_two_best_biased_scores() -> None:
    # Group 0 has the single best expert, group 1 the better pair: group 1 wins with topk_group 1.
    x = torch.tensor([[4.0, -4.0, 1.5, 1.5]])
    assert reference.route_spec(x, grouped(2, n_group=2, topk_group=1)).ids.tolist() == [[2, 3]]
    # The bias decides the choice, the weights stay the unbiased scores.
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])
    r = reference.route_spec(torch.tensor([[1.0, 0.5, 0.0, -1.0]]), RoutingSpec("sigmoid", 2, False, 1.0, bias))
    assert r.ids.tolist() == [[3, 0]]
    torch.testing.assert_close(r.weights, torch.sigmoid(torch.tensor([[-1.0, 1.0]])))


def test_masked_experts_leave_the_group_scores() -> None:
    x = torch.tensor([[4.0, 3.0, 1.0, 1.0, 0.0, 0.0]])
    spec = grouped(2, n_group=3, topk_group=1)
    assert reference.route_spec(x, spec).ids.tolist() == [[0, 1]]
    # Masking expert 0 leaves group 0 one expert: it scores sigmoid(3) alone, below group 1's pair.
    keep = torch.tensor([False, True, True, True, True, True])
    assert reference.route_spec(x, spec, keep_mask=keep).ids.tolist() == [[2, 3]]
    # A group with every expert masked is never eligible, however good its logits.
    keep = torch.tensor([False, False, True, True, True, True])
    r = reference.route_spec(x, spec, keep_mask=keep)
    assert r.ids.tolist() == [[2, 3]]
    # With a single eligible group too small for k, the other allowed experts follow by index.
    r = reference.route_spec(torch.tensor([[5.0, 4.0, 1.0, 0.0, 3.0, 2.0]]), grouped(3, n_group=3, topk_group=1), keep_mask=keep)
    assert r.ids.tolist() == [[4, 5, 2]]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax_topk"])
def test_top_k_equal_to_the_allowed_experts_takes_them_all(scoring: str) -> None:
    E, k = 16, 5
    keep = torch.zeros(E, dtype=torch.bool)
    keep[torch.tensor([0, 1, 6, 9, 15])] = True
    spec = grouped(k) if scoring == "sigmoid" else RoutingSpec(scoring, k)
    r = reference.route_spec(special_logits(40, E), spec, keep_mask=keep)
    assert (torch.sort(r.ids.long(), -1).values == torch.tensor([0, 1, 6, 9, 15])).all()
    assert torch.isfinite(r.weights).all()


def test_sigmoid_sanitizes_nan_and_inf_as_route_does() -> None:
    E, k = 16, 4
    x = special_logits(60, E, ties=False)
    clean = reference.sanitize_logits(x)  # NaN -> -inf, +inf -> float32 max
    bias = torch.rand(E) * 0.2
    for spec in (grouped(k, bias=bias), grouped(k, renormalize=False), RoutingSpec("sigmoid", k)):
        for beta in (None, 0.5):
            got = reference.route_spec(x, spec, beta)
            assert_bitwise(got, reference.route_spec(clean, spec, beta))
            assert torch.isfinite(got.weights).all()
    # An all -inf (or NaN) row scores 0 everywhere: chosen by bias alone, zero weights, no NaN.
    r = reference.route_spec(x[:2], grouped(k))
    assert r.ids.tolist() == [[0, 1, 2, 3]] * 2 and (r.weights == 0).all()
    # +inf scores 1.
    assert reference.route_spec(torch.tensor([[math.inf, 0.0]]), RoutingSpec("sigmoid", 1, False)).weights.item() == 1.0


def test_softmax_topk_degenerate_rows_follow_route() -> None:
    x = special_logits(10, 8, ties=False)
    r = reference.route_spec(x, RoutingSpec("softmax_topk", 4))
    for t in (0, 1, 2):  # all NaN, all -inf, all equal: the lowest experts, equal weights
        assert r.ids[t].tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(r.weights[t], torch.full((4,), 0.25))
    assert torch.isfinite(r.weights).all()
    assert torch.equal(r.ids, reference.route(x, 4).ids)  # same choice as softmax over all


# --- the skip rule on final weights and its calibration ratios ---------------------------------
SPECS = [
    softmax_routing(4, True), softmax_routing(4, False), RoutingSpec("softmax_topk", 4),
    RoutingSpec("sigmoid", 4, True, 2.5, torch.linspace(-0.2, 0.2, 16), 4, 2), RoutingSpec("sigmoid", 4, False),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scoring}-{s.renormalize}")
def test_skip_rule_is_a_ratio_of_final_weights(spec: RoutingSpec) -> None:
    x = torch.randn(2000, 16) * 2
    full = reference.route_spec(x, spec)
    w = full.weights.double()
    ratio = w[:, 1:] / w[:, :1]
    assert torch.allclose(reference.skip_ratios(x, spec), ratio, rtol=1e-5, atol=0)
    for beta in (0.2, 0.5, [0.9, 0.5, 0.1]):
        got = reference.route_spec(x, spec, beta)
        b = torch.tensor(reference.per_slot(reference.beta_values(beta), 4), dtype=torch.float64)
        clear = ((ratio - b).abs() > 1e-5 * b).all(-1)  # away from the border (rounding)
        want_skip = ratio < b
        assert torch.equal((got.ids[:, 1:] == 16)[clear], want_skip[clear])
        assert (got.ids[:, 0] < 16).all()
        # The survivors keep the mass the k final weights had, and their proportions.
        torch.testing.assert_close(got.weights.sum(-1), full.weights.sum(-1), rtol=1e-5, atol=1e-6)
        kept = got.ids < 16
        scale = (full.weights.sum(-1) / full.weights.masked_fill(~kept, 0).sum(-1)).unsqueeze(-1)
        torch.testing.assert_close(got.weights, (full.weights * scale).masked_fill(~kept, 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scoring", ["softmax", "softmax_topk", "sigmoid"])
def test_skip_rule_at_the_border(scoring: str) -> None:
    # Equal weights never skip, beta 0 never skips, beta 1 skips every strictly smaller weight.
    spec = RoutingSpec(scoring, 2)
    x = torch.tensor([[1.0, 0.5, -5.0], [1.0, 1.0, -5.0], [2.0, -math.inf, -math.inf]])
    assert (reference.route_spec(x, spec, 0.0).ids < 3).all()
    assert reference.route_spec(x, spec, 1.0).ids[:, 1].tolist() == [3, 1, 3]


def test_softmax_skip_equals_the_logit_gap_rule() -> None:
    # The generalized rule reads as today's gap rule: l_0 - l_j > -log(beta_j), in float64.
    x = torch.randn(5000, 8)
    gaps = reference.skip_gaps([0.7, 0.3, 0.05], 4)
    top = torch.topk(x, 4).values.double()
    want = (top[:, :1] - top) > torch.tensor(gaps, dtype=torch.float64)
    want[:, 0] = False
    got = reference.route_spec(x, softmax_routing(4, True), [0.7, 0.3, 0.05]).ids == 8
    assert torch.equal(got, want)


def test_softmax_skip_ratios_are_what_calibration_measured() -> None:
    # What calibrate_skipping measured before it called skip_ratios: exp of the top-k logits'
    # differences, in float64. Its betas stay the same to the bit.
    x = torch.randn(3000, 60)
    top = torch.topk(x, 4, dim=-1).values
    want = torch.exp(top[:, 1:].double() - top[:, :1].double())
    assert torch.equal(reference.skip_ratios(x, softmax_routing(4, True)), want)
    assert torch.equal(reference.skip_ratios(x, softmax_routing(4, False)), want)


def test_quantile_of_ratios_skips_that_fraction() -> None:
    from moe_fast.serving.skipping import quantile_betas

    x = torch.randn(4000, 16)
    for spec in SPECS:
        betas = quantile_betas(reference.skip_ratios(x, spec).numpy(), 0.3)
        rate = (reference.route_spec(x, spec, betas).ids[:, 1:] == 16).double().mean(0)
        assert ((rate - 0.3).abs() <= 2 / 4000).all(), (spec.scoring, rate)


# --- the descriptor and its owners ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_adapters_describe_todays_softmax_routing(family: str) -> None:
    for renorm in (True, False):
        router, cfg = make_router(family, 2, renorm)
        adapter = get_adapter(cfg)
        spec = adapter.routing()
        assert spec == softmax_routing(adapter.top_k, adapter.renormalize)
        assert spec.renormalize == (True if family == "mixtral" else renorm)
        assert spec.is_plain_softmax and spec.selection_bias is None and not spec.grouped
        assert adapter.routing(None) == spec


def test_new_families_are_described_and_their_adapters_agree() -> None:
    ds = DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    spec = routing_spec_from_config(ds)
    assert (spec.scoring, spec.top_k, spec.renormalize, spec.scaling, spec.n_group, spec.topk_group) == ("sigmoid", 4, True, 2.5, 4, 2)
    assert spec.selection_bias is None
    glm = routing_spec_from_config(Glm4MoeConfig(n_routed_experts=16, num_experts_per_tok=4, norm_topk_prob=False))
    assert (glm.scoring, glm.renormalize, glm.n_group, glm.topk_group, glm.grouped) == ("sigmoid", False, 1, 1, False)
    oss = routing_spec_from_config(GptOssConfig(num_local_experts=16, num_experts_per_tok=4))
    assert (oss.scoring, oss.top_k, oss.router_bias) == ("softmax_topk", 4, True)
    registered = {t for cls in ADAPTERS for t in cls.model_types}
    # registered once patching, skipping and export took the spec (tests/adapters/test_families_routing.py);
    # transformers maps no kimi_k2 model_type, so no adapter claims it
    assert registered & {"deepseek_v3", "glm4_moe", "gpt_oss", "kimi_k2"} == {"deepseek_v3", "glm4_moe", "gpt_oss"}
    for config, expected in ((ds, spec), (Glm4MoeConfig(n_routed_experts=16, num_experts_per_tok=4, norm_topk_prob=False), glm),
                             (GptOssConfig(num_local_experts=16, num_experts_per_tok=4), oss)):
        assert get_adapter(config).routing() == expected
    with pytest.raises(ValueError, match="no routing builder"):
        routing_spec_from_config(MixtralConfig())


def test_spec_equality_hash_and_checks() -> None:
    bias = torch.arange(8.0)
    a = RoutingSpec("sigmoid", 2, True, 2.5, bias, 4, 2)
    assert a == RoutingSpec("sigmoid", 2, True, 2.5, bias.clone(), 4, 2) and hash(a) == hash(a.with_selection_bias(bias + 1))
    assert a != a.with_selection_bias(bias + 1) and a != a.with_selection_bias(None)
    assert softmax_routing(2, True) == RoutingSpec() and softmax_routing(2, False) != RoutingSpec()
    with pytest.raises(ValueError, match="scoring"):
        RoutingSpec("relu")
    with pytest.raises(ValueError, match="top_k"):
        RoutingSpec(top_k=0)
    with pytest.raises(ValueError, match="scaling"):
        RoutingSpec(scaling=0.0)
    with pytest.raises(ValueError, match="topk_group"):
        RoutingSpec("sigmoid", n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="need scoring 'sigmoid'"):
        RoutingSpec("softmax", selection_bias=bias)
    with pytest.raises(ValueError, match="need scoring 'sigmoid'"):
        RoutingSpec("softmax_topk", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="equal groups"):
        reference.route_spec(torch.randn(2, 10), RoutingSpec("sigmoid", 2, n_group=4, topk_group=2))
    with pytest.raises(ValueError, match="selection_bias has shape"):
        reference.route_spec(torch.randn(2, 10), RoutingSpec("sigmoid", 2, selection_bias=bias))
    with pytest.raises(ValueError, match="finite"):
        reference.route_spec(torch.randn(2, 8), RoutingSpec("sigmoid", 2, selection_bias=bias / 0))


@pytest.mark.parametrize("field, value", [("top_k", 2.7), ("top_k", 2.0), ("top_k", True), ("n_group", 4.0), ("topk_group", "2")])
def test_spec_refuses_a_count_that_is_not_an_integer(field, value) -> None:
    # 2.7 used to be truncated to 2 by the op while the reference failed on it: both now never see it.
    with pytest.raises(ValueError, match=f"{field} must be an integer"):
        RoutingSpec("sigmoid", **{field: value})


@pytest.mark.parametrize("beta", ["0.5", ["0.5"], b"0.5"])
def test_a_string_beta_is_refused_alike_by_the_op_and_the_reference(beta) -> None:
    from moe_fast import ops

    logits = torch.randn(3, 8)
    spec = RoutingSpec("sigmoid", 2)
    for route in (lambda: ops.route_spec(logits, spec, beta=beta), lambda: reference.route_spec(logits, spec, beta=beta),
                  lambda: ops.route(logits, 2, beta=beta), lambda: reference.route(logits, 2, beta=beta)):
        with pytest.raises(ValueError, match="beta must be a number.*string"):
            route()
