"""The pruning search for grouped routers (DeepSeek-V3, GLM-4.5 with topk_group < n_group): only
keep-sets with the same number of experts in every group are searched.

* The fast scoring (``GroupedOutputs``: candidates routed together, outputs computed once each)
  equals the plain spec ``reference.grouped_subset_loss`` on random inputs with tied scores and a
  selection bias that changes the group choice, and computes exactly the outputs some candidate
  (or the unpruned top-k) chooses.
* Exhaustive pruning (layer-wise and progressive) equals a brute force over every equal-per-group
  keep set that re-runs the stock transformers block with the dropped experts' selection bias at -inf.
* Greedy and beam equal a plain constrained backward elimination over brute-force scores.
* The exported checkpoint loads in plain transformers and equals the masked original.
* A keep that cannot be split evenly (or leaves fewer than 2 per group) is refused before any forward.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import moe_fast
from moe_fast import reference
from moe_fast.adapters import get_adapter
from moe_fast.routing.layer_routing import route_candidates
from moe_fast.pruning.grouped_outputs import GroupedOutputs
from moe_fast.kernels.routing_spec import RoutingSpec

from helpers.brute_force import BATCH, check_layer
from helpers.checkpoints import save_checkpoint
from helpers.routing_reference import masked_routers
from helpers.stock_brute_force import brute_force, dropped_in_stock_router, stock_layer_scores
from helpers.tiny_models import VOCAB, tiny_model

# DeepSeek-V3: 12 experts in 4 groups of 3, 2 groups eligible, top-3 -> keep 8 = 2 per group (81 sets).
# GLM-4.5: 16 experts in 4 groups of 4, 2 groups eligible, top-2 -> keep 12 = 3 per group (256 sets).
CONFIGS = {
    "deepseek_v3": dict(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3),
    "glm4_moe": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2),
}
KEEP = {"deepseek_v3": 8, "glm4_moe": 12}
FAMILIES = tuple(CONFIGS)


def _model(family: str, seed: int = 0):
    """A tiny grouped model whose every layer has a random selection bias large enough to change choices."""
    model = tiny_model(family, seed=seed, **CONFIGS[family])
    g = torch.Generator().manual_seed(50 + seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return model


def _ids(seed: int, n: int = 8, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(300 + seed))


def _balanced(E: int, n_group: int, keep: int) -> list[tuple]:
    """Every dropped set taking the same number from each group, written out from the definition."""
    size, drop = E // n_group, E - keep
    return [d for d in itertools.combinations(range(E), drop)
            if all(sum(1 for e in d if e // size == g) == drop // n_group for g in range(n_group))]


def _constrained_beam(score, E: int, n_group: int, drop: int, width: int) -> tuple:
    """Backward elimination where a step drops an expert only from a group with the fewest drops."""
    size = E // n_group
    frontier = [()]
    for _ in range(drop):
        cands = set()
        for d in frontier:
            counts = [sum(1 for e in d if e // size == g) for g in range(n_group)]
            for e in range(E):
                if e not in d and counts[e // size] == min(counts):
                    cands.add(tuple(sorted(d + (e,))))
        frontier = sorted(cands, key=lambda d: (score(d), d))[:width]
    return frontier[0]


# --- the fast scoring against its plain spec ------------------------------------------------------


class _TableAdapter:
    """Stand-in: expert e on the input row [t] outputs table[t, e] (so every computed pair is countable)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.num_experts = table, table.shape[1]
        self.calls: list[tuple[int, int]] = []

    def expert_forward(self, experts, e: int, x: torch.Tensor) -> torch.Tensor:
        rows = x[:, 0].long()
        self.calls.extend((int(t), e) for t in rows)
        return self.table[rows, e]


def _grouped_inputs(seed: int, T: int = 40, E: int = 12, H: int = 5, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (T, E), generator=g).float() / 2  # few values: tied scores and group scores
    bias = torch.randint(-2, 3, (E,), generator=g).float() / 4  # changes choices (see the assertion)
    spec = RoutingSpec(scoring="sigmoid", top_k=k, renormalize=True, scaling=1.5, selection_bias=bias, n_group=4, topk_group=2)
    table = torch.randn(T, E, H, generator=g)
    group = torch.randint(0, 3, (T,), generator=g)
    return logits, spec, table, group


