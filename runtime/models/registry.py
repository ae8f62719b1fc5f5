"""Which Hugging Face architectures sglite builds, and the class that builds each (``module:Class`` under
``runtime.models``, imported only when `model_class` asks for it).

Torch-free on purpose: `ModelConfig` reads it to validate a checkpoint, and the plugin (``xinf_sglang.registration.matching``)
reads it whenever Xinference builds its engine tables, in processes that never load a model. Adding an
architecture: a family file next to ``llama.py`` (a `DecoderLM` subclass choosing its blocks) and one line here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import import_module
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError

MODEL_CLASSES: Mapping[str, str] = MappingProxyType({
    "DeepseekV2ForCausalLM": "deepseek:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "deepseek:DeepseekV3ForCausalLM",
    "LlamaForCausalLM": "llama:LlamaForCausalLM",
    "MistralForCausalLM": "llama:MistralForCausalLM",
    "MixtralForCausalLM": "mixtral:MixtralForCausalLM",
    "Qwen2ForCausalLM": "qwen2:Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM": "qwen2_moe:Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM": "qwen3:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "qwen3_moe:Qwen3MoeForCausalLM",
})
"""HF ``architectures`` entry -> ``module:Class`` of the model that builds it."""

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(MODEL_CLASSES)


def supported_architecture(architectures: Iterable[str]) -> str | None:
    """The first of a config's ``architectures`` that sglite builds; None when there is none."""
    return next((a for a in architectures if a in MODEL_CLASSES), None)


def model_class(architecture: str) -> Any:
    """The `DecoderLM` subclass that builds ``architecture`` (its module imported now, with torch).

    Raises:
        ConfigError: sglite does not build ``architecture`` (the message lists what it builds).
    """
    path = MODEL_CLASSES.get(architecture)
    if path is None:
        raise ConfigError(f"unsupported architecture {architecture!r}; sglite supports "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    module, _, name = path.partition(":")
    return getattr(import_module(f"{__package__}.{module}"), name)
