"""`TPGroup`: a `TPInfo` that holds its process group and runs the collectives the sharded layers call.

The process group is built directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over a ``TCPStore``), not through
``torch.distributed.init_process_group``: that would set torch's global default group, and an engine process may
build (and shut down) several engines. Every collective is a method of this object, so what a layer reaches is
exactly the group it was built with.

Startup agreement (who is alive, the free memory of each rank) goes over the store (`exchange`), not the process
group: rank 0 can then watch its peers while it waits (``check_peers``) and report a rank that failed to load with
that rank's own error, instead of waiting for a collective to time out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .distributed import TPInfo

__all__ = ["CommStats", "RankFailure", "TPGroup", "connect_store"]

STARTUP_TIMEOUT_S = 1800.0  # loading a large shard from a slow disk; a dead peer is noticed sooner (check_peers)
IDLE_TIMEOUT = timedelta(days=365)  # a follower waits this long for the next step (an idle engine sends none)


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, hung or failed: the engine cannot run another step and must be relaunched."""


@dataclass
class CommStats:
    """Host time spent in collectives on this rank (on CUDA only the enqueueing time: NCCL runs asynchronously)."""

    all_reduce_seconds: float = 0.0
    all_reduces: int = 0
    gather_seconds: float = 0.0
    broadcast_seconds: float = 0.0


def connect_store(port: int, size: int, is_master: bool) -> dist.TCPStore:
    """The rendezvous store on this host (rank 0 listens: ``port=0`` picks a free port, read it from ``.port``)."""
    return dist.TCPStore("127.0.0.1", port, size, is_master, timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
                         wait_for_workers=False)


@dataclass(frozen=True, eq=False)
class TPGroup(TPInfo):
    """Rank ``rank`` of ``size`` with a live process group ``pg`` (see the module docstring).

    ``check_peers`` (rank 0 only) raises when another rank is dead or reported an error; it is called while
    waiting in `exchange`.
    """

    pg: Any = field(default=None, repr=False)
    store: Any = field(default=None, repr=False)
    device: torch.device = torch.device("cpu")
    check_peers: Callable[[], None] | None = field(default=None, repr=False)
    stats: CommStats = field(default_factory=CommStats, repr=False)

    @classmethod
    def connect(
        cls, rank: int, size: int, store: dist.Store, device: torch.device, timeout_s: float,
        check_peers: Callable[[], None] | None = None,
    ) -> "TPGroup":
        """Join the group once every rank has reached this point (so a rank that died before is reported, not
        waited for). ``timeout_s`` bounds every collective of a step: a hung peer fails the step after it."""
        group = cls(rank, size, store=store, device=device, check_peers=check_peers)
        group.exchange("hello", "")
        prefixed = dist.PrefixStore("tp", store)
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            pg = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        object.__setattr__(group, "pg", pg)  # frozen: the group is complete from here on
        return group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        start = time.perf_counter()
        self.pg.allreduce([tensor]).wait()
        self.stats.all_reduce_seconds += time.perf_counter() - start
        self.stats.all_reduces += 1
        return tensor

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """The vocabulary slices of all ranks joined on rank 0; a follower gets its own slice back (unused)."""
        start = time.perf_counter()
        logits = logits.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(logits) for _ in range(self.size)]
            self.pg.gather([parts], [logits], opts).wait()
            logits = torch.cat(parts, dim=-1)
        else:
            self.pg.gather([], [logits], opts).wait()
        self.stats.gather_seconds += time.perf_counter() - start
        return logits

    def broadcast(self, tensor: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """Rank 0's ``tensor`` into every rank's ``tensor`` (same shape and dtype); returns it. ``idle``: this
        rank may wait indefinitely (a follower waiting for the next step of an idle engine)."""
        start = time.perf_counter()
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        if idle:
            opts.timeout = IDLE_TIMEOUT
        self.pg.broadcast([tensor], opts).wait()
        if not idle:
            self.stats.broadcast_seconds += time.perf_counter() - start
        return tensor

    def exchange(self, key: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``key``, in rank order, once all ranks have given theirs (over the store).

        Raises:
            RankFailure: rank 0 only: ``check_peers`` found a dead or failed peer while waiting, or the startup
                timeout passed.
        """
        self.store.set(f"{key}/{self.rank}", value)
        keys = [f"{key}/{r}" for r in range(self.size)]
        if self.check_peers is None:
            self.store.wait(keys)
        else:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not self.store.check(keys):
                self.check_peers()
                if time.monotonic() > deadline:
                    raise RankFailure(f"tensor-parallel ranks did not reach {key!r} within {STARTUP_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        return [self.store.get(k).decode() for k in keys]
