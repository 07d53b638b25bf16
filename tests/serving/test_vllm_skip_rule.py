"""The vLLM plugin's skip rule (moe_fast/serving/vllm_plugin/rule.py) against the specification
``reference.route_spec``, on router outputs laid out as vLLM's routers return them (unordered slots,
final weights), for every family's router; and its record reader's errors. No vLLM needed."""

from __future__ import annotations

import math

import pytest
import torch

from moe_fast import reference
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing
from moe_fast.serving.vllm_plugin.record import SkipRecordError, read_serving_skip
from moe_fast.serving.vllm_plugin.rule import apply_skips, skip_thresholds, skipped_mask

SPECS = {
    "softmax renormalized (Mixtral, Qwen3-MoE)": softmax_routing(2, True),
    "softmax top-4 renormalized": softmax_routing(4, True),
    "softmax not renormalized (Qwen2-MoE, OLMoE)": softmax_routing(2, False),
    "grouped sigmoid, bias, scaling (DeepSeek-V3)": RoutingSpec("sigmoid", 4, True, 2.5, torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.05, 4, 2),
    "sigmoid one group (GLM-4.5)": RoutingSpec("sigmoid", 2, True, 1.5, torch.randn(8, generator=torch.Generator().manual_seed(4)) * 0.05),
    "softmax over the chosen k (gpt-oss)": RoutingSpec("softmax_topk", 2, False, router_bias=True),
}


def engine_output(logits: torch.Tensor, spec: RoutingSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a vLLM router returns: the unskipped top-k weights and ids, each row's slots shuffled."""
    full = reference.route_spec(logits, spec)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(spec.top_k, generator=gen) for _ in range(logits.shape[0])])
    return full.weights.gather(-1, perm), full.ids.long().gather(-1, perm)


@pytest.mark.parametrize("name", list(SPECS))
def test_rule_on_engine_output_equals_reference(name: str) -> None:
    spec = SPECS[name]
    E = 16 if spec.grouped else 8
    logits = torch.randn(400, E, generator=torch.Generator().manual_seed(0)) * 1.5
    betas = reference.skip_ratios(logits, spec).median(dim=0).values.tolist()  # about half the tokens skip
    weights, ids = engine_output(logits, spec, seed=1)
    skipped = skipped_mask(logits, ids, skip_thresholds(betas, spec.top_k), spec.scoring == "sigmoid", spec.selection_bias)
    got = apply_skips(weights, skipped)
    want = reference.route_spec(logits, spec, beta=betas)
    assert 0 < int(skipped.sum()) < skipped[:, 1:].numel() + skipped.shape[0]  # the betas skip some, not all
    # per token, the same experts survive with the same weights
    dense_got = torch.zeros(logits.shape[0], E + 1).scatter_add_(-1, ids.masked_fill(skipped, E), got)[:, :E]
    dense_want = torch.zeros(logits.shape[0], E + 1).scatter_add_(-1, want.ids.long(), want.weights)[:, :E]
    torch.testing.assert_close(dense_got, dense_want, rtol=1e-6, atol=1e-6)
    assert int(skipped.sum()) == int((want.ids == E).sum())


def test_beta_zero_skips_nothing_and_one_skips_every_smaller() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, -1.0]])
    spec = softmax_routing(2, True)
    weights, ids = engine_output(logits, spec, seed=0)
    assert not skipped_mask(logits, ids, skip_thresholds([0.0], 2), False).any()
    skipped = skipped_mask(logits, ids, skip_thresholds([1.0], 2), False)
    assert skipped.sum(-1).tolist() == [1, 0]  # equal weights never skip
    assert math.isclose(float(apply_skips(weights, skipped)[0].sum()), float(weights[0].sum()), rel_tol=1e-6)


class Cfg:
    """A stand-in for a loaded config: only the attributes the reader uses."""

    def __init__(self, model_type: str = "mixtral", record=None, k: int = 2):
        self.model_type, self.num_experts_per_tok, self.num_local_experts = model_type, k, 8
        if record is not None:
            self.moe_fast = {"skipping": record}


def test_record_reader_accepts_a_written_record_and_ignores_none() -> None:
    assert read_serving_skip(Cfg(), "ckpt") is None
    assert read_serving_skip(Cfg(record={"betas": None}), "ckpt") is None
    skip = read_serving_skip(Cfg(record={"betas": [[0.4], 0.5], "layers": [0, 3]}), "ckpt")
    assert skip.betas == {0: [0.4], 3: [0.5]} and skip.top_k == 2 and not skip.sigmoid


@pytest.mark.parametrize(
    "record, model_type, words",
    [
        ({"betas": [[1.7]], "layers": [0]}, "mixtral", "must be in [0, 1]"),
        ({"betas": [["x"]], "layers": [0]}, "mixtral", "must be a number"),
        ({"betas": [[0.5]], "layers": [0, 1]}, "mixtral", "equal length"),
        ({"betas": [[0.5, 0.5]], "layers": [0]}, "mixtral", "k - 1 = 1"),
        ({"layers": [0]}, "mixtral", "malformed"),
        ({"betas": [[0.5]], "layers": [0], "version": 2}, "mixtral", "record version 2"),
        ({"betas": [[0.5]], "layers": [0]}, "llama4", "not a family"),
    ],
)
def test_record_reader_errors_name_checkpoint_and_problem(record, model_type: str, words: str) -> None:
    with pytest.raises(SkipRecordError) as err:
        read_serving_skip(Cfg(model_type, record), "/models/ckpt")
    assert "/models/ckpt/config.json" in str(err.value) and words in str(err.value)
