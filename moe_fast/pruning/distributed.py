"""Data-parallel calibration on torch.distributed: shard batches, sum the squared errors.

Every rank holds whole calibration batches (global batch b goes to rank b % world), so each
term of the paper's objective (one batch's Frobenius norm) is computed on one rank only; the
[candidates, groups] squared errors are summed with ``all_reduce`` before the square root, and
every rank takes the same argmin. Backends: NCCL for CUDA devices, Gloo for CPU.

A rank that fails must not leave the others waiting in a collective: work between collectives
runs under :meth:`Dist.guard`, which all-reduces an error flag and, if any rank failed, raises
on every rank with the failing ranks' messages.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Callable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """Another rank (or this one) raised; raised on every rank so that none hangs."""


class Dist:
    """The process group seen by the pruner; ``world == 1`` makes every method a no-op."""

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | None = None) -> None:
        self.world, self.rank = world, rank
        self.device = device or torch.device("cpu")  # where collective tensors live

    @property
    def active(self) -> bool:
        return self.world > 1

    def batches(self, num_batches: int) -> list[int]:
        """The global calibration batch indices this rank processes (round robin)."""
        if self.active and num_batches < self.world:
            raise ValueError(
                f"{num_batches} calibration batches cannot be shared by {self.world} ranks; "
                "use more samples or a smaller --batch-size"
            )
        return list(range(self.rank, num_batches, self.world))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a tensor on ``tensor``'s device)."""
        if not self.active:
            return tensor
        buf = tensor.to(self.device).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def summed(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` on this rank (rank-local, guarded) summed over ranks: the data-parallel
        objective adds the ranks' squared errors before any square root."""
        with self.guard():
            err = compute()
        return self.sum(err)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def check(self, error: BaseException | None) -> None:
        """Collective: raises on every rank when any rank passes an error."""
        if not self.active:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        if int(flag.item()) == 0:
            return
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        if error is not None:
            raise RankFailed(f"pruning failed ({failed})") from error
        raise RankFailed(f"pruning stopped because another rank failed ({failed})")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Runs a block of rank-local work (no collectives inside); errors reach every rank."""
        if not self.active:
            yield
            return
        error = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            error = err
        self.check(error)


def current(device: torch.device | str | None = None) -> Dist:
    """The initialized default process group as a :class:`Dist`, or a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Dist()
    backend = dist.get_backend()
    if backend == "nccl":
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return Dist(dist.get_world_size(), dist.get_rank(), dev)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None, timeout_s: float = 1800.0) -> str | None:
    """Initializes the default group from torchrun's environment; returns the device to use.

    NCCL when the device is CUDA (each rank on ``cuda:LOCAL_RANK``), Gloo otherwise. The
    timeout bounds any collective a crashed peer never joins.
    """
    if not launched() or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device is not None and str(device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return device


def shutdown(wait_for_peers: bool = False) -> None:
    """Destroys the default group; ``wait_for_peers`` (after a run every rank finished) first waits
    for all ranks, so that no rank tears its connections down while rank 0 is still writing the
    checkpoint: Gloo aborts a process whose peer vanished mid-connection ("terminate called
    without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
