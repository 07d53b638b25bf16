"""``moe_fast.prune``: expert pruning end to end (calibration, streaming search, export).

Streams the calibration hidden states through the model one decoder layer at a time.
Per MoE layer it runs each token's rank-bounded experts once, keeps their Gram
entries, scores the candidate keep-sets with ``ops.subset_loss`` and keeps the best one. With an
output directory, every finished layer is saved to ``<out>.moe_fast_partial/progress.json`` so
that ``resume=True`` continues after an interruption (finished layers are replayed with a plain
forward, no search), and the checkpoint is written there and moved to ``out`` in whole.

Under an initialized torch.distributed process group (``torchrun ... -m moe_fast.cli prune``)
the ranks share the calibration batches (``moe_fast.pruning.distributed``): each streams the
layers over its own batches, the per-candidate, per-batch squared errors are summed with
all_reduce before the square roots, every rank selects the same experts, and rank 0 writes the
progress, the checkpoint and the report.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_fast.calibration import calibration_fingerprint, load_calibration
from moe_fast.checkpoint_check import verify_checkpoint
from moe_fast.pruning import distributed
from moe_fast.pruning.expert_outputs import LayerStats, PrunedForward, StatsForward
from moe_fast.pruning.lazy_outputs import LazyOutputs, LazyRecorder
from moe_fast.pruning.lazy_search import run_lazy_search
from moe_fast.pruning.search import choose_search, make_scorer, run_search
from moe_fast.pruning.source import CheckpointSource, LayerSource, LoadedSource
from moe_fast.staging import LOCK_NAME, FolderBusy, FolderLock, describe_holder

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".moe_fast_partial"
REPORT_NAME = "moe_fast_report.json"


@dataclass
class LayerResult:
    kept: list[int]
    dropped: list[int]
    loss: dict[str, float]  # "<dropped ids comma-joined>" -> objective value
    search: str = "exhaustive"
    expert_outputs_per_token: float | None = None  # lazy search: (token, expert) outputs run per token
    scored_exactly: int | None = None  # lazy search: candidates with an exact score (``loss``)
    discarded_by_bound: int | None = None  # lazy exhaustive: candidates whose lower bound lost
    search_state_bytes: int | None = None  # most bytes of per-token search state held (Gram, outputs, ids, ...)
    lazy_detail: dict | None = None  # lazy search: where the outputs went (``lazy_search.LazyInfo.summary``)


@dataclass
class PruneReport:
    layers: dict[int, LayerResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    settings: dict = field(default_factory=dict)
    world_size: int = 1  # ranks that shared the calibration tokens

    @property
    def kept(self) -> dict[int, list[int]]:
        return {i: r.kept for i, r in self.layers.items()}

    def to_dict(self) -> dict:
        return {
            "layers": {str(i): vars(r) for i, r in sorted(self.layers.items())},
            "timings": self.timings,
            "peak_memory_bytes": self.peak_memory_bytes,
            "settings": self.settings,
            "world_size": self.world_size,
        }

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def table(self) -> str:
        """Readable per-layer summary: kept, dropped, best loss and the runner-up."""
        lines = [f"{'layer':>5}  {'kept':<28} {'dropped':<16} {'loss':>14} {'runner-up':>14} {'evaluated':>9} {'bounded':>7} {'outputs/tok':>11}"]
        for i, r in sorted(self.layers.items()):
            values = sorted(r.loss.values())
            best = values[0] if values else float("nan")
            second = values[1] if len(values) > 1 else float("nan")
            bounded = "-" if r.discarded_by_bound is None else str(r.discarded_by_bound)
            outputs = "-" if r.expert_outputs_per_token is None else f"{r.expert_outputs_per_token:.2f}"
            lines.append(
                f"{i:>5}  {','.join(map(str, r.kept)):<28} {','.join(map(str, r.dropped)):<16} {best:>14.6g} {second:>14.6g} {len(values):>9}"
                f" {bounded:>7} {outputs:>11}"
            )
        t = self.timings
        lines.append("timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in t.items()))
        lines.append(f"peak memory: {self.peak_memory_bytes / 2**20:.1f} MiB ({self.settings.get('peak_memory_kind', '')})")
        return "\n".join(lines)


class PruneResult(NamedTuple):
    model: nn.Module | None
    report: PruneReport


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak device memory: CUDA max allocated, or the process's max resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_max_rss"


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (reset by exec, unlike ru_maxrss, which a
    child process inherits from the parent that forked it), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _key(dropped) -> str:
    return ",".join(str(e) for e in dropped)


def _lazy_note(fields: dict) -> str:
    """'; 2.41 expert outputs/token, 12 scored, 58 discarded by bound' (empty without lazy search)."""
    if "expert_outputs_per_token" not in fields:
        return ""
    note = f"; {fields['expert_outputs_per_token']:.2f} expert outputs/token, {fields['scored_exactly']} scored exactly"
    if fields.get("discarded_by_bound") is not None:
        note += f", {fields['discarded_by_bound']} discarded by bound"
    return note


def _load_tokenizer(path: str | None, model: nn.Module | None):
    source = path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not os.path.isdir(source):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # no tokenizer files: token-id calibration still works
        log.debug("no tokenizer at %s: %s", source, err)
        return None


def _check_out(out: str | None) -> None:
    if out is not None and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output directory {out} exists and is not empty")


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
) -> PruneResult:
    """Prunes every MoE layer to ``keep`` experts; returns ``(model, report)``.

    Args:
        model_or_path: a loaded transformers model (pruned in place) or a checkpoint directory
            (streamed one layer at a time; the returned model is loaded from ``out``, or None with
            ``return_model=False``).
        calibration: a spec for :func:`moe_fast.calibration.load_calibration` or ids [n, L].
        keep: R, experts kept per layer (top-k <= R < E).
        out: directory for the pruned checkpoint and ``moe_fast_report.json``; must not exist or be empty.
        mode: ``layerwise`` (inputs from the unpruned model) or ``progressive`` (from the model
            pruned so far; target still the unpruned model's block output).
        objective: ``paper`` (sum over batches of the Frobenius norm) or ``mse``.
        search: ``exhaustive``, ``greedy``, ``beam`` or ``auto`` (exhaustive when C(E, R) <= 5000).
        n_samples, seq_len: calibration size (None: 128 x 2048 for text, the whole tensor for ids).
        batch_size: sequences per calibration batch: one group of the paper's objective.
        chunk_tokens: tokens whose expert outputs are held at once (bounds memory).
        lazy: compute each token's expert outputs only as far as a candidate still in the running
            needs them (``moe_fast.pruning.lazy_search``: same selections; exhaustive search keeps
            exact scores only for the candidates its bounds did not discard). False: the
            rank-bounded search (M = k + dropped outputs per token up front). None (default): lazy
            for greedy and beam search, rank-bounded for exhaustive search (whose bounds save
            little on flat routers: benchmarks/RESULTS.md). Data-parallel runs use the
            rank-bounded search.
        device, dtype: where and in what precision a checkpoint path is computed (default cpu, the
            checkpoint's dtype). A loaded model keeps its dtype; with ``device`` each layer moves
            there while it is processed and back afterwards.

    With ``out`` the run holds an exclusive lock on ``<out>.moe_fast_partial`` from start to end:
    a second run into the same ``out`` fails at once (FolderBusy, naming the first), and a lock
    left by a killed run is taken over. The checkpoint is verified (every shard the index names
    present, with its tensors and size) before it is moved to ``out``.
    """
    locks: list[FolderLock] = []
    try:
        return _prune(
            locks, model_or_path, calibration, keep, out=out, mode=mode, objective=objective, search=search,
            beam_width=beam_width, n_samples=n_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
            device=device, dtype=dtype, resume=resume, tokenizer=tokenizer, chunk_tokens=chunk_tokens,
            return_model=return_model, progress=progress, lazy=lazy,
        )
    finally:
        for lock in locks:  # still held: the run failed; its progress stays for --resume
            lock.release(remove=False)


def _prune(
    locks: list[FolderLock],
    model_or_path: nn.Module | str | os.PathLike,
    calibration: str | torch.Tensor,
    keep: int,
    *,
    out: str | os.PathLike | None,
    mode: str,
    objective: str,
    search: str,
    beam_width: int,
    n_samples: int | None,
    seq_len: int | None,
    batch_size: int,
    seed: int,
    device: str | None,
    dtype: str,
    resume: bool,
    tokenizer,
    chunk_tokens: int,
    return_model: bool,
    progress: bool,
    lazy: bool | None,
) -> PruneResult:
    """The body of :func:`prune`; a lock it takes goes into ``locks`` (released by the caller on error)."""
    t_start = time.perf_counter()
    if mode not in ("layerwise", "progressive"):
        raise ValueError(f"mode must be layerwise or progressive; got {mode!r}")
    if objective not in ("paper", "mse"):
        raise ValueError(f"objective must be paper or mse; got {objective!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ctx = distributed.current(device)  # data-parallel calibration when a process group is up
    lead = ctx.rank == 0  # writes progress, the checkpoint and the report
    out = None if out is None else os.fspath(out)
    is_path = not isinstance(model_or_path, nn.Module)
    partial = None if out is None or not lead else out.rstrip("/") + PARTIAL_SUFFIX
    with ctx.guard():
        if lead:
            _check_out(out)
            if partial is not None:
                locks.append(_lock_partial(partial, out))
                _check_out(out)  # again: a run that held the lock may have just finished there
        if is_path:
            from moe_fast.models import resolve_model

            path = resolve_model(os.fspath(model_or_path))
            verify_checkpoint(path)  # a truncated or corrupt file: one clear error before any work
            source: LayerSource = CheckpointSource(path, device=device, dtype=dtype)
        else:
            source = LoadedSource(model_or_path, device=device)
        adapter = source.adapter
        E, k = adapter.num_experts, adapter.top_k
        if not k <= keep < E:
            raise ValueError(f"keep must satisfy top-k ({k}) <= keep < number of experts ({E}); got {keep}")
        method = choose_search(search, E, keep)
        num_drop = E - keep
        rank = k + num_drop

        if tokenizer is None and not isinstance(calibration, torch.Tensor) and not str(calibration).lower().endswith(".pt"):
            tokenizer = _load_tokenizer(source.path, None if is_path else model_or_path)
        ids = load_calibration(calibration, tokenizer, n_samples, seq_len, seed)
        n, L = ids.shape
        num_batches = math.ceil(n / batch_size)
        mine = ctx.batches(num_batches)  # global batch indices of this rank (all of them alone)
    calib_summary = {
        "spec": calibration if isinstance(calibration, str) else "tensor",
        "n_samples": n, "seq_len": L, "batch_size": batch_size, "seed": seed,
        "fingerprint": calibration_fingerprint(ids),
    }
    if len(set(ctx.gather(calib_summary["fingerprint"]))) > 1:
        raise ValueError("the ranks loaded different calibration tokens; give every rank the same --calib and seed")
    settings = {
        "keep": keep, "num_experts": E, "top_k": k, "mode": mode, "objective": objective, "search": method,
        "beam_width": beam_width if method == "beam" else None, "rank_bound": rank, "lazy": (method != "exhaustive" if lazy is None else lazy) and not ctx.active,
        "model_type": source.config.model_type, "dtype": str(source.dtype).replace("torch.", ""),
        "calibration": calib_summary,
    }

    report = PruneReport(settings=settings, world_size=ctx.world)
    with ctx.guard():
        if partial is not None:
            report.layers = _resume_state(partial, settings, resume)
            _save_progress(partial, settings, report)  # the settings, so that a resume can check them
    report.layers = ctx.broadcast(report.layers)

    def reduce(compute):
        with ctx.guard():
            err = compute()
        return ctx.sum(err)

    timings = {"calibration": time.perf_counter() - t_start, "forward": 0.0, "expert_outputs": 0.0, "search": 0.0}
    with torch.inference_mode():
        t0 = time.perf_counter()
        with ctx.guard():
            parts = [ids[b * batch_size : min(n, (b + 1) * batch_size)] for b in mine]
            hidden = torch.cat([source.embed(p) for p in parts]).to(source.dtype)
            pruned = hidden.clone() if mode == "progressive" else None
        slices, pos = [], 0  # (global batch index, rows of this rank's hidden states)
        for b, p in zip(mine, parts):
            slices.append((b, slice(pos, pos + p.shape[0])))
            pos += p.shape[0]
        del parts
        kw_cache: dict[int, dict] = {}

        def kw(sl: slice) -> dict:
            rows = (sl.stop - sl.start) if isinstance(sl, slice) else int(sl)
            if rows not in kw_cache:
                kw_cache[rows] = source.layer_kwargs(hidden[:rows])
            return kw_cache[rows]

        timings["forward"] += time.perf_counter() - t0
        bar = tqdm(range(source.num_layers), desc="layers", disable=not progress or not lead)
        for index in bar:
            stack = contextlib.ExitStack()
            with ctx.guard():
                layer = stack.enter_context(source.layer(index))
                block = adapter.moe_block(layer)
            with stack:
                done = report.layers.get(index)
                if block is None or done is not None:  # dense layer, or resumed: replay without search
                    t0 = time.perf_counter()
                    with ctx.guard():
                        _forward_layer(layer, hidden, kw, batch_size)
                        if pruned is not None:
                            if block is None:
                                _forward_layer(layer, pruned, kw, batch_size)
                            else:
                                with _patched(block, PrunedForward(adapter, block, done.kept, chunk_tokens)):
                                    _forward_layer(layer, pruned, kw, batch_size)
                    timings["forward"] += time.perf_counter() - t0
                    continue
                t0 = time.perf_counter()
                with ctx.guard():
                    if settings["lazy"]:
                        stats = LazyOutputs(adapter, block.experts, rank)
                        recorder = LazyRecorder(adapter, block, stats, chunk_tokens)
                    else:
                        stats = LayerStats(rank=rank)
                        recorder = StatsForward(adapter, block, rank, stats, chunk_tokens)
                    for b, sl in slices:
                        recorder.group_id = b  # global batch index: one term of the paper's sum
                        if pruned is None:
                            with _patched(block, recorder):
                                hidden[sl] = _layer_out(layer(hidden[sl], **kw(sl)))
                        else:
                            target, hidden[sl] = _block_output(layer, block, hidden[sl], kw(sl))
                            recorder.target = target.reshape(-1, target.shape[-1])
                            _block_input_stats(layer, block, recorder, pruned[sl], kw(sl))
                            recorder.target = None
                            del target
                    tensors = stats.finish()
                    del recorder
                timings["expert_outputs"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if settings["lazy"]:
                    stats.num_groups_total, stats.num_tokens_total = num_batches, n * L
                    dropped, losses, info = run_lazy_search(method, stats, num_drop, objective, beam_width)
                    lazy_fields = {"expert_outputs_per_token": round(info.outputs_per_token, 4), "scored_exactly": info.scored_exactly,
                                   "discarded_by_bound": info.discarded_by_bound if method == "exhaustive" else None,
                                   "search_state_bytes": info.peak_bytes, "lazy_detail": info.summary()}
                else:
                    score = make_scorer(
                        tensors, E, k, adapter.renormalize, objective, num_batches, progress=progress and lead,
                        desc=f"layer {index}", reduce=reduce if ctx.active else None,
                    )
                    dropped, losses = run_search(method, score, E, num_drop, beam_width)
                    lazy_fields = {"search_state_bytes": sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)}
                dropped = tuple(ctx.broadcast(tuple(dropped)))  # equal on every rank; rank 0's is the record
                del tensors, stats
                timings["search"] += time.perf_counter() - t0
                kept = [e for e in range(E) if e not in dropped]
                report.layers[index] = LayerResult(kept, list(dropped), {_key(d): v for d, v in losses.items()}, method, **lazy_fields)
                if lead:
                    log.info("layer %d: keep %s, drop %s (loss %.6g)%s", index, kept, list(dropped), losses[dropped] if dropped else 0.0,
                             _lazy_note(lazy_fields))
                    bar.set_postfix_str(_lazy_note(lazy_fields).strip(" ;"), refresh=False)
                with ctx.guard():
                    if partial is not None:
                        _save_progress(partial, settings, report)
                    if pruned is not None:
                        t0 = time.perf_counter()
                        with _patched(block, PrunedForward(adapter, block, kept, chunk_tokens)):
                            _forward_layer(layer, pruned, kw, batch_size)
                        timings["forward"] += time.perf_counter() - t0
        bar.close()
        del hidden, pruned

    report.peak_memory_bytes, settings["peak_memory_kind"] = peak_memory(source.device)
    record = {
        "kept_experts": {str(i): r.kept for i, r in sorted(report.layers.items())},
        "objective": objective, "mode": mode, "search": method, "calibration": calib_summary,
    }
    t0 = time.perf_counter()
    model = None
    with ctx.guard():
        if not is_path:
            from moe_fast.export import prune_loaded_model

            model = prune_loaded_model(model_or_path, adapter, report.kept, record)
        if out is not None and lead:
            from moe_fast import export

            staging = os.path.join(partial, "export")
            shutil.rmtree(staging, ignore_errors=True)
            with _writing(staging):
                if is_path:
                    export.export_checkpoint(source.path, staging, adapter, report.kept, record, tokenizer)
                else:
                    export.save_loaded(model, staging, tokenizer)
                timings["export"] = time.perf_counter() - t0
                timings["total"] = time.perf_counter() - t_start
                report.timings = timings
                report.peak_memory_bytes, settings["peak_memory_kind"] = peak_memory(source.device)  # export included
                report.save(os.path.join(staging, REPORT_NAME))
            _verify_export(staging)
            if os.path.isdir(out):
                os.rmdir(out)  # empty (checked under the lock)
            os.replace(staging, out)
            locks.pop().release(remove=True)
        else:
            timings["total"] = time.perf_counter() - t_start
            report.timings = timings
    if is_path and return_model:
        from transformers import AutoModelForCausalLM

        from moe_fast.models import quiet_loading

        with quiet_loading():
            if out is not None and lead:
                model = AutoModelForCausalLM.from_pretrained(out, dtype=source.dtype)
            else:
                from moe_fast.export import prune_loaded_model

                full = AutoModelForCausalLM.from_pretrained(source.path, dtype=source.dtype)
                model = prune_loaded_model(full, adapter, report.kept, record)
    return PruneResult(model, report)


class _patched:
    """Temporarily replaces a module's forward (instance attribute)."""

    def __init__(self, module: nn.Module, fn) -> None:
        self.module, self.fn = module, fn

    def __enter__(self):
        self.previous = self.module.__dict__.get("forward")  # an instance-level forward set by others
        self.module.forward = self.fn

    def __exit__(self, *exc):
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


class _Captured(Exception):
    pass


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _forward_layer(layer: nn.Module, hidden: torch.Tensor, kw, batch_size: int) -> None:
    """hidden <- layer(hidden), in place, one calibration batch at a time."""
    for lo in range(0, hidden.shape[0], batch_size):
        sl = slice(lo, min(hidden.shape[0], lo + batch_size))
        hidden[sl] = _layer_out(layer(hidden[sl], **kw(sl)))


def _block_output(layer: nn.Module, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the unpruned block's output inside ``layer``, the layer's output) on ``hidden``."""
    captured = {}

    def hook(module, args, output):
        captured["z"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook)
    try:
        out = _layer_out(layer(hidden, **kwargs))
    finally:
        handle.remove()
    return captured["z"], out


def _block_input_stats(layer: nn.Module, block: nn.Module, recorder: StatsForward, hidden: torch.Tensor, kwargs: dict) -> None:
    """Runs ``layer`` on ``hidden`` up to its block, records the block's stats, stops there."""

    def stop(*args, **kw):
        recorder(*args, **kw)
        raise _Captured

    with _patched(block, stop):
        try:
            layer(hidden, **kwargs)
        except _Captured:
            pass


def _lock_partial(partial: str, out: str) -> FolderLock:
    """Takes the partial folder's lock (see :class:`moe_fast.staging.FolderLock`)."""
    lock = FolderLock(partial)
    try:
        lock.acquire()
    except FolderBusy as err:
        raise FolderBusy(f"another prune into {out} is running ({err.holder}); wait for it to end or choose another --out") from None
    if lock.previous:
        log.info("%s: taking over from a run that ended without finishing (%s)", partial, describe_holder(lock.previous))
    return lock


@contextlib.contextmanager
def _writing(path: str):
    """OSErrors (full disk, permissions) raised without a file name get ``path`` as theirs."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, path) from err
        raise


def _verify_export(staging: str) -> None:
    """The export is complete: its weight files match their index, and config and report exist."""
    weights = verify_checkpoint(staging, strict=True)
    if not weights:
        raise OSError(errno.ENOENT, "the export wrote no weights", staging)
    for name in ("config.json", REPORT_NAME):
        if not os.path.isfile(os.path.join(staging, name)):
            raise OSError(errno.ENOENT, "missing from the export", os.path.join(staging, name))


def _resume_state(partial: str, settings: dict, resume: bool) -> dict[int, LayerResult]:
    """Layers already done (``resume``); without ``resume`` the partial folder is emptied (its lock kept)."""
    path = os.path.join(partial, "progress.json")
    if not resume:
        for name in os.listdir(partial):
            if name != LOCK_NAME:
                target = os.path.join(partial, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
        return {}
    if not os.path.exists(path):
        log.info("resume: no saved progress in %s, starting from the first layer", partial)
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
        layers = {int(i): LayerResult(**r) for i, r in saved["layers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"resume: {path} is unreadable ({type(err).__name__}: {err}); run without --resume to start over"
        ) from None
    if saved.get("settings") != json.loads(json.dumps(settings)):
        raise ValueError(
            f"resume: the saved progress in {partial} was made with other settings or calibration tokens; "
            "run without --resume to start over"
        )
    log.info("resume: %d layers already done", len(layers))
    return layers


def _save_progress(partial: str, settings: dict, report: PruneReport) -> None:
    tmp = os.path.join(partial, "progress.json.tmp")
    with _writing(tmp):
        with open(tmp, "w") as f:
            json.dump({"settings": settings, "layers": {str(i): vars(r) for i, r in report.layers.items()}}, f)
    os.replace(tmp, os.path.join(partial, "progress.json"))
