"""``quantization_config`` (a checkpoint's config.json) -> `QuantizationConfig` -> each linear layer's method.

Read with the rest of the config, before any weight (``ModelConfig.from_dict``), so an unsupported scheme is
refused by name at launch, saying what is served. Served: see `SUPPORTED`. Layers named in
``modules_to_not_convert`` / ``ignored_layers`` / ``ignore`` stay dense; the LM head, the embeddings, the norms and
the MoE router are never quantized here (``lm_head`` quantized by GPTQ is refused).

Torch-free (the plugin reads configs while Xinference builds its engine tables): the methods of
``layers/quantization`` are imported when a model asks for one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..layers.quantization.base import LinearMethod
    from .gguf_quant import GGUFQuantization

SUPPORTED = (
    "fp8 (float8 e4m3 weights with weight_block_size block scales or one scale per tensor, activation_scheme "
    "dynamic), compressed-tensors float-quantized (8-bit float weights per tensor, channel or block; dynamic or no "
    "activation quantization), awq (GEMM version, 4-bit with zero points) and gptq (v1 checkpoint format, 4 or 8 "
    "bits, sym true or false, desc_act true or false, any group size or -1), for dense models"
)


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 weights: ``block`` (rows, cols) of one scale, or None for one scale per channel / tensor."""

    block: tuple[int, int] | None
    per_tensor: bool = False
    scale_name: str = "weight_scale_inv"  # of block scales (compressed-tensors: weight_scale)


@dataclass(frozen=True)
class IntScheme:
    """AWQ / GPTQ integer weights."""

    fmt: Literal["awq", "gptq"]
    bits: int
    group_size: int  # -1: one group over all input features
    desc_act: bool = False
    sym: bool = False


@dataclass(frozen=True)
class QuantizationConfig:
    """The checkpoint's quantization: its ``quant_method``, the weight scheme, and the modules kept dense
    (``skip``: names or substrings of checkpoint module names; ``skip_patterns``: compressed-tensors' ``re:``)."""

    quant_method: str
    scheme: Fp8Scheme | IntScheme
    skip: tuple[str, ...] = ()
    skip_patterns: tuple[str, ...] = ()

    def is_skipped(self, module: str) -> bool:
        """Whether checkpoint module ``module`` (``model.layers.0.mlp.down_proj``) is stored dense."""
        return any(s == module or s in module for s in self.skip) or any(
            re.match(p, module) for p in self.skip_patterns)

    def method(self, modules: tuple[str, ...] = ()) -> LinearMethod:
        """The linear method of a quantized layer (one format for every layer, whatever ``modules`` it stacks)."""
        from ..layers.quantization import awq, fp8, gptq

        s = self.scheme
        if isinstance(s, Fp8Scheme):
            if s.block is None:
                return fp8.Fp8ChannelLinearMethod(per_tensor=s.per_tensor)
            return fp8.Fp8BlockLinearMethod(s.block, s.scale_name)
        if s.fmt == "awq":
            return awq.AWQLinearMethod(s.group_size)
        return gptq.GPTQLinearMethod(s.bits, s.group_size, s.desc_act, s.sym)

    def describe(self) -> str:
        dense = f"; kept dense: {', '.join(self.skip + self.skip_patterns)}" if self.skip or self.skip_patterns else ""
        return f"{self.method().describe()} ({self.quant_method}){dense}"


def linear_method(quant: QuantizationConfig | GGUFQuantization | None, prefix: str,
                  parts: tuple[str, ...] = ()) -> LinearMethod:
    """The method of the linear layer of checkpoint module ``prefix`` that stacks the checkpoint projections
    ``parts`` (``("q_proj", "k_proj", "v_proj")``; none: ``prefix`` itself).

    Raises:
        ConfigError: some of the stacked projections are kept dense and others not (one layer holds one format).
    """
    from ..layers.quantization.base import UNQUANTIZED

    if quant is None:
        return UNQUANTIZED
    names = [f"{prefix}.{p}" for p in parts] or [prefix]
    dense = [n for n in names if quant.is_skipped(n)]
    if dense and len(dense) < len(names):
        raise ConfigError(f"{', '.join(dense)} are kept dense by the quantization config but stacked in one layer "
                          f"with {', '.join(n for n in names if n not in dense)}, which are quantized")
    if dense:
        return UNQUANTIZED
    return quant.method(tuple(names))  # a small object per layer: its parameters live on the layer


def vocab_qtype(quant: QuantizationConfig | GGUFQuantization | None, module: str) -> str | None:
    """The GGUF block type the vocabulary table ``module`` (``model.embed_tokens``, ``lm_head``) is kept in; None:
    dense (every other format keeps its embeddings and LM head dense)."""
    return quant.vocab_type(module) if quant is not None and quant.quant_method == "gguf" else None


def read_quantization(cfg: dict[str, Any], moe: bool) -> QuantizationConfig | GGUFQuantization | None:
    """The ``quantization_config`` of config dict ``cfg`` (None: not quantized); ``moe``: the model has experts.
    A GGUF checkpoint states the linears it keeps in their blocks (``quant_method`` ``gguf``, `gguf_quant`).

    Raises:
        ConfigError: a scheme sglite does not serve (named, with `SUPPORTED`).
    """
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "gguf":  # experts included: they are dequantized at load, only the dense linears are kept
        from .gguf_quant import GGUFQuantization

        return GGUFQuantization.from_dict(q, cfg)
    reader = _READERS.get(method)
    if reader is None:
        _refuse(f"quantization {method or q!r}")
    if moe:
        arch = ", ".join(cfg.get("architectures") or ["?"])
        raise ConfigError(f"{method}-quantized mixture-of-experts models ({arch}) are not served yet: the fused "
                          f"experts take float32 / bfloat16 / float16 weights only; use the model's unquantized "
                          f"checkpoint (DeepSeek-V3 / R1: their BF16 conversion). sglite serves {SUPPORTED}")
    return reader(q)


