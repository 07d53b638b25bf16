"""Shared pieces of the pruning tests: tiny Mixtrals and the paper's brute-force enumeration.

The brute force re-runs the stock transformers block with the dropped experts' logits at -inf
for every candidate and sums the per-batch Frobenius norms (float64) against the unpruned
block output, exactly as the paper's code does. It shares no code with moe_fast.pruning.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread (no spin-waiting on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_mixtral(seed: int = 0, experts: int = 8, top_k: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 48, vocab: int = 128) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger router weights: a spread of routing probabilities
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.2)
            layer.mlp.experts.down_proj.normal_(0.0, 0.2)
    return model


def masked_block_forward(block, x: torch.Tensor, dropped) -> torch.Tensor:
    """The stock block on x [T, H] with the dropped experts' router logits at -inf."""
    logits = torch.nn.functional.linear(x, block.gate.weight).float()
    if dropped:
        logits[:, list(dropped)] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, block.gate.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    return block.experts(x, idx, top)


class masked_routers:
    """Context: the listed layers' routers drop experts (logit -inf), stock code otherwise."""

    def __init__(self, model, dropped_per_layer: dict[int, tuple]) -> None:
        self.model, self.dropped = model, dropped_per_layer

    def __enter__(self):
        for i, dropped in self.dropped.items():
            gate = self.model.model.layers[i].mlp.gate

            def fwd(h, gate=gate, dropped=tuple(dropped)):
                h = h.reshape(-1, gate.hidden_dim)
                logits = torch.nn.functional.linear(h, gate.weight)
                masked = logits.float().clone()
                masked[:, list(dropped)] = -math.inf
                probs = torch.softmax(masked, dim=-1)
                top, idx = torch.topk(probs, gate.top_k, dim=-1)
                return logits, top / top.sum(-1, keepdim=True), idx

            gate.forward = fwd
        return self

    def __exit__(self, *exc):
        for i in self.dropped:
            del self.model.model.layers[i].mlp.gate.forward


def capture_block_io(model, ids: torch.Tensor, batch_size: int, layer: int):
    """Per calibration batch: (block input [T, H], block output [T, H]) of one layer."""
    block = model.model.layers[layer].mlp
    out = []
    store = {}

    def hook(module, args, output):
        store["x"] = args[0].reshape(-1, args[0].shape[-1]).clone()
        store["z"] = output.reshape(-1, output.shape[-1]).clone()

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for lo in range(0, ids.shape[0], batch_size):
                model(ids[lo : lo + batch_size])
                out.append((store["x"], store["z"]))
    finally:
        handle.remove()
    return out


def candidate_loss(block, batches, dropped, objective: str = "paper") -> float:
    """The paper's score of one dropped set: re-run the block, sum the per-batch norms."""
    total = 0.0
    with torch.no_grad():
        for x, z in batches:
            diff = z.double() - masked_block_forward(block, x, dropped).double()
            total += float(torch.linalg.norm(diff)) if objective == "paper" else float((diff * diff).sum())
    return total


def all_candidate_losses(block, batches, cands, objective: str = "paper") -> dict[tuple, float]:
    """``candidate_loss`` for many dropped sets, with every expert's output computed once per batch.

    Same arithmetic per candidate (masked softmax, top-k, renormalize, weighted sum of the same
    expert outputs, float64 norm of the difference to the stock block output); only the expert MLPs
    are not re-run per candidate, which keeps the sweep fast.
    """
    E = block.gate.weight.shape[0]
    totals = {d: 0.0 for d in cands}
    with torch.no_grad():
        for x, z in batches:
            ys = torch.stack([
                torch.nn.functional.linear(
                    block.experts.act_fn(torch.nn.functional.linear(x, block.experts.gate_up_proj[e]).chunk(2, -1)[0])
                    * torch.nn.functional.linear(x, block.experts.gate_up_proj[e]).chunk(2, -1)[1],
                    block.experts.down_proj[e],
                )
                for e in range(E)
            ], 1)  # [T, E, H]
            logits = torch.nn.functional.linear(x, block.gate.weight).float()
            for d in cands:
                lg = logits.clone()
                if d:
                    lg[:, list(d)] = -math.inf
                top, idx = torch.topk(torch.softmax(lg, -1), block.gate.top_k, dim=-1)
                top = top / top.sum(-1, keepdim=True)
                out = (top.unsqueeze(-1) * torch.gather(ys, 1, idx.unsqueeze(-1).expand(-1, -1, ys.shape[-1]))).sum(1)
                diff = z.double() - out.double()
                totals[d] += float(torch.linalg.norm(diff)) if objective == "paper" else float((diff * diff).sum())
    return totals


def brute_force(model, ids, keep: int, batch_size: int, mode: str = "layerwise", objective: str = "paper"):
    """The paper's algorithm: per layer all C(E, R) dropped sets -> (chosen per layer, losses per layer)."""
    E = model.config.num_local_experts
    chosen: dict[int, tuple] = {}
    losses: dict[int, dict[tuple, float]] = {}
    for layer in range(model.config.num_hidden_layers):
        targets = capture_block_io(model, ids, batch_size, layer)
        if mode == "progressive" and layer > 0:
            with masked_routers(model, chosen):
                inputs = capture_block_io(model, ids, batch_size, layer)
            batches = [(xp, zu) for (xp, _), (_, zu) in zip(inputs, targets)]
        else:
            batches = targets
        block = model.model.layers[layer].mlp
        cands = list(itertools.combinations(range(E), E - keep))
        vals = all_candidate_losses(block, batches, cands, objective)
        chosen[layer] = min(cands, key=lambda d: (vals[d], d))
        losses[layer] = vals
    return chosen, losses


def brute_force_beam(model, ids, keep: int, batch_size: int, width: int, objective: str = "paper"):
    """Backward elimination (layer-wise) with the brute-force objective: the beam search's spec."""
    E = model.config.num_local_experts
    chosen = {}
    for layer in range(model.config.num_hidden_layers):
        batches = capture_block_io(model, ids, batch_size, layer)
        block = model.model.layers[layer].mlp
        frontier = [()]
        for _ in range(E - keep):
            cands = sorted({tuple(sorted(d + (e,))) for d in frontier for e in range(E) if e not in d})
            vals = all_candidate_losses(block, batches, cands, objective)
            frontier = sorted(cands, key=lambda d: (vals[d], d))[:width]
        chosen[layer] = frontier[0]
    return chosen


def tiny_tokenizer(vocab: int = 128):
    """A word-level fast tokenizer over the words w0..w{vocab-2} plus [UNK] (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["[UNK]"] = vocab - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def save_checkpoint(model, path, tokenizer=None, shard: str | None = "40KB") -> str:
    """Hub-layout checkpoint of a model (sharded by default), with a tokenizer when given."""
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)
