"""Which Xinference model specs sglite can serve: checkpoint formats, GGUF file types, architectures, abilities.

Read when Xinference builds its engine tables (supervisor and worker, for every spec of every family), so nothing
here imports torch (the architectures sglite builds come from the torch-free ``runtime.models.registry``, read at
each call). The architecture is decided per spec, not per family (:mod:`.spec_architecture`): a family may mix dense
and mixture-of-experts sizes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..runtime.models import registry
from .spec_architecture import GGUF_FORMAT, SpecArchitecture, gguf_file, spec_architecture

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2, LLMSpecV1

SUPPORTED_FORMAT = "pytorch"  # Xinference's name for unquantized HF checkpoints (safetensors or .bin)
# Quantized HF checkpoints served quantized (runtime.model_loader.quant_config), with the quantization names
# Xinference 4.1's catalogue spells them (Int4, 4bit, Int8-W8A16, fp8, FP8, ...) that mean a scheme sglite reads.
QUANTIZED_FORMATS = {
    "awq": (re.compile(r"(?i)^(int4|4-?bits?|awq)$"), "AWQ 4-bit (GEMM version)"),
    "gptq": (re.compile(r"(?i)^(int[48](-w[48]a16)?|[48]-?bits?)$"), "GPTQ 4-bit and 8-bit"),
    "fp8": (re.compile(r"(?i)^(fp8|none)?$"), "FP8"),
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM",
                     "DeepseekV3ForCausalLM")
# Model ids whose checkpoints are FP8 though Xinference 4.1 lists them as pytorch: deepseek-ai publishes DeepSeek-V3
# / V3-0324 / V3.1 / R1 / R1-0528 (671B, MoE) in FP8 only (their distills are other organisations' ids or dense).
NATIVE_FP8 = re.compile(r"(?i)^deepseek-ai/DeepSeek-(V3|R1)(?![\w.-]*Distill)")
# GGUF file quantizations (llama.cpp's names) whose tensor types the runtime dequantizes (runtime.models.gguf)
GGUF_QUANTIZATIONS = re.compile(r"(?i)^(F32|F16|BF16|Q8_0|Q4_0|Q4_1|Q5_0|Q5_1|Q2_K(_S)?|Q3_K_[SML]|Q4_K_[SM]|Q5_K_[SM]|Q6_K)$")
_TEXT_ONLY_BLOCKERS = ("vision", "audio", "omni", "embed")
# GGUF_FORMAT (llama.cpp files, dequantized at load) and gguf_file live with the architecture reading; the engine's
# launch imports them from here.
__all__ = ["GGUF_FORMAT", "GGUF_QUANTIZATIONS", "SUPPORTED_FORMAT", "gguf_file", "match_model"]

Match = bool | tuple[bool, str]


def match_model(family: LLMFamilyV2, spec: LLMSpecV1, quantization: str, need_chat: bool) -> Match:
    """``True`` when sglite can serve ``spec`` of ``family`` (with chat, for ``need_chat``), else ``(False,
    reason)``: the reason is shown in ``/v1/engines/{model}`` and the web UI."""
    found = spec_architecture(family, spec)
    problem = (
        _format_problem(spec, quantization)
        or _architecture_problem(family, spec, found)
        or _quantized_moe_problem(spec, found)
        or _ability_problem(family, need_chat)
    )
    return (False, problem) if problem else True


def _serves() -> str:
    return (
        f"sglite serves {SUPPORTED_FORMAT} (safetensors; {', '.join(QUANTIZED_FORMATS)} quantized for dense models) "
        f"and {GGUF_FORMAT} checkpoints of {', '.join(registry.SUPPORTED_ARCHITECTURES)}"
    )


def _format_problem(spec: LLMSpecV1, quantization: str) -> str | None:
    """Why the checkpoint format or quantization rules the spec out; ``None`` when they do not."""
    fmt = spec.model_format
    if fmt in QUANTIZED_FORMATS:
        names, served = QUANTIZED_FORMATS[fmt]
        if not names.match(quantization or ""):
            return f"sglite serves {fmt} checkpoints as {served}; this spec is {fmt} {quantization}"
        return None
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


def _architecture_problem(family: LLMFamilyV2, spec: LLMSpecV1, found: SpecArchitecture) -> str | None:
    """Why the spec's architectures rule it out (unknown, or none that sglite builds); ``None`` when they do not."""
    if not found.architectures:
        return (
            f"{_serves()}; the architecture of {family.model_name} is unknown: add "
            f'"architectures": ["Qwen2ForCausalLM"] (or another one) to the model registration'
        )
    if not any(a in registry.SUPPORTED_ARCHITECTURES for a in found.architectures):
        return f"{_serves()}; {_spec_name(family, spec)} is {', '.join(found.architectures)} ({found.source})"
    return None


def _quantized_moe_problem(spec: LLMSpecV1, found: SpecArchitecture) -> str | None:
    """Quantized mixtures of experts are refused until the fused experts take quantized weights; so are the
    ``pytorch`` specs whose checkpoint is FP8 all the same (`NATIVE_FP8`)."""
    if not any(a in MOE_ARCHITECTURES for a in found.architectures):
        return None
    if spec.model_format in QUANTIZED_FORMATS:
        return (f"sglite serves {spec.model_format} checkpoints of dense models only; this one is a mixture of "
                f"experts ({', '.join(found.architectures)}): quantized experts are not served yet")
    model_id = getattr(spec, "model_id", None) or ""
    if spec.model_format == SUPPORTED_FORMAT and NATIVE_FP8.search(model_id):
        return (f"{model_id} ships FP8 weights (quantization_config fp8 in its config.json) though the catalogue "
                f"lists it as pytorch, and sglite does not serve FP8 experts yet; a BF16 conversion registered as "
                f"a custom model loads")
    return None


def _spec_name(family: LLMFamilyV2, spec: LLMSpecV1) -> str:
    """``qwen3 30B`` (the family, and the size when the spec gives one), as the launch dialog names it."""
    size = getattr(spec, "model_size_in_billions", None)
    return f"{family.model_name} {str(size).replace('_', '.')}B" if size not in (None, "") else family.model_name


def _ability_problem(family: LLMFamilyV2, need_chat: bool) -> str | None:
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
