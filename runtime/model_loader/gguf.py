"""GGUF checkpoints (llama.cpp's format) read by `gguf_header.read_gguf` and dequantized at load by the ``gguf`` package.

What is mapped (facts of llama.cpp's ``convert_hf_to_gguf.py`` and of the GGUF spec):

- ``general.architecture`` ``llama`` (Llama and Mistral checkpoints alike; Mixtral when ``llama.expert_count`` > 0),
  ``qwen2``, ``qwen3``, ``qwen2moe``, ``qwen3moe``, ``deepseek2``; the model's hyper-parameters are
  ``{arch}.block_count``, ``.embedding_length``, ``.feed_forward_length``, ``.attention.head_count(_kv)``,
  ``.attention.key_length``, ``.attention.layer_norm_rms_epsilon``, ``.rope.freq_base``, ``.rope.scaling.*``,
  ``.context_length``; experts:
  ``.expert_count``, ``.expert_used_count``, ``.expert_feed_forward_length``, ``.expert_shared_feed_forward_length``
  (HF's ``num_experts`` / ``num_local_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
  ``shared_expert_intermediate_size``; ``norm_topk_prob`` is llama.cpp's fixed choice per architecture, see
  `_moe_config`).
- Tensor names (`gguf_names`): ``token_embd``, ``output_norm``, ``output`` (absent when the embeddings are tied) and
  per block ``blk.N.{attn_q,attn_k,attn_v,attn_output,attn_norm,attn_q_norm,attn_k_norm,ffn_gate,ffn_up,ffn_down,
  ffn_norm}``; experts ``ffn_gate_inp`` (router), ``ffn_{gate,up,down}_exps`` (stacked, 3-D) and Qwen2-MoE's shared
  expert ``ffn_{gate,up,down}_shexp`` + ``ffn_gate_inp_shexp``. Old Mixtral files with one tensor per expert
  (``blk.N.ffn_gate.E.weight``) are stacked at load into today's layout.
- ``deepseek2`` (DeepSeek-V2 / V2-Lite / V3 / R1 / Moonlight): multi-head latent attention, DeepSeek-MoE and YaRN keys,
  V2 or V3 by the routing function, the up-projection split or whole: `gguf_deepseek`.
- For the ``llama`` architecture (Mixtral included) the converter permutes the rows of Q and K (its rotary pairs
  dimensions ``(i, i + d/2)`` as adjacent ``(2i, 2i + 1)``); the reader undoes it, so the weights equal the HF ones.
- Llama 3.1's rope scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors.
- GGUF lists a tensor's dimensions fastest first; the numpy array is the reverse (``[out, in]`` for a linear,
  ``[experts, out, in]`` for stacked experts).

Weights are dequantized to float32 with ``gguf.quants.dequantize`` (numpy) one tensor at a time and cast to the
engine dtype by the caller, except the linears the checkpoint keeps in their blocks (`gguf_quant`: on the CPU), which
come as the file's bytes (Q/K rows un-permuted alike: a row of blocks is a row of the weight).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .gguf_deepseek import deepseek_config, deepseek_rope, merge_kv_b
from .gguf_header import ARCHITECTURES, MOE_ARCHITECTURES, SIGMOID_ARCHITECTURES, SIGMOID_GATING
from .gguf_quant import blocks, quantized_name
from .gguf_header import GGUFPart, GGUFTensor, read_gguf
from .gguf_names import (DEEPSEEK_SHARED, MIXTRAL_MOE_PREFIX, MLA_SPLIT, MOE_PREFIX, OLD_EXPERT, SHARED_EXPERT,
                         hf_tensor_name)


DEQUANTIZED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""Tensor types the reader dequantizes (each checked in tests/test_gguf.py)."""

