"""``moe_fast.prune``: expert pruning end to end (calibration, streaming search, export).

Streams the calibration hidden states through the model one decoder layer at a time. Per MoE
layer it collects each token's rank-bounded expert outputs as Gram entries, scores the candidate
keep-sets with ``ops.subset_loss``, chooses the best one and applies it (``layer_phases``). With an
output directory, every finished layer is saved to ``<out>.moe_fast_partial/progress.json``, with
the hidden states carried past it (``carried_states``), so that ``resume=True`` continues after an
interruption exactly as the uninterrupted run (the finished layers are skipped, their outputs
loaded, not recomputed), and the checkpoint is written beside ``out`` and moved there in whole.
Every input that can be refused (arguments, device, checkpoint headers, calibration ids) is
refused before the lock and partial folder are made.

Under an initialized torch.distributed process group (``torchrun ... -m moe_fast.cli prune``)
the ranks share the calibration batches (``moe_fast.pruning.distributed``): each streams the
layers over its own batches, the per-candidate, per-batch squared errors are summed with
all_reduce before the square roots, every rank selects the same experts, and rank 0 writes the
progress, the checkpoint and the report. Rank-local work runs under ``ctx.guard()``, so that a
rank that fails stops every rank instead of leaving them waiting in a collective.

The phases and their modules: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_fast.pruning import distributed
from moe_fast.checkpoint.preflight import check_device, model_limits
from moe_fast.pruning.carried_states import load_states, remove_other_states, restore, save_states
from moe_fast.pruning.calibration_batches import check_same_on_all_ranks, find_tokenizer, load_batches, needs_tokenizer
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.layer_phases import LayerPruner, open_layer
from moe_fast.pruning.memory import Timings
from moe_fast.pruning.output import (
    checkpoint_writer, completed_output, export_pruned, finish_report, load_pruned, prune_in_memory,
)
from moe_fast.pruning.progress import PARTIAL_SUFFIX, Progress, check_out, claimed, partial_folder
from moe_fast.pruning.repair import (
    LstsqRepair, Repaired, apply_repaired, check_repair_fits, check_repair_name, check_repair_supported, load_repaired,
    save_rows, write_rows,
)
from moe_fast.pruning.repair_merge import MergeRepair
from moe_fast.pruning.report import REPORT_NAME, LayerResult, PruneReport, PruneResult, loss_key
from moe_fast.pruning.settings import SearchSpec, check_arguments, criterion_spec, run_settings
from moe_fast.pruning.strategies import RunShape, canonical_criterion, make_strategy
from moe_fast.pruning.source import open_source

__all__ = ["prune", "PruneReport", "PruneResult", "LayerResult", "PARTIAL_SUFFIX", "REPORT_NAME"]

log = logging.getLogger(__name__)


def prune(
    model_or_path: nn.Module | str | os.PathLike,
    calibration: str | torch.Tensor,
    keep: int,
    *,
    out: str | os.PathLike | None = None,
    mode: str = "layerwise",
    objective: str = "paper",
    search: str = "auto",
    beam_width: int = 4,
    n_samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    seed: int = 42,
    device: str | None = None,
    dtype: str = "auto",
    resume: bool = False,
    tokenizer=None,
    chunk_tokens: int = 4096,
    return_model: bool = True,
    progress: bool = True,
    lazy: bool | None = None,
    recompute_outputs: bool | tuple[int, int] = False,
    repair: str | None = None,
    criterion: str = "reconstruction",
) -> PruneResult:
    """Prunes every MoE layer to ``keep`` experts; returns ``(model, report)``.

    Args:
        model_or_path: a loaded transformers model (pruned in place) or a checkpoint directory
            (streamed one layer at a time; the returned model is loaded from ``out``, or None with
            ``return_model=False``).
        calibration: a spec for :func:`moe_fast.data.calibration.load_calibration` or ids [n, L].
        keep: R, experts kept per layer (top-k <= R < E). A grouped router (``topk_group < n_group``)
            keeps R / n_group experts in every group and is searched over such sets only
            (``grouped_search``); a keep it cannot have is refused before any forward.
        out: directory for the pruned checkpoint and ``moe_fast_report.json``; must not exist or be empty.
        mode: ``layerwise`` (inputs from the unpruned model) or ``progressive`` (from the model
            pruned so far; target still the unpruned model's block output).
        objective: ``paper`` (sum over batches of the Frobenius norm) or ``mse``.
        search: ``exhaustive``, ``greedy``, ``beam`` or ``auto`` (exhaustive when C(E, R) <= 5000).
        n_samples, seq_len: calibration size (None: 128 x 2048 for text, or 128 x the model's
            max_position_embeddings when smaller; the whole tensor for ids). Ids outside the
            vocabulary and sequences longer than max_position_embeddings are refused.
        batch_size: sequences per calibration batch: one group of the paper's objective.
        chunk_tokens: tokens whose expert outputs are held at once (bounds memory).
        lazy: compute each token's expert outputs only as far as a candidate still in the running
            needs them (``moe_fast.pruning.lazy_search``: same selections; exhaustive search keeps
            exact scores only for the candidates its bounds did not discard). False: the
            rank-bounded search (M = k + dropped outputs per token up front). None (default): lazy
            for greedy and beam search, rank-bounded for exhaustive search (whose bounds save
            little on flat routers: benchmarks/RESULTS.md). Data-parallel runs extend each rank's
            own tokens and sum the candidates' errors over ranks, as the rank-bounded search does.
            Grouped routers always take the grouped search, which computes outputs as candidates
            need them (None or True; False is refused).
        recompute_outputs: lean lazy search: per token hold only its block input and the Gram
            entries of its computed ranks, not the expert outputs; when a candidate needs a token's
            later ranks, its earlier outputs still needed are recomputed. Less search memory (about
            H + d(d+1)/2 floats per token for d computed ranks), more expert outputs run (counted
            in ``expert_outputs_per_token``); the same selections. True: every token starts with
            2k + 2 ranks and an extension goes ceil(3k/4) ranks past the need (18 and 6 for
            k = 8); a pair (first_ranks, lookahead) sets them. Lazy search only (greedy, beam, or ``lazy=True``).
        repair: None (default: the selection alone), ``"lstsq"`` or ``"merge"``: after each layer's
            selection, ``lstsq`` refits the kept experts' down projections in closed form so that the
            pruned block reproduces the unpruned block's output on the calibration tokens
            (``pruning.repair``; ridge chosen on held-out calibration sequences); ``merge`` folds each
            dropped expert into the kept expert whose outputs it matches best, weighted by routing
            mass (``pruning.repair_merge``). A repair that does not lower the layer's calibration
            loss is reverted. Progressive mode carries the repaired layer's outputs on. With ``out`` each
            finished layer's repaired rows are saved in the partial folder, so ``resume`` continues
            exactly; under torchrun the repair's statistics and errors are summed over ranks. Refused
            before any work: families whose experts are not the
            standard gated ``down_proj(act(gate) * up)`` (gpt-oss), and for lstsq a joint system
            (keep x expert width features) too large for the device (docs/REPAIR.md).
        criterion: how each layer's experts are chosen: ``reconstruction`` (default: the paper's
            search above) or a statistic criterion (``pruning.strategies.criteria``): ``frequency``
            (most often in a token's top-k), ``reap`` (mean routing weight x output norm over the
            tokens routed to an expert; alias ``saliency``), ``ean`` (the same without the weight),
            ``random`` (``seed`` draws; no calibration forward unless a repair needs one). Every
            criterion streams, resumes, runs under torchrun and exports as the search does; a
            router with expert groups keeps the same number of experts in every group. ``search``,
            ``lazy`` and ``recompute_outputs`` belong to the search and are refused with a criterion.
        device, dtype: where and in what precision a checkpoint path is computed (default cpu, the
            checkpoint's dtype). A loaded model keeps its dtype; with ``device`` each layer moves
            there while it is processed and back afterwards.

    With ``out`` the run holds an exclusive lock on ``<out>.moe_fast_partial`` from start to end:
    a second run into the same ``out`` fails once its inputs are checked (FolderBusy, naming the
    first), and a lock left by a killed run is taken over, with any staging folder its export
    left beside ``out``. A resume whose ``out`` already holds this run's verified checkpoint
    (killed after the final rename) returns that checkpoint's report (a loaded model is pruned
    to it). The checkpoint is verified (every shard the index names present, with its tensors
    and size) before it is moved to ``out``.
    """
    clock = Timings("calibration", "forward", "expert_outputs", "search")
    check_arguments(mode, objective, batch_size, beam_width, chunk_tokens)
    check_repair_name(repair)
    criterion = canonical_criterion(criterion)
    device = check_device(device)
    ctx = distributed.current(device)  # data-parallel calibration when a process group is up
    lead = ctx.rank == 0  # writes progress, the checkpoint and the report
    out = None if out is None else os.fspath(out)
    loaded = model_or_path if isinstance(model_or_path, nn.Module) else None
    # Everything that can be refused is, before the lock and partial folder are made.
    with ctx.guard():
        if lead and not resume:
            check_out(out)
        source = open_source(model_or_path, device, dtype)
        if criterion == "reconstruction":
            spec = SearchSpec.build(source.adapter, keep, search, beam_width, objective, lazy, recompute_outputs)
        else:
            spec = criterion_spec(source.adapter, keep, criterion, search, lazy, recompute_outputs)
        check_repair_supported(repair, source.adapter)
        statistics_dtype = check_repair_fits(repair, source.config, keep, source.device)
        if tokenizer is None and needs_tokenizer(calibration):
            tokenizer = find_tokenizer(source.path, loaded)
        calib = load_batches(calibration, tokenizer, n_samples, seq_len, batch_size, seed, model_limits(source.config))
        my_batches = ctx.batches(calib.num_batches)
    check_same_on_all_ranks(ctx, calib)
    settings = run_settings(spec, mode, source, calib.summary, repair, criterion, seed)
    with claimed(out, ctx, resume) as partial:  # the lock and resume file of <out>.moe_fast_partial
        with ctx.guard():
            finished = completed_output(out, settings) if partial.out_not_empty else None
        finished = ctx.broadcast(finished)
        if finished is not None:  # killed after its export was in place: nothing left to do
            if lead:
                log.info("resume: %s is already complete (verified, same settings); nothing to do", out)
            if loaded is not None:
                return PruneResult(prune_in_memory(loaded, source, finished), finished)
            return PruneResult(load_pruned(source, finished, out) if return_model else None, finished)
        report = PruneReport(settings=settings, world_size=ctx.world)
        with ctx.guard():
            report.layers = partial.start(settings, resume)
        report.layers, states_at = ctx.broadcast((report.layers, partial.states_next_layer))
        clock.mark("calibration")
        shape = RunShape(calib.num_batches, calib.num_tokens, chunk_tokens, progress and lead)
        strategy = make_strategy(criterion, source.adapter, spec, ctx, shape, seed, source.moe_layers())
        pruner = LayerPruner(source.adapter, spec, ctx, calib.num_batches, calib.num_tokens, chunk_tokens,
                             progress and lead, strategy)
        states_folder = None if out is None else partial_folder(out)
        repairer = None if repair is None else (
            LstsqRepair(source.adapter, objective, chunk_tokens, ctx, statistics_dtype) if repair == "lstsq"
            else MergeRepair(source.adapter, objective, chunk_tokens, ctx))
        repaired: Repaired = {}  # checkpoint source: layer -> expert -> repaired weights, for the export
        with ctx.guard():  # resume: every rank replays the finished layers with their repaired rows
            restored = load_repaired(states_folder, report.layers) if repairer is not None else {}
        if loaded is not None:
            apply_repaired(loaded, source.adapter, restored)  # a fresh model: the finished layers' repairs again
        else:
            repaired.update(restored)

        with torch.inference_mode():
            if not pruner.needs_forward and repairer is None:  # random: no layer needs the calibration tokens
                _choose_without_forward(pruner, source, report, ctx, partial, settings)
                stream = None
                bar = tqdm(range(0), disable=True)
            else:
                with ctx.guard(), clock.measure("forward"):
                    stream = HiddenStates(source, calib, my_batches, progressive=mode == "progressive")
                bar = tqdm(range(source.num_layers), desc="layers", disable=not progress or not lead)
            start = _restore_states(ctx, stream, states_folder, states_at) if report.layers and stream is not None else 0
            for index in bar:
                if index < start:  # carried past it by the restored states
                    continue
                with open_layer(source, index, ctx) as (layer, block):
                    done = report.layers.get(index)
                    if block is None or done is not None:  # dense, or finished before a resume
                        if index in restored and loaded is None:  # replayed with its repaired weights
                            write_rows(block.experts, restored[index])
                        with ctx.guard(), clock.measure("forward"):
                            pruner.replay(stream, layer, block, done)
                        continue
                    inputs = stream.unpruned.clone() if repairer is not None else None  # the layer's input, for the repair
                    with ctx.guard(), clock.measure("expert_outputs"):
                        collected = pruner.collect(stream, layer, block)
                    with clock.measure("search"):
                        scores = pruner.score(collected, desc=f"layer {index}", block=block)
                        result = report.layers[index] = pruner.choose(scores, index)
                        del collected, scores  # the statistics go before the next layer's come
                    if repairer is not None:
                        with clock.measure("repair"):
                            result.repair, rows = repairer.run(stream, layer, block, result.kept, inputs)
                        if loaded is None and rows:  # a loaded model holds them itself (written in place)
                            repaired[index] = rows
                        if rows and states_folder is not None and lead:  # for a resume, before the progress names the layer
                            save_rows(states_folder, index, rows)
                        del inputs
                    if lead:
                        _log_layer(index, result, bar)
                    with ctx.guard(), clock.measure("forward"):
                        pruner.apply(stream, layer, block, result.kept)
                    _save_progress(ctx, partial, settings, report, stream, states_folder, index + 1)
            bar.close()
            del stream

        with ctx.guard():
            model = None if loaded is None else prune_in_memory(loaded, source, report)  # repaired in place
            if out is not None and lead:
                writer = checkpoint_writer(source, model, report, tokenizer, repaired)
                export_pruned(out, report, clock, source.device, writer)
            else:
                finish_report(report, clock, source.device)
    if loaded is None and return_model:
        model = load_pruned(source, report, out if out is not None and lead else None, repaired)
    return PruneResult(model, report)


def _choose_without_forward(
    pruner: LayerPruner, source, report: PruneReport, ctx: distributed.Dist, partial: Progress, settings: dict,
) -> None:
    """A strategy that needs no calibration forward (random) chooses every MoE layer at once."""
    for index in source.moe_layers():
        if index not in report.layers:
            report.layers[index] = pruner.choose(None, index)
    if ctx.rank == 0:
        partial.save(settings, report, states_next_layer=0)


def _save_progress(
    ctx: distributed.Dist, partial: Progress, settings: dict, report: PruneReport, stream: HiddenStates,
    folder: str | None, next_layer: int,
) -> None:
    """Every rank saves the states it carries into ``next_layer``, then rank 0 the progress that
    names them, then the older states go: a kill at any point leaves a consistent pair."""
    if folder is None:
        return
    with ctx.guard():
        save_states(folder, next_layer, ctx.rank, stream)
    with ctx.guard():
        partial.save(settings, report, states_next_layer=next_layer)
    with ctx.guard():
        remove_other_states(folder, next_layer, ctx.rank)


def _restore_states(ctx: distributed.Dist, stream: HiddenStates, folder: str | None, next_layer: int) -> int:
    """Resume: the layer to continue from, with ``stream`` holding the states saved for it on
    every rank; 0 (replay every finished layer with the plain forward) when any rank lacks them."""
    record = None
    with ctx.guard():
        if folder is not None and next_layer > 0:
            record = load_states(folder, next_layer, ctx.rank, stream)
    if not all(ctx.gather(record is not None)):
        if ctx.rank == 0:
            log.warning("resume: replaying the finished layers with the plain forward instead of restoring their "
                        "carried hidden states; in float16/bfloat16 the later layers may round differently from "
                        "an uninterrupted run")
        return 0
    with ctx.guard():
        restore(stream, record)
    return next_layer


def _log_layer(index: int, result: LayerResult, bar) -> None:
    if result.criterion_scores is not None or not result.loss:  # a statistic criterion: no candidate losses
        log.info("layer %d: keep %s, drop %s (%s)", index, result.kept, result.dropped, result.search)
    else:
        best = result.loss[loss_key(result.dropped)] if result.dropped else 0.0
        log.info("layer %d: keep %s, drop %s (loss %.6g)%s", index, result.kept, result.dropped, best, result.lazy_note())
    if result.repair is not None:
        rep = result.repair
        detail = f"ridge {rep['ridge']}" if rep["method"] == "lstsq" else f"strength {rep['strength']}, into {rep['into']}"
        log.info("layer %d: %s repair: loss %.6g -> %.6g (%s)", index, rep["method"], rep["loss_before"], rep["loss_after"], detail)
    bar.set_postfix_str(result.lazy_note().strip(" ;"), refresh=False)
