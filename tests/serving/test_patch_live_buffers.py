"""A patched router reads the model's tensors as they are at each forward, never a copy taken at
patch time (issue 26, cause 2): after ``load_state_dict(..., assign=True)``, a reassigned selection
bias, ``to_empty()`` and a reload, ``model.to(dtype)`` or a device move, the patched DeepSeek-V3 /
GLM-4.5 router chooses what the stock router with the same tensors chooses. And no module of a
patched model holds a tensor that is neither a parameter nor a buffer (what transformers'
``test_all_tensors_are_parameter_or_buffer`` requires to recover from the meta device)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import moe_fast
from moe_fast.adapters import get_adapter

from helpers.tiny_models import ROUTING_FAMILIES, VOCAB, tiny_model

BIASED = ["deepseek_v3", "glm4_moe"]  # the families with a per-layer selection bias


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _routers(model: nn.Module) -> list[nn.Module]:
    return [ref.router for ref in get_adapter(model).moe_blocks(model)]


def _assert_routes_as_stock(patched: nn.Module, stock: nn.Module, device: str = "cpu") -> None:
    """Every patched router chooses the stock router's experts with its weights, and the logits agree."""
    gen = torch.Generator().manual_seed(1)
    for p_router, s_router in zip(_routers(patched), _routers(stock)):
        x = torch.randn(64, patched.config.hidden_size, generator=gen).to(device)
        with torch.no_grad():
            _, p_w, p_ids = p_router(x.to(p_router.weight.dtype))
            _, s_w, s_ids = s_router(x.to(s_router.weight.dtype))
        p_order, s_order = p_ids.argsort(-1), s_ids.argsort(-1)
        assert torch.equal(p_ids.gather(-1, p_order), s_ids.gather(-1, s_order))
        torch.testing.assert_close(p_w.gather(-1, p_order).float(), s_w.gather(-1, s_order).float(), rtol=1e-5, atol=1e-6)
    ids = _ids().to(device)
    with torch.no_grad():
        got, want = patched(ids).logits.float(), stock(ids).logits.float()
    tol = 1e-5 if patched.dtype == torch.float32 else 3e-2
    assert float((got - want).abs().max() / want.abs().max()) < tol


def _new_biases(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Selection biases large enough to change which experts route (std 0.5 against scores in [0, 1])."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(buf.shape, generator=gen) * 0.5
            for name, buf in model.named_buffers() if name.endswith("e_score_correction_bias")}


@pytest.mark.parametrize("family", BIASED)
def test_load_state_dict_assign_after_patch(family, one_thread):
    model = moe_fast.patch(tiny_model(family, seed=0)).model
    other = tiny_model(family, seed=1)
    state = other.state_dict() | _new_biases(other, 5)
    other.load_state_dict(state)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    _assert_routes_as_stock(model, other)


@pytest.mark.parametrize("family", BIASED)
def test_reassigned_bias_buffer_after_patch(family, one_thread):
    model = moe_fast.patch(tiny_model(family)).model
    stock = tiny_model(family)
    for name, bias in _new_biases(model, 7).items():
        for m in (model, stock):
            router = m.get_submodule(name.rsplit(".", 1)[0])
            router.e_score_correction_bias = bias.clone()  # a new tensor in the buffer slot
    _assert_routes_as_stock(model, stock)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_meta_patch_to_empty_and_reload(family, one_thread):
    stock = tiny_model(family, seed=2)
    if family in BIASED:
        stock.load_state_dict(stock.state_dict() | _new_biases(stock, 3))
    with torch.device("meta"):
        model = type(stock)(stock.config)
    moe_fast.patch(model)
    model.to_empty(device="cpu")
    model.load_state_dict(stock.state_dict())
    with torch.no_grad():  # the non-persistent buffers (rotary inv_freq) are not in the state dict
        for name, buf in stock.named_buffers():
            model.get_buffer(name).copy_(buf)
    model.eval()
    _assert_routes_as_stock(model, stock)


@pytest.mark.parametrize("family", BIASED)
def test_model_to_other_dtype_after_patch(family, one_thread):
    model = moe_fast.patch(tiny_model(family)).model
    stock = tiny_model(family)
    with torch.no_grad():
        for m in (model, stock):
            for name, bias in _new_biases(m, 11).items():
                m.get_buffer(name).copy_(bias)
    model.to(torch.bfloat16)
    stock.to(torch.bfloat16)
    # The buffers changed dtype under the patched router; the bf16 values must be the ones it uses.
    model.load_state_dict(stock.state_dict())
    _assert_routes_as_stock(model, stock)


@pytest.mark.parametrize("family", ROUTING_FAMILIES + ["mixtral", "qwen3_moe"])
def test_all_tensors_of_a_patched_model_are_parameters_or_buffers(family):
    model = moe_fast.patch(tiny_model(family)).model
    registered = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}

    def loose(value, where: str):
        if isinstance(value, torch.Tensor):
            if id(value) not in registered:
                yield where
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                yield from loose(getattr(value, f.name), f"{where}.{f.name}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from loose(v, f"{where}[{i}]")

    def held() -> list[str]:
        found = []
        for name, module in model.named_modules():
            for attr, value in vars(module).items():
                if attr not in ("_parameters", "_buffers", "_modules"):
                    found += list(loose(value, f"{name}.{attr}"))
        return found

    assert not held(), f"tensors held outside parameters and buffers after patch: {held()}"
    with torch.no_grad():  # the router's dispatch plan is handed to the experts and not kept
        model(_ids())
    assert not held(), f"tensors held outside parameters and buffers after a forward: {held()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("family", BIASED)
def test_model_to_cuda_after_patch(family):
    model = moe_fast.patch(tiny_model(family)).model
    stock = tiny_model(family)
    for m in (model, stock):
        m.load_state_dict(m.state_dict() | _new_biases(m, 13))
    model.to("cuda")
    stock.to("cuda")
    _assert_routes_as_stock(model, stock, device="cuda")
