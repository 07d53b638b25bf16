"""moe_fast.evaluation.measures and `moe-fast eval`, checked against plain-transformers references."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_fast import cli
from moe_fast.evaluation.measures import SkipCounter, data_texts, evaluate, parameter_count, perplexity, size_on_disk


def _tiny(seed: int = 0, layers: int = 2) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger router weights: routing far from uniform
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    return model


def test_perplexity_matches_transformers_loss():
    model = _tiny()
    ids = torch.randint(0, 300, (5 * 64 + 7,))  # 5 windows and a remainder that is not scored
    ppl, n = perplexity(model, ids, seq_len=64, batch_size=2)
    windows = ids[: 5 * 64].view(5, 64)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert n == 5 * 63
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert perplexity(model, ids, seq_len=64, batch_size=5)[0] == pytest.approx(ppl, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:10], seq_len=64)


def test_parameter_count_from_config():
    model = _tiny()
    c = model.config
    H, I, E, V, L = c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size, c.num_hidden_layers
    hd = H // c.num_attention_heads
    attn = H * H * 2 + 2 * H * c.num_key_value_heads * hd
    per_layer = attn + E * 3 * H * I + E * H + 2 * H
    assert parameter_count(model) == 2 * V * H + L * per_layer + H


def _skip_rate_reference(model, ids: torch.Tensor, beta: float) -> float:
    """Fraction of tokens whose second routing weight is below beta times the first (stock routing)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    skipped = total = 0
    for logits in out.router_logits:
        top = torch.softmax(logits.float(), -1).topk(2, -1).values
        skipped += int((top[:, 1] < beta * top[:, 0]).sum())
        total += top.shape[0]
    return skipped / total


@pytest.mark.numerics
def test_skip_counter_matches_the_rule():
    from moe_fast.serving.patching import patch

    model = _tiny(layers=1)  # one layer: skipping cannot change the router's input
    ids = torch.randint(0, 300, (2, 64))
    beta = 0.5
    expected = _skip_rate_reference(model, ids, beta)
    assert 0.05 < expected < 0.95  # the check means something
    patch(model, betas=beta)
    counter = SkipCounter(model)
    with torch.no_grad():
        model(input_ids=ids)
    counter.remove()
    assert counter.rate == pytest.approx(expected, abs=1e-9)
    # unpatched model: nothing skipped
    plain = _tiny()
    counter = SkipCounter(plain)
    with torch.no_grad():
        plain(input_ids=ids)
    assert counter.slots > 0 and counter.rate == 0.0


def test_builtin_eval_data_is_the_test_split():
    from moe_fast.data.builtin import get_corpus

    assert data_texts("builtin:python-code") == get_corpus("python-code").test
    assert data_texts("builtin:python-prose:calib") == get_corpus("python-prose").calib
    with pytest.raises(FileNotFoundError):
        data_texts("/nonexistent/file.txt")


def _save_tiny(tmp_path) -> tuple[str, object]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i + 1 for i in range(26)} | {"<eos>": 0, " ": 27, "\n": 28}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    model = _tiny().to(torch.float16)
    path = str(tmp_path / "tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def test_evaluate_and_cli(tmp_path):
    path, tokenizer = _save_tiny(tmp_path)
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    data_file = tmp_path / "held_out.txt"
    data_file.write_text(text)
    out_json = tmp_path / "eval.json"
    rc = cli.main(["eval", path, "--data", str(data_file), "--seq-len", "64", "--max-tokens", "640",
                   "--new-tokens", "4", "--prompts", "1", "--json", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert res["num_experts"] == 6 and res["top_k"] == 2 and res["skip_rate"] is None
    assert res["tokens_scored"][str(data_file)] == 10 * 63
    assert res["size_on_disk_bytes"] == os.path.getsize(os.path.join(path, "model.safetensors"))
    assert res["size_on_disk_bytes"] >= 2 * res["parameters"] and res["tokens_per_s"] > 0
    # the same perplexity through the library, and through an independent loss computation
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:640]).view(10, 64)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    assert res["perplexity"][str(data_file)] == pytest.approx(math.exp(sum(losses) / 10), rel=1e-4)
    direct = evaluate(model, tokenizer, {"t": text}, path=path, max_tokens=640, seq_len=64, gen_prompts=0)
    assert direct.perplexity["t"] == pytest.approx(res["perplexity"][str(data_file)], rel=1e-6)
    assert direct.size_on_disk_bytes == size_on_disk(path) and not direct.size_is_estimate
    # --beta turns skipping on and reports the measured rate; --skip without recorded betas is an error
    rc = cli.main(["eval", path, "--data", str(data_file), "--seq-len", "64", "--max-tokens", "640",
                   "--prompts", "0", "--beta", "1.0", "--json", str(out_json)])
    assert rc == 0
    assert json.loads(out_json.read_text())["skip_rate"] == pytest.approx(1.0, abs=0.02)
    assert cli.main(["eval", path, "--data", str(data_file), "--skip"]) == 2
