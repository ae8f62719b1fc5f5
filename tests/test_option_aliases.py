"""vLLM / SGLang launch-option names and hyphenated keys map to sglite's options (xinf_sglang/serving/option_aliases.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from xinf_sglang.serving.launch_options import LaunchOptionsError, split_model_config
from xinf_sglang.serving.option_aliases import ALIASES, alias_table


def test_vllm_names_become_sglite_options(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="xinf_sglang.serving.launch_options"):
        opts, xkeys = split_model_config({
            "max_model_len": 2048, "gpu_memory_utilization": "0.5", "max_num_seqs": 8,
            "enable_prefix_caching": "false", "max_num_batched_tokens": 512, "enforce_eager": True,
            "enable_chunked_prefill": True, "kv_cache_dtype": "auto", "tensor-parallel-size": 1,
        })
    assert (opts.context_length, opts.mem_fraction_static, opts.max_running_requests) == (2048, 0.5, 8)
    assert opts.disable_radix_cache is True and opts.max_prefill_tokens == 512 and opts.disable_cuda_graph is True
    assert opts.chunked_prefill_size is None and opts.dtype == "auto"  # already sglite's behaviour: unchanged
    assert opts.tp_size == 1 and xkeys == {}
    # the startup log says what each name became
    assert "max_model_len=2048 (vLLM) -> context_length=2048" in caplog.text
    assert "enable_prefix_caching='false' (vLLM) -> disable_radix_cache=True" in caplog.text
    assert "enable_chunked_prefill=True (vLLM): already sglite's behaviour" in caplog.text


def test_hyphens_count_as_underscores() -> None:
    opts, xkeys = split_model_config({"mem-fraction-static": 0.6, "reasoning-content": True, "max-num-seqs": 4})
    assert opts.mem_fraction_static == 0.6 and opts.max_running_requests == 4
    assert xkeys == {"reasoning_content": True}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_modle_len": 1}, "unknown option 'max_modle_len' (did you mean 'max_model_len'?)"),
        ({"mem-fraction-statik": 0.5}, "did you mean 'mem_fraction_static'"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype (vLLM): sglite stores the KV cache in the model's dtype"),
        ({"enable_chunked_prefill": False}, "set chunked_prefill_size to the context length instead"),
        ({"enforce_eager": "maybe"}, "'maybe' is not a boolean"),
        ({"context_length": 100, "max_model_len": 200}, "max_model_len=200 conflicts with context_length=100"),
        ({"gpu_memory_utilization": 1.5}, "mem_fraction_static=1.5"),  # the target's own range check
    ],
)
def test_what_cannot_be_honoured_is_refused_with_the_reason(config: dict, message: str) -> None:
    with pytest.raises(LaunchOptionsError) as err:
        split_model_config(config)
    assert message in str(err.value)


def test_an_alias_and_its_target_with_the_same_value_agree() -> None:
    opts, _ = split_model_config({"context_length": 256, "max_model_len": 256})
    assert opts.context_length == 256


def test_unset_alias_values_keep_the_default() -> None:
    opts, _ = split_model_config({"max_model_len": "None", "gpu_memory_utilization": ""})
    assert opts.context_length is None and opts.mem_fraction_static is None


def test_every_alias_targets_an_option_and_the_readme_lists_them() -> None:
    from xinf_sglang.serving.launch_options import LaunchOptions

    missing = [a.name for a in ALIASES if a.target not in LaunchOptions.model_fields]
    assert not missing, f"aliases whose target is not a launch option: {missing}"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert alias_table() in readme, "README's alias table differs from option_aliases.alias_table()"
