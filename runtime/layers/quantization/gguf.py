"""GGUF weights kept in llama.cpp's block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K;
``kernels/quant/gguf_reference.py`` defines them).

A linear stores its weight as the file does: ``qweight_<type>`` uint8 ``[out, in / block values, block bytes]``,
one row of blocks per output feature (rows are independent, so tensor-parallel shards and llama's Q/K row order
are plain row slices; an input shard must start on a block). ``kernels.quant.gguf_linear`` multiplies: the C++
kernel on CPU float32 activations, the Triton kernels on CUDA (float32 / bf16 / fp16), the dequantize-then-matmul
reference elsewhere.

The projections a layer stacks (q/k/v, gate/up) may have different types in one file: Q4_K_M stores ``attn_v``
as Q6_K in some layers and ``attn_q`` / ``attn_k`` as Q4_K. Such a layer keeps one parameter per type, each
holding its parts' rows (`ParamLayout.parts`), and runs one matmul per type; nothing is requantized, since
moving a block of one format into another is lossy (Q4_K's per-sub-block minimum has no Q6_K counterpart) and
padding rows to the widest format would cost memory on every row. Parts of one type share a parameter, so the
common case (every part of one type) is one matmul.

The vocabulary tables use the same storage (`blocks_parameter`, ``layers/embedding.py``): the LM head is a
`kernels.quant.gguf_linear`, an embedding lookup dequantizes the rows it reads.

With ``load_format="dummy"`` a model whose config carries a GGUF ``quantization_config`` (``mix``, e.g.
``Q4_K_M``: ``model_loader/gguf_quant.py``) draws random blocks (`init_dummy`), for benchmarks at real shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from xinf_sglang.kernels.cpu import gguf as cpu_gguf
from xinf_sglang.kernels.quant import GGUF_BLOCKS, dequantize_gguf, gguf_linear, random_gguf_blocks

from ..weights import ShardId
from .base import LinearMethod, ParamLayout


# Scale fields of dummy blocks: small enough that activations stay finite through many random layers.
DUMMY_SCALE = 0.0005


def qweight_name(qtype: str) -> str:
    """The parameter (and checkpoint tensor leaf) of a weight stored as ``qtype``: ``qweight_q4_k``."""
    return f"qweight_{qtype.lower()}"


def blocks_parameter(qtype: str, rows: int, in_features: int) -> nn.Parameter:
    """An uninitialised ``[rows, in_features]`` weight in ``qtype``'s blocks, kept as stored by the model's cast (a
    vocabulary table: ``layers/embedding.py``)."""
    layout = GGUFLinearMethod.layout(qtype, in_features, rows, None)
    param = nn.Parameter(torch.empty(layout.shape, dtype=torch.uint8), requires_grad=False)
    param.param_layout, param.keeps_dtype = layout, True
    return param


def generator_on(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen``: dummy blocks are drawn where they live (a Q4_K_M 8B model
    is GBs of random bytes, slow to draw on the CPU and copy)."""
    seed = int(torch.randint(2**31, (1,), generator=gen, device=gen.device))
    return torch.Generator(device=device).manual_seed(seed)


class GGUFLinearMethod(LinearMethod):
    """GGML blocks of ``types``: one type per stacked part, in the layer's part order (one for an unstacked
    layer)."""

    name = "gguf"

    def __init__(self, types: Sequence[str]) -> None:
        unknown = [t for t in types if t not in GGUF_BLOCKS]
        if unknown or not types:
            raise ValueError(f"GGUF types {unknown or types} are not kept quantized; kept: {', '.join(GGUF_BLOCKS)}")
        self.types = tuple(types)
        self._stored = tuple((t, qweight_name(t)) for t in dict.fromkeys(self.types))  # one parameter per type
        self._block = GGUF_BLOCKS[self.types[0]]

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        if len(set(self.types)) > 1:
            raise ValueError(f"stacked GGUF types {self.types} need the parts' sizes (stacked_layouts)")
        return [self.layout(self.types[0], in_features, out_features, None)]

    def stacked_layouts(self, in_features: int, parts: Sequence[tuple[ShardId, int]]) -> list[ParamLayout]:
        if len(parts) != len(self.types):
            raise ValueError(f"{len(parts)} stacked parts, {len(self.types)} GGUF types")
        if len(set(self.types)) == 1:
            return self.layouts(in_features, sum(rows for _, rows in parts))
        return [self.layout(t, in_features, sum(r for (_, r), pt in zip(parts, self.types) if pt == t),
                             tuple(i for (i, _), pt in zip(parts, self.types) if pt == t))
                for t in dict.fromkeys(self.types)]

    @staticmethod
    def layout(qtype: str, in_features: int, rows: int, parts: tuple[ShardId, ...] | None) -> ParamLayout:
        """``qweight_<qtype>`` of ``rows`` rows of ``in_features`` (holding stacked ``parts``, None: all)."""
        block = GGUF_BLOCKS[qtype]
        if in_features % block.values:
            raise ValueError(f"{qtype} blocks hold {block.values} input features; this layer has {in_features}")
        return ParamLayout(qweight_name(qtype), (rows, in_features // block.values, block.bytes), torch.uint8,
                           output_dim=0, input_dim=1, input_span=block.values, parts=parts)

    def _weights(self, layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(t, getattr(layer, name)) for t, name in self._stored]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if len(self._stored) == 1:  # the common case, on the decode path: as little Python as possible
            qtype, name = self._stored[0]
            if x.is_cpu and x.dtype is torch.float32 and x.dim() == 2 and x.stride(1) == 1:
                # a step's rows: straight to the C++ (gguf_linear's checks were ~8% of a batch-1 step)
                return cpu_gguf.linear_rows(x, getattr(layer, name), self._block, bias)
            return gguf_linear(x, getattr(layer, name), qtype, bias)
        weights = self._weights(layer)
        y = torch.cat(self._in_part_order(layer, {t: gguf_linear(x, w, t) for t, w in weights}, dim=-1), dim=-1)
        return y if bias is None else y + bias

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return torch.cat(self._in_part_order(layer, {t: dequantize_gguf(w, t) for t, w in self._weights(layer)}, 0))

    def _in_part_order(self, layer: nn.Module, by_type: dict[str, torch.Tensor], dim: int) -> list[torch.Tensor]:
        """The per-type results (rows of W or output features, along ``dim``) cut into the layer's parts, in the
        layer's part order."""
        if len(by_type) == 1:
            return list(by_type.values())
        pieces = {t: list(v.split([r for r, pt in zip(layer.output_sizes, self.types) if pt == t], dim=dim))
                  for t, v in by_type.items()}
        return [pieces[t].pop(0) for t in self.types]

    def init_dummy(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Random blocks with small scales (random bytes would put NaNs and huge values in the float16 fields)."""
        weights = self._weights(layer)
        on_device = generator_on(gen, weights[0][1].device)
        for t, w in weights:
            in_features = w.shape[1] * GGUF_BLOCKS[t].values
            w.data.copy_(random_gguf_blocks(w.shape[0], in_features, t, on_device, scale=DUMMY_SCALE))

    def describe(self) -> str:
        return f"gguf {' + '.join(dict.fromkeys(self.types))} blocks"
