"""Tensor parallelism: which shard of the model this process holds (`TPInfo`) and the collectives the sharded
layers call.

A `TPInfo` is plain data (it crosses a process boundary as it is, and it is what the layer tests shard with): its
collectives are the identity at size 1 and refuse larger sizes. A running tensor-parallel engine passes a
`runtime.tp_group.TPGroup` instead, a `TPInfo` that also holds the process group and runs the real collectives;
the layers call `all_reduce` / `gather_vocab` on whichever they were given, never a global group.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ShardRange:
    """``size`` consecutive items starting at ``start`` (rows, heads or columns of a full tensor)."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class TPInfo:
    """This process's place in a tensor-parallel group: ``rank`` of ``size`` (``size=1``: no parallelism)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"tensor-parallel rank {self.rank} of size {self.size}: need 0 <= rank < size")

    def divide(self, total: int, what: str) -> int:
        """``total / size``.

        Raises:
            ConfigError: ``total`` is not a multiple of the size (the message names ``what``).
        """
        if total % self.size:
            raise ConfigError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}")
        return total // self.size

    def shard(self, total: int, what: str) -> ShardRange:
        """This rank's equal part of ``total`` items (see `divide`)."""
        size = self.divide(total, what)
        return ShardRange(self.rank * size, size)

    def kv_head_shard(self, num_kv_heads: int) -> ShardRange:
        """The KV heads this rank holds: an equal part when there are at least ``size`` of them, else the one KV
        head its query heads read (KV heads replicated over ``size / num_kv_heads`` ranks).

        Raises:
            ConfigError: neither count divides the other.
        """
        if num_kv_heads >= self.size:
            return self.shard(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ConfigError(f"the tensor-parallel size {self.size} is not a multiple of num_key_value_heads "
                              f"({num_kv_heads}), so KV heads cannot be replicated evenly")
        return ShardRange(self.rank * num_kv_heads // self.size, 1)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (row-parallel outputs, vocab-parallel embeddings)."""
        if self.size == 1:
            return tensor
        raise ConfigError(f"rank {self.rank} of {self.size} has no process group: build a tp.TPGroup")

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slice of ``logits [..., vocab / size]`` joined along the last dimension, on
        rank 0 (where sampling happens); other ranks get their own slice back."""
        if self.size == 1:
            return logits
        raise ConfigError(f"rank {self.rank} of {self.size} has no process group: build a tp.TPGroup")

    def exchange(self, key: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``key`` in rank order (startup agreement: memory, reports)."""
        if self.size == 1:
            return [value]
        raise ConfigError(f"rank {self.rank} of {self.size} has no process group: build a tp.TPGroup")

    def min_over_ranks(self, key: str, values: list[int]) -> list[int]:
        """The element-wise minimum of every rank's ``values`` (exchanged under ``key``)."""
        rows = [[int(v) for v in s.split(",")] for s in self.exchange(key, ",".join(str(v) for v in values))]
        return [min(col) for col in zip(*rows)]


def all_reduce(tensor: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """``tp.all_reduce(tensor)``: the sum over the ranks of ``tp`` (the identity at size 1)."""
    return tp.all_reduce(tensor)


def gather_vocab(logits: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """``tp.gather_vocab(logits)``: the whole vocabulary's logits on rank 0 (the identity at size 1)."""
    return tp.gather_vocab(logits)
