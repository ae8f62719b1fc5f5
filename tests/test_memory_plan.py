"""Pool sizing: DESIGN.md's formula, the max_total_tokens cap and its warning, and clear errors when nothing fits."""

from __future__ import annotations

import pytest
import torch

from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.mem_cache.kv_pool import KVPool
from xinf_sglang.runtime.mem_cache.memory_plan import GPU_FIXED_RESERVE, GiB, MemoryInputs, plan_memory

# Llama-3.1-8B in bf16 on an 80 GiB card: 16 GB of weights.
LLAMA8B_KV = KVPool.bytes_per_token(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


def gpu_inputs(**kw) -> MemoryInputs:
    base = dict(device="cuda", free_before_weights=79 * GiB, free_after_weights=64 * GiB, weights_bytes=15 * GiB,
                kv_bytes_per_token=LLAMA8B_KV, model_context_length=131072, hidden_size=4096,
                ffn_bytes_per_token=3 * 14336 * 2, vocab_size=128256, dtype_bytes=2)
    base.update(kw)
    return MemoryInputs(**base)


def test_kv_bytes_per_token_of_llama_8b():
    assert LLAMA8B_KV == 128 * 1024  # 8 * 128 * 32 * 2 * 2


def test_pool_follows_the_formula():
    inputs = gpu_inputs()
    plan = plan_memory(inputs, mem_fraction_static=0.8, context_length=8192, max_running_requests=64)
    rest = 64 * GiB - 79 * GiB * (1 - 0.8)
    others = plan.req_table_bytes + plan.activation_reserve_bytes
    assert plan.req_table_bytes == 64 * (8192 + 1) * 4
    assert plan.activation_reserve_bytes > GPU_FIXED_RESERVE
    assert plan.pool_tokens == int((rest - others) // LLAMA8B_KV)
    assert plan.kv_pool_bytes + plan.weights_bytes + others <= 0.8 * 79 * GiB + 1
    assert not plan.capped_by_max_total_tokens


def test_max_total_tokens_caps_but_never_grows_and_says_so():
    inputs = gpu_inputs()
    free = plan_memory(inputs, mem_fraction_static=0.8, context_length=8192)
    capped = plan_memory(inputs, mem_fraction_static=0.8, context_length=8192, max_total_tokens=20000)
    assert capped.pool_tokens == 20000 and capped.capped_by_max_total_tokens
    warning = [line for line in capped.report() if line.startswith("WARNING")]
    assert warning and "max_total_tokens=20000" in warning[0] and str(free.pool_tokens) in warning[0]
    bigger = plan_memory(inputs, mem_fraction_static=0.8, context_length=8192, max_total_tokens=10**9)
    assert bigger.pool_tokens == free.pool_tokens and not bigger.capped_by_max_total_tokens


def test_weights_that_do_not_fit_name_the_knob():
    with pytest.raises(ConfigError, match="raise mem_fraction_static"):
        plan_memory(gpu_inputs(), mem_fraction_static=0.1)


def test_context_length_eats_the_request_table():
    with pytest.raises(ConfigError, match="lower context_length"):
        plan_memory(gpu_inputs(), mem_fraction_static=0.22, max_running_requests=4096)


def test_default_fraction_depends_on_the_card():
    """0.9 where 10% of the card is >= 6 GiB (an 80 GB H100: 79 GiB free), 0.85 on smaller cards (40 and 48 GB);
    a given value always wins, and the report says which it was."""
    big = plan_memory(gpu_inputs(), context_length=4096)
    assert big.mem_fraction_static == 0.9 and big.mem_fraction_is_default
    assert "mem_fraction_static=0.9 (default for this device)" in "\n".join(big.report())
    for free_gib in (39, 47):
        small = plan_memory(gpu_inputs(free_before_weights=free_gib * GiB, free_after_weights=(free_gib - 15) * GiB),
                            context_length=4096)
        assert small.mem_fraction_static == 0.85
    given = plan_memory(gpu_inputs(), mem_fraction_static=0.85, context_length=4096)
    assert given.mem_fraction_static == 0.85 and not given.mem_fraction_is_default
    assert "(default" not in "\n".join(given.report())
    # The larger default buys pool tokens, and weights + pool + reserves still stay inside 90% of the card.
    assert big.pool_tokens > given.pool_tokens
    others = big.req_table_bytes + big.activation_reserve_bytes
    assert big.kv_pool_bytes + big.weights_bytes + others <= 0.9 * 79 * GiB + 1


def test_defaults_and_report_lines():
    plan = plan_memory(gpu_inputs(), context_length=4096)
    assert plan.mem_fraction_static == 0.9
    assert plan.context_length == 4096
    report = "\n".join(plan.report())
    for fact in ("weights: 15.00 GiB", "KV pool:", "max running requests:", "prefill chunk:", "context length: 4096"):
        assert fact in report
    assert plan.max_prefill_tokens >= plan.chunked_prefill_size


def test_cpu_uses_available_memory_and_the_table_bound():
    inputs = gpu_inputs(device="cpu", free_before_weights=20 * GiB, free_after_weights=19 * GiB,
                        kv_bytes_per_token=512, model_context_length=2048)
    plan = plan_memory(inputs)
    assert plan.mem_fraction_static == 0.25
    assert plan.pool_tokens == plan.max_running_requests * plan.context_length


def test_engine_reports_its_plan(tiny_model, caplog):
    from .engine_helpers import make_engine

    with caplog.at_level("INFO", logger="xinf_sglang.runtime"):
        with make_engine(tiny_model("llama"), max_total_tokens=300) as engine:
            assert engine.memory_plan.pool_tokens == 300
            assert engine.metrics()["kv_total_tokens"] == 300
    text = caplog.text
    assert "KV pool: 300 tokens" in text and "WARNING: max_total_tokens=300 caps the KV pool" in text


def test_prompt_scoring_rows_are_capped_and_reserved():
    """echo + logprobs scores every prompt position, each a [vocab] row of logits and of log-softmax: the plan caps
    the positions one step scores and reserves their memory (issue 28 point 3)."""
    plan = plan_memory(gpu_inputs(), context_length=8192)
    assert plan.max_scored_prompt_tokens == 512  # the CUDA default
    fewer = plan_memory(gpu_inputs(), context_length=8192, max_scored_prompt_tokens=64)
    row = 128256 * (4 + 4 + 2)  # the LM head's bf16 output, its float32 copy and the log-softmax of that
    assert plan.activation_reserve_bytes - fewer.activation_reserve_bytes == (512 - 64) * row
    assert "prompt logprobs: at most 512 prompt tokens scored per step" in "\n".join(plan.report())
    small = plan_memory(gpu_inputs(), context_length=8192, max_prefill_tokens=256, chunked_prefill_size=256,
                        max_scored_prompt_tokens=4096)
    assert small.max_scored_prompt_tokens == 256  # never more than one prefill batch computes
    cpu = plan_memory(gpu_inputs(device="cpu", free_before_weights=20 * GiB, free_after_weights=19 * GiB))
    assert cpu.max_scored_prompt_tokens == 256
