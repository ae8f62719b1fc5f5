"""Xinference matching of quantized specs (issue 32 point 5), over Xinference 4.1's real catalogue: awq / gptq /
fp8 specs of dense architectures sglite builds are offered, under the quantization names the catalogue spells
(Int4, 4bit, Int8, 8bits, fp8, FP8, ...); other quantizations and quantized mixtures of experts are refused with
the reason; custom registrations of quantized folders carry their format."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from xinf_sglang.registration.matching import match_model

from .test_spec_architecture import empty_model_cache, families  # noqa: F401  (fixtures)


def _verdict(families: dict[str, Any], family: str, model_id: str, quantization: str) -> bool | tuple[bool, str]:
    fam = families[family]
    spec = next(s for s in fam.model_specs if s.model_id == model_id and s.quantization == quantization)
    return match_model(fam, spec, quantization, need_chat=True)


@pytest.mark.parametrize("family, model_id, quantization", [
    ("qwen2.5-instruct", "Qwen/Qwen2.5-7B-Instruct-AWQ", "Int4"),
    ("qwen2.5-instruct", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "Int4"),
    ("qwen2.5-instruct", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int8", "Int8"),
    ("qwen3", "Qwen/Qwen3-8B-FP8", "fp8"),
    ("Qwen3-Instruct", "Qwen/Qwen3-4B-Instruct-2507-FP8", "none"),
])
def test_quantized_dense_specs_are_offered(families, family, model_id, quantization):
    assert _verdict(families, family, model_id, quantization) is True


@pytest.mark.parametrize("family, model_id, quantization, reason", [
    ("qwen3", "Qwen/Qwen3-30B-A3B-FP8", "fp8", "mixture of experts (Qwen3MoeForCausalLM): quantized experts"),
    ("seed-oss", "QuantTrio/Seed-OSS-36B-Instruct-GPTQ-Int3", "Int3",
     "sglite serves gptq checkpoints as GPTQ 4-bit and 8-bit; this spec is gptq Int3"),
    ("glm-4.5", "QuantTrio/GLM-4.5-Air-AWQ-FP16Mix", "AWQ-FP16Mix",
     "sglite serves awq checkpoints as AWQ 4-bit (GEMM version); this spec is awq AWQ-FP16Mix"),
])
def test_other_quantizations_are_refused_with_the_reason(families, family, model_id, quantization, reason):
    verdict = _verdict(families, family, model_id, quantization)
    assert verdict is not True and reason in verdict[1]


@pytest.mark.parametrize("fmt", ["bnb", "fp4", "mlx"])
def test_formats_sglite_does_not_read_are_refused(fmt):
    family = SimpleNamespace(model_name="fam", architectures=["Qwen2ForCausalLM"], model_ability=["chat"],
                             model_family=None)
    spec = SimpleNamespace(model_format=fmt, model_uri=None, quantization="4-bit")
    ok, reason = match_model(family, spec, "4-bit", need_chat=True)
    assert not ok and reason.endswith(f"this spec is {fmt}") and "awq, gptq, fp8 quantized" in reason


def test_most_builtin_quantized_specs_of_dense_text_models_are_offered(families):
    offered: dict[str, int] = {}
    for fam in families.values():
        for spec in fam.model_specs:
            if spec.model_format in ("awq", "gptq", "fp8") and match_model(
                    fam, spec, spec.quantization, need_chat="chat" in fam.model_ability) is True:
                offered[spec.model_format] = offered.get(spec.model_format, 0) + 1
    assert offered["awq"] > 50 and offered["gptq"] > 150 and offered["fp8"] > 15, offered


@pytest.mark.parametrize("config, fmt, quantization", [
    ({"quant_method": "awq", "bits": 4}, "awq", "Int4"),
    ({"quant_method": "gptq", "bits": 8}, "gptq", "Int8"),
    ({"quant_method": "fp8"}, "fp8", "FP8"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "fp8", "FP8"),
])
def test_custom_registration_of_a_quantized_folder_names_its_format(tmp_path: Path, config, fmt, quantization):
    from xinf_sglang.registration.custom_model import _folder_spec

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "quantization_config": config}))
    _, _, spec = _folder_spec(tmp_path)
    assert (spec["model_format"], spec["quantization"]) == (fmt, quantization)
