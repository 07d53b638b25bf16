"""Every model class of every supported family, at ordinary and at odd expert sizes.

The classes are discovered from each family's transformers modeling module (its ``__all__``:
causal LM, sequence / token classification, question answering, the bare model, whatever the
installed transformers exports), so a class added upstream is tested without editing this file.
Each one is patched, calibrated for skipping, pruned while loaded, saved and loaded back; the
outputs are compared with stock transformers and with a plain per-expert loop written here
from the routing rule (no moe_fast code).

The odd sizes (expert MLP widths 37 and 12) are ones stock transformers' default ``grouped_mm``
experts path refuses on CPU ("strides should be multiple of 16 bytes"); there the stock
comparison uses transformers' eager experts.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_fast
from helpers.reference_blocks import rel_err
from helpers.tiny_models import FAMILIES, VOCAB, tiny_config

KEEP = 6  # of the tiny configs' 8 experts
TOL = 1e-5


def model_classes(family: str) -> list[type]:
    """The concrete model classes a family's modeling module exports (those with a forward)."""
    from transformers import PreTrainedModel

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    found = []
    for name in names:
        obj = getattr(module, name, None)
        if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.forward is not nn.Module.forward:
            found.append(obj)
    return found


CASES = [pytest.param(family, cls, id=cls.__name__) for family in FAMILIES for cls in model_classes(family)]

# Expert MLP widths that are not multiples of 8 (Mixtral and OLMoE experts use intermediate_size;
# the Qwen families use moe_intermediate_size for experts and intermediate_size for dense layers).
ODD = {
    "mixtral": dict(intermediate_size=37),
    "olmoe": dict(intermediate_size=37),
    "qwen2_moe": dict(intermediate_size=37, moe_intermediate_size=12, shared_expert_intermediate_size=37),
    "qwen3_moe": dict(intermediate_size=37, moe_intermediate_size=12),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: far faster on one thread


def test_discovery_finds_the_families_classes():
    from transformers import AutoModel, AutoModelForCausalLM

    for family in FAMILIES:
        classes = model_classes(family)
        config_class = type(tiny_config(family))
        # The Auto mappings name the bare model and the causal LM independently of the module.
        assert AutoModel._model_mapping[config_class] in classes
        assert AutoModelForCausalLM._model_mapping[config_class] in classes
        assert all(not c.__name__.endswith("PreTrainedModel") for c in classes)


# --- models and a plain reference ---------------------------------------------------------------


def make_model(family: str, cls: type, sizes: str, seed: int = 0) -> nn.Module:
    """A random tiny model of ``cls``; eager experts at the odd sizes (stock grouped_mm fails there)."""
    config = tiny_config(family, **(ODD[family] if sizes == "odd" else {}))
    if sizes == "odd":
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # clearly separated router logits and outputs
                p.normal_(0.0, 0.25 if "embed" in name else 0.12)
    return model.eval()


def load_kwargs(sizes: str) -> dict:
    return {"experts_implementation": "eager"} if sizes == "odd" else {}


def sparse_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer, block) of every sparse block, found through transformers' ``base_model``."""
    return [(i, layer.mlp) for i, layer in enumerate(model.base_model.layers) if hasattr(layer.mlp, "experts")]


def num_experts(model: nn.Module) -> int:
    config = model.config
    return config.num_local_experts if config.model_type == "mixtral" else config.num_experts


