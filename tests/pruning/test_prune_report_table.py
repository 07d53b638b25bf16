"""The prune summary table shows the chosen set's loss and a runner-up of the same size (issue 25)."""

from __future__ import annotations

import pytest
import torch

import moe_fast
from moe_fast.pruning.report import LayerResult, PruneReport
from helpers.tiny_models import tiny_mixtral


def _row(table: str, layer: int) -> list[str]:
    for line in table.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] == str(layer):
            return cells
    raise AssertionError(f"no row for layer {layer} in\n{table}")


def test_greedy_layer_shows_the_chosen_loss_not_a_smaller_partial_set() -> None:
    # Greedy dropping 2 of 4 scores the one-expert drops on the way: their losses are smaller.
    loss = {"0": 1.0, "1": 2.0, "2": 3.0, "3": 4.0, "0,1": 30.0, "0,2": 20.0, "0,3": 25.0}
    report = PruneReport(layers={0: LayerResult([1, 3], [0, 2], loss, "greedy")})
    cells = _row(report.table(), 0)
    assert cells[1:3] == ["1,3", "0,2"]
    assert float(cells[3]) == 20.0 and float(cells[4]) == 25.0 and cells[5] == "7"


def test_a_chosen_set_without_a_scored_rival_shows_nan_as_runner_up() -> None:
    report = PruneReport(layers={2: LayerResult([1], [0], {"0": 5.5}, "exhaustive")})
    cells = _row(report.table(), 2)
    assert float(cells[3]) == 5.5 and cells[4] == "nan"


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_table_of_a_real_search_matches_the_chosen_sets(search) -> None:
    torch.manual_seed(0)
    model = tiny_mixtral(3, experts=8, layers=2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    _, report = moe_fast.prune(model, ids, 4, search=search, batch_size=2, progress=False)
    table = report.table()
    for index, result in report.layers.items():
        cells = _row(table, index)
        chosen = result.loss[",".join(map(str, result.dropped))]
        rivals = [v for key, v in result.loss.items() if len(key.split(",")) == 4 and key != ",".join(map(str, result.dropped))]
        assert min(result.loss.values()) < chosen  # the partial sets greedy/beam scored on the way
        assert float(cells[3]) == pytest.approx(chosen, rel=1e-5)
        assert float(cells[4]) == pytest.approx(min(rivals), rel=1e-5) and min(rivals) >= chosen
