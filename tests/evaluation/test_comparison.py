"""`moe-fast eval MODEL --base ORIGINAL`: KL, top-1 agreement and perplexity ratio against a computation here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_fast import cli
from moe_fast.evaluation.comparison import compare_models

VOCAB = 30
SEQ, TOKENS = 32, 320


def _save(tmp_path, name: str, seed: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i + 1 for i in range(26)} | {"<eos>": 0, " ": 27, "\n": 28, ".": 29}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
                        eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    path = str(tmp_path / name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _text(tmp_path) -> str:
    rng = np.random.default_rng(0)
    words = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(2, 7))) for _ in range(200)]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words) + ".\n")
    return str(path)


@torch.no_grad()
def _expected(base: str, model: str, text: str) -> dict:
    """Both models loaded side by side, full next-token distributions, plain formulas."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor(tok(open(text).read(), add_special_tokens=False)["input_ids"][:TOKENS]).view(-1, SEQ)
    out = {}
    for name, path in (("p", base), ("q", model)):
        m = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[name] = torch.log_softmax(m(input_ids=ids).logits[:, :-1].double(), -1)
    p, q, target = out["p"], out["q"], ids[:, 1:]
    kl = (p.exp() * (p - q)).sum(-1).flatten().numpy()
    nll = {k: -float(v.gather(-1, target.unsqueeze(-1)).mean()) for k, v in out.items()}
    return {"kl_mean": kl.mean(), "kl_p99": np.percentile(kl, 99), "agree": float((p.argmax(-1) == q.argmax(-1)).double().mean()),
            "ratio": math.exp(nll["q"] - nll["p"]), "ppl_base": math.exp(nll["p"]), "tokens": target.numel()}


def test_kl_agreement_and_ratio_match_a_side_by_side_computation(tmp_path):
    base, other, text = _save(tmp_path, "base", 0), _save(tmp_path, "other", 1), _text(tmp_path)
    want = _expected(base, other, text)
    assert want["kl_mean"] > 0.01 and want["agree"] < 1  # the two models really differ
    for top in (0, VOCAB):  # every log-probability kept: exact
        got = compare_models(other, base, [text], max_tokens=TOKENS, seq_len=SEQ, batch_size=3, top=top).per_data[0]
        assert got.tokens == want["tokens"]
        assert got.kl_mean == pytest.approx(want["kl_mean"], rel=1e-4)
        assert got.kl_p99 == pytest.approx(want["kl_p99"], rel=1e-4)
        assert got.top1_agreement == pytest.approx(want["agree"])
        assert got.perplexity_ratio == pytest.approx(want["ratio"], rel=1e-5)
        assert got.perplexity_base == pytest.approx(want["ppl_base"], rel=1e-5)
    coarse = compare_models(other, base, [text], max_tokens=TOKENS, seq_len=SEQ, batch_size=3, top=4).per_data[0]
    assert 0 < coarse.kl_mean <= want["kl_mean"] * (1 + 1e-6)  # grouping outcomes never raises a divergence
    assert coarse.top1_agreement == pytest.approx(want["agree"])
    same = compare_models(base, base, [text], max_tokens=TOKENS, seq_len=SEQ, top=4).per_data[0]
    assert abs(same.kl_mean) < 1e-6 and same.top1_agreement == 1.0 and same.perplexity_ratio == pytest.approx(1.0)


def test_cli_base(tmp_path, capsys):
    base, other, text = _save(tmp_path, "base", 0), _save(tmp_path, "other", 1), _text(tmp_path)
    out = tmp_path / "cmp.json"
    rc = cli.main(["eval", other, "--base", base, "--data", text, "--max-tokens", str(TOKENS), "--seq-len", str(SEQ),
                   "--kl-top", "0", "--json", str(out)])
    assert rc == 0
    assert "KL mean" in capsys.readouterr().out
    row = json.loads(out.read_text())["per_data"][0]
    want = _expected(base, other, text)
    assert row["kl_mean"] == pytest.approx(want["kl_mean"], rel=1e-4)
    assert row["perplexity_ratio"] == pytest.approx(want["ratio"], rel=1e-5)
    capsys.readouterr()
    assert cli.main(["eval", other, "--base", base]) == 2
    assert "--base needs --data" in capsys.readouterr().err
    assert cli.main(["eval", other, "--base", base, "--data", text, "--kl-top", "-1"]) == 2
    assert "--kl-top" in capsys.readouterr().err
