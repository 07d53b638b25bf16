"""Skipping inside one vLLM fused-MoE layer: the rule on the router's output, and compute only survivors.

Why here and not in vLLM's kernels: vLLM 0.32's routers return every token's k experts, and its CPU
expert kernel (``cpu_fused_moe``) computes every (token, slot) row it is given: ids of -1 (what
expert parallelism marks as "not here") corrupt its memory, and a zero weight still costs the row.
So the router's output is rewritten (the rule, ``rule.py``; a skipped slot gets id E = the number of
experts, moe_fast's mark) and the layer's experts are called on the surviving (token, expert) rows
only, as top-1 rows, and their outputs summed back per token. Nothing new runs on the device: the
same expert kernels see fewer rows. On CUDA the same Python path runs (unverified until a GPU run;
its data-dependent row count needs eager mode, no CUDA graphs).

Compiled mode (vLLM without ``enforce_eager``): on CPU, vLLM 0.32 calls a MoE layer's Python forward
(``_moe_forward``) directly, so Dynamo traces into it and fails on the rule's data-dependent steps
(the counters' ``int``, ``nonzero``, the survivors' row count). A skipping layer is therefore
entered through vLLM's own opaque custom op (``torch.ops.vllm.moe_forward``, what vLLM uses on CUDA;
``opaque_entry``, in compiled mode only: eager mode keeps vLLM's direct call): the compiled graph
calls it, and inside it the rule and the survivors run eagerly, as in eager mode. Attention, norms
and the rest of the model are compiled.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from moe_fast.serving.vllm_plugin import stats
from moe_fast.serving.vllm_plugin.record import ServingSkip, SkipRecordError
from moe_fast.serving.vllm_plugin.rule import apply_skips, skip_thresholds, skipped_mask

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM module name such as ``model.layers.3.mlp.experts``."""
    match = _LAYER.search(layer_name)
    if match is None:
        raise SkipRecordError(f"moe_fast vLLM plugin: cannot tell the decoder layer of MoE module {layer_name!r}")
    return int(match.group(1))


def opaque_entry(runner: Any) -> None:
    """Enters ``runner``'s MoE forward through vLLM's opaque custom op, so that Dynamo does not trace the skipping.

    vLLM 0.32 picks ``_moe_forward`` (plain Python) on CPU and ``torch.ops.vllm.moe_forward`` (the same
    function registered as a custom op, with a fake implementation for tracing) elsewhere; both call
    ``runner._forward_impl``. Anything else (another vLLM layout) is left as it is.
    """
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    ops = {
        getattr(moe_runner, "_moe_forward", None): getattr(torch.ops.vllm, "moe_forward", None),
        getattr(moe_runner, "_moe_forward_shared", None): getattr(torch.ops.vllm, "moe_forward_shared", None),
    }
    entry = getattr(runner, "_forward_entry", None)
    if entry is not None and ops.get(entry) is not None:
        runner._forward_entry = ops[entry]


def _compiled() -> bool:
    """Whether vLLM compiles this model (``enforce_eager`` sets the compilation mode to NONE)."""
    from vllm.config import CompilationMode, get_current_vllm_config

    return get_current_vllm_config().compilation_config.mode != CompilationMode.NONE


def attach(runner: Any, skip: ServingSkip, seen: set[int]) -> None:
    """Makes ``runner`` (a vLLM ``MoERunner``) skip by ``skip``'s betas for its layer."""
    layer = layer_index(runner.layer_name)
    if layer not in skip.betas:
        raise SkipRecordError(
            f"moe_fast skipping in {skip.checkpoint}/config.json: vLLM's MoE layer {layer} ({runner.layer_name}) "
            f"has no betas in the record (its layers: {sorted(skip.betas)}); the record does not match this model"
        )
    seen.add(layer)
    betas = skip.betas[layer]
    if betas is None:
        return
    router, experts = runner.router, runner.routed_experts
    if int(router.top_k) != skip.top_k:
        raise SkipRecordError(f"moe_fast skipping in {skip.checkpoint}: vLLM routes layer {layer} to top-{router.top_k}, the record to top-{skip.top_k}")
    scoring = getattr(router, "scoring_func", None)
    if scoring is not None and (scoring == "sigmoid") != skip.sigmoid:
        raise SkipRecordError(f"moe_fast skipping in {skip.checkpoint}: vLLM's layer {layer} scores by {scoring!r}, not as {skip.model_type} routes")
    num_experts = int(router.global_num_experts)
    thresholds = skip_thresholds(betas, skip.top_k)
    select_experts, forward_modular = router.select_experts, experts.forward_modular

    checked = []

    def skipping_select_experts(hidden_states, router_logits, *args, **kwargs):
        if not checked:  # by the first forward (vLLM's warm-up) every MoE layer has been built
            missing = sorted(set(skip.betas) - seen)
            if missing:
                raise SkipRecordError(
                    f"moe_fast skipping in {skip.checkpoint}/config.json: the record has betas for layers {missing}, "
                    f"which are not MoE layers of vLLM's model (its MoE layers: {sorted(seen)})"
                )
            checked.append(True)
        weights, ids = select_experts(hidden_states, router_logits, *args, **kwargs)
        bias = getattr(router, "e_score_correction_bias", None) if skip.sigmoid else None
        skipped = skipped_mask(router_logits, ids, thresholds, skip.sigmoid, bias)
        stats.add(layer, tokens=ids.shape[0], slots=ids.numel(), skipped=int(skipped.sum()))
        return apply_skips(weights, skipped), ids.masked_fill(skipped, num_experts)

    def survivors_forward_modular(x, topk_weights, topk_ids, *args, **kwargs):
        kept = topk_ids < num_experts
        if bool(kept.all()):
            stats.add(layer, rows_computed=topk_ids.numel())
            return forward_modular(x, topk_weights, topk_ids, *args, **kwargs)
        token = kept.nonzero()[:, 0]
        ids = topk_ids[kept].unsqueeze(-1).contiguous()
        weights = topk_weights[kept].unsqueeze(-1).contiguous()
        stats.add(layer, rows_computed=ids.numel())
        out = forward_modular(x.index_select(0, token), weights, ids, *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"moe_fast vLLM plugin: layer {layer}'s experts returned {type(out).__name__}, not a tensor; this expert backend is not supported")
        return out.new_zeros(x.shape[0], out.shape[-1]).index_add_(0, token, out)

    def refuse_monolithic(*args, **kwargs):
        raise SkipRecordError(
            f"moe_fast skipping in {skip.checkpoint}: layer {layer}'s expert backend routes inside its own kernel "
            "(monolithic); the plugin cannot skip there"
        )

    if _compiled():
        opaque_entry(runner)
    router.select_experts = skipping_select_experts
    experts.forward_modular = survivors_forward_modular
    experts.forward_monolithic = refuse_monolithic
