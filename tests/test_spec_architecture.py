"""Xinference matching per spec (issue 30, point 5): each built-in spec's architecture, over Xinference 4.1's real
family list, and sglite offering a spec iff it builds that architecture (and reads the spec's format)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from xinf_sglang.registration.matching import SUPPORTED_FORMAT, match_model
from xinf_sglang.registration.spec_architecture import is_moe, spec_architecture
from xinf_sglang.runtime.models import registry

QWEN3, QWEN3_MOE = "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
# Hub facts (each checkpoint's config.json), written by hand: the families whose sizes mix dense and MoE
# checkpoints, size -> architecture ("*": every other size). Every other built-in family is what it declares.
MIXED_FAMILIES: dict[str, dict[Any, str]] = {
    "qwen3": {30: QWEN3_MOE, 235: QWEN3_MOE, "*": QWEN3},  # Qwen3-30B-A3B, Qwen3-235B-A22B
    "Qwen3-Instruct": {4: QWEN3, "*": QWEN3_MOE},  # Qwen3-4B-Instruct-2507 is dense
    "Qwen3-Thinking": {4: QWEN3, "*": QWEN3_MOE},
    "Ernie4.5": {"0_3": "Ernie4_5ForCausalLM", "*": "Ernie4_5_MoeForCausalLM"},  # ERNIE-4.5-21B-A3B, 300B-A47B
}
# Families whose declared architecture is right for every size, MoE ones included.
MOE_FAMILIES = {"Qwen3-Coder": QWEN3_MOE, "qwen2-moe-instruct": "Qwen2MoeForCausalLM",
                "qwen1.5-moe-chat": "Qwen2MoeForCausalLM", "mixtral-v0.1": "MixtralForCausalLM",
                "mixtral-instruct-v0.1": "MixtralForCausalLM", "mixtral-8x22B-instruct-v0.1": "MixtralForCausalLM",
                "deepseek-v3": "DeepseekV3ForCausalLM", "deepseek-r1": "DeepseekV3ForCausalLM",
                "deepseek-v2-chat": "DeepseekV2ForCausalLM", "deepseek-r1-distill-qwen": "Qwen2ForCausalLM",
                "deepseek-r1-0528-qwen3": QWEN3}


@pytest.fixture(scope="module")
def families() -> dict[str, Any]:
    """Xinference 4.1's built-in LLM families by name (its bundled JSON, specs flattened per hub/quantization)."""
    import xinference.model.llm  # noqa: F401  (fills the list)
    from xinference.model.llm.llm_family import BUILTIN_LLM_FAMILIES

    return {f.model_name: f for f in BUILTIN_LLM_FAMILIES}


