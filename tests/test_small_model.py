"""The shipped small Mixtral: a fixed artifact, so its properties can be checked directly.

Routing is measured with plain transformers (``output_router_logits``), not with moe_fast.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from moe_fast.models import SMALL_MIXTRAL_DIR, resolve_model

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(SMALL_MIXTRAL_DIR, "config.json")), reason="small Mixtral not built"
)

WINDOWS, SEQ = 32, 256


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("builtin:small-mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _windows(tokenizer, text: str, offset: int = 0) -> torch.Tensor:
    ids = tokenizer(text[: 400_000], add_special_tokens=False)["input_ids"]
    ids = ids[offset * SEQ : (offset + WINDOWS) * SEQ]
    assert len(ids) == WINDOWS * SEQ
    return torch.tensor(ids).view(WINDOWS, SEQ)


def _routing(model, ids: torch.Tensor) -> torch.Tensor:
    """[layers, experts]: fraction of top-2 slots per expert."""
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    E = model.config.num_local_experts
    hist = torch.stack([torch.bincount(l.topk(2, -1).indices.reshape(-1), minlength=E).float() for l in out.router_logits])
    return hist / hist.sum(-1, keepdim=True)


def _tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(-1)


def test_checkpoint_files_and_size():
    weights = [f for f in os.listdir(SMALL_MIXTRAL_DIR) if f.endswith(".safetensors")]
    total = sum(os.path.getsize(os.path.join(SMALL_MIXTRAL_DIR, f)) for f in os.listdir(SMALL_MIXTRAL_DIR))
    assert weights and total <= 25 * 2**20
    with open(os.path.join(SMALL_MIXTRAL_DIR, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    with open(os.path.join(SMALL_MIXTRAL_DIR, "training_info.json")) as f:
        info = json.load(f)
    assert info["command"].startswith("python -m moe_fast.models.train_small")


def test_tokenizer_round_trip(loaded):
    _, tokenizer = loaded
    text = 'def f(x):\n    """Return x."""\n    return x  # é\n'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer) == 4096


def test_experts_specialise_on_prose_vs_code(loaded):
    from moe_fast.data.builtin import get_corpus

    model, tokenizer = loaded
    prose = _windows(tokenizer, get_corpus("python-prose").test)
    code = _windows(tokenizer, get_corpus("python-code").test)
    between = _tv(_routing(model, prose), _routing(model, code))
    # the noise floor: two interleaved halves of the same text
    within = torch.maximum(
        _tv(_routing(model, prose[0::2]), _routing(model, prose[1::2])),
        _tv(_routing(model, code[0::2]), _routing(model, code[1::2])),
    )
    # Measured on the shipped model (benchmarks/RESULTS.md, "## demo"): total variation prose vs
    # code 0.15 / 0.32 / 0.10 / 0.28 per layer, within one kind of text at most 0.04.
    assert between.mean() > 0.15, between
    assert (between > 2.5 * within).all(), (between, within)


def test_model_has_learned_both_kinds(loaded):
    from moe_fast.data.builtin import get_corpus

    model, tokenizer = loaded
    for name, bound in (("python-prose", 300.0), ("python-code", 300.0)):
        ids = _windows(tokenizer, get_corpus(name).test)[:4]  # measured: prose 177, code 169
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        # a uniform guess over 4096 tokens is 4096; the shipped model is far below these bounds
        assert torch.exp(torch.tensor(loss)).item() < bound, (name, loss)
