"""runtime/models/registry.py: torch-free, every entry builds the architecture it names, and the plugin's `match`
and the runtime's config reading both follow it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from xinf_sglang.registration.matching import match_model
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.model_loader.model_config import ModelConfig
from xinf_sglang.runtime.models.decoder import DecoderLM
from xinf_sglang.runtime.models.registry import MODEL_CLASSES, SUPPORTED_ARCHITECTURES, model_class


def test_the_registry_and_the_plugin_matching_import_without_torch():
    code = (
        "import sys\n"
        "import xinf_sglang.runtime.models.registry, xinf_sglang.registration.matching\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _modules_after_engine_tables(autoload: bool) -> set[str]:
    """The modules a fresh interpreter holds once Xinference built its engine tables, as the supervisor and the
    worker do (with or without sglite's start-up hook)."""
    code = (
        "import json, sys, xinference.model\n"
        "from xinference.model.llm.llm_family import SUPPORTED_ENGINES\n"
        "print(json.dumps(['sglite' in SUPPORTED_ENGINES, sorted(sys.modules)]))\n"
    )
    env = {**os.environ, "SGLITE_XINFERENCE_AUTOLOAD": "1" if autoload else "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd="/")
    registered, modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert registered is autoload
    return set(modules)


def test_registering_the_engine_loads_no_kernel_grammar_compiler_or_triton():
    """Xinference 4.1 imports torch in its supervisor and worker by itself (xinference/device_utils.py); what the
    sglite hook adds there must stay light: no kernels, no triton, no llguidance, no runtime beyond the config and
    the grammar spec the launch options validate (they load in the model process, when used)."""
    added = _modules_after_engine_tables(True) - _modules_after_engine_tables(False)
    heavy = sorted(m for m in added if m.split(".")[0] in ("triton", "llguidance", "transformers")
                   or m.startswith(("xinf_sglang.kernels", "xinf_sglang.runtime.constrained.backend",
                                    "xinf_sglang.runtime.constrained.llguidance_backend",
                                    "xinf_sglang.runtime.engine", "xinf_sglang.runtime.scheduler")))
    assert heavy == []


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_entry_is_a_decoder_class_named_for_its_architecture(arch):
    cls = model_class(arch)
    assert issubclass(cls, DecoderLM) and cls.__name__ == arch
    assert MODEL_CLASSES[arch].startswith(f"{cls.__module__.rsplit('.', 1)[1]}:")


def test_an_unknown_architecture_is_a_config_error_listing_the_supported_ones():
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'; sglite supports Deepseek.*LlamaForCausalLM"):
        model_class("GPT2LMHeadModel")


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_the_plugin_matches_exactly_the_registered_architectures(arch):
    family = SimpleNamespace(model_name="fam", architectures=[arch], model_ability=["chat"])
    spec = SimpleNamespace(model_format="pytorch", model_uri=None, quantization="none")
    assert match_model(family, spec, "none", need_chat=True) is True
    ok, reason = match_model(SimpleNamespace(**{**vars(family), "architectures": [arch + "V2"]}), spec, "none", True)
    assert not ok and reason.endswith(f"fam is {arch}V2 (declared by the fam family)")
    assert ", ".join(SUPPORTED_ARCHITECTURES) in reason


def test_the_config_picks_the_first_registered_architecture_of_a_checkpoint():
    cfg = {"architectures": ["SomethingElse", "Qwen3ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    assert ModelConfig.from_dict(cfg).architecture == "Qwen3ForCausalLM"