_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF checkpoint (all parts of a split file); `read` parses their metadata and tensor tables."""

    parts: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """A ``.gguf`` file; for the first part of a split (``name-00001-of-00003.gguf``) all parts are used.

        Raises:
            ConfigError: the file is missing, a split part is missing, or it is not a GGUF file.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist")
        split = _SPLIT.match(path.name)
        if split is None:
            return cls((path,))
        stem, count = split.group(1), int(split.group(3))
        parts = tuple(path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise ConfigError(f"split GGUF {path.name} lacks part(s) {', '.join(missing)} in {path.parent}")
        return cls(parts)

    def read(self) -> list[GGUFPart]:
        """Every part's metadata and tensor table (`gguf_header.read_gguf`: arrays such as the vocabulary are not decoded,
        tensor data are memory-mapped).

        Raises:
            ConfigError: a part is not a readable GGUF file (the message says why).
        """
        parts = []
        for path in self.parts:
            try:
                parts.append(read_gguf(path))
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None
        return parts


class GGUFMetadata:
    """The key/value metadata of a GGUF file (first part), with typed accessors."""

    def __init__(self, part: GGUFPart) -> None:
        self._part = part

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (an array as a list, decoded on each call), or ``default``."""
        return self._part.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConfigError(f"the GGUF metadata lacks {key!r}")
        return value

    def count(self, key: str) -> int:
        """Number of items of an array field (0 when absent), without decoding them."""
        return self._part.count(key)

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"GGUF architecture {arch!r} is not supported; sglite reads {', '.join(ARCHITECTURES)}"
            )
        return arch

    @property
    def hf_architecture(self) -> str:
        """The HF architecture the file holds: ``llama`` with experts is Mixtral (`MOE_ARCHITECTURES`), ``deepseek2``
        with sigmoid routing DeepSeek-V3 (`SIGMOID_ARCHITECTURES`)."""
        arch = self.architecture
        if arch in MOE_ARCHITECTURES and int(self.get(f"{arch}.expert_count") or 0) > 0:
            return MOE_ARCHITECTURES[arch]
        if arch in SIGMOID_ARCHITECTURES and self.get(f"{arch}.expert_gating_func") == SIGMOID_GATING:
            return SIGMOID_ARCHITECTURES[arch]
        return ARCHITECTURES[arch]


def is_later_split_part(path: Path) -> bool:
    """Whether ``path`` is part 2, 3, ... of a split GGUF (``name-00002-of-00003.gguf``)."""
    split = _SPLIT.match(path.name)
    return split is not None and int(split.group(2)) != 1


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for ``num_heads`` heads (rows ``[h, d/2, 2]`` back to ``[h, 2, d/2]``)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """float32 numpy array of a GGUF tensor, in numpy dimension order.

    Raises:
        ConfigError: the tensor type is not in `DEQUANTIZED_TYPES`.
    """
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in DEQUANTIZED_TYPES:
        raise ConfigError(
            f"GGUF tensor {tensor.name} is {kind}, which sglite cannot dequantize; supported: "
            f"{', '.join(DEQUANTIZED_TYPES)}"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    return values  # F32 comes back as `GGUFTensor.data` itself: a fresh array torch may write


class GGUFWeights:
    """The tensors of a GGUF checkpoint under HF names, dequantized one at a time (peak host memory: one tensor)."""

    def __init__(self, parts: list[GGUFPart], metadata: GGUFMetadata) -> None:
        self._tensors = [t for part in parts for t in part.tensors]
        self._permute = metadata.architecture == "llama"
        arch = metadata.architecture
        self._heads = int(metadata.require(f"{arch}.attention.head_count"))
        self._kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", self._heads))
        self._experts = int(metadata.get(f"{arch}.expert_count") or 0)
        mixtral = metadata.hf_architecture == MOE_ARCHITECTURES.get(arch)
        self._moe_prefix = MIXTRAL_MOE_PREFIX if mixtral else MOE_PREFIX
        self._shared = DEEPSEEK_SHARED if arch == "deepseek2" else SHARED_EXPERT

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> set[str]:
        """GGUF names of every tensor."""
        return {t.name for t in self._tensors}

    def tensor(self, gguf_name: str) -> np.ndarray:
        """One tensor by its GGUF name, dequantized (no Q/K unpermutation)."""
        return dequantize(next(t for t in self._tensors if t.name == gguf_name))

    def type_counts(self) -> Counter[str]:
        """How many tensors of each GGUF type (``{"Q4_1": 210, "F32": 61, ...}``)."""
        return Counter(t.tensor_type.name for t in self._tensors)

    def file_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self._tensors)

    def hf_types(self) -> Iterator[tuple[str, str, int]]:
        """``(hf_name, GGML type name, number of dims)`` of every tensor that has an HF name of its own (read from
        the header only)."""
        for t in self._tensors:
            name = hf_tensor_name(t.name, self._moe_prefix, self._shared)
            if name is not None:
                yield name, t.tensor_type.name, len(t.shape)

    def items(self, kept: Mapping[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, float32 tensor)`` for every tensor the decoder takes, Q/K rows in HF order, experts stacked
        (``[E, I, H]`` / ``[E, H, I]``), Qwen2-MoE's shared-expert gate as ``[1, H]`` (GGUF stores it 1-D),
        DeepSeek's ``attn_k_b`` + ``attn_v_b`` merged into ``kv_b_proj``. The linears in ``kept`` (checkpoint
        module -> type, `gguf_quant`) come as their blocks instead, under `gguf_quant.quantized_name`."""
        pending: dict[tuple[str, str], dict[int, np.ndarray]] = {}
        latent: dict[str, dict[str, np.ndarray]] = {}
        for t in self._tensors:
            old, split = OLD_EXPERT.match(t.name), MLA_SPLIT.match(t.name)
            if old is not None:
                yield from self._stack_old_experts(pending, old.groups(), dequantize(t))
                continue
            if split is not None:
                yield from _merge_kv_b(latent, split.groups(), dequantize(t))
                continue
            name = hf_tensor_name(t.name, self._moe_prefix, self._shared)
            if name is None:
                continue
            kind = kept.get(name.removesuffix(".weight")) if kept else None
            if kind is not None:
                name, value = quantized_name(name.removesuffix(".weight"), kind), blocks(t)
            else:
                value = torch.from_numpy(dequantize(t))
            if self._permute and ".q_proj." in name:
                value = unpermute_qk(value, self._heads)
            elif self._permute and ".k_proj." in name:
                value = unpermute_qk(value, self._kv_heads)
            elif name.endswith(".shared_expert_gate.weight"):
                value = value.reshape(1, -1)
            yield name, value
        if pending:
            raise ConfigError(f"GGUF experts incomplete: layer/projection {sorted(pending)} lacks some of "
                              f"{self._experts} experts")
        if latent:
            raise ConfigError("GGUF " + "; ".join(
                f"layer {layer} has attn_{part}_b without attn_{'v' if part == 'k' else 'k'}_b"
                for layer, parts in sorted(latent.items(), key=lambda item: int(item[0])) for part in parts)
                + " (llama.cpp splits kv_b_proj into both)")

    def _stack_old_experts(self, pending: dict[tuple[str, str], dict[int, np.ndarray]], key: tuple[str, str, str],
                           value: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        """llama.cpp's first Mixtral files hold one tensor per expert (``blk.N.ffn_gate.E.weight``): gather a
        layer's projection until all `expert_count` experts are in, then yield them stacked like today's files."""
        layer, proj, expert = key
        if int(expert) >= self._experts:
            raise ConfigError(f"GGUF tensor blk.{layer}.ffn_{proj}.{expert}.weight: expert {expert} of "
                              f"expert_count={self._experts}")
        experts = pending.setdefault((layer, proj), {})
        experts[int(expert)] = value
        if len(experts) == self._experts:
            del pending[(layer, proj)]
            stacked = np.stack([experts[e] for e in range(self._experts)])
            yield f"model.layers.{layer}.{self._moe_prefix}.experts.{proj}_proj", torch.from_numpy(stacked)


def config_dict(metadata: GGUFMetadata, weights: GGUFWeights) -> dict[str, Any]:
    """A HF-style ``config.json`` dict for the checkpoint (what `ModelConfig.from_dict` reads)."""
    arch = metadata.architecture
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    heads = int(metadata.require(key("attention.head_count")))
    hidden = int(metadata.require(key("embedding_length")))
    names = weights.names()
    cfg: dict[str, Any] = {
        "architectures": [metadata.hf_architecture],
        "model_type": arch,
        "vocab_size": int(metadata.get(key("vocab_size")) or metadata.count("tokenizer.ggml.tokens") or _embedding_rows(weights)),
        "hidden_size": hidden,
        "intermediate_size": int(metadata.require(key("feed_forward_length"))),
        "num_hidden_layers": int(metadata.require(key("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get(key("attention.head_count_kv"), heads)),
        "head_dim": int(metadata.get(key("attention.key_length")) or hidden // heads),
        "rms_norm_eps": float(metadata.get(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        "max_position_embeddings": int(metadata.get(key("context_length"), 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_output.bias" in names,  # q/k/v/o biases (Qwen2 has q/k/v ones by arch)
        "rope_parameters": _rope_parameters(metadata, weights, arch),
        "eos_token_id": eos_token_ids(metadata),
        "dtype": "float32",
    }
    cfg.update(_moe_config(metadata, weights))
    if arch == "deepseek2":
        cfg.update(deepseek_config(metadata, names))
    return cfg


def _merge_kv_b(latent: dict[str, dict[str, np.ndarray]], key: tuple[str, str],
                value: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
    """Gather a layer's ``attn_k_b`` and ``attn_v_b``; once both are in, yield HF's ``kv_b_proj`` weight."""
    layer, part = key
    parts = latent.setdefault(layer, {})
    parts[part] = value
    if len(parts) == 2:
        del latent[layer]
        yield f"model.layers.{layer}.self_attn.kv_b_proj.weight", torch.from_numpy(merge_kv_b(parts["k"], parts["v"]))


_MOE_MODEL_TYPES = {"Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
                    "MixtralForCausalLM": "mixtral"}


def _moe_config(metadata: GGUFMetadata, weights: GGUFWeights) -> dict[str, Any]:
    """HF's expert keys of a mixture of experts (``{}`` for a dense model), with llama.cpp's routing.

    The GGUF has no key for renormalising the top-k weights: llama.cpp's graphs hard-code it (``build_moe_ffn``'s
    ``norm_w``: true in ``src/models/qwen3moe.cpp`` and for ``llama`` experts, false in ``qwen2moe.cpp``), so that is
    what a GGUF model computes whatever its HF config said; transformers' GGUF reader also sets ``norm_topk_prob``
    true for qwen3_moe. Absent expert widths fall back as llama.cpp's do (``feed_forward_length / expert_used_count``
    for the experts, ``feed_forward_length`` for the shared one). A layer without a router is dense (llama.cpp's
    converter writes its FFN as ``ffn_gate/up/down``): `mlp_only_layers` lists those.
    """
    arch, hf_arch = metadata.architecture, metadata.hf_architecture
    if hf_arch not in _MOE_MODEL_TYPES:
        return {}
    key = lambda name: f"{arch}.{name}"
    experts, used = int(metadata.require(key("expert_count"))), int(metadata.require(key("expert_used_count")))
    if hf_arch == "MixtralForCausalLM":  # experts as wide as feed_forward_length, always renormalised
        return {"model_type": "mixtral", "num_local_experts": experts, "num_experts_per_tok": used}
    ffn, names = int(metadata.require(key("feed_forward_length"))), weights.names()
    layers = int(metadata.require(key("block_count")))
    cfg: dict[str, Any] = {
        "model_type": _MOE_MODEL_TYPES[hf_arch],
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(metadata.get(key("expert_feed_forward_length")) or ffn // used),
        "norm_topk_prob": arch == "qwen3moe",
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names],
    }
    if arch == "qwen2moe":
        cfg["shared_expert_intermediate_size"] = int(metadata.get(key("expert_shared_feed_forward_length")) or ffn)
        cfg["qkv_bias"] = "blk.0.attn_q.bias" in names
    return cfg


def _embedding_rows(weights: GGUFWeights) -> int:
    return int(weights.tensor("token_embd.weight").shape[0])


def _rope_parameters(metadata: GGUFMetadata, weights: GGUFWeights, arch: str) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0))}
    if arch == "deepseek2":
        return deepseek_rope(metadata, params["rope_theta"])
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in weights.names():
        params["rope_type"] = "factors"
        params["freq_factors"] = [float(x) for x in weights.tensor("rope_freqs.weight").reshape(-1)]
    elif scaling in (None, "none"):
        params["rope_type"] = "default"
    elif scaling == "linear":
        params.update(rope_type="linear", factor=float(metadata.require(f"{arch}.rope.scaling.factor")))
    else:
        raise ConfigError(f"GGUF rope scaling {scaling!r} is not supported; sglite reads none, linear and "
                          "Llama 3.1's rope_freqs")
    return params


def eos_token_ids(metadata: GGUFMetadata) -> list[int]:
    """End-of-generation ids from the metadata: ``tokenizer.ggml.eos_token_id`` and ``eot_token_id``."""
    ids = [metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return sorted({int(i) for i in ids if i is not None})
