"""Which Xinference model specs sglite can serve: checkpoint formats, GGUF file types, architectures, abilities.

Read when Xinference builds its engine tables (supervisor and worker, for every family), so nothing here imports
torch or xinference (the architectures come from the torch-free ``runtime.models.registry``); a local checkpoint's
architecture is read from its ``config.json`` or GGUF header.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from ..runtime.models.registry import SUPPORTED_ARCHITECTURES, supported_architecture

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2, LLMSpecV1

SUPPORTED_FORMAT = "pytorch"  # Xinference's name for unquantized HF checkpoints (safetensors or .bin)
GGUF_FORMAT = "ggufv2"  # llama.cpp files; dequantized at load
# GGUF file quantizations (llama.cpp's names) whose tensor types the runtime dequantizes (runtime.models.gguf)
GGUF_QUANTIZATIONS = re.compile(r"(?i)^(F32|F16|BF16|Q8_0|Q4_0|Q4_1|Q5_0|Q5_1|Q2_K(_S)?|Q3_K_[SML]|Q4_K_[SM]|Q5_K_[SM]|Q6_K)$")
_TEXT_ONLY_BLOCKERS = ("vision", "audio", "omni", "embed")

Match = Union[bool, Tuple[bool, str]]


def match_model(family: "LLMFamilyV2", spec: "LLMSpecV1", quantization: str, need_chat: bool) -> Match:
    """``True`` when sglite can serve ``spec`` of ``family`` (with chat, for ``need_chat``), else ``(False,
    reason)``: the reason is shown in ``/v1/engines/{model}`` and the web UI."""
    archs = _architectures(family, spec)
    problem = (
        _format_problem(spec, quantization)
        or _architecture_problem(family, archs)
        or _ability_problem(family, need_chat)
    )
    return (False, problem) if problem else True


def _serves() -> str:
    return (
        f"sglite serves {SUPPORTED_FORMAT} (safetensors) and {GGUF_FORMAT} checkpoints of "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _format_problem(spec: "LLMSpecV1", quantization: str) -> Optional[str]:
    """Why the checkpoint format or quantization rules the spec out; ``None`` when they do not."""
    fmt = spec.model_format
    if fmt not in (SUPPORTED_FORMAT, GGUF_FORMAT):
        return f"{_serves()}; this spec is {fmt}"
    if fmt == SUPPORTED_FORMAT and quantization not in (None, "", "none"):
        return f"{_serves()}; {fmt} specs without quantization only, this one is quantized ({quantization})"
    if fmt == GGUF_FORMAT and not GGUF_QUANTIZATIONS.match(quantization or ""):
        return (
            f"sglite dequantizes GGUF files of types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K quants "
            f"Q2_K..Q6_K; this spec is {quantization}"
        )
    return None


def _architecture_problem(family: "LLMFamilyV2", archs: List[str]) -> Optional[str]:
    """Why the architectures ``archs`` rule the family out (unknown or unsupported); ``None`` when they do not."""
    if not archs:
        return (
            f"{_serves()}; the architecture of {family.model_name} is unknown: add "
            f'"architectures": ["Qwen2ForCausalLM"] (or another one) to the model registration'
        )
    if supported_architecture(archs) is None:
        return f"{_serves()}; {family.model_name} is {', '.join(archs)}"
    return None


def _ability_problem(family: "LLMFamilyV2", need_chat: bool) -> Optional[str]:
    """Why the family's abilities rule it out (not text-only, no chat / generate); ``None`` when they do not."""
    abilities = set(family.model_ability or [])
    blocked = [a for a in _TEXT_ONLY_BLOCKERS if a in abilities]
    if blocked:
        return f"sglite serves text-only models; {family.model_name} has {', '.join(blocked)} ability"
    if need_chat and "chat" not in abilities:
        return "the sglite chat engine needs a family with chat ability"
    if not need_chat and "generate" not in abilities and "chat" not in abilities:
        return "sglite needs a family with generate or chat ability"
    return None


def _architectures(family: "LLMFamilyV2", spec: "LLMSpecV1") -> List[str]:
    """The family's architectures, else those of a local checkpoint's config.json (custom registrations)."""
    resolve = getattr(family, "_resolve_architectures", None)
    archs = resolve() if callable(resolve) else getattr(family, "architectures", None)
    if archs:
        return list(archs)
    uri = getattr(spec, "model_uri", None) or ""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if path and spec.model_format == GGUF_FORMAT:
        return _gguf_architectures(path, spec)
    config = os.path.join(path, "config.json") if path else ""
    if config and os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                return list(json.load(f).get("architectures") or [])
        except (OSError, ValueError):
            return []
    return []


def _gguf_architectures(path: str, spec: "LLMSpecV1") -> List[str]:
    """The architecture of a local GGUF file, read from its header (no torch, a few hundred bytes)."""
    from ..runtime.model_loader.gguf_header import hf_architecture

    try:
        arch = hf_architecture(gguf_file(path, spec))
    except (OSError, ValueError):
        return []
    return [arch] if arch else []


def gguf_file(model_path: str, spec: "LLMSpecV1") -> str:
    """The GGUF file Xinference means: ``model_path`` itself, or the spec's file (first part of a split file)
    in the ``model_path`` folder, as Xinference's llama.cpp engine resolves it."""
    if os.path.isfile(model_path):
        return model_path
    quantization = spec.quantization
    parts = (getattr(spec, "quantization_parts", None) or {}).get(quantization)
    split_template = getattr(spec, "model_file_name_split_template", None)
    if split_template and parts:
        return os.path.join(model_path, split_template.format(quantization=quantization, part=parts[0]))
    return os.path.join(model_path, spec.model_file_name_template.format(quantization=quantization))
