"""The search's promise across devices and thread counts: losses that agree to TIE_RTOL are tied,
and ties go to the lexicographically smallest dropped set."""

from __future__ import annotations

import itertools
import random

import torch

from moe_fast import reference
from moe_fast.pruning import search


def _jitter(losses: list[float], rel: float, seed: int) -> list[float]:
    """Another device's losses: the same up to a relative rounding difference of at most rel."""
    rng = random.Random(seed)
    return [v * (1.0 + rng.uniform(-rel, rel)) for v in losses]


def test_near_ties_go_to_the_smallest_dropped_set() -> None:
    cands = [(0, 1), (0, 2), (1, 2), (2, 3)]
    losses = [1.0 + 1e-13, 1.0, 1.0 - 1e-13, 2.0]  # three sets tied up to rounding
    assert search.best_sets(cands, losses) == [(0, 1)]
    assert search.best_sets(cands, losses, width=3) == [(0, 1), (0, 2), (1, 2)]
    # A real difference (well above TIE_RTOL) still wins.
    assert search.best_sets(cands, [1.0, 1.0 - 1e-6, 1.0, 2.0]) == [(0, 2)]


def test_choice_is_the_same_under_device_rounding() -> None:
    # Losses with exact and near ties; every "device" perturbs them by up to 1e-12 relative (the
    # CPU and GPU kernels agree to about that) and must choose the same sets.
    rng = random.Random(0)
    cands = list(itertools.combinations(range(8), 3))
    base = [float(rng.choice([1.0, 1.5, 2.0, 2.0 + 1e-11])) for _ in cands]
    want = search.best_sets(cands, base, width=4)
    for seed in range(50):
        assert search.best_sets(cands, _jitter(base, 1e-12, seed), width=4) == want, seed


def _layer_stats(T: int = 300, E: int = 6, k: int = 2, drop: int = 2):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(T, E, generator=gen)
    M = k + drop
    # Experts 1 and 4 give the same outputs and logits: sets that swap them tie exactly in math.
    y_all = torch.randn(T, E, 16, generator=gen)
    y_all[:, 4] = y_all[:, 1]
    logits[:, 4] = logits[:, 1]
    ids = reference.route(logits, M).ids
    y = torch.gather(y_all, 1, ids.long().unsqueeze(-1).expand(T, M, 16))
    gram = reference.expert_gram(y)[0]
    tw = torch.zeros(T, M)
    tw[:, :k] = reference.route(logits, k).weights
    stats = dict(gram=gram, ids=ids, logits=logits, group=torch.arange(T) % 3, target_weights=tw, cross=None,
                 target_sq=None)
    return stats, E, k, drop


def test_search_same_for_any_thread_count_and_rounding() -> None:
    stats, E, k, drop = _layer_stats()
    old = torch.get_num_threads()
    picks = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            score = search.make_scorer(stats, E, k, True, "paper", 3)
            picks.append(search.run_search("exhaustive", score, E, drop))
            picks.append(search.run_search("beam", score, E, drop, beam_width=3))
    finally:
        torch.set_num_threads(old)
    (ex1, losses1), (bm1, _), (ex2, losses2), (bm2, _) = picks
    assert ex1 == ex2 and bm1 == bm2 and losses1 == losses2
    # Another device's rounding of the same losses picks the same set.
    cands = list(losses1)
    for seed in range(20):
        jittered = _jitter([losses1[c] for c in cands], 1e-12, seed)
        assert search.best_sets(cands, jittered) == [ex1], seed
