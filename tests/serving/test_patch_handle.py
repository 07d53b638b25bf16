"""What ``moe_fast.patch`` returns (PatchHandle), the helpers that use it instead of the adapter,
and the channel that carries the router's dispatch plan to the experts (experts.PlanChannel)."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_fast
from moe_fast.serving import experts as fast_experts
from moe_fast.adapters import get_adapter
from moe_fast.evaluation.measures import SkipCounter
from moe_fast.serving.patching import PatchHandle, current_betas, patch_handle
from helpers.tiny_models import VOCAB, tiny_model


def _ids(b: int = 2, s: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))


def test_patch_returns_a_handle_of_the_blocks_it_patched():
    model = tiny_model("qwen2_moe")  # layer 1 is dense
    handle = moe_fast.patch(model, betas=0.5)
    assert isinstance(handle, PatchHandle) and handle.model is model and patch_handle(model) is handle
    refs = get_adapter(model).moe_blocks(model)
    assert handle.layers == [0, 2]
    assert all(h.router is r.router and h.experts is r.experts for h, r in zip(handle.blocks, refs, strict=True))
    assert handle.betas == {0: [0.5], 2: [0.5]} == current_betas(model)
    again = moe_fast.patch(model, betas={0: 0.3})  # a second call changes the betas, same handle
    assert again is handle and handle.betas == {0: [0.3], 2: None}
    assert "PatchHandle" in repr(handle) and "Qwen2Moe" not in repr(handle)  # no model dump


def test_the_handle_says_where_the_model_is():
    handle = moe_fast.patch(tiny_model("mixtral"))
    with pytest.raises(AttributeError, match=r"in place and returns this handle: the model is handle\.model"):
        handle.generate  # noqa: B018  (what `model = moe_fast.patch(model)` callers would reach for)
    assert not hasattr(handle, "config")


@pytest.mark.parametrize("how", ["handle", "model", "handle via unpatch"])
def test_unpatch_from_the_handle_or_the_model(how):
    model = tiny_model("mixtral")
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        handle = moe_fast.patch(model, betas=0.9)
        assert not torch.equal(model(ids).logits, stock)  # skipping changed something
        back = {"handle": handle.unpatch, "model": lambda: moe_fast.unpatch(model),
                "handle via unpatch": lambda: moe_fast.unpatch(handle)}[how]()
        assert back is model
        assert torch.equal(model(ids).logits, stock)
    assert not handle.active and patch_handle(model) is None and current_betas(model) == {}
    for ref in handle.blocks:
        assert "forward" not in ref.router.__dict__ and fast_experts.PLAN_CHANNEL_ATTR not in ref.experts.__dict__
    assert handle.unpatch() is model  # a second time: nothing to undo


def test_an_old_handle_does_not_unpatch_a_later_patch():
    model = tiny_model("mixtral")
    old = moe_fast.patch(model)
    old.unpatch()
    new = moe_fast.patch(model, betas=0.5)
    old.unpatch()
    assert patch_handle(model) is new and new.betas == {0: [0.5], 1: [0.5]}


def test_a_deep_copy_has_its_own_handle():
    model = tiny_model("mixtral")
    moe_fast.patch(model, betas=0.5)
    twin = copy.deepcopy(model)
    handle = patch_handle(twin)
    assert handle is not patch_handle(model) and handle.model is twin
    assert handle.blocks[0].router is twin.model.layers[0].mlp.gate


def test_helpers_on_a_patched_model_use_the_handle_not_the_adapter(monkeypatch):
    """Skipping calibration, the skip counter, the betas and unpatch act on the handle's blocks."""
    model = tiny_model("mixtral")
    ids = _ids(3)
    handle = moe_fast.patch(model, betas=0.9)
    adapter_class = type(get_adapter(model))

    def no_lookup(self, model):
        raise AssertionError("looked the blocks up again through the adapter")

    monkeypatch.setattr(adapter_class, "moe_blocks", no_lookup)
    cal = moe_fast.calibrate_skipping(model, ids, progress=False)
    assert handle.betas == {0: [0.9], 1: [0.9]}  # skipping back on after calibrating without it
    assert cal.layers == handle.layers
    counter = SkipCounter(model)
    with torch.no_grad():
        model(ids)
    counter.remove()
    assert counter.slots > 0 and counter.rate > 0.0
    assert current_betas(model) == handle.betas
    moe_fast.unpatch(model)
    assert patch_handle(model) is None


def test_skipping_off_routes_unskipped_and_restores_even_on_error():
    model = tiny_model("mixtral")
    ids = _ids()
    handle = moe_fast.patch(model, betas={0: 0.99, 1: None})
    with torch.no_grad():
        skipping = model(ids).logits
        with handle.skipping_off():
            assert set(handle.betas.values()) == {None}
            unskipped = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"), handle.skipping_off():
            raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, skipping)
        moe_fast.patch(model)
        assert torch.equal(model(ids).logits, unskipped)
    assert not torch.equal(skipping, unskipped)


# --- the plan's channel --------------------------------------------------------------------------


def _plan_inputs(E: int = 4):
    ids = torch.tensor([[1, 0], [3, E], [1, 2]])
    return ids, torch.tensor([1, 0, 4, 2, 5, 3]), torch.tensor([0, 1, 3, 4, 5], dtype=torch.int32)


def test_the_channel_gives_the_plan_once_and_only_for_its_indices():
    channel = fast_experts.PlanChannel()
    ids, perm, offsets = _plan_inputs()
    channel.put(ids, perm, offsets)
    plan = channel.take(ids)
    assert torch.equal(plan.perm, perm) and plan.perm.dtype == torch.int64
    assert torch.equal(plan.ends, offsets[1:]) and plan.active == 5
    assert channel.take(ids) is None  # taken once
    channel.put(ids, perm, offsets)
    assert channel.take(ids.clone()) is None  # equal values, other tensor: not this routing's plan
    assert channel.take(ids) is None  # and a failed take empties the channel


def _count_rebuilt_plans(monkeypatch) -> list[int]:
    built = []
    build = fast_experts.build_plan

    def counting(top_k_index, num_experts):
        built.append(1)
        return build(top_k_index, num_experts)

    monkeypatch.setattr(fast_experts, "build_plan", counting)
    return built


def test_patched_experts_take_the_routers_plan(monkeypatch):
    model = tiny_model("mixtral", num_hidden_layers=1)
    block = model.model.layers[0].mlp
    x = torch.randn(7, model.config.hidden_size)
    built = _count_rebuilt_plans(monkeypatch)
    with torch.no_grad():
        stock = block(x.unsqueeze(0))
        moe_fast.patch(model)
        channel = getattr(block.experts, fast_experts.PLAN_CHANNEL_ATTR)
        assert channel is block.gate._moe_fast.plans
        patched = block(x.unsqueeze(0))
        assert built == []  # the block's experts ran on the router's plan
        _, scores, indices = block.gate(x)
        fast_experts.moe_fast_experts_forward(block.experts, x, indices.clone(), scores)
        assert built == [1]  # other indices: the plan is rebuilt from them
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-6)


def test_under_compile_the_router_hands_no_plan(monkeypatch):
    """What fullgraph compile relies on: while compiling, the router leaves the channel empty."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    moe_fast.patch(model)
    block = model.model.layers[0].mlp
    x = torch.randn(5, model.config.hidden_size)
    channel = getattr(block.experts, fast_experts.PLAN_CHANNEL_ATTR)
    with torch.no_grad():
        _, _, indices = block.gate(x)
        assert channel.take(indices) is not None  # eager: handed over
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        _, _, indices = block.gate(x)
    assert channel.take(indices) is None
