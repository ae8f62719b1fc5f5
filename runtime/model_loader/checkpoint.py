"""`Checkpoint`: what a model's files hold (config, tokenizer, EOS ids, weights), whatever their format.

Two formats, one interface, picked by `open_checkpoint` from what the path holds:

- `SafetensorsCheckpoint`: a Hugging Face folder (``config.json``, ``*.safetensors`` single or sharded with an
  index, tokenizer files, ``generation_config.json``).
- `GGUFCheckpoint`: a llama.cpp ``.gguf`` file (or a folder holding exactly one, or the first part of a split
  file); config, tokenizer, chat template and EOS from its metadata; linears kept in their blocks when asked
  (`gguf_quant`), the other weights dequantized at load.

The loader (`models.loader`) and the engine only talk to this interface.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .model_config import ModelConfig

logger = logging.getLogger(__name__)


class Checkpoint(ABC):
    """A model's files. ``path`` is what the user named (folder or file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The model's hyper-parameters as a HF ``config.json`` dict."""

    @cached_property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config_dict())

    @abstractmethod
    def load_tokenizer(self) -> Any:
        """The HF fast tokenizer of this checkpoint, its EOS token the model's end-of-turn token."""

    @abstractmethod
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation (config, generation config or GGUF metadata)."""

    @abstractmethod
    def num_tensors(self) -> int:
        """How many tensors `tensors` reads (for progress)."""

    @abstractmethod
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` pairs, one at a time (host memory holds one tensor beyond the model)."""

    def tensor_slices(self) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        """Like `tensors`, but a format that can read part of a tensor yields `LazyTensor`s: a layer's
        ``weight_loader`` then reads only its tensor-parallel slice."""
        return self.tensors()

    @abstractmethod
    def describe(self, dtype: torch.dtype, weights_bytes: int) -> str:
        """One startup-log line: the format, its storage types and what loading it as ``dtype`` costs."""


