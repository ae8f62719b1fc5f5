"""`TPGroup`: a `TPInfo` that holds its process group and runs the collectives the sharded layers call.

The process group is built directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over a ``TCPStore``), not through
``torch.distributed.init_process_group``: that would set torch's global default group, and an engine process may
build (and shut down) several engines. Every collective is a method of this object, so what a layer reaches is
exactly the group it was built with.

Startup agreement (who is alive, the free memory of each rank) goes over the store (`exchange`), not the process
group: every rank watches its peers while it waits (``check_peers``): rank 0 reports a rank that failed to load with
that rank's own error, and the other ranks leave as soon as a peer reported one, instead of waiting for a collective
or the startup timeout.

The group is on one host, so nothing of it listens beyond the loopback interface: the store's server is handed a
socket bound to 127.0.0.1 (``TCPStore`` itself would listen on every interface), gloo's device is 127.0.0.1 (by
default it uses the hostname's address), and NCCL's bootstrap sockets use ``lo`` (``NCCL_SOCKET_IFNAME``, unless the
environment sets it).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .distributed import TPInfo

__all__ = ["LOOPBACK", "CommStats", "PeerFailure", "RankFailure", "TPGroup", "connect_store", "loopback_env"]

STARTUP_TIMEOUT_S = 1800.0  # loading a large shard from a slow disk; a dead peer is noticed sooner (check_peers)
IDLE_TIMEOUT = timedelta(days=365)  # a follower waits this long for the next step (an idle engine sends none)
POLL_S = 0.05  # how often a rank waiting in `exchange` looks at its peers
LOOPBACK = "127.0.0.1"


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, hung or failed: the engine cannot run another step and must be relaunched."""


class PeerFailure(RankFailure):
    """Another rank reported a startup error while this one waited for it (that rank's report names the cause)."""


@dataclass
class CommStats:
    """Host time spent in collectives on this rank (on CUDA only the enqueueing time: NCCL runs asynchronously)."""

    all_reduce_seconds: float = 0.0
    all_reduces: int = 0
    gather_seconds: float = 0.0
    broadcast_seconds: float = 0.0


def connect_store(port: int, size: int, is_master: bool) -> dist.TCPStore:
    """The rendezvous store on this host (rank 0 listens: ``port=0`` picks a free port, read it from ``.port``).

    Rank 0's server listens on ``LOOPBACK`` only: the store takes over a socket bound there (its ``host`` argument
    is only where clients dial; left to itself it would listen on every interface, unauthenticated)."""
    timeout = timedelta(seconds=STARTUP_TIMEOUT_S)
    if not is_master:
        return dist.TCPStore(LOOPBACK, port, size, False, timeout=timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((LOOPBACK, port))
        listener.listen(max(128, size))
        port = listener.getsockname()[1]
    except BaseException:
        listener.close()
        raise
    # detach: the store owns the descriptor from here on and closes it when it is destroyed
    return dist.TCPStore(LOOPBACK, port, size, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())


def loopback_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with NCCL's and gloo's socket interface set to ``lo`` where it names none: the ranks of a group on
    one host have nothing to say to another host, and these bootstrap sockets take no authentication."""
    return {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo", **env}


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
        group = cls(rank, size, store=store, device=device,
                    check_peers=check_peers or (lambda: _raise_peer_error(store, rank, size)))
        group.exchange("hello", "")
        prefixed = dist.PrefixStore("tp", store)
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            os.environ.update(loopback_env(dict(os.environ)))  # read by NCCL when the communicator starts
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
            pg = dist.ProcessGroupGloo(prefixed, rank, size, options)
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
            RankFailure: ``check_peers`` found a dead or failed peer while waiting (`PeerFailure` on ranks > 0), or
                the startup timeout passed.
        """
        self.store.set(f"{key}/{self.rank}", value)
        keys = [f"{key}/{r}" for r in range(self.size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            if self.check_peers is not None:
                self.check_peers()
            if time.monotonic() > deadline:
                raise RankFailure(f"tensor-parallel ranks did not reach {key!r} within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)
        return [self.store.get(k).decode() for k in keys]


def _raise_peer_error(store: dist.Store, rank: int, size: int) -> None:
    """A waiting rank's ``check_peers``: `PeerFailure` once another rank reported a startup error (``error/R``)."""
    for peer in range(size):
        key = f"error/{peer}"
        if peer != rank and store.check([key]):
            raise PeerFailure(f"tensor-parallel rank {peer} failed to start: {store.get(key).decode()}")