@pytest.fixture(autouse=True)
def empty_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Xinference model cache: what the specs say decides, not what this machine downloaded."""
    import xinference.constants

    monkeypatch.setattr(xinference.constants, "XINFERENCE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def expected_architecture(family: Any, spec: Any) -> str:
    sizes = MIXED_FAMILIES.get(family.model_name)
    if sizes is None:
        return MOE_FAMILIES.get(family.model_name) or family.architectures[0]
    return sizes.get(spec.model_size_in_billions, sizes["*"])


def with_registry(monkeypatch: pytest.MonkeyPatch, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> None:
    """sglite's model registry with ``add`` (a placeholder class path: matching never imports it) and without
    ``drop``, for this test."""
    classes = {a: c for a, c in registry.MODEL_CLASSES.items() if a not in drop}
    classes.update({a: classes.get(a, "placeholder:Class") for a in add})
    monkeypatch.setattr(registry, "MODEL_CLASSES", MappingProxyType(classes))
    monkeypatch.setattr(registry, "SUPPORTED_ARCHITECTURES", tuple(classes))


def offered(family: Any, spec: Any) -> bool:
    chat = "chat" in family.model_ability
    return match_model(family, spec, spec.quantization, need_chat=chat) is True


# ---- the architecture of each built-in spec ----


def test_every_builtin_spec_gets_its_checkpoints_architecture(families: dict[str, Any]) -> None:
    assert len(families) == 171  # Xinference 4.1.0's catalogue; a new version needs MIXED_FAMILIES re-checked
    wrong = sorted({(name, spec.model_size_in_billions, spec_architecture(family, spec).architectures[0])
                    for name, family in families.items() for spec in family.model_specs
                    if spec_architecture(family, spec).architectures[0] != expected_architecture(family, spec)})
    assert wrong == []


@pytest.mark.parametrize("name", sorted(MIXED_FAMILIES))
def test_mixed_families_are_mixed_and_every_moe_spec_carries_a_marker(families: dict[str, Any], name: str) -> None:
    """What the dense-sibling rule relies on: every MoE spec says so (active size, metadata or model id)."""
    family = families[name]
    moe = {spec.model_id: is_moe(spec) for spec in family.model_specs}
    assert any(moe.values()) and not all(moe.values())
    for spec in family.model_specs:
        assert moe[spec.model_id] == ("Moe" in expected_architecture(family, spec)), spec.model_id


# ---- offered iff the architecture is supported ----


@pytest.mark.parametrize("moe_supported", [True, False], ids=["with-qwen3-moe", "without-qwen3-moe"])
def test_qwen3_spec_offered_iff_its_architecture_is_supported(families: dict[str, Any], moe_supported: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with_registry(monkeypatch, add=(QWEN3_MOE,) if moe_supported else (), drop=() if moe_supported else (QWEN3_MOE,))
    family, checked = families["qwen3"], set()
    for spec in family.model_specs:
        served_format = spec.model_format == SUPPORTED_FORMAT or (
            spec.model_format == "ggufv2" and spec.quantization in ("Q4_K_M", "Q8_0", "BF16"))
        if not served_format:
            continue
        supported = expected_architecture(family, spec) in registry.SUPPORTED_ARCHITECTURES
        assert offered(family, spec) == supported, (spec.model_id, spec.quantization)
        checked.add((spec.model_size_in_billions, supported))
    assert {(30, moe_supported), (235, moe_supported), ("0_6", True), (32, True)} <= checked


def test_the_reason_names_the_specs_architecture_and_what_sglite_builds(
        families: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    with_registry(monkeypatch, drop=(QWEN3_MOE,))
    family = families["qwen3"]
    spec = next(s for s in family.model_specs if s.model_id == "Qwen/Qwen3-30B-A3B" and s.model_format == "pytorch")
    ok, reason = match_model(family, spec, "none", need_chat=True)
    assert not ok
    assert f"{', '.join(registry.SUPPORTED_ARCHITECTURES)}; qwen3 30B is {QWEN3_MOE}" in reason
    assert "inferred from Qwen/Qwen3-30B-A3B" in reason


@pytest.mark.parametrize("name", ["Qwen3-Instruct", "Qwen3-Thinking"])
def test_the_dense_size_of_a_moe_family_is_offered_without_moe_support(
        families: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with_registry(monkeypatch, drop=(QWEN3_MOE,))
    family = families[name]
    pytorch = {s.model_size_in_billions: offered(family, s) for s in family.model_specs if s.model_format == "pytorch"}
    assert pytorch == {4: True, 30: False, 235: False}


# ---- a local checkpoint decides ----


def _spec(**kw: Any) -> SimpleNamespace:
    fields = {"model_format": "pytorch", "model_size_in_billions": 30, "activated_size_in_billions": 3,
              "quantization": "none", "model_id": "Qwen/Qwen3-30B-A3B", "model_uri": None, "model_metadata": None}
    return SimpleNamespace(**{**fields, **kw})


def _family(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(**{"model_name": "qwen3", "architectures": [QWEN3], "model_ability": ["chat"], **kw})


def test_a_custom_models_config_beats_the_rules(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    found = spec_architecture(_family(), _spec(model_uri=f"file://{tmp_path}"))
    assert found.architectures == ("LlamaForCausalLM",) and str(tmp_path) in found.source


def test_a_downloaded_spec_is_judged_by_its_cached_config(empty_model_cache: Path) -> None:
    cached = empty_model_cache / "v2" / "qwen3-pytorch-30b-none"
    assert spec_architecture(_family(), _spec()).architectures == (QWEN3_MOE,)  # not downloaded: the rule
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({"architectures": ["SomeOtherForCausalLM"]}))
    assert spec_architecture(_family(), _spec()).architectures == ("SomeOtherForCausalLM",)


def _write_gguf_header(path: Path, arch: str) -> None:
    """A GGUF v3 file holding only ``general.architecture`` (what the header reader needs)."""
    key, value = b"general.architecture", arch.encode()
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IQ", 8, len(value)) + value)


@pytest.mark.parametrize("gguf_arch, expected", [("qwen3", (QWEN3,)), ("qwen35", ("GGUF qwen35",))])
def test_a_local_gguf_is_judged_by_its_header(tmp_path: Path, gguf_arch: str, expected: tuple[str, ...]) -> None:
    _write_gguf_header(tmp_path / "model-Q8_0.gguf", gguf_arch)
    spec = _spec(model_format="ggufv2", quantization="Q8_0", model_uri=str(tmp_path),
                 model_file_name_template="model-{quantization}.gguf")
    assert spec_architecture(_family(), spec).architectures == expected
    assert offered(_family(), spec) == (expected[0] in registry.SUPPORTED_ARCHITECTURES)


# ---- the rules on their own ----


@pytest.mark.parametrize("declared, spec, expected", [
    ([QWEN3], _spec(), QWEN3_MOE),
    ([QWEN3], _spec(model_size_in_billions=32, activated_size_in_billions=None, model_id="Qwen/Qwen3-32B"), QWEN3),
    ([QWEN3_MOE], _spec(model_size_in_billions=4, activated_size_in_billions=None, model_id="x/y"), QWEN3),
    (["MistralForCausalLM"], _spec(activated_size_in_billions=None, model_id="someone/Mixtral-8x7B-ft"),
     "MixtralForCausalLM"),
    (["Qwen2ForCausalLM"], _spec(activated_size_in_billions=None, model_id="Qwen/Qwen1.5-MoE-A2.7B"),
     "Qwen2MoeForCausalLM"),
    ([], _spec(activated_size_in_billions=None, model_id="deepseek-ai/DeepSeek-V2-Lite-Chat"),
     "DeepseekV2ForCausalLM"),
    ([], _spec(model_size_in_billions=671, activated_size_in_billions=37, model_id="deepseek-ai/DeepSeek-R1"),
     "DeepseekV3ForCausalLM"),
    ([QWEN3], _spec(model_size_in_billions=8, activated_size_in_billions=None,
                    model_id="deepseek-ai/DeepSeek-R1-0528-Qwen3-8B"), QWEN3),  # a distill: not V3
    (["DeepseekV32ForCausalLM"], _spec(model_size_in_billions=671, activated_size_in_billions=37,
                                       model_id="deepseek-ai/DeepSeek-V3.2"), "DeepseekV32ForCausalLM"),
    (["Qwen3VLMoeForConditionalGeneration"], _spec(model_size_in_billions=8, activated_size_in_billions=8,
                                                   model_id="Qwen/Qwen3-VL-8B"), "Qwen3VLMoeForConditionalGeneration"),
])
def test_rules(declared: list[str], spec: SimpleNamespace, expected: str) -> None:
    assert spec_architecture(_family(architectures=declared), spec).architectures[0] == expected


def test_fp8_native_deepseek_v3_specs_are_not_offered_but_their_siblings_are(families: dict[str, Any]) -> None:
    """deepseek-ai ships DeepSeek-V3 / R1 in FP8 only, though the catalogue says pytorch: offering them would mean
    a ~700 GB download refused at load (sglite has no FP8 experts yet). V2.5 (bf16) and the dense R1 distills are
    still offered."""
    def pytorch_spec(name: str) -> Any:
        return next(s for s in families[name].model_specs if s.model_format == SUPPORTED_FORMAT)

    for name in ("deepseek-v3", "deepseek-r1", "deepseek-r1-0528"):
        family, spec = families[name], pytorch_spec(name)
        verdict = match_model(family, spec, spec.quantization, need_chat=True)
        assert verdict is not True and "ships FP8 weights" in verdict[1] and "BF16 conversion" in verdict[1], name
    for name in ("deepseek-v2.5", "deepseek-r1-distill-qwen"):
        assert offered(families[name], pytorch_spec(name)), name