class LazyTensor:
    """A checkpoint tensor not read yet: ``shape``, and ``narrow(dim, start, length)`` reads just that part
    (safetensors' ``get_slice``). What ``layers.load_slice`` needs of a tensor, so a rank that holds a shard
    never has the whole tensor in host memory."""

    def __init__(self, part) -> None:
        self._part = part
        self.shape = torch.Size(part.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._part[(slice(None),) * dim + (slice(start, start + length),)]

    def read(self) -> torch.Tensor:
        """The whole tensor (a per-tensor scale, 0-d included)."""
        return self._part[...]


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face checkpoint folder."""

    def config_dict(self) -> dict[str, Any]:
        path = self.path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {self.path!s}: expected a Hugging Face checkpoint folder")
        return json.loads(path.read_text())

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def eos_token_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    @cached_property
    def files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.path / name for name in sorted(set(weight_map.values()))]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            others = [p.name for p in self.path.glob("*.bin")]
            hint = f" (found {', '.join(others[:3])}: only safetensors and GGUF are supported)" if others else ""
            raise ConfigError(f"no *.safetensors weights in {self.path}{hint}")
        return files

    def num_tensors(self) -> int:
        from safetensors import safe_open

        total = 0
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                total += len(list(f.keys()))
        return total

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for path in self.files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def tensor_slices(self) -> Iterator[tuple[str, LazyTensor]]:
        from safetensors import safe_open

        for path in self.files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, LazyTensor(f.get_slice(name))

    def describe(self, dtype: torch.dtype, weights_bytes: int) -> str:
        stored = self.model_config.torch_dtype or "unstated dtype"
        quant = self.model_config.quantization
        kept = f", linears kept quantized as {quant.describe()}" if quant else ""
        return (f"safetensors ({stored}, {len(self.files)} file(s)) loaded as {_dtype_name(dtype)}{kept}: "
                f"{weights_bytes / 2**30:.2f} GiB")


class GGUFCheckpoint(Checkpoint):
    """A GGUF file (all parts of a split file). ``keep_quantized``: the linears whose type has a kernel keep their
    blocks (`gguf_quant`: a quantization config in the config dict, their tensors yielded as blocks); the rest,
    and everything without it, is dequantized at load."""

    def __init__(self, path: Path, file: Path, keep_quantized: bool = False) -> None:
        from .gguf import GGUFFile, GGUFMetadata, GGUFWeights

        super().__init__(path)
        self.file = GGUFFile.open(file)
        parts = self.file.read()
        # Where the first part's tensor data starts: the header, metadata and tensor table lie before it.
        self.metadata_end = parts[0].data_offset
        self.metadata = GGUFMetadata(parts[0])
        self.weights = GGUFWeights(parts, self.metadata)
        self.keep_quantized = keep_quantized

    @cached_property
    def kept(self) -> dict[str, str]:
        """``{checkpoint module: GGML type}`` of the linears and vocabulary tables kept in their blocks (none unless
        ``keep_quantized``)."""
        from .gguf_quant import kept_modules

        if not self.keep_quantized:
            return {}
        return kept_modules(self.weights.hf_types(), mla=self.metadata.architecture == "deepseek2")

    def config_dict(self) -> dict[str, Any]:
        from .gguf import config_dict

        cfg = config_dict(self.metadata, self.weights)
        if self.kept:
            cfg["quantization_config"] = {"quant_method": "gguf", "kept": self.kept}
        return cfg

    def load_tokenizer(self) -> Any:
        """The converted tokenizer (`convert_tokenizer`), cached on disk after the first conversion
        (`gguf_tokenizer_cache`)."""
        from .gguf_tokenizer_cache import cached_tokenizer

        return cached_tokenizer(self.file.parts[0], self.metadata_end, self.convert_tokenizer)

    def convert_tokenizer(self) -> Any:
        """transformers' converter of GGUF tokenizer metadata, with the EOS token the metadata names (seconds on a
        large vocabulary: `load_tokenizer` caches it)."""
        from transformers import AutoTokenizer

        from .gguf_tokenizer import OWN_TOKENIZER, gguf_tokenizer

        if self.metadata.architecture in OWN_TOKENIZER:  # transformers' GGUF reader refuses the architecture
            return gguf_tokenizer(self.metadata)
        first = self.file.parts[0]
        tokenizer = AutoTokenizer.from_pretrained(first.parent, gguf_file=first.name)
        eos = self.metadata.get("tokenizer.ggml.eos_token_id")
        if eos is not None:
            # The converter may name another token (SmolLM2: <|im_start|>) than the metadata's EOS id.
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos))
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = self.metadata.get("tokenizer.chat_template")
        return tokenizer

    def eos_token_ids(self) -> set[int]:
        from .gguf import eos_token_ids

        return set(eos_token_ids(self.metadata))

    def num_tensors(self) -> int:
        return len(self.weights)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.weights.items(self.kept)

    def describe(self, dtype: torch.dtype, weights_bytes: int) -> str:
        types = ", ".join(f"{k} x{n}" for k, n in self.weights.type_counts().most_common())
        head = f"GGUF {self.file.parts[0].name} ({self.weights.file_bytes() / 2**30:.2f} GiB of tensors: {types})"
        size = f"{weights_bytes / 2**30:.2f} GiB in memory"
        if not self.kept:
            why = "" if self.keep_quantized else " (gguf_dequantize, tp_size > 1, or the CPU not in float32)"
            return f"{head} dequantized from {self.quantization} to {_dtype_name(dtype)}{why}: {size}"
        quant = self.model_config.quantization
        return f"{head}: {quant.describe()}; the other tensors dequantized to {_dtype_name(dtype)}: {size}"

    @property
    def quantization(self) -> str:
        """The dominant storage type of the 2-D weights (``Q4_1``), as llama.cpp names the file."""
        counts = self.weights.type_counts()
        quantized = {k: n for k, n in counts.items() if k not in ("F32",)}
        return max(quantized, key=quantized.get) if quantized else "F32"


def open_checkpoint(path: str | Path, keep_gguf_quantized: bool = False) -> Checkpoint:
    """The checkpoint at ``path``: a HF folder, a ``.gguf`` file, or a folder holding exactly one GGUF model
    (``keep_gguf_quantized``: its linears keep their blocks, `GGUFCheckpoint`).

    Raises:
        ConfigError: nothing loadable there, or several GGUF files to choose from (the message lists them).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"{path} is a file but not a .gguf file; give a checkpoint folder or a GGUF file")
        return GGUFCheckpoint(path, path, keep_gguf_quantized)
    if not path.is_dir():
        raise ConfigError(f"model path {path} does not exist")
    if (path / "config.json").is_file():
        return SafetensorsCheckpoint(path)
    from .gguf import is_later_split_part

    ggufs = sorted(p for p in path.glob("*.gguf") if not is_later_split_part(p))
    if len(ggufs) == 1:
        return GGUFCheckpoint(path, ggufs[0], keep_gguf_quantized)
    if ggufs:
        raise ConfigError(f"{path} holds {len(ggufs)} GGUF models ({', '.join(p.name for p in ggufs[:6])}); "
                          "give the path of the file to serve")
    raise ConfigError(f"{path} holds neither a config.json (Hugging Face checkpoint) nor a .gguf file")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
