"""The shipped small MoEs: fixed artifacts, so their properties are checked on the weights.

Routing is measured here with plain transformers (``output_router_logits``) on the test splits,
not read from ``training_info.json`` and not computed with moe_fast.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from moe_fast.models import BUILTIN_MODELS, resolve_model

WINDOWS, SEQ = 64, 256
MAX_BYTES = 32 * 2**20
# The model shipped before the current one (4 layers, 1.8M training tokens), measured with the
# same windows of the same test splits: held-out loss in nats per character. A new model must be
# better on both, per character so that a new tokenizer compares fairly.
PREVIOUS_LOSS_PER_CHAR = {"python-prose": 1.4077, "python-code": 1.0935}


def _built(name: str) -> bool:
    return os.path.exists(os.path.join(BUILTIN_MODELS[name], "config.json"))


MODELS = [pytest.param(n, marks=pytest.mark.skipif(not _built(n), reason=f"{n} not built")) for n in BUILTIN_MODELS]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(f"builtin:{request.param}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, model, AutoTokenizer.from_pretrained(path)


def _test_windows(tokenizer, corpus: str) -> tuple[torch.Tensor, str]:
    from moe_fast.data.builtin import get_corpus

    text = get_corpus(corpus).test
    ids = tokenizer(text[:600_000], add_special_tokens=False)["input_ids"][: WINDOWS * SEQ]
    assert len(ids) == WINDOWS * SEQ
    return torch.tensor(ids).view(WINDOWS, SEQ), text


def _num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def _routing(model, ids: torch.Tensor) -> torch.Tensor:
    """[layers, experts]: fraction of the top-k slots that went to each expert."""
    E, k = _num_experts(model.config), model.config.num_experts_per_tok
    counts = 0
    with torch.no_grad():
        for lo in range(0, ids.shape[0], 16):
            out = model(input_ids=ids[lo : lo + 16], output_router_logits=True)
            counts = counts + torch.stack(
                [torch.bincount(l.topk(k, -1).indices.reshape(-1), minlength=E).double() for l in out.router_logits]
            )
    return counts / counts.sum(-1, keepdim=True)


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_files_and_size(name):
    path = BUILTIN_MODELS[name]
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert any(f.endswith(".safetensors") for f in os.listdir(path)) and total <= MAX_BYTES
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "training_info.json")) as f:
        info = json.load(f)
    assert info["command"].startswith("python -m moe_fast.models.train_small")
    for key in ("loss_curve_every_10", "train_seconds", "routing_test_prose", "routing_test_code", "test_loss_per_char"):
        assert info[key], key
    if config["model_type"] == "mixtral":
        assert config["num_hidden_layers"] >= 6
        assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
        assert info.get("train_tokens_all_phases", info["train_tokens"]) >= 8_000_000
    else:
        assert config["model_type"] == "qwen3_moe"
        experts = config.get("num_experts") or config.get("num_local_experts")
        assert experts in (32, 64) and config["num_experts_per_tok"] in (4, 8)


def test_tokenizer_round_trip(loaded):
    _, _, tokenizer = loaded
    text = 'def f(x):\n    """Return x."""\n    return x  # é\n'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


# Known misses (measured on the shipped weights, 64 x 256 test tokens): on prose, small-mixtral's
# last layer gives one expert 3.3% (< 4%); small-qwen3-moe's layers 0, 2, 3 give one expert
# 0.1-0.7% (< 0.78%). Code is within the bounds for both. strict: the day a retrained model meets
# the bound, this marker must go.
@pytest.mark.parametrize("corpus", ["python-prose", "python-code"])
def test_routing_is_balanced_on_the_test_split(loaded, corpus):
    """Mixtral-like: every expert of every layer gets 4%..30% of the routings; fine-grained: none
    below a quarter of its fair share 1/E."""
    name, model, tokenizer = loaded
    ids, _ = _test_windows(tokenizer, corpus)
    share = _routing(model, ids)
    E = share.shape[1]
    if E == 8:
        assert share.min() >= 0.04 and share.max() <= 0.30, share
    else:
        assert share.min() >= 0.25 / E, share


def test_held_out_loss_per_character(loaded):
    """Below the previous shipped model's (a 4-layer Mixtral) on both test splits, per character."""
    name, model, tokenizer = loaded
    for corpus in ("python-prose", "python-code"):
        ids, _ = _test_windows(tokenizer, corpus)
        with torch.no_grad():
            losses = [model(input_ids=ids[lo : lo + 16], labels=ids[lo : lo + 16]).loss.item() for lo in range(0, WINDOWS, 16)]
        loss = sum(losses) / len(losses)
        chars = len(tokenizer.decode(ids.reshape(-1)[1:].tolist()))
        per_char = loss * (ids.numel() - 1) / chars
        assert per_char < PREVIOUS_LOSS_PER_CHAR[corpus], (name, corpus, per_char)
