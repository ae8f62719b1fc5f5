"""Model layers that own their tensor-parallel sharding (`runtime.distributed.TPInfo`): each sharded layer has a
``weight_loader(param, full_checkpoint_tensor, shard_id)`` that copies its rank's slice, and ``shard_ids``, the
checkpoint tensors each of its parameters is stacked from. The generic loader (`runtime.models.loader`) asks the
layer owning a parameter; a layer without a ``weight_loader`` (norms) is replicated and takes the whole tensor."""

from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from .norm import RMSNorm
from .rotary import RotaryEmbedding
from .weights import ShardId, default_weight_loader, empty_parameter, load_slice

__all__ = [
    "LinearBase",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "ShardId",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "empty_parameter",
    "load_slice",
]