def plain_block_forward(block, hidden, renorm: bool, betas=None, allowed=None) -> torch.Tensor:
    """One sparse block by the rule, in float64 routing and a loop over experts.

    ``allowed``: experts that may be routed to (the others at logit -inf: a pruned model);
    ``betas``: slot j >= 1 dropped when ``w_j < beta_j * w_0``.
    """
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    logits = F.linear(x, block.gate.weight).double()
    if allowed is not None:
        logits[:, [e for e in range(logits.shape[1]) if e not in allowed]] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    k = block.gate.top_k
    top_p, top_i = order.values[:, :k], order.indices[:, :k]
    keep = torch.ones_like(top_p, dtype=torch.bool)
    if betas is not None:
        keep[:, 1:] = top_p[:, 1:] >= torch.tensor(betas, dtype=torch.float64) * top_p[:, :1]
    w = torch.where(keep, top_p, torch.zeros_like(top_p))
    w = w / w.sum(-1, keepdim=True) if renorm else w * (top_p.sum(-1, keepdim=True) / w.sum(-1, keepdim=True))
    ex = block.experts
    out = torch.zeros(x.shape[0], shape[-1], dtype=torch.float64)
    for e in range(ex.gate_up_proj.shape[0]):
        tok, slot = torch.nonzero((top_i == e) & keep, as_tuple=True)
        if tok.numel():
            gate, up = F.linear(x[tok], ex.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(ex.act_fn(gate) * up, ex.down_proj[e])
            out.index_add_(0, tok, y.double() * w[tok, slot].unsqueeze(-1))
    out = out.to(hidden.dtype)
    if hasattr(block, "shared_expert"):
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out.reshape(shape)


@contextlib.contextmanager
def plain_reference(model, betas: dict | None = None, allowed: dict | None = None):
    """Runs every sparse block with :func:`plain_block_forward` (per layer betas / allowed experts)."""
    renorm = model.config.model_type == "mixtral" or bool(model.config.norm_topk_prob)
    blocks = sparse_blocks(model)
    for layer, block in blocks:
        b, a = (betas or {}).get(layer), (allowed or {}).get(layer)
        block.forward = types.MethodType(lambda self, h, _b=b, _a=a: plain_block_forward(self, h, renorm, _b, _a), block)
    try:
        yield
    finally:
        for _, block in blocks:
            del block.forward


def outputs(model, ids) -> dict[str, torch.Tensor]:
    """Every floating-point tensor the model returns (logits, start/end logits, hidden states)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    found = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert found, f"{type(model).__name__} returned no float tensor"
    return found


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(rel_err(a[k], b[k]) for k in a)


def skipped_fraction(model, ids) -> float:
    """Fraction of the slots j >= 1 the patched routers skip on ``ids`` (index E marks a skip)."""
    E, seen = num_experts(model), []
    hooks = [b.gate.register_forward_hook(lambda m, a, out: seen.append(out[2][:, 1:] == E)) for _, b in sparse_blocks(model)]
    try:
        outputs(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return float(torch.cat([s.reshape(-1) for s in seen]).float().mean())


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", ["tiny", "odd"])
@pytest.mark.parametrize("family,cls", CASES)
def test_patch_skip_save_load(family, cls, sizes, tmp_path):
    model = make_model(family, cls, sizes)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    stock = outputs(model, ids)
    with plain_reference(model):
        plain = outputs(model, ids)
    assert max_rel_err(plain, stock) < TOL  # the reference is the stock model's rule

    moe_fast.patch(model)
    assert max_rel_err(outputs(model, ids), stock) < TOL
    moe_fast.unpatch(model)
    assert max_rel_err(outputs(model, ids), stock) == 0.0

    cal = moe_fast.calibrate_skipping(model, ids, progress=False)
    layers = [layer for layer, _ in sparse_blocks(model)]
    assert cal.layers == layers and len(cal.betas) == len(layers)
    betas = dict(zip(cal.layers, cal.betas))
    with plain_reference(model, betas=betas):
        ref = outputs(model, ids)
    moe_fast.patch(model, betas=cal)
    assert 0.05 < skipped_fraction(model, ids) < 0.95  # skipping does something, not everything
    skipping = outputs(model, ids)
    assert max_rel_err(skipping, ref) < TOL

    moe_fast.save(model, tmp_path / "skipping")
    loaded = moe_fast.from_pretrained(tmp_path / "skipping")  # the saved class, patched again
    assert type(loaded) is cls
    assert moe_fast.serving.patching.is_patched(loaded)
    assert moe_fast.serving.patching.current_betas(loaded) == betas
    assert max_rel_err(outputs(loaded.eval(), ids), skipping) < TOL
    plain_loaded = cls.from_pretrained(tmp_path / "skipping", **load_kwargs(sizes)).eval()  # stock transformers
    assert not moe_fast.serving.patching.is_patched(plain_loaded)
    assert max_rel_err(outputs(plain_loaded, ids), stock) < TOL


@pytest.mark.parametrize("sizes", ["tiny", "odd"])
@pytest.mark.parametrize("family,cls", CASES)
def test_prune_loaded_model_and_save(family, cls, sizes, tmp_path):
    model = make_model(family, cls, sizes)
    original = copy.deepcopy(model)
    calib = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2))
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    E = num_experts(model)

    pruned, report = moe_fast.prune(model, calib, KEEP, out=tmp_path / "pruned", search="exhaustive", batch_size=2, progress=False)
    assert pruned is model
    layers = [layer for layer, _ in sparse_blocks(original)]
    assert sorted(report.kept) == layers
    for layer, block in sparse_blocks(pruned):
        kept = report.kept[layer]
        assert len(kept) == KEEP and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < E
        assert torch.equal(block.gate.weight, original.base_model.layers[layer].mlp.gate.weight[kept])
        assert block.experts.gate_up_proj.shape[0] == KEEP
    assert num_experts(pruned) == KEEP
    with plain_reference(original, allowed=report.kept):
        expected = outputs(original, ids)  # the unpruned model routing only to the kept experts
    got = outputs(pruned, ids)
    assert max_rel_err(got, expected) < TOL

    loaded = cls.from_pretrained(tmp_path / "pruned", **load_kwargs(sizes)).eval()  # stock transformers
    assert num_experts(loaded) == KEEP
    assert loaded.config.moe_fast["pruning"]["kept_experts"] == {str(k): v for k, v in report.kept.items()}
    assert max_rel_err(outputs(loaded, ids), got) < TOL

    moe_fast.patch(loaded)
    assert max_rel_err(outputs(loaded, ids), got) < TOL
    cal = moe_fast.calibrate_skipping(loaded, calib, progress=False)
    moe_fast.patch(loaded, betas=cal)
    with plain_reference(pruned, betas=dict(zip(cal.layers, cal.betas))):
        ref = outputs(pruned, ids)
    assert max_rel_err(outputs(loaded, ids), ref) < TOL


# --- odd widths in the experts' grouped GEMMs (any dtype) ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_in,n_out", [(32, 24), (32, 12), (12, 32), (32, 74), (37, 32)])
def test_grouped_matmul_any_width(dtype, n_in, n_out):
    """Rows of each expert times its weight, whatever the width (bf16 rows of 12 are 24 bytes)."""
    from moe_fast.serving.experts import grouped_matmul

    gen = torch.Generator().manual_seed(4)
    counts = [3, 0, 6, 2]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), n_in, generator=gen).to(dtype)
    weight = torch.randn(len(counts), n_out, n_in, generator=gen).to(dtype).transpose(-2, -1)  # as the experts pass it
    with torch.no_grad():
        got = grouped_matmul(x, weight, offsets)
    expected = torch.cat([x[a:b].double() @ weight[e].double() for e, (a, b) in enumerate(zip([0] + offsets.tolist()[:-1], offsets.tolist()))])
    assert got.shape == (sum(counts), n_out) and got.dtype == dtype
    assert rel_err(got, expected) < (1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_experts_at_odd_sizes(family):
    """The moe_fast experts path on a bf16 block with odd widths: runs, equals a float64 loop."""
    from moe_fast.serving.experts import moe_fast_experts_forward

    config = tiny_config(family, **ODD[family])
    torch.manual_seed(0)
    model = model_classes(family)[0](config).to(torch.bfloat16).eval()
    experts = sparse_blocks(model)[0][1].experts
    gen = torch.Generator().manual_seed(5)
    T, k, E = 10, config.num_experts_per_tok, experts.gate_up_proj.shape[0]
    hidden = torch.randn(T, config.hidden_size, generator=gen).to(torch.bfloat16)
    index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    index[::3, 1] = E  # some skipped slots
    weights = torch.rand(T, k, generator=gen)
    with torch.no_grad():
        got = moe_fast_experts_forward(experts, hidden, index, weights)
        expected = torch.zeros(T, config.hidden_size, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                e = int(index[t, j])
                if e < E:
                    gate, up = F.linear(hidden[t].double(), experts.gate_up_proj[e].double()).chunk(2)
                    y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e].double())
                    expected[t] += float(weights[t, j]) * y
    assert rel_err(got, expected) < 3e-2