def _refuse(what: str) -> None:
    raise ConfigError(f"{what} is not supported; sglite serves {SUPPORTED}")


def _skip(q: dict[str, Any], *keys: str) -> tuple[str, ...]:
    return tuple(str(n) for k in keys for n in (q.get(k) or ()))


def _read_fp8(q: dict[str, Any]) -> QuantizationConfig:
    if str(q.get("fmt", "e4m3")).lower() != "e4m3":
        _refuse(f"fp8 fmt {q['fmt']!r}")
    if str(q.get("activation_scheme", "dynamic")).lower() != "dynamic":
        _refuse(f"fp8 activation_scheme {q['activation_scheme']!r} (precomputed input scales)")
    block = q.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(int(b) for b in block) < 1):
        _refuse(f"fp8 weight_block_size {block!r}")
    scheme = Fp8Scheme(tuple(int(b) for b in block) if block else None, per_tensor=block is None)
    return QuantizationConfig("fp8", scheme, _skip(q, "ignored_layers", "modules_to_not_convert"))


def _read_awq(q: dict[str, Any]) -> QuantizationConfig:
    bits = int(q.get("bits", q.get("w_bit", 4)))
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4:
        _refuse(f"awq with {bits} bits")
    if version != "gemm":
        _refuse(f"awq version {version!r} (only the GEMM layout is read)")
    if not q.get("zero_point", True):
        _refuse("awq without zero points (zero_point false)")
    return QuantizationConfig("awq", IntScheme("awq", 4, _group(group, "awq")), _skip(q, "modules_to_not_convert"))


def _read_gptq(q: dict[str, Any]) -> QuantizationConfig:
    bits = int(q.get("bits", 4))
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if bits not in (4, 8):
        _refuse(f"gptq with {bits} bits")
    if fmt != "gptq":
        _refuse(f"gptq checkpoint_format {fmt!r} (only the v1 format 'gptq' is read)")
    if q.get("lm_head"):
        _refuse("gptq with a quantized lm_head (lm_head true)")
    for key in ("dynamic", "modules_in_block_to_quantize"):
        if q.get(key):
            _refuse(f"gptq with per-module settings ({key})")
    scheme = IntScheme("gptq", bits, _group(int(q.get("group_size", 128)), "gptq"), bool(q.get("desc_act", False)),
                       bool(q.get("sym", True)))
    return QuantizationConfig("gptq", scheme, _skip(q, "modules_to_not_convert"))


def _group(group: int, method: str) -> int:
    if group == 0 or group < -1:
        _refuse(f"{method} group_size {group}")
    return group


def _read_compressed_tensors(q: dict[str, Any]) -> QuantizationConfig:
    """llm-compressor's FP8 checkpoints (``format: float-quantized``): one weight scheme for every Linear."""
    groups = list((q.get("config_groups") or {}).values())
    if not groups:
        _refuse("compressed-tensors without config_groups")
    if q.get("kv_cache_scheme"):
        _refuse("compressed-tensors kv_cache_scheme (a quantized KV cache)")
    schemes = {_compressed_tensors_scheme(g, q.get("format")) for g in groups}
    if len(schemes) > 1:
        _refuse("compressed-tensors with several weight schemes")
    ignore = [str(i) for i in q.get("ignore") or ()]
    return QuantizationConfig("compressed-tensors", schemes.pop(), tuple(i for i in ignore if not i.startswith("re:")),
                              tuple(i[3:] for i in ignore if i.startswith("re:")))


def _compressed_tensors_scheme(group: dict[str, Any], fmt: str | None) -> Fp8Scheme:
    fmt = group.get("format") or fmt
    w, a = group.get("weights") or {}, group.get("input_activations")
    kind = f"{w.get('type')} {w.get('num_bits')}-bit weights"
    if fmt != "float-quantized" or w.get("type") != "float" or int(w.get("num_bits") or 0) != 8:
        _refuse(f"compressed-tensors {fmt} ({kind})")
    if "Linear" not in (group.get("targets") or ()):
        _refuse(f"compressed-tensors targets {group.get('targets')!r} (only Linear)")
    if w.get("dynamic") or not w.get("symmetric", True):
        _refuse(f"compressed-tensors {kind} that are dynamic or asymmetric")
    if a and (not a.get("dynamic") or a.get("type") != "float" or int(a.get("num_bits") or 0) != 8):
        _refuse("compressed-tensors static or non-FP8 input activations")
    strategy = w.get("strategy")
    if strategy == "block":
        block = w.get("block_structure") or ()
        if len(block) != 2:
            _refuse(f"compressed-tensors block_structure {block!r}")
        return Fp8Scheme((int(block[0]), int(block[1])), scale_name="weight_scale")
    if strategy in ("channel", "tensor"):
        return Fp8Scheme(None, per_tensor=strategy == "tensor")
    _refuse(f"compressed-tensors weight strategy {strategy!r}")


_READERS = {"fp8": _read_fp8, "awq": _read_awq, "gptq": _read_gptq, "compressed-tensors": _read_compressed_tensors}
