"""Trains the small Mixtral that ships with moe_fast (``builtin:small-mixtral``), on the CPU.

Why it exists: the demo and the tests need a real MoE trained on real text whose experts have
specialised, on a machine with no GPU and no network. This script makes that model from the
built-in corpora (:mod:`moe_fast.data.builtin`, training splits only) with a byte-level BPE
tokenizer it trains itself. Seeded (tokenizer, initialisation, batch order): with the same
Python, torch and thread count a rerun should give the same checkpoint (not verified bit for bit).

The shipped checkpoints were made with exactly these commands (each writes to a scratch
directory; the last one's output was copied to ``moe_fast/models/<name>``; each phase's
``training_info.json`` keeps the earlier phases' records under ``previous_phase``):

    # builtin:small-mixtral: 6 layers, 8 experts, top-2; 13.3M tokens in five phases
    python scripts/train_small_models.py --out P1 --experts-impl eager      # 2000 x 16 x 256 tokens
    python scripts/train_small_models.py --out P2 --init-from P1 --steps 400 --aux-loss 0.1 \
        --prose-share 0.5 --lr 1e-3 --warmup 10 --experts-impl eager
    python scripts/train_small_models.py --out P3 --init-from P2 --steps 300 --aux-loss 0.1 \
        --prose-share 0.5 --balance-groups source --lr 5e-4 --warmup 10 --experts-impl eager
    python scripts/train_small_models.py --out P4 --init-from P3 --steps 300 --aux-loss 0.1 \
        --prose-share 0.5 --balance-groups sequence --lr 5e-4 --warmup 10 --experts-impl eager
    python scripts/train_small_models.py --out P5 --init-from P4 --steps 250 --aux-loss 0.3 \
        --prose-share 0.5 --balance-groups sequence --lr 5e-4 --warmup 10 --experts-impl eager
    # builtin:small-qwen3-moe: 4 layers, 32 experts of width 128, top-4; 5.7M tokens in two phases
    python scripts/train_small_models.py --out Q1 --arch qwen3_moe --layers 4 --experts 32 --top-k 4 \
        --intermediate 128 --steps 1000 --experts-impl grouped_mm
    python scripts/train_small_models.py --out Q2 --init-from Q1 --steps 400 --aux-loss 0.1 \
        --prose-share 0.5 --balance-groups sequence --lr 1e-3 --warmup 10 --experts-impl grouped_mm

all with ``OMP_WAIT_POLICY=PASSIVE`` (it changes no number; it stops OpenMP threads from
spinning on a shared machine). The later phases exist because the first (prose a quarter of each
batch, transformers' balance loss over the whole batch) left prose routing in the last layers under
the balance bounds on the prose *test* split, whose modules the model never saw: they give prose
half of each batch, raise the balance weight, and balance first each source's rows
(:func:`per_layer_balance_loss` on each), then each sequence (:func:`per_sequence_balance_loss`),
so that routing is balanced on any text rather than on the training mix. Each phase's recipe was
chosen from the routing histograms and held-out losses alone; none was changed for a pruning result. Wall
times on 2 shared cores: 4145 + 866 + 687 + 692 + 897 s (Mixtral, 2.0 h in all), 1789 + 831 s
(Qwen3-MoE, 44 min).

It writes the model, the tokenizer and ``training_info.json``
(loss curve, wall time, held-out losses, and the routing distributions on prose and on code).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from moe_fast.data.builtin import get_corpus

log = logging.getLogger("moe_fast.train_small")

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=EOS, model_max_length=1 << 30
    )


def _chunks(texts: list[str], size: int = 1 << 16):
    """Texts cut at line ends into pieces of about ``size`` characters (for fast batch encoding)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, encoded in line-aligned chunks, as one int64 tensor."""
    pieces = list(_chunks([text]))
    ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for chunk in ids for i in chunk], dtype=torch.long)


def make_config(vocab_size: int, args: argparse.Namespace, eos_id: int):
    """A Mixtral or Qwen3-MoE config; ``router_aux_loss_coef`` records the per-layer loss weight."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_loss,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rope_theta=10000.0,
    )
    if args.arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common,
            moe_intermediate_size=args.intermediate,
            head_dim=args.hidden // args.heads,
            num_experts=args.experts,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    from transformers import MixtralConfig

    return MixtralConfig(**common, num_local_experts=args.experts)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' load-balancing loss applied to each layer on its own, averaged over layers.

    Why per layer: transformers concatenates every layer's router logits before taking the
    loss, which balances the average over layers and lets a single layer send half its tokens
    to one expert while another layer compensates. Mixtral's and Switch's loss is per layer.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def per_sequence_balance_loss(router_logits: tuple[torch.Tensor, ...], batch: int, num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' load-balancing loss taken on each sequence of each layer, averaged.

    Why: balancing whole batches still lets a layer send most of one kind of text to a few
    experts when that kind is rare in training (the prose test split's last layer); balancing
    every sequence asks for balance on any text, as DeepSeek-V3's sequence-wise loss does.
    Each term is exactly :func:`load_balancing_loss_func` on one sequence's tokens.
    """
    losses = []
    for logits in router_logits:  # [batch * seq, E]
        probs = torch.softmax(logits.float(), dim=-1).view(batch, -1, num_experts)  # [B, S, E]
        top = probs.topk(top_k, dim=-1).indices  # [B, S, k]
        mask = torch.nn.functional.one_hot(top, num_experts).float()  # [B, S, k, E]
        tokens_per_expert = mask.mean(dim=1)  # [B, k, E]
        prob_per_expert = probs.mean(dim=1)  # [B, E]
        losses.append((tokens_per_expert * prob_per_expert[:, None, :]).sum((1, 2)).mean() * num_experts)
    return torch.stack(losses).mean()


def sample_batch(
    streams: list[torch.Tensor], batch: int, seq_len: int, gen: torch.Generator, first_share: float = 0.5
) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens: ``first_share`` of them from stream 0."""
    rows = []
    n_first = round(batch * first_share)
    for i in range(batch):
        ids = streams[0 if i < n_first else 1]
        start = int(torch.randint(0, len(ids) - seq_len - 1, (1,), generator=gen))
        rows.append(ids[start : start + seq_len + 1])
    return torch.stack(rows)


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token loss over the first non-overlapping windows of ``ids``."""
    n = min(max_windows, (len(ids) - 1) // seq_len)
    x = ids[: n * seq_len].view(n, seq_len)
    losses = [model(input_ids=x[i : i + 8], labels=x[i : i + 8]).loss.item() for i in range(0, n, 8)]
    return float(sum(losses) / len(losses))


def num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


@torch.no_grad()
def routing_distribution(model, ids: torch.Tensor, seq_len: int, max_windows: int) -> list[list[float]]:
    """Per layer, the fraction of top-k routing slots that went to each expert."""
    cfg = model.config
    n_exp = num_experts(cfg)
    n = min(max_windows, (len(ids) - 1) // seq_len)
    x = ids[: n * seq_len].view(n, seq_len)
    counts = torch.zeros(cfg.num_hidden_layers, n_exp)
    for i in range(0, n, 8):
        out = model(input_ids=x[i : i + 8], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(top.reshape(-1), minlength=n_exp).float()
    return (counts / counts.sum(-1, keepdim=True)).tolist()


def loss_per_char(tokenizer, text: str, ids: torch.Tensor, seq_len: int, max_windows: int, loss: float) -> float:
    """Mean token loss scaled to nats per character of the evaluated windows' text.

    Why: a per-token loss depends on the tokenizer; per character, two models with different
    tokenizers compare fairly.
    """
    n = min(max_windows, (len(ids) - 1) // seq_len)
    targets = ids[1 : n * seq_len]
    chars = len(tokenizer.decode(targets.tolist()))
    return loss * len(targets) / max(1, chars)


def total_variation(p: list[list[float]], q: list[list[float]]) -> list[float]:
    return [0.5 * sum(abs(a - b) for a, b in zip(pl, ql)) for pl, ql in zip(p, q)]


def _tokens_before(previous: dict | None) -> int:
    """Training tokens of all earlier phases recorded in a ``training_info.json``."""
    if not previous:
        return 0
    return int(previous.get("train_tokens_all_phases") or previous.get("train_tokens", 0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (replaced)")
    p.add_argument("--arch", choices=["mixtral", "qwen3_moe"], default="mixtral")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux-loss", type=float, default=0.02, help="per-layer router load-balancing loss weight")
    p.add_argument("--prose-share", type=float, default=0.25, help="share of each batch drawn from prose")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation for training")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per split for loss and routing")
    p.add_argument("--init-from", default=None, help="continue from this checkpoint (a further training phase)")
    p.add_argument("--balance-groups", choices=["batch", "source", "sequence"], default="batch",
                   help="take the load-balancing loss over the whole batch, over its prose rows and its code rows "
                   "separately, or over each sequence")
    p.add_argument("--balance-per-source", dest="balance_groups", action="store_const", const="source",
                   help="same as --balance-groups source")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="saved weights")
    return p.parse_args(argv)


@dataclass
class Corpora:
    """One phase's text as tokens: the training streams, the held-out and test splits."""

    tokenizer: Any
    streams: list[torch.Tensor]  # training tokens: [prose, code]
    calib: dict[str, torch.Tensor]  # held-out (calibration split) tokens per source
    test_text: dict[str, str]
    test: dict[str, torch.Tensor]
    previous: dict | None  # the earlier phase's training_info.json (--init-from), else None


@dataclass
class TrainingRun:
    curve: list[float]  # language-model loss per step
    balance_curve: list[float]  # load-balancing loss per step
    seconds: float


def start(args: argparse.Namespace) -> None:
    """Logging, threads and seeds: every phase starts from the same state."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)


def load_corpora(args: argparse.Namespace) -> Corpora:
    """The built-in corpora as tokens: a new tokenizer, or the earlier phase's with its record."""
    prose, code = get_corpus("python-prose"), get_corpus("python-code")
    previous = None
    if args.init_from:  # a further phase: the earlier phase's tokenizer, weights and record
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        with open(os.path.join(args.init_from, "training_info.json")) as f:
            previous = json.load(f)
    else:
        tokenizer = train_tokenizer([prose.train, code.train], args.vocab)
    streams = [encode(tokenizer, prose.train), encode(tokenizer, code.train)]
    calib = {"prose": encode(tokenizer, prose.calib), "code": encode(tokenizer, code.calib)}
    test_text = {"prose": prose.test, "code": code.test}
    test = {k: encode(tokenizer, v) for k, v in test_text.items()}
    log.info("tokenizer: %d tokens; train tokens prose %d, code %d", len(tokenizer), *map(len, streams))
    return Corpora(tokenizer, streams, calib, test_text, test, previous)


def build_model(args: argparse.Namespace, tokenizer):
    """A new model from ``make_config``, or the earlier phase's (whose top-k then sets ``args.top_k``)."""
    from transformers import AutoModelForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    if args.init_from:
        model = AutoModelForCausalLM.from_pretrained(
            args.init_from, dtype=torch.float32, experts_implementation=args.experts_impl
        )
        model.config.router_aux_loss_coef = args.aux_loss
        args.top_k = model.config.num_experts_per_tok
    else:
        config = make_config(len(tokenizer), args, eos_id)
        model = AutoModelForCausalLM.from_config(config, experts_implementation=args.experts_impl)
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def routing_by_source(model, splits: dict[str, torch.Tensor], seq_len: int, max_windows: int) -> dict:
    """{source: per-layer routing distribution} of the model as it is now."""
    model.eval()
    return {k: routing_distribution(model, v, seq_len, max_windows) for k, v in splits.items()}


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on norms, biases)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over ``args.warmup`` steps, then cosine decay to a tenth of ``args.lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def balance_loss(router_logits: tuple[torch.Tensor, ...], args: argparse.Namespace, n_exp: int) -> torch.Tensor:
    """The load-balancing term over the whole batch, each source's rows or each sequence (--balance-groups)."""
    if args.balance_groups == "sequence":
        return per_sequence_balance_loss(router_logits, args.batch, n_exp, args.top_k)
    if args.balance_groups == "source":  # each source's rows balanced on their own, then averaged
        n_first = round(args.batch * args.prose_share) * args.seq_len
        parts = [tuple(lg[:n_first] for lg in router_logits), tuple(lg[n_first:] for lg in router_logits)]
        return torch.stack([per_layer_balance_loss(p, n_exp, args.top_k) for p in parts if p[0].shape[0]]).mean()
    return per_layer_balance_loss(router_logits, n_exp, args.top_k)


def train(model, opt: torch.optim.Optimizer, streams: list[torch.Tensor], args: argparse.Namespace) -> TrainingRun:
    """``args.steps`` steps on random windows (``args.prose_share`` of each batch from prose): the
    language-model loss plus ``args.aux_loss`` times the balance loss, gradients clipped to norm 1."""
    from tqdm import tqdm

    n_exp = num_experts(model.config)
    gen = torch.Generator().manual_seed(args.seed)
    curve: list[float] = []
    balance_curve: list[float] = []
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train small-mixtral", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        batch = sample_batch(streams, args.batch, args.seq_len, gen, args.prose_share)
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].reshape(-1))
        balance = balance_loss(out.router_logits, args, n_exp)
        (lm + args.aux_loss * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(lm.item(), 4))
        balance_curve.append(round(balance.item(), 4))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(curve[-10:]) / len(curve[-10:]):.3f}", balance=f"{balance_curve[-1]:.3f}")
    return TrainingRun(curve, balance_curve, time.perf_counter() - t_train)


