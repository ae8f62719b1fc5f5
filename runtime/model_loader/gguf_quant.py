"""Which GGUF tensors stay in their block formats, and the `GGUFQuantization` that gives their layers the GGUF
storage (``layers/quantization/gguf.py``).

Kept quantized, when their type has a kernel (`KEPT_TYPES`): the 2-D weights of the linears the model builds through
``quant_config.linear_method`` (attention q/k/v/o and the gated MLP's gate/up/down, a shared expert's included),
and the vocabulary tables (the embedding, read row by row, and the LM head, or the embedding as a tied head).
A stack (q/k/v, gate/up) is kept only if all its parts are (one layer holds GGUF parameters or a dense weight,
not both): a part in Q2_K, Q3_K, an IQ type or F16 makes its stack dense. Everything else is dequantized at load
as before: norms, routers and stacked experts, multi-head latent attention (DeepSeek). Whether a run keeps any
(`keeps_blocks`): on CUDA in every model dtype (the Triton kernels, kernels/quant/gguf_triton.py), on the CPU in
float32 only (the C++ kernel takes float32 activations; in bf16 each call would dequantize its whole weight), never
with ``gguf_dequantize`` or tp_size > 1 (a row-parallel shard of a K-quant would have to start on a 256-value
super-block).

A config without a file (``load_format="dummy"``, configs/llama-3.1-8b-q4km.json) states a ``mix`` instead of the
``kept`` map: every linear and vocabulary table in the types a llama.cpp quantization gives them (`mix_types`), so
a benchmark runs a Q4_K_M model's shapes and bytes with random blocks.

The checkpoint yields a kept tensor as ``<module>.qweight_<type>`` (uint8 ``[rows, blocks, block bytes]``, the
file's bytes), the parameter name the layer declares. Torch-free at import (read with the config).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..layers.quantization.base import LinearMethod

KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
"""GGML types with a CPU kernel (``kernels/quant/gguf_reference.GGUF_BLOCKS``)."""

_LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp|mlp\.shared_expert))\.(\w+_proj)\.weight$")
VOCAB_TABLES = ("model.embed_tokens", "lm_head")
_STACKS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
"""How models/blocks.py stacks the projections into layers."""


def keeps_blocks(device_type: str, dtype: str, dequantize: bool, tp_size: int) -> bool:
    """Whether a GGUF run keeps its kept types in their blocks (the rule of the module docstring): ``device_type``
    ``cuda`` / ``cpu``, ``dtype`` the engine's (``auto``: float32 on the CPU), ``gguf_dequantize``, tp_size."""
    if dequantize or tp_size != 1:
        return False
    if device_type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None  # without it each call would dequantize its weight
    return device_type == "cpu" and dtype in ("auto", "float32")


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
    def from_dict(cls, q: dict[str, Any], cfg: dict[str, Any] | None = None) -> GGUFQuantization:
        """From the ``quantization_config`` the GGUF checkpoint puts in its config dict (``kept``), or from a
        ``mix`` (`mix_types`) over the layers of config dict ``cfg``.

        Raises:
            ConfigError: both or neither of ``kept`` and ``mix``, or a mix that is not known.
        """
        if ("kept" in q) == ("mix" in q):
            raise ConfigError(f"a gguf quantization_config states either 'kept' or 'mix', got keys {sorted(q)}")
        if "kept" in q:
            return cls(dict(q["kept"] or {}))
        cfg = cfg or {}
        return cls(mix_types(str(q["mix"]), int(cfg.get("num_hidden_layers") or 0),
                             bool(cfg.get("tie_word_embeddings", False))))

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


MIXES = ("Q4_K_M", "Q5_K_M") + KEPT_TYPES
"""What a ``mix`` may name: llama.cpp's K_M mixes, or one kept type for every tensor."""


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third in between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_types(mix: str, layers: int, tied: bool) -> dict[str, str]:
    """``{checkpoint module: type}`` of a dense decoder of ``layers`` layers quantized as ``mix`` by llama.cpp
    (``llama_tensor_get_type``): Q4_K_M / Q5_K_M put Q4_K / Q5_K everywhere except ``attn_v`` and ``ffn_down`` in
    Q6_K in the `_more_bits` layers and the output (or a tied embedding) in Q6_K; a kept type alone puts it
    everywhere. ConfigError for another mix."""
    if mix not in MIXES or layers < 1:
        raise ConfigError(f"gguf mix {mix!r} over {layers} layers: expected one of {', '.join(MIXES)} and "
                          f"num_hidden_layers >= 1")
    base = mix.removesuffix("_M") if mix.endswith("_K_M") else mix
    kept = {"model.embed_tokens": "Q6_K" if tied and base != mix else base}
    if not tied:
        kept["lm_head"] = "Q6_K" if base != mix else base
    for i in range(layers):
        more = base != mix and _more_bits(i, layers)
        for parent, projections in (("self_attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
            for p in projections:
                kept[f"model.layers.{i}.{parent}.{p}_proj"] = "Q6_K" if more and p in ("v", "down") else base
    return kept


def blocks(tensor: Any) -> Any:
    """A kept tensor (a `gguf_header.GGUFTensor`) as uint8 ``[rows, blocks per row, block bytes]``: the file's
    bytes, read into memory of their own (`GGUFTensor.data`)."""
    import torch
    from xinf_sglang.kernels.quant import GGUF_BLOCKS

    data = tensor.data
    return torch.from_numpy(data).reshape(data.shape[0], -1, GGUF_BLOCKS[tensor.tensor_type.name].bytes)