def _store(logits, spec, table, group, target=None) -> tuple[GroupedOutputs, _TableAdapter]:
    T, E, _ = table.shape
    adapter = _TableAdapter(table)
    store = GroupedOutputs(adapter, None, spec)
    r = reference.route_spec(logits, spec)  # the unpruned top-k, as the layer forward computes them
    ids = r.ids.long()
    y = torch.gather(table, 1, ids.unsqueeze(-1).expand(-1, -1, table.shape[2]))
    x = torch.zeros(T, table.shape[2])  # run_pairs outputs have the input's width
    x[:, 0] = torch.arange(T, dtype=torch.float32)
    store.add_chunk(x, logits, group, ids, r.weights, y, z=target)
    store.num_groups = int(group.max()) + 1
    store.finish()
    return store, adapter


def _some_keep_sets(E: int, n_group: int) -> torch.Tensor:
    """Equal-per-group sets and the unequal ones greedy passes through (one group a drop ahead)."""
    sets = [d for d in _balanced(E, n_group, E - n_group)][:30] + [(0,), (4,), (0, 3), (1, 5, 9)]
    keep = torch.ones(len(sets), E, dtype=torch.bool)
    for row, d in enumerate(sets):
        keep[row, list(d)] = False
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_grouped_errors_equal_the_plain_spec(seed, progressive):
    logits, spec, table, group = _grouped_inputs(seed)
    T, E, H = table.shape
    # the selection bias changes which groups are eligible for some tokens
    allowed = torch.ones(T, E, dtype=torch.bool)
    unbiased = reference.eligible_experts(torch.sigmoid(logits), allowed, spec)
    biased = reference.eligible_experts(reference.sigmoid_choice(logits, spec)[1], allowed, spec)
    assert (unbiased != biased).any()
    target = torch.randn(T, H, generator=torch.Generator().manual_seed(9)) if progressive else None
    store, adapter = _store(logits, spec, table, group, target)
    keep = _some_keep_sets(E, spec.n_group)
    got = store.group_errors(keep, 3)
    want = reference.grouped_subset_loss(table, logits, keep, group, 3, spec, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # every computed output is one some candidate (or the unpruned router) chooses, each once
    needed = {(t, int(e)) for t, row in enumerate(reference.route_spec(logits, spec).ids.tolist()) for e in row}
    for c in range(keep.shape[0]):
        ids = reference.route_spec(logits, spec, keep_mask=keep[c]).ids
        needed |= {(t, int(e)) for t, row in enumerate(ids.tolist()) for e in row}
    assert len(adapter.calls) == len(set(adapter.calls))
    assert set(adapter.calls) | {(t, int(e)) for t, row in enumerate(store.ids.tolist()) for e in row} == needed
    assert store.size == len(needed) and int((store.index >= 0).sum()) == len(needed)
    # scoring again computes nothing new and gives the same errors
    calls = len(adapter.calls)
    torch.testing.assert_close(store.group_errors(keep, 3), got, rtol=0, atol=0)
    assert len(adapter.calls) == calls


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("progressive", [False, True])
def test_child_errors_against_the_parent_equal_the_plain_spec(seed, progressive):
    """Backward elimination scores a child from its parent's per-token state, routing again only the
    tokens the added drop can affect: the same errors as the plain spec, at every step of a path."""
    logits, spec, table, group = _grouped_inputs(seed)
    T, E, H = table.shape
    target = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)) if progressive else None
    store, _ = _store(logits, spec, table, group, target)
    g = torch.Generator().manual_seed(seed)
    parent: tuple = ()
    for _ in range(4):  # down to 2 per group of 3
        store.set_frontier([parent])
        counts = [sum(1 for e in parent if e // 3 == grp) for grp in range(4)]
        children = [e for e in range(E) if e not in parent and counts[e // 3] == min(counts)]
        for e in children:
            child = tuple(sorted(parent + (e,)))
            assert store.parent_in_frontier(child) == (parent, e)
            keep = torch.ones(1, E, dtype=torch.bool)
            keep[0, list(child)] = False
            want = reference.grouped_subset_loss(table, logits, keep, group, 3, spec, target)[0]
            torch.testing.assert_close(store.child_errors(parent, e, 3), want, rtol=1e-12, atol=1e-12)
        parent = tuple(sorted(parent + (children[int(torch.randint(len(children), (1,), generator=g))],)))


def test_route_candidates_equals_route_spec_per_candidate():
    logits, spec, _, _ = _grouped_inputs(5, T=60)
    keep = _some_keep_sets(12, 4)
    ids, w = route_candidates(logits, spec, keep)
    for c in range(keep.shape[0]):
        r = reference.route_spec(logits, spec, keep_mask=keep[c])
        assert torch.equal(ids[c], r.ids.long())
        assert torch.equal(w[c], r.weights)


# --- end to end against the stock transformers block ---------------------------------------------


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exhaustive_search_equals_stock_brute_force_over_equal_groups(family, mode):
    model = _model(family)
    spec = get_adapter(model).routing()
    assert spec.grouped
    E, keep = get_adapter(model).num_experts, KEEP[family]
    ids = _ids(1)
    ref_losses = brute_force(model, family, ids, lambda: _balanced(E, spec.n_group, keep), mode)
    result = moe_fast.prune(model, ids, keep=keep, search="exhaustive", batch_size=BATCH, mode=mode,
                            progress=False, return_model=False)
    settings = result.report.settings
    per = keep // spec.n_group
    assert settings["grouped_search"] == f"equal experts per group (n_group={spec.n_group}, per group {per} of {E // spec.n_group})"
    assert sorted(result.report.layers) == sorted(ref_losses)
    for layer, res in result.report.layers.items():
        check_layer(res.kept, ref_losses[layer], res.loss, E)
        assert res.scored_exactly == len(ref_losses[layer]) == math.comb(E // spec.n_group, per) ** spec.n_group
        assert spec.top_k <= res.expert_outputs_per_token <= E


@pytest.mark.parametrize("search,width", [("greedy", 1), ("beam", 3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_beam_equal_a_constrained_elimination_over_brute_force(family, search, width):
    model = _model(family, seed=1)
    spec = get_adapter(model).routing()
    E, keep = get_adapter(model).num_experts, KEEP[family]
    ids = _ids(2)
    scores = stock_layer_scores(model, family, ids)
    want = {layer: _constrained_beam(score, E, spec.n_group, E - keep, width) for layer, score in scores.items()}
    result = moe_fast.prune(model, ids, keep=keep, search=search, beam_width=width, batch_size=BATCH,
                            progress=False, return_model=False)  # slices ``model``: the brute force ran first
    assert result.report.settings["search"] == search
    size = E // spec.n_group
    for layer, res in result.report.layers.items():
        assert tuple(res.dropped) == want[layer]
        assert [sum(1 for e in res.kept if e // size == g) for g in range(spec.n_group)] == [keep // spec.n_group] * spec.n_group
        for key, value in res.loss.items():  # every set scored is on a balanced path and scored exactly
            d = tuple(int(e) for e in key.split(","))
            counts = [sum(1 for e in d if e // size == g) for g in range(spec.n_group)]
            assert max(counts) - min(counts) <= 1
            assert value == pytest.approx(scores[layer].cache[d], rel=2e-5, abs=1e-9)  # the same sets were visited


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_loads_in_transformers_and_equals_the_masked_original(family, tmp_path):
    model = _model(family, seed=2)
    original = _model(family, seed=2)  # ``model`` is pruned in place
    ids = _ids(3)
    out = tmp_path / "pruned"
    result = moe_fast.prune(model, ids, keep=KEEP[family], search="greedy", batch_size=BATCH, out=str(out),
                            progress=False, return_model=False)
    kept = {layer: res.kept for layer, res in result.report.layers.items()}
    report = json.loads((out / "moe_fast_report.json").read_text())
    assert report["settings"]["grouped_search"].startswith("equal experts per group (n_group=4")
    assert all(r["expert_outputs_per_token"] > 0 for r in report["layers"].values())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.n_routed_experts == KEEP[family]
    assert original.config.first_k_dense_replace == 1 and 0 not in kept
    for i, layer in enumerate(loaded.model.layers):
        src = original.model.layers[i].mlp
        if i not in kept:  # the dense layer is untouched
            for name, p in layer.mlp.named_parameters():
                assert torch.equal(p, dict(src.named_parameters())[name])
            continue
        gate = layer.mlp.gate
        assert torch.equal(gate.weight, src.gate.weight[kept[i]])
        assert torch.equal(gate.e_score_correction_bias, src.gate.e_score_correction_bias[kept[i]])
        for name, p in layer.mlp.shared_experts.named_parameters():
            assert torch.equal(p, dict(src.shared_experts.named_parameters())[name])
    probe = _ids(4, n=3)
    E = get_adapter(original).num_experts
    with torch.no_grad(), contextlib.ExitStack() as stack:  # the stock routers, dropped experts' bias at -inf
        for i, keep in kept.items():
            dropped = [e for e in range(E) if e not in keep]
            stack.enter_context(dropped_in_stock_router(original.model.layers[i].mlp.gate, family, dropped))
        expected = original(probe).logits
    with torch.no_grad(), masked_routers(original, get_adapter(original), kept):  # moe_fast's reference routing
        torch.testing.assert_close(original(probe).logits, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        got = loaded(probe).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


# --- refused keep sizes and lazy choices ------------------------------------------------------------


class _NoForward(Exception):
    pass


def _forbid_forward(model) -> None:
    def hook(*_):
        raise _NoForward("a forward ran before the keep size was checked")
    model.model.register_forward_pre_hook(hook)
    for layer in model.model.layers:
        layer.register_forward_pre_hook(hook)


@pytest.mark.parametrize("keep,message", [
    (9, r"keep = 9 .*n_group = 4 groups of 3.*same number of experts in every group, got \[3, 2, 2, 2\]"),
    (4, r"keep = 4 .*n_group = 4 groups of 3.*at least 2 experts, got 1"),
])
def test_keep_sizes_the_grouped_router_cannot_have_are_refused_before_any_forward(keep, message):
    model = _model("deepseek_v3")
    _forbid_forward(model)
    with pytest.raises(ValueError, match=message):
        moe_fast.prune(model, _ids(5, n=2, length=8), keep=keep, progress=False, return_model=False)


def test_keep_whose_eligible_groups_cannot_hold_top_k_is_refused():
    model = tiny_model("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=4)
    _forbid_forward(model)
    with pytest.raises(ValueError, match=r"keep = 8 .*topk_group = 1 groups of 2 kept experts cannot hold top-k = 4"):
        moe_fast.prune(model, _ids(5, n=2, length=8), keep=8, progress=False, return_model=False)


def test_lazy_choices_on_a_grouped_router():
    """lazy None and True take the grouped search (it computes outputs as candidates need them); False is refused."""
    model = _model("deepseek_v3")
    ids = _ids(6, n=4)
    for lazy in (None, True):
        result = moe_fast.prune(_model("deepseek_v3"), ids, keep=8, search="greedy", lazy=lazy, batch_size=BATCH,
                                progress=False, return_model=False)
        assert result.report.settings["lazy"] is True and "grouped_search" in result.report.settings
    _forbid_forward(model)
    with pytest.raises(ValueError, match="rank-bounded search \\(lazy=False\\) does not serve it"):
        moe_fast.prune(model, ids, keep=8, lazy=False, progress=False, return_model=False)
    with pytest.raises(ValueError, match="grouped router is searched by the grouped search"):
        moe_fast.prune(model, ids, keep=8, recompute_outputs=True, progress=False, return_model=False)


def test_demo_one_pass_refuses_grouped_routers():
    from moe_fast.demo.selection import one_pass_selections

    model = _model("deepseek_v3")
    _forbid_forward(model)
    with pytest.raises(ValueError, match="one-pass selections do not serve deepseek_v3's grouped router"):
        one_pass_selections(model, _ids(7, n=2), (8,), ("frequency",), ("exhaustive",), "prose", 0)


# --- data-parallel calibration ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for mode, search in (("layerwise", "exhaustive"), ("progressive", "greedy")):
            _, report = moe_fast.prune(_model("deepseek_v3"), _ids(8, n=12), 8, mode=mode, search=search,
                                       batch_size=BATCH, progress=False)
            out[f"{mode}/{search}"] = {str(i): [r.dropped, r.loss] for i, r in report.layers.items()}
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_select_what_one_process_selects(tmp_path, one_thread):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for mode, search in (("layerwise", "exhaustive"), ("progressive", "greedy")):
        _, ref = moe_fast.prune(_model("deepseek_v3"), _ids(8, n=12), 8, mode=mode, search=search, batch_size=BATCH,
                                progress=False)
        got = ranks[0][f"{mode}/{search}"]
        for i, r in ref.layers.items():
            assert got[str(i)][0] == r.dropped, (mode, search, i)
            for key, value in r.loss.items():  # expert outputs batched differently: float32 GEMM rounding
                assert got[str(i)][1][key] == pytest.approx(value, rel=1e-6, abs=1e-12), (mode, search, i)


# --- the command line on a checkpoint (streamed one layer at a time) --------------------------------


def test_cli_prunes_a_grouped_checkpoint_as_the_loaded_model_and_refuses_an_uneven_keep(tmp_path, capsys, one_thread):
    from moe_fast.cli import main

    src = save_checkpoint(_model("deepseek_v3", seed=3), tmp_path / "src")
    torch.save(_ids(9), tmp_path / "ids.pt")
    calib = str(tmp_path / "ids.pt")
    bad = str(tmp_path / "bad")
    assert main(["prune", src, "--keep", "9", "--calib", calib, "--out", bad, "--no-progress"]) == 2
    assert "keep = 9 is not a keep size the grouped router of deepseek_v3 can be pruned to" in capsys.readouterr().err
    assert not os.path.exists(bad)
    out = tmp_path / "out"
    argv = ["prune", src, "--keep", "8", "--calib", calib, "--out", str(out), "--batch-size", str(BATCH),
            "--search", "exhaustive", "--mode", "progressive", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "moe_fast_report.json").read_text())
    want = moe_fast.prune(_model("deepseek_v3", seed=3), _ids(9), keep=8, search="exhaustive", mode="progressive",
                          batch_size=BATCH, progress=False, return_model=False).report
    assert {int(i): r["kept"] for i, r in report["layers"].items()} == want.kept
    assert report["settings"]["grouped_search"] == want.settings["grouped_search"]


def test_plan_bounds_the_grouped_search_and_refuses_an_uneven_keep(tmp_path):
    """``prune --plan`` budgets a grouped router at every output of every token: the search state a
    real run reports stays within it, and the expert FLOPs bound the outputs it computed."""
    from moe_fast.pruning.plan import plan_table, prune_plan

    src = save_checkpoint(_model("deepseek_v3", seed=4), tmp_path / "src")
    ids = _ids(10)
    n, L = ids.shape
    with pytest.raises(ValueError, match="keep = 10 is not a keep size"):
        prune_plan(src, 10, n_samples=n, seq_len=L, batch_size=BATCH)
    for mode in ("layerwise", "progressive"):
        plan = prune_plan(src, 8, n_samples=n, seq_len=L, batch_size=BATCH, mode=mode)
        assert plan["grouped_search"].startswith("equal experts per group (n_group=4, per group 2 of 3)")
        assert "grouped search: up to 12 outputs per token" in plan_table(plan)
        report = moe_fast.prune(src, ids, keep=8, search="exhaustive", batch_size=BATCH, mode=mode, progress=False,
                                return_model=False).report
        rows = {r["layer"]: r for r in plan["layers"]}
        for i, res in report.layers.items():
            assert 0 < res.search_state_bytes <= rows[i]["stats_bytes"]
            per_output = rows[i]["expert_flops"] / (n * L * 12)
            assert res.expert_outputs_per_token * n * L * per_output <= rows[i]["expert_flops"]


def test_resume_after_an_interrupted_grouped_run(tmp_path, monkeypatch):
    import moe_fast.pruning.strategies.reconstruction as phases_mod

    src = save_checkpoint(_model("deepseek_v3", seed=5), tmp_path / "src")
    ids = _ids(11)
    clean = moe_fast.prune(src, ids, 8, mode="progressive", search="greedy", batch_size=BATCH, return_model=False,
                           progress=False).report
    out = str(tmp_path / "out")
    real = phases_mod.run_grouped_search
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(phases_mod, "run_grouped_search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        moe_fast.prune(src, ids, 8, mode="progressive", search="greedy", batch_size=BATCH, out=out, return_model=False,
                       progress=False)
    monkeypatch.setattr(phases_mod, "run_grouped_search", real)
    report = moe_fast.prune(src, ids, 8, mode="progressive", search="greedy", batch_size=BATCH, out=out, resume=True,
                            return_model=False, progress=False).report
    assert report.kept == clean.kept
    first, second = sorted(clean.layers)
    assert report.layers[first].expert_outputs_per_token == clean.layers[first].expert_outputs_per_token  # replayed
    for key, v in clean.layers[second].loss.items():
        assert report.layers[second].loss[key] == pytest.approx(v, rel=1e-6)
