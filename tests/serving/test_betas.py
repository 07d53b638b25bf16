"""The beta rule's one reading (moe_fast.kernels.beta_args.beta_entries / per_slot) and its per-layer checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_fast import reference
from moe_fast.kernels.beta_args import beta_entries, per_slot
from moe_fast.serving.betas import SkipCalibration, layer_betas, normalize_betas
from moe_fast.serving.skipping import quantile_betas


@pytest.mark.parametrize(
    "beta, entries",
    [(None, None), (0.5, [0.5]), ([0.2, 0.3], [0.2, 0.3]), (torch.tensor([[0.25]]), [0.25]), ((0.1,), [0.1])],
)
def test_beta_entries_reads_every_accepted_form(beta, entries):
    assert beta_entries(beta) == entries


def test_one_value_stands_for_every_slot():
    assert per_slot([0.5], 4) == [0.5, 0.5, 0.5]
    assert per_slot([0.5], 1) == [0.5]  # top-1: one (unused) slot
    assert per_slot([0.1, 0.2, 0.3], 4) == [0.1, 0.2, 0.3]


def test_skip_gaps_and_layer_betas_read_betas_alike():
    for beta in (0.5, [0.5], torch.tensor(0.5), [0.25, 0.5]):
        checked = layer_betas(beta, 3, "layer 0")
        gaps = reference.skip_gaps(beta, 3)
        assert gaps[1:] == [-math.log(b) for b in checked]


def test_layer_betas_names_the_place_of_a_bad_value():
    with pytest.raises(ValueError, match=r"layer 4 slot 2 must be in \[0, 1\]"):
        layer_betas([0.5, 1.5], 3, "layer 4")
    with pytest.raises(ValueError, match="layer 4 must be a number"):
        layer_betas(["x"], 3, "layer 4")
    with pytest.raises(ValueError, match="k - 1 = 2 betas"):
        layer_betas([0.1, 0.2, 0.3], 3, "layer 4")


def test_normalize_betas_accepts_a_calibration_for_the_same_layers():
    cal = SkipCalibration(layers=[0, 2], betas=[[0.1], [0.2]], skip_rate=[[0.5], [0.5]], quantile=0.5, num_tokens=8, top_k=2)
    assert normalize_betas(cal, [0, 2], 2) == {0: [0.1], 2: [0.2]}
    with pytest.raises(ValueError, match="calibrated for MoE layers"):
        normalize_betas(cal, [0, 1], 2)


def test_quantile_betas_is_the_clamped_quantile_per_slot():
    ratios = np.array([[0.1, 0.0], [0.3, 0.0], [0.5, 0.0]])
    assert quantile_betas(ratios, 0.5) == [pytest.approx(0.3), 0.0]
    assert quantile_betas(np.array([[1.5]]), 0.5) == [1.0]


def test_a_string_is_refused_as_betas_not_read_as_characters():
    with pytest.raises(ValueError, match="not the string '0.5'"):
        normalize_betas("0.5", [0, 1], 2)
    with pytest.raises(ValueError, match="string"):
        normalize_betas({0: "0.5"}, [0, 1], 2)
