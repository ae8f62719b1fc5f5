"""GGUF checkpoints (llama.cpp's format) read with the ``gguf`` package and dequantized at load.

What is mapped (facts of llama.cpp's ``convert_hf_to_gguf.py`` and of the GGUF spec):

- ``general.architecture`` ``llama`` (Llama and Mistral checkpoints alike), ``qwen2``, ``qwen3``; the model's
  hyper-parameters are ``{arch}.block_count``, ``.embedding_length``, ``.feed_forward_length``,
  ``.attention.head_count(_kv)``, ``.attention.key_length``, ``.attention.layer_norm_rms_epsilon``,
  ``.rope.freq_base``, ``.rope.scaling.*``, ``.context_length``.
- Tensor names: ``token_embd``, ``output_norm``, ``output`` (absent when the embeddings are tied) and per block
  ``blk.N.{attn_q,attn_k,attn_v,attn_output,attn_norm,attn_q_norm,attn_k_norm,ffn_gate,ffn_up,ffn_down,ffn_norm}``.
- For the ``llama`` architecture the converter permutes the rows of Q and K (its rotary pairs dimensions
  ``(i, i + d/2)`` as adjacent ``(2i, 2i + 1)``); the reader undoes it, so the weights equal the HF ones.
- Llama 3.1's rope scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors.
- GGUF lists a tensor's dimensions fastest first; the numpy array is the reverse (``[out, in]`` for a linear).

Weights are dequantized to float32 with ``gguf.quants.dequantize`` (numpy) one tensor at a time and cast to the
engine dtype by the caller; keeping them quantized on the GPU is a later step (README).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .gguf_header import ARCHITECTURES


DEQUANTIZED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""Tensor types the reader dequantizes (each checked in tests/test_gguf.py)."""

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF checkpoint (all parts of a split file), opened lazily through memory maps."""

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

    def readers(self) -> list[Any]:
        from gguf import GGUFReader

        try:
            return [GGUFReader(str(p)) for p in self.parts]
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{self.parts[0]} is not a readable GGUF file: {exc}") from None


class GGUFMetadata:
    """The key/value metadata of a GGUF file (first part), with typed accessors."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConfigError(f"the GGUF metadata lacks {key!r}")
        return value

    def count(self, key: str) -> int:
        """Number of items of an array field (0 when absent), without decoding them."""
        field = self._fields.get(key)
        return 0 if field is None else len(field.data)

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"GGUF architecture {arch!r} is not supported; sglite reads {', '.join(ARCHITECTURES)}"
            )
        return arch


def is_later_split_part(path: Path) -> bool:
    """Whether ``path`` is part 2, 3, ... of a split GGUF (``name-00002-of-00003.gguf``)."""
    split = _SPLIT.match(path.name)
    return split is not None and int(split.group(2)) != 1


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
    None for tensors the decoder does not take (``rope_freqs`` is read into the config instead)."""
    block = _BLOCK.match(gguf_name)
    if block is not None:
        layer, part, kind = block.groups()
        target = _BLOCK_NAMES.get(part)
        return None if target is None else f"model.layers.{layer}.{target}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    target = _GLOBAL_NAMES.get(stem)
    return None if target is None else f"{target}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for ``num_heads`` heads (rows ``[h, d/2, 2]`` back to ``[h, 2, d/2]``)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def dequantize(tensor: Any) -> np.ndarray:
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
    # F32 tensors come back as views of the read-only memory map; torch wants memory it may write.
    return values if values.flags.writeable else values.copy()


class GGUFWeights:
    """The tensors of a GGUF checkpoint under HF names, dequantized one at a time (peak host memory: one tensor)."""

    def __init__(self, readers: list[Any], metadata: GGUFMetadata) -> None:
        self._tensors = [t for r in readers for t in r.tensors]
        self._permute = metadata.architecture == "llama"
        arch = metadata.architecture
        self._heads = int(metadata.require(f"{arch}.attention.head_count"))
        self._kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", self._heads))

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

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, float32 tensor)`` for every tensor the decoder takes, Q/K rows in HF order."""
        for t in self._tensors:
            name = hf_tensor_name(t.name)
            if name is None:
                continue
            value = torch.from_numpy(dequantize(t))
            if self._permute and ".q_proj." in name:
                value = unpermute_qk(value, self._heads)
            elif self._permute and ".k_proj." in name:
                value = unpermute_qk(value, self._kv_heads)
            yield name, value


def config_dict(metadata: GGUFMetadata, weights: GGUFWeights) -> dict[str, Any]:
    """A HF-style ``config.json`` dict for the checkpoint (what `ModelConfig.from_dict` reads)."""
    arch = metadata.architecture
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    heads = int(metadata.require(key("attention.head_count")))
    hidden = int(metadata.require(key("embedding_length")))
    names = weights.names()
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
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
    return cfg


def _embedding_rows(weights: GGUFWeights) -> int:
    return int(weights.tensor("token_embd.weight").shape[0])


def _rope_parameters(metadata: GGUFMetadata, weights: GGUFWeights, arch: str) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0))}
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
