"""Every selection criterion through ``moe_fast.prune``: the streaming path (one decoder layer at a
time, resume, export) selects exactly what the whole-model hooked statistics select
(``helpers.criteria_reference``) on the shipped models; routers with expert groups keep equal
groups under every criterion; the search's own options are refused with a criterion."""

from __future__ import annotations

import json
import os

import pytest
import torch

import moe_fast
import moe_fast.pruning.pipeline as pipeline
from helpers.checkpoints import save_checkpoint
from helpers.criteria_reference import routing_stats, select
from helpers.tiny_models import VOCAB, tiny_mixtral, tiny_model
from moe_fast.checkpoint.loading import load_pretrained, load_tokenizer
from moe_fast.models import resolve_model
from moe_fast.pruning.progress import PARTIAL_SUFFIX

pytestmark = pytest.mark.usefixtures("one_thread")

STAT_CRITERIA = ("frequency", "reap", "ean")
SHIPPED = {"builtin:small-mixtral": 4, "builtin:small-qwen3-moe": 16}


@pytest.fixture(scope="module")
def shipped():
    """{model: (path, keep, calibration ids, the reference statistics on the whole float32 model)}."""
    out = {}
    for name, keep in SHIPPED.items():
        path = resolve_model(name)
        ids = moe_fast.load_calibration("builtin:python-prose", load_tokenizer(path), 8, 64, 42)
        model = load_pretrained(path, dtype=torch.float32)
        out[name] = (path, keep, ids, routing_stats(model, ids, batch_size=4))
        del model
    return out


@pytest.mark.parametrize("name", tuple(SHIPPED))
def test_streamed_criteria_select_what_the_hooked_whole_model_selects(shipped, name):
    path, keep, ids, stats = shipped[name]
    E = len(stats.counts[0])
    for criterion in STAT_CRITERIA + ("random",):
        report = moe_fast.prune(path, ids, keep, criterion=criterion, batch_size=4, dtype="float32", seed=7,
                                return_model=False, progress=False).report
        assert report.kept == select(criterion, E, keep, stats.layers, stats, seed=7), (name, criterion)
        assert report.settings["criterion"] == criterion and report.settings["search"] == criterion
        if criterion != "random":
            table = stats.table_for(criterion)
            for li, layer in enumerate(stats.layers):
                assert report.layers[layer].criterion_scores == pytest.approx(table[li], rel=1e-5, abs=1e-9)


def test_the_criteria_disagree_on_the_shipped_models(shipped):
    """So that the test above tells them apart (it would pass for a criterion swapped with another)."""
    for name, (_, keep, _, stats) in shipped.items():
        picks = {c: select(c, len(stats.counts[0]), keep, stats.layers, stats) for c in STAT_CRITERIA}
        assert len({json.dumps(p, sort_keys=True) for p in picks.values()}) == 3, name


def test_a_criterion_never_loads_the_whole_model(tmp_path, monkeypatch):
    """The checkpoint is read one decoder layer at a time, as for the reconstruction search."""
    src = save_checkpoint(tiny_mixtral(4, layers=3), tmp_path / "src")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("moe_fast.checkpoint.loading.load_pretrained", refuse)
    report = moe_fast.prune(src, ids, 5, criterion="reap", out=str(tmp_path / "out"), batch_size=4,
                            return_model=False, progress=False).report
    assert sorted(report.layers) == [0, 1, 2]
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["moe_fast"]["pruning"]["criterion"] == "reap"
    assert config["num_local_experts"] == 5


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("criterion", ["reap", "random"])
def test_an_interrupted_criterion_run_resumes_to_the_same_checkpoint(tmp_path, monkeypatch, criterion):
    src = save_checkpoint(tiny_mixtral(6, layers=4), tmp_path / "src")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    run = dict(criterion=criterion, batch_size=4, return_model=False, progress=False, seed=3)
    clean = moe_fast.prune(src, ids, 5, out=str(tmp_path / "clean"), **run).report
    out = str(tmp_path / "out")
    if criterion == "random":  # no layer loop: killed in the export, after the progress was saved
        monkeypatch.setattr(pipeline, "export_pruned", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    else:
        real = pipeline._log_layer

        def die_after_layer_1(index, result, bar):
            real(index, result, bar)
            if index == 1:
                raise Killed()

        monkeypatch.setattr(pipeline, "_log_layer", die_after_layer_1)
    with pytest.raises(Killed):
        moe_fast.prune(src, ids, 5, out=out, **run)
    assert os.path.exists(out + PARTIAL_SUFFIX)
    monkeypatch.undo()
    resumed = moe_fast.prune(src, ids, 5, out=out, resume=True, **run).report
    assert resumed.kept == clean.kept
    assert [r.criterion_scores for r in resumed.layers.values()] == [r.criterion_scores for r in clean.layers.values()]


GROUPED = {
    "deepseek_v3": (dict(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3), 8),
    "glm4_moe": (dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2), 12),
}