def measure(model, corpora: Corpora, args: argparse.Namespace, tv_init: list[float]) -> dict:
    """Held-out and test losses (per token and per character) and the routing on both splits."""
    model.eval()
    model.config.output_router_logits = False
    heldout = {k: heldout_loss(model, v, args.seq_len, args.eval_windows) for k, v in corpora.calib.items()}
    test_loss = {k: heldout_loss(model, v, args.seq_len, args.eval_windows) for k, v in corpora.test.items()}
    test_loss_char = {
        k: loss_per_char(corpora.tokenizer, corpora.test_text[k], corpora.test[k], args.seq_len, args.eval_windows,
                         test_loss[k])
        for k in corpora.test
    }
    routing = routing_by_source(model, corpora.calib, args.seq_len, args.eval_windows)
    routing_test = routing_by_source(model, corpora.test, args.seq_len, args.eval_windows)
    tv = total_variation(routing["prose"], routing["code"])
    log.info("held-out loss (calib split): %s; test split: %s; per character: %s", heldout, test_loss, test_loss_char)
    log.info("routing on the test splits, min/max share per layer: %s", {
        k: [(round(min(r), 3), round(max(r), 3)) for r in v] for k, v in routing_test.items()
    })
    log.info("routing total variation prose vs code per layer: %s (at init: %s)",
             [round(t, 3) for t in tv], [round(t, 3) for t in tv_init])
    return {
        "heldout_loss_calib_split": heldout,
        "test_loss_per_token": test_loss,
        "test_loss_per_char": test_loss_char,
        "routing_prose": routing["prose"],
        "routing_code": routing["code"],
        "routing_test_prose": routing_test["prose"],
        "routing_test_code": routing_test["code"],
        "routing_total_variation": tv,
    }


