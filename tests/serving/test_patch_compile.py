"""A patched model compiles with ``torch.compile(fullgraph=True)`` (issue 26, cause 3): every
family, float32 and bfloat16; the compiled forward equals the eager one and greedy generation
through the compiled forward gives the eager tokens. The experts' static-shape path
(``experts._static_forward``) and its two ops are checked against the reference with opcheck.

Most cases compile with the ``aot_eager`` backend: it runs dynamo (where the data-dependent loop
used to fail) and AOT autograd over the fake kernels, without inductor's C++ code generation, which
takes minutes on a small CPU. One case runs the default inductor backend end to end."""

from __future__ import annotations

import pytest
import torch

import moe_fast
from moe_fast import reference
from moe_fast.serving import experts

from helpers.tiny_models import FAMILIES, ROUTING_FAMILIES, VOCAB, tiny_model

ALL_FAMILIES = FAMILIES + ROUTING_FAMILIES


def _ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def _patched(family: str, dtype: torch.dtype, beta: float | None = 0.3) -> torch.nn.Module:
    """Two decoder layers (DeepSeek / GLM: the dense one and one MoE layer), with skipping on."""
    return moe_fast.patch(tiny_model(family, dtype=dtype, num_hidden_layers=2), beta).model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_patched_forward_compiles_fullgraph_and_equals_eager(family, dtype, one_thread):
    torch._dynamo.reset()
    model = _patched(family, dtype)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_generation_under_compile_equals_eager(family, one_thread):
    torch._dynamo.reset()
    model = _patched(family, torch.float32)
    ids = _ids(2, 4)  # 4 + 3 tokens stay inside gpt-oss' sliding window of 8: no mask change, fewer recompiles
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=3, do_sample=False)
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True, backend="aot_eager")
        got = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_inductor_compiles_a_patched_model_fullgraph(one_thread):
    torch._dynamo.reset()
    model = _patched("qwen3_moe", torch.float32)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_compiled_training_step_gradients_equal_eager(one_thread):
    """Through the ops' autograd: the compiled model's gradients are the eager model's."""
    torch._dynamo.reset()
    grads = []
    for compiled in (False, True):
        model = moe_fast.patch(tiny_model("mixtral", num_hidden_layers=1)).model
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        fn(_ids(), labels=_ids()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def _plan_case(seed: int, rows: int = 13, E: int = 4, skipped: int = 3):
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(E), rows - skipped, replacement=True, generator=g).bincount(minlength=E)
    ends = torch.cumsum(counts, 0).to(torch.int32)
    return torch.randn(rows, 6, generator=g), torch.randn(E, 6, 5, generator=g), ends


@pytest.mark.parametrize("seed", range(3))
def test_grouped_matmul_op_equals_reference(seed):
    x, w, ends = _plan_case(seed)
    torch.testing.assert_close(experts.grouped_matmul_op(x, w, ends), reference.grouped_matmul(x, w, ends))
    g = torch.randn(x.shape[0], 5)
    torch.testing.assert_close(experts.grouped_matmul_weight_grad(x, g, ends),
                               reference.grouped_matmul_weight_grad(x, g, ends))


def test_grouped_matmul_ops_opcheck_and_autograd():
    x, w, ends = _plan_case(5)
    torch.library.opcheck(torch.ops.moe_fast.grouped_matmul.default, (x, w, ends))
    torch.library.opcheck(torch.ops.moe_fast.grouped_matmul_weight_grad.default, (x, torch.randn(13, 5), ends))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (experts.grouped_matmul_op(xr, wr, ends) ** 2).sum().backward()
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    (reference.grouped_matmul(xs, ws, ends) ** 2).sum().backward()
    torch.testing.assert_close(xr.grad, xs.grad)
    torch.testing.assert_close(wr.grad, ws.grad)


def test_grouped_matmul_op_refuses_mismatched_shapes():
    x, w, ends = _plan_case(0)
    with pytest.raises(RuntimeError, match="x has 6 columns, weight 7 rows"):
        experts.grouped_matmul_op(x, torch.randn(4, 7, 5), ends)
    with pytest.raises(RuntimeError, match="one entry per expert"):
        experts.grouped_matmul_op(x, w, ends[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "mixtral"])
def test_patched_forward_compiles_fullgraph_on_cuda(family):
    torch._dynamo.reset()
    model = _patched(family, torch.bfloat16).to("cuda")
    ids = _ids().to("cuda")
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)
