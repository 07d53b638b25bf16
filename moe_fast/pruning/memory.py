"""Peak memory and wall time of a pruning run, as the report records them."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

from moe_fast.host.ram import peak_rss_bytes


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak device memory: CUDA max allocated, or the process's max resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_max_rss"


class Timings:
    """Seconds per phase, summed over layers; the keys keep the order the report shows them in."""

    def __init__(self, *phases: str) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = dict.fromkeys(phases, 0.0)

    def since_start(self) -> float:
        return time.perf_counter() - self.start

    def mark(self, name: str) -> None:
        """``name`` takes the time since the run started (the calibration phase, the total)."""
        self.seconds[name] = self.since_start()

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