def _every_10(values: list[float]) -> list[float]:
    return [round(sum(values[i : i + 10]) / len(values[i : i + 10]), 4) for i in range(0, len(values), 10)]


def training_record(argv: list[str] | None, args: argparse.Namespace, model, run: TrainingRun, results: dict,
                    tv_init: list[float], previous: dict | None, t_start: float) -> dict:
    """``training_info.json``: the command, the settings, the curves, the measurements, the earlier phases."""
    train_tokens = args.steps * args.batch * args.seq_len
    return {
        "command": "python scripts/train_small_models.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": train_tokens,
        "train_seconds": round(run.seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "loss_curve_every_10": _every_10(run.curve),
        "balance_loss_every_10": _every_10(run.balance_curve),
        **results,
        "routing_total_variation_at_init": tv_init,
        "previous_phase": previous,
        "train_tokens_all_phases": train_tokens + _tokens_before(previous),
    }


def save(model, tokenizer, info: dict, args: argparse.Namespace) -> None:
    """The model (in ``args.dtype``), the tokenizer and the record, written beside ``args.out`` and
    moved into place whole (an earlier ``args.out`` is replaced)."""
    tmp = tempfile.mkdtemp(prefix=".small_mixtral.", dir=os.path.dirname(os.path.abspath(args.out)) or ".")
    model.to(getattr(torch, args.dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)


def main(argv: list[str] | None = None) -> int:
    """The recipe of one training phase."""
    args = parse_args(argv)
    start(args)
    t_start = time.perf_counter()
    corpora = load_corpora(args)
    model = build_model(args, corpora.tokenizer)
    routing_init = routing_by_source(model, corpora.calib, args.seq_len, 8)
    tv_init = total_variation(routing_init["prose"], routing_init["code"])
    run = train(model, make_optimizer(model, args), corpora.streams, args)
    results = measure(model, corpora, args, tv_init)
    info = training_record(argv, args, model, run, results, tv_init, corpora.previous, t_start)
    save(model, corpora.tokenizer, info, args)
    log.info("saved to %s in %.0f s (training %.0f s)", args.out, time.perf_counter() - t_start, run.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
