"""The Hugging Face architecture of one Xinference model spec, not of its family.

Xinference 4.1 declares ``architectures`` per family, but families mix dense and mixture-of-experts (MoE) sizes:
``qwen3`` declares ``Qwen3ForCausalLM`` and ships Qwen3-30B-A3B and Qwen3-235B-A22B (``Qwen3MoeForCausalLM``);
``Qwen3-Instruct`` / ``Qwen3-Thinking`` declare ``Qwen3MoeForCausalLM`` and ship the dense Qwen3-4B-2507. Judged by
the family, sglite would offer a checkpoint it cannot build (the user downloads 60-470 GB, then the load fails) or
hide one it can. So each spec is judged on its own, from the best evidence at hand, in this order:

1. **The checkpoint, when it is local** (a custom registration's ``model_uri``, or Xinference's cache folder for
   the spec once downloaded): ``config.json``'s ``architectures``, or a GGUF file's header. This is what the
   runtime itself reads at load, so it is never wrong.
2. **Rules over what the spec says** (``RULES``; first match wins), for a checkpoint not downloaded yet:

   ============== ================================================= ===================================
   rule           when                                              architecture
   ============== ================================================= ===================================
   mixtral        "Mixtral" in the model id or the family's name    MixtralForCausalLM
   deepseek-v2    model id DeepSeek-V2* / DeepSeek-Coder-V2*        DeepseekV2ForCausalLM
   deepseek-v3    model id DeepSeek-V3 / V3.1 / R1*, and MoE        DeepseekV3ForCausalLM
   moe-sibling    family declares a dense class, and MoE            that class's MoE sibling
   dense-sibling  family declares a MoE class, and not MoE          that class's dense sibling
   ============== ================================================= ===================================

   "MoE" is :func:`is_moe`: the spec names fewer active than total parameters (Xinference's
   ``activated_size_in_billions``, "for MOE model"), its metadata (read by Xinference from the checkpoint's config)
   counts experts or says ``architecture_type: moe``, or its model id follows the MoE naming conventions
   (``-A3B``: Qwen's total-A-active sizes; ``MoE``: Qwen1.5-MoE; ``8x7B``: Mixtral's experts x size).
3. **The family's declared architectures**, otherwise.

Every MoE spec of the families with a dense sibling in Xinference 4.1's catalogue carries at least one MoE marker,
which is what lets ``dense-sibling`` read "no marker" as dense; tests/test_spec_architecture.py checks every built-in
spec against the architecture of its checkpoint. A custom MoE registration with no marker and no local checkpoint
would be judged dense: sglite still reads its config.json at load and refuses it there, by name.

Imports nothing heavy (no torch, and xinference only lazily, for its cache-folder rule): it runs in every
Xinference process, each time the engine tables or ``/v1/engines/{model}`` are built.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

GGUF_FORMAT = "ggufv2"  # Xinference's name for llama.cpp files

DENSE_TO_MOE = {
    "Qwen3ForCausalLM": "Qwen3MoeForCausalLM",
    "Qwen2ForCausalLM": "Qwen2MoeForCausalLM",
    "MistralForCausalLM": "MixtralForCausalLM",
    "Ernie4_5ForCausalLM": "Ernie4_5_MoeForCausalLM",
}
"""Dense class -> the MoE class of the same model line (same attention, experts in place of the MLP)."""
MOE_TO_DENSE = {moe: dense for dense, moe in DENSE_TO_MOE.items()}

_MOE_NAME = re.compile(r"(?i)-A\d+(\.\d+)?B\b|\bMoE\b|\b\d+x\d+(\.\d+)?B\b")
_DEEPSEEK_V2 = re.compile(r"(?i)deepseek-(coder-)?v2")
# V3, V3.1, V3-0324, R1, R1-0528 are DeepseekV3ForCausalLM; V3.2 and later are other classes.
_DEEPSEEK_V3 = re.compile(r"(?i)deepseek-(v3(\.1)?|r1)(?![.\d])")


@dataclass(frozen=True)
class SpecArchitecture:
    """A spec's architectures and where they were read (said in the reasons ``match_json`` gives)."""

    architectures: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Rule:
    """One inference rule: ``pick(declared, spec, family_name)`` names an architecture or returns None."""

    name: str
    pick: Callable[[Sequence[str], Any, str], str | None]


def is_moe(spec: Any) -> bool:
    """Whether the spec says it is a mixture of experts (see the module docstring for the markers)."""
    total, active = getattr(spec, "model_size_in_billions", None), getattr(spec, "activated_size_in_billions", None)
    if active not in (None, "") and str(active) != str(total):  # Qwen3-VL repeats the total on dense sizes
        return True
    metadata = getattr(spec, "model_metadata", None)
    if metadata is not None and (getattr(metadata, "num_experts", None)
                                 or getattr(metadata, "architecture_type", None) == "moe"):
        return True
    return bool(_MOE_NAME.search(getattr(spec, "model_id", None) or ""))


def _mixtral(declared: Sequence[str], spec: Any, family_name: str) -> str | None:
    # Mixtral fine-tunes and GGUF re-uploads get registered under Mistral families; only the name tells.
    named = f"{getattr(spec, 'model_id', None) or ''} {family_name}"
    return "MixtralForCausalLM" if "mixtral" in named.lower() else None