@pytest.mark.parametrize("family", tuple(GROUPED))
def test_every_criterion_keeps_equal_expert_groups(family):
    config, keep = GROUPED[family]
    ids = torch.randint(3, VOCAB, (8, 12), generator=torch.Generator().manual_seed(4))
    E, n_group = config["n_routed_experts"], config["n_group"]
    size = E // n_group
    for criterion in STAT_CRITERIA + ("random",):
        model = tiny_model(family, seed=1, **config)  # pruned in place
        report = moe_fast.prune(model, ids, keep, criterion=criterion, batch_size=4, progress=False).report
        assert report.layers, criterion
        for layer, result in report.layers.items():
            per_group = [sum(1 for e in result.kept if e // size == g) for g in range(n_group)]
            assert per_group == [keep // n_group] * n_group, (criterion, layer, result.kept)
            if criterion != "random":  # within each group, the group's best experts
                scores = result.criterion_scores
                for g in range(n_group):
                    members = range(g * size, (g + 1) * size)
                    kept = [e for e in members if e in result.kept]
                    dropped = [e for e in members if e not in result.kept]
                    assert min(scores[e] for e in kept) >= max(scores[e] for e in dropped), (criterion, layer, g)
    with pytest.raises(ValueError, match="expert groups"):
        moe_fast.prune(tiny_model(family, seed=1, **config), ids, keep + 1, criterion="reap", batch_size=4, return_model=False, progress=False)


@pytest.mark.parametrize("options", [dict(search="beam"), dict(lazy=True), dict(recompute_outputs=True)])
def test_the_search_options_are_refused_with_a_criterion(options):
    with pytest.raises(ValueError, match="criterion 'reap' keeps the highest-scoring experts without a search"):
        moe_fast.prune(tiny_mixtral(1, layers=1), torch.zeros(2, 4, dtype=torch.long), 5, criterion="reap",
                       progress=False, **options)


def test_unknown_criterion_is_refused():
    with pytest.raises(ValueError, match="unknown criterion 'magnitude'"):
        moe_fast.prune(tiny_mixtral(1, layers=1), torch.zeros(2, 4, dtype=torch.long), 5, criterion="magnitude",
                       progress=False)


@pytest.mark.parametrize("criterion", ["reap", "frequency"])
def test_repair_after_a_criterion(criterion):
    """A repair runs on any selection: after REAP or frequency it lowers (never raises) each
    layer's calibration loss, which it reports."""
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5))
    model, report = moe_fast.prune(tiny_mixtral(8, layers=2), ids, 4, criterion=criterion, repair="lstsq",
                                   batch_size=4, progress=False)
    plain = moe_fast.prune(tiny_mixtral(8, layers=2), ids, 4, criterion=criterion, batch_size=4,
                           return_model=False, progress=False).report
    assert report.kept == plain.kept
    for result in report.layers.values():
        rep = result.repair
        assert rep["method"] == "lstsq" and rep["loss_after"] <= rep["loss_before"]
    assert any(r.repair["loss_after"] < 0.99 * r.repair["loss_before"] for r in report.layers.values())
    assert model.config.num_local_experts == 4
