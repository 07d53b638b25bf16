"""The sizes and choices of one demo run, with defaults that depend on the model's width."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PROSE, CODE = "builtin:python-prose", "builtin:python-code"
CALIBS = {"prose": PROSE, "code": CODE}


@dataclass
class Settings:
    """What one ``moe-fast demo`` run does. ``for_model`` fills the model-dependent fields.

    ``keeps``: experts kept per layer (r); ``seeded_keeps``: the r at which every non-random
    criterion is calibrated on ``len(calib_seeds)`` different calibration samples, so that a
    difference can be compared with its spread; ``searches``: how the reconstruction loss is
    minimised (``exhaustive`` for 8 experts, ``greedy``/``beam`` for wide models); ``repairs``: each
    repair runs (``moe_fast.prune(..., repair=...)``) on the first search's layer-wise selection at the
    seeded r, on every calibration sample of ``repair_calibs``, with its first ``repair_samples``
    sequences.
    """

    model: str = "builtin:small-mixtral"
    n_samples: int = 128  # calibration sequences per sample
    seq_len: int = 256  # calibration and evaluation window
    eval_tokens: int = 24576  # tokens scored per test split (96 windows of 256)
    task_items: int = 64  # items of each built-in task scored for accuracy (evenly spread; the tasks hold 1053-1406)
    batch_size: int = 8  # calibration sequences per group of the paper's objective
    keeps: tuple[int, ...] = ()
    seeded_keeps: tuple[int, ...] = ()
    calib_seeds: tuple[int, ...] = (0, 1, 2)
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    criteria: tuple[str, ...] = ("frequency", "reap", "ean")
    searches: tuple[str, ...] = ()
    beam_width: int = 4
    progressive: bool = True
    progressive_calibs: tuple[str, ...] = ("prose",)
    task_specific: bool = True  # also calibrate on code
    skipping: bool = True
    skip_quantile: float = 0.5
    repairs: tuple[str, ...] = ("lstsq", "merge")  # moe_fast.prune(..., repair=...) rows at the seeded r
    repair_calibs: tuple[str, ...] = ("prose",)
    repair_samples: int = 16  # the first n sequences of each calibration sample (the budget: demo/repair.py)
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def for_model(self, num_experts: int, top_k: int) -> "Settings":
        """Defaults for a model: 8 experts -> r in {6, 4, 2} searched exhaustively; wide models ->
        25% and 50% of the experts pruned, greedy and beam search, no progressive pass."""
        s = self
        if not s.keeps:
            if num_experts <= 16:
                keeps = tuple(r for r in (num_experts * 3 // 4, num_experts // 2, num_experts // 4) if r >= top_k)
            else:
                keeps = (num_experts * 3 // 4, num_experts // 2)
            s = replace(s, keeps=tuple(dict.fromkeys(keeps)))
        if s.quick:
            s = replace(s, keeps=s.keeps[:2], seeded_keeps=s.seeded_keeps or s.keeps[1:2])
        if not s.seeded_keeps:  # the middle r (4 of 8): where the criteria differ most
            s = replace(s, seeded_keeps=(s.keeps[len(s.keeps) // 2],))
        if not s.searches:
            s = replace(s, searches=("exhaustive",) if num_experts <= 16 else ("greedy", "beam"))
        if num_experts > 16 and s.progressive and "progressive" not in s.extra:
            s = replace(s, progressive=False)
        return s

    @classmethod
    def quick_settings(cls, model: str = "builtin:small-mixtral") -> "Settings":
        """A shortened run that exercises every path (for the tests, not for conclusions)."""
        return cls(
            model=model, n_samples=8, seq_len=128, eval_tokens=1024, task_items=12,
            calib_seeds=(0, 1), random_seeds=(0, 1), quick=True,
        )

    def seeds_for(self, keep: int) -> tuple[int, ...]:
        return self.calib_seeds if keep in self.seeded_keeps else self.calib_seeds[:1]
