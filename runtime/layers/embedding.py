"""The vocabulary table, split over tensor-parallel ranks by token id: the embedding and the LM head.

Rank ``r`` holds the rows of ids ``[r * V / size, (r + 1) * V / size)``. The embedding looks up the ids in its
range, zeroes the others and sums over ranks (`runtime.distributed.all_reduce`); the LM head computes the logits
of its vocabulary slice and joins the slices (`runtime.distributed.gather_vocab`). Both are the identity at size 1.

A GGUF table may stay in its blocks (``qtype``; ``layers/quantization/gguf.py``): the head then runs the GGUF matmul
(at decode it reads a quarter of the bytes of float32 for Q8_0) and a lookup dequantizes the rows it reads into the
model's dtype (`kernels.quant.gguf_rows`: one Triton kernel on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from xinf_sglang.kernels import linear
from xinf_sglang.kernels.cpu import gguf as cpu_gguf
from xinf_sglang.kernels.quant import GGUF_BLOCKS, gguf_linear, gguf_rows, random_gguf_blocks

from ..tp.distributed import TPInfo, all_reduce, gather_vocab
from .quantization.gguf import DUMMY_SCALE, blocks_parameter, generator_on, qweight_name
from .weights import ShardId, empty_parameter, load_slice


class VocabParallelEmbedding(nn.Module):
    """Token embeddings ``[V / size, hidden]`` (``weight``, or ``qweight_<qtype>`` blocks); as a tied model's LM
    head too (`logits`)."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, qtype: str | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab = tp.shard(vocab_size, "vocab_size")
        self.qtype = qtype
        self.table_name = "weight" if qtype is None else qweight_name(qtype)
        # The dtype a lookup returns: the model's, which is the default dtype while the model is built (the
        # blocks themselves stay uint8 through the model's cast).
        self.out_dtype = torch.get_default_dtype()
        if qtype is None:
            self.weight = empty_parameter(self.vocab.size, hidden_size)
        else:
            self.register_parameter(self.table_name, blocks_parameter(qtype, self.vocab.size, hidden_size))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        """This rank's rows of the full ``[vocab_size, hidden]`` table."""
        load_slice(param.data, loaded, 0, self.vocab.start, self.vocab_size)

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows for ``ids`` in its range, zeros elsewhere: the sum over ranks is the full lookup."""
        if self.tp.size == 1:
            return self._lookup(ids)
        local = ids - self.vocab.start
        outside = (local < 0) | (local >= self.vocab.size)
        rows = self._lookup(local.masked_fill(outside, 0))
        return rows.masked_fill(outside.unsqueeze(-1), 0)

    def _lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        table = getattr(self, self.table_name)
        if self.qtype is None:
            return F.embedding(local_ids, table)
        if table.is_cpu:  # the C++ decoder: the reference's values exactly, without its dozen small ops a step
            block = GGUF_BLOCKS[self.qtype]
            rows = cpu_gguf.gguf_dequantize_cpu(table[local_ids.reshape(-1)], block, table.shape[1] * block.values)
            return rows.to(self.out_dtype).reshape(*local_ids.shape, rows.shape[-1])
        return gguf_rows(table, local_ids, self.qtype, self.out_dtype)

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random blocks with small scales for a table in blocks (``load_format="dummy"``); a dense table is
        drawn with the other dense weights."""
        if self.qtype is not None:
            table = getattr(self, self.table_name)
            in_features = table.shape[1] * GGUF_BLOCKS[self.qtype].values
            gen = generator_on(gen, table.device)
            table.data.copy_(random_gguf_blocks(table.shape[0], in_features, self.qtype, gen, DUMMY_SCALE))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(ids), self.tp)

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h @ weight.T``: the logits of this rank's vocabulary slice."""
        if self.qtype is None:
            return linear(h, self.weight)
        return gguf_linear(h, getattr(self, self.table_name), self.qtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary ``[..., vocab_size]`` (this table read as the output projection)."""
        return gather_vocab(self.local_logits(h), self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """The LM head of an untied model: a vocabulary table of its own, called on hidden states."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)