def _deepseek_v2(declared: Sequence[str], spec: Any, family_name: str) -> str | None:
    # DeepSeek families also hold Llama-architecture models (deepseek-llm, coder v1, the R1 distills), so the id
    # decides; every V2 (Lite, Coder-V2, V2.5) is MoE with latent attention.
    return "DeepseekV2ForCausalLM" if _DEEPSEEK_V2.search(getattr(spec, "model_id", None) or "") else None


def _deepseek_v3(declared: Sequence[str], spec: Any, family_name: str) -> str | None:
    # "R1" also names dense distills (DeepSeek-R1-0528-Qwen3-8B), hence the MoE check.
    model_id = getattr(spec, "model_id", None) or ""
    return "DeepseekV3ForCausalLM" if _DEEPSEEK_V3.search(model_id) and is_moe(spec) else None


def _moe_sibling(declared: Sequence[str], spec: Any, family_name: str) -> str | None:
    # Xinference's qwen3 family declares Qwen3ForCausalLM for its 30B-A3B and 235B-A22B sizes too.
    dense = next((a for a in declared if a in DENSE_TO_MOE), None)
    return DENSE_TO_MOE[dense] if dense and is_moe(spec) else None


def _dense_sibling(declared: Sequence[str], spec: Any, family_name: str) -> str | None:
    # Qwen3-Instruct / Qwen3-Thinking declare Qwen3MoeForCausalLM for their dense 4B-2507 size too.
    moe = next((a for a in declared if a in MOE_TO_DENSE), None)
    return MOE_TO_DENSE[moe] if moe and not is_moe(spec) else None


RULES: tuple[Rule, ...] = (
    Rule("mixtral", _mixtral),
    Rule("deepseek-v2", _deepseek_v2),
    Rule("deepseek-v3", _deepseek_v3),
    Rule("moe-sibling", _moe_sibling),
    Rule("dense-sibling", _dense_sibling),
)


def spec_architecture(family: Any, spec: Any) -> SpecArchitecture:
    """The architectures of ``spec`` of ``family``: the local checkpoint's, else a rule's, else the family's
    (possibly none: a custom family registered without ``architectures`` and not downloaded)."""
    local = _local_architecture(family, spec)
    if local is not None:
        return local
    declared = tuple(_declared(family))
    family_name = getattr(family, "model_name", "") or ""
    source = f"declared by the {family_name} family"
    for rule in RULES:
        arch = rule.pick(declared, spec, family_name)
        if arch is None:
            continue
        if arch in declared:
            return SpecArchitecture(declared, source)
        said = getattr(spec, "model_id", None) or family_name
        return SpecArchitecture((arch,), f"inferred from {said}, rule {rule.name}")
    return SpecArchitecture(declared, source)


def _declared(family: Any) -> Sequence[str]:
    """The family's architectures; a custom family naming a built-in one (``model_family``) inherits them."""
    resolve = getattr(family, "_resolve_architectures", None)
    return (resolve() if callable(resolve) else getattr(family, "architectures", None)) or ()


def _local_architecture(family: Any, spec: Any) -> SpecArchitecture | None:
    """The architectures of the spec's checkpoint when it is on this machine; None when it is not."""
    for folder in _local_folders(family, spec):
        if spec.model_format == GGUF_FORMAT:
            found = _gguf_architecture(folder, spec)
        else:
            found = _config_architecture(os.path.join(folder, "config.json"))
        if found is not None:
            return found
    return None


def _local_folders(family: Any, spec: Any) -> list:
    """Where the checkpoint may be: the spec's ``model_uri``, then Xinference's cache folder for the spec."""
    folders = []
    uri = getattr(spec, "model_uri", None) or ""
    if uri:
        folders.append(uri.removeprefix("file://"))
    try:
        from xinference.model.llm.cache_manager import LLMCacheManager
    except ImportError:  # matching outside Xinference (tools, tests): no cache folder to look at
        return folders
    try:
        folders.append(LLMCacheManager.get_cache_dir_for_spec(family.model_name, spec))
    except (AttributeError, TypeError):  # a spec or family without the fields the cache path is made of
        pass
    return folders


def _config_architecture(config: str) -> SpecArchitecture | None:
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return None
    return SpecArchitecture(tuple(archs), f"read from {config}") if archs else None


def _gguf_architecture(folder: str, spec: Any) -> SpecArchitecture | None:
    """A local GGUF file's architecture, from its header (a few hundred bytes): the HF class sglite builds for it,
    or else the GGUF name itself (``GGUF qwen35``), which no HF name equals."""
    from ..runtime.model_loader.gguf_header import hf_architecture, read_metadata_value

    try:
        path = gguf_file(folder, spec)
        if not os.path.isfile(path):
            return None
        arch = hf_architecture(path)
        gguf_arch = None if arch else read_metadata_value(path, "general.architecture")
    except (OSError, ValueError, AttributeError, KeyError, IndexError):
        return None
    if arch is None and not isinstance(gguf_arch, str):
        return None
    return SpecArchitecture((arch or f"GGUF {gguf_arch}",), f"read from the header of {path}")


def gguf_file(model_path: str, spec: Any) -> str:
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
