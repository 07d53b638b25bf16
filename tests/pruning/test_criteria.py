"""The expert-selection criteria (frequency, REAP, EAN) on hand-worked values, and their two
implementations (hooks on a model vs one pass of the pruning statistics) against each other."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from helpers import criteria_reference
from moe_fast.pruning.export import export_selection
from moe_fast.pruning.strategies import criteria
from moe_fast.demo.selection import one_pass_selections
from moe_fast.pruning import one_pass
from helpers.tiny_models import tiny_mixtral


def test_layer_scores_hand_worked():
    # 3 tokens, top-2 of 4 experts. Token 0: experts (1, 0) weights (0.75, 0.25), norms (2, 4);
    # token 1: (1, 2) weights (0.5, 0.5), norms (6, 1); token 2: (2, 1) weights (0.9, 0.1), norms (3, 10).
    ids = torch.tensor([[1, 0], [1, 2], [2, 1]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    norms = torch.tensor([[2.0, 4.0], [6.0, 1.0], [3.0, 10.0]])
    counts, reap, ean = criteria.layer_scores_from_ranked(ids, w, norms, 4)
    assert counts.tolist() == [1, 3, 2, 0]
    # expert 1: (0.75*2 + 0.5*6 + 0.1*10) / 3 = 5.5 / 3; expert 2: (0.5*1 + 0.9*3) / 2 = 1.6
    assert reap.tolist() == pytest.approx([0.25 * 4, 5.5 / 3, 1.6, 0.0])
    # EAN has no gate weight: expert 1: (2 + 6 + 10) / 3 = 6; expert 2: (1 + 3) / 2 = 2
    assert ean.tolist() == pytest.approx([4.0, 6.0, 2.0, 0.0])
    # the three criteria disagree here, as they should: frequency keeps 1, 2; REAP 1, 2; EAN 1, 0
    assert criteria.top_scores(counts, 2) == [1, 2]
    assert criteria.top_scores(reap, 2) == [1, 2]
    assert criteria.top_scores(ean, 2) == [0, 1]
    assert criteria.top_scores(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1) == [1]  # ties: lower index


def test_gram_diagonal_positions():
    y = torch.randn(5, 4, 7)
    gram = torch.bmm(y, y.transpose(1, 2))
    rows, cols = torch.triu_indices(4, 4)
    packed = gram[:, rows, cols]
    assert torch.allclose(one_pass.gram_diagonal(packed, 4, 3), (y[:, :3] ** 2).sum(-1))


def test_criterion_names_and_alias():
    assert criteria.canonical_criterion("saliency") == "reap"
    assert criteria.canonical_criterion("ean") == "ean"
    with pytest.raises(ValueError, match="unknown criterion 'magnitude'"):
        criteria.canonical_criterion("magnitude")


def _tiny() -> MixtralForCausalLM:
    return tiny_mixtral(1, experts=6, layers=2)


def test_one_pass_criteria_select_what_the_hooked_statistics_select():
    """The one pass's criteria (Gram diagonal of the rank-bounded statistics) rank the experts as the
    whole-model hooks do: the same keep-set at every r, i.e. the same order."""
    model = _tiny()
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    hooked = criteria_reference.routing_stats(model, ids, batch_size=2, progress=False)
    got = one_pass.one_pass_selections(model, ids, (2, 3, 4, 5), ("frequency", "reap", "ean"), (), batch_size=2)
    for criterion in ("frequency", "reap", "ean"):
        for r in (2, 3, 4, 5):
            assert got[criterion, r] == criteria_reference.select(criterion, 6, r, hooked.layers, hooked), (criterion, r)


def test_one_pass_reconstruction_equals_prune():
    """The demo's one-pass search picks what ``moe_fast.prune`` picks, at every r from one pass."""
    from moe_fast.pruning import prune

    model = _tiny()
    ids = torch.randint(0, 128, (4, 12))
    sels = one_pass_selections(model, ids, (4, 3), ("frequency",), ("exhaustive",), "prose", 0, batch_size=2)
    for keep in (4, 3):
        ours = next(s for s in sels if s.method == "layer-wise" and s.num_keep == keep).kept_dict
        fresh = _tiny()
        report = prune(fresh, ids, keep, batch_size=2, return_model=False, progress=False).report
        assert ours == report.kept, keep


@pytest.mark.parametrize("criterion,recorded", [("ean", "ean"), ("reap", "reap"), ("saliency", "reap")])
def test_cli_prune_by_criterion(tmp_path, criterion, recorded):
    """``moe-fast prune --criterion reap|ean`` keeps the top experts of the statistics on its calibration."""
    import json
    import os

    from moe_fast.cli import main
    from moe_fast.data.calibration import load_calibration
    from helpers.checkpoints import save_checkpoint

    model = tiny_mixtral(3, layers=2)
    src = save_checkpoint(model, tmp_path / "src")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    out = str(tmp_path / "out")
    argv = ["prune", src, "--keep", "5", "--calib", str(tmp_path / "ids.pt"), "--out", out, "--criterion", criterion,
            "--no-progress"]
    assert main(argv) == 0
    record = json.load(open(os.path.join(out, "config.json")))["moe_fast"]["pruning"]
    assert record["criterion"] == recorded
    kept = record["kept_experts"] if "kept_experts" in record else record["kept"]
    stats = criteria_reference.routing_stats(model.float().eval(), load_calibration(str(tmp_path / "ids.pt"), None, None, None, 42),
                                    batch_size=8, progress=False)
    table = stats.ean if recorded == "ean" else stats.reap
    # the two criteria disagree on this model, so the check tells them apart
    assert criteria.top_scores(stats.ean[0], 5) != criteria.top_scores(stats.reap[0], 5)
    for li, layer in enumerate(stats.layers):
        assert kept[str(layer)] == criteria.top_scores(table[li], 5)
