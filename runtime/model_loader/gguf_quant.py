"""Which GGUF tensors stay in their block formats, and the `GGUFQuantization` that gives their layers the GGUF
storage (``layers/quantization/gguf.py``).

Kept quantized, when their type has a kernel (`KEPT_TYPES`): the 2-D weights of the linears the model builds through
``quant_config.linear_method`` (attention q/k/v/o and the gated MLP's gate/up/down, a shared expert's included),
and the vocabulary tables (the embedding, read row by row, and the LM head, or the embedding as a tied head).
A stack (q/k/v, gate/up) is kept only if all its parts are (one layer holds GGUF parameters or a dense weight,
not both): a part in Q2_K, Q3_K, an IQ type or F16 makes its stack dense. Everything else is dequantized at load
as before: norms, routers and stacked experts, multi-head latent attention (DeepSeek), and every tensor on a CUDA
device (no GPU kernel yet), in another dtype than float32 or with ``gguf_dequantize``.

The checkpoint yields a kept tensor as ``<module>.qweight_<type>`` (uint8 ``[rows, blocks, block bytes]``, the
file's bytes), the parameter name the layer declares. Torch-free at import (read with the config).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..layers.quantization.base import LinearMethod

KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
"""GGML types with a CPU kernel (``kernels/quant/gguf_reference.GGUF_BLOCKS``)."""

_LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp|mlp\.shared_expert))\.(\w+_proj)\.weight$")
VOCAB_TABLES = ("model.embed_tokens", "lm_head")
_STACKS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
"""How models/blocks.py stacks the projections into layers."""


def kept_modules(tensors: Iterable[tuple[str, str, int]], mla: bool) -> dict[str, str]:
    """``{checkpoint module: GGML type}`` of the linears and vocabulary tables kept quantized, from ``(hf tensor
    name, type name, number of dims)`` of every tensor; ``mla``: the attention is DeepSeek's latent attention (built
    without methods)."""
    found: dict[str, str] = {}
    kept = {}
    for name, kind, ndim in tensors:
        match = _LINEAR.match(name)
        module = name.removesuffix(".weight")
        if match and ndim == 2 and not (mla and ".self_attn" in match.group(1)):
            found[module] = kind
        elif module in VOCAB_TABLES and ndim == 2 and kind in KEPT_TYPES:
            kept[module] = kind
    for parent in {m.rpartition(".")[0] for m in found}:
        for stack in _STACKS:
            modules = [f"{parent}.{p}" for p in stack]
            if all(found.get(m) in KEPT_TYPES for m in modules):
                kept.update((m, found[m]) for m in modules)
    return kept


def quantized_name(module: str, kind: str) -> str:
    """The checkpoint name a kept tensor is yielded under (the parameter its layer declares)."""
    from ..layers.quantization.gguf import qweight_name

    return f"{module}.{qweight_name(kind)}"


@dataclass(frozen=True)
class GGUFQuantization:
    """GGUF linears kept in their block formats: ``kept`` maps each one (checkpoint module name) to its type.
    What `quant_config.linear_method` asks of a quantization config."""

    kept: dict[str, str] = field(hash=False)
    quant_method: str = "gguf"

    @classmethod
    def from_dict(cls, q: dict[str, Any]) -> GGUFQuantization:
        """From the ``quantization_config`` the GGUF checkpoint puts in its config dict."""
        return cls(dict(q.get("kept") or {}))

    def is_skipped(self, module: str) -> bool:
        """Whether checkpoint module ``module`` is dequantized (not kept)."""
        return module not in self.kept

    def method(self, modules: tuple[str, ...] = ()) -> LinearMethod:
        """The GGUF method of the layer stacking ``modules`` (each kept)."""
        from ..layers.quantization.gguf import GGUFLinearMethod

        return GGUFLinearMethod([self.kept[m] for m in modules])

    def vocab_type(self, module: str) -> str | None:
        """The type vocabulary table ``module`` (`VOCAB_TABLES`) is kept in, or None (dequantized)."""
        return self.kept.get(module)

    def describe(self) -> str:
        linears = [k for m, k in self.kept.items() if m not in VOCAB_TABLES]
        types = ", ".join(f"{k} x{n}" for k, n in Counter(linears).most_common())
        tables = ", ".join(f"{m} {k}" for m, k in self.kept.items() if m in VOCAB_TABLES)
        return f"{len(linears)} linears kept in their GGUF blocks ({types})" + (f", and {tables}" if tables else "")


def blocks(tensor: Any) -> Any:
    """A kept tensor (a ``gguf.GGUFReader`` tensor) as uint8 ``[rows, blocks per row, block bytes]``: a copy of the
    file's bytes (the memory map is read-only, and a parameter outlives it)."""
    import numpy as np
    import torch
    from xinf_sglang.kernels.quant import GGUF_BLOCKS

    data = np.array(tensor.data, dtype=np.uint8)
    return torch.from_numpy(data).reshape(data.shape[0], -1, GGUF_BLOCKS[tensor.tensor_type.name].bytes)
