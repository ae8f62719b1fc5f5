"""Tensor parallelism: which shard of the model this process holds (`TPInfo`) and the collectives the sharded
layers call.

There are no process groups yet (tensor parallelism is a later issue), so every collective is the identity at
size 1 and refuses larger sizes; the layers in `runtime.layers` already hold and load the shard of a
``TPInfo(rank, size)``, so tensor parallelism only has to fill in `all_reduce` and `gather_vocab`.

Importing this module does not import torch: `TPInfo` is plain data (it can cross a process boundary as it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

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


def all_reduce(tensor: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``tp`` (row-parallel outputs, vocab-parallel embeddings)."""
    if tp.size == 1:
        return tensor
    raise NotImplementedError("tensor parallelism (all-reduce over ranks) is not implemented yet")


def gather_vocab(logits: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Every rank's vocabulary slice of ``logits [..., vocab / size]`` joined along the last dimension."""
    if tp.size == 1:
        return logits
    raise NotImplementedError("tensor parallelism (gathering logits over ranks) is not implemented yet")
