"""Pool sizing: DESIGN.md's formula, the max_total_tokens cap and its warning, and clear errors when nothing fits."""

from __future__ import annotations

import pytest
import torch

from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.mem_cache.kv_pool import KVPool
from xinf_sglang.runtime.mem_cache.memory_plan import (DEFAULT_CPU_KV_POOL_BYTES, GPU_FIXED_RESERVE, GiB,
                                                       MemoryInputs, check_headroom, out_of_memory_advice,
                                                       plan_memory)

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


# SmolLM2-135M in float32 on the 23 GiB CPU machine: 46080 bytes per token, 8192 tokens of context.
SMOLLM2_CPU = dict(device="cpu", free_before_weights=23 * GiB, free_after_weights=22.9 * GiB, weights_bytes=GiB // 10,
                   kv_bytes_per_token=46080, model_context_length=8192, hidden_size=576, ffn_bytes_per_token=3 * 1536 * 4,
                   vocab_size=49152, dtype_bytes=4)


def test_cpu_default_pool_is_the_default_budget_not_a_quarter_of_the_machine():
    """Issue 33: 0.25 of 23 GiB made a 5.3 GiB pool for a 135M model; by default the CPU pool takes 1 GiB."""
    plan = plan_memory(gpu_inputs(**SMOLLM2_CPU))
    assert plan.pool_tokens == DEFAULT_CPU_KV_POOL_BYTES // 46080 < plan.max_running_requests * plan.context_length
    assert plan.kv_pool_bytes <= DEFAULT_CPU_KV_POOL_BYTES
    assert "sized by the CPU default of 1 GiB" in "\n".join(plan.report())


def test_cpu_default_pool_holds_at_least_one_context():
    big = dict(SMOLLM2_CPU, kv_bytes_per_token=512 * 1024, model_context_length=4096)  # 4096 x 512 KiB = 2 GiB
    assert plan_memory(gpu_inputs(**big)).pool_tokens == 4096


def test_cpu_explicit_sizes_replace_the_default_budget():
    """A given max_total_tokens is the pool (up to what memory allows); a given mem_fraction_static sizes it as on a
    GPU, bounded only by max_running_requests x context_length."""
    inputs = gpu_inputs(**SMOLLM2_CPU)
    tokens = plan_memory(inputs, max_total_tokens=40000)
    assert tokens.pool_tokens == 40000 and tokens.pool_bound == "max_total_tokens=40000"
    fraction = plan_memory(inputs, mem_fraction_static=0.1)
    assert fraction.pool_tokens == fraction.profiled_tokens > 1.5 * DEFAULT_CPU_KV_POOL_BYTES // 46080
    assert fraction.pool_bound.startswith("mem_fraction_static=0.1 of 23.0 GiB available")
    rows = plan_memory(inputs, mem_fraction_static=0.5, max_running_requests=4, context_length=2048)
    assert rows.pool_tokens == 4 * 2048 and rows.pool_bound == "max_running_requests x context_length = 4 x 2048"


def test_gpu_pool_has_no_default_budget():
    plan = plan_memory(gpu_inputs())
    assert plan.pool_bound.startswith("mem_fraction_static=0.9 of 79.0 GiB free")
    assert plan.kv_pool_bytes > 40 * GiB


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


# ---- seed 002: every workspace reserved; errors say which option to change and to what ----


def test_mla_workspace_and_cuda_graphs_are_reserved_and_reported():
    base = plan_memory(gpu_inputs(), context_length=4096)
    mla = plan_memory(gpu_inputs(attention_bytes_per_token=128 * 2176 * 2), context_length=4096)
    graphs = plan_memory(gpu_inputs(graph_batch=256), context_length=4096)
    assert mla.workspace.prefill - base.workspace.prefill == base.chunked_prefill_size * 128 * 2176 * 2
    assert base.workspace.graphs == 0 and graphs.workspace.graphs == 256 * base.workspace.prefill // base.chunked_prefill_size
    assert mla.pool_tokens < base.pool_tokens and graphs.pool_tokens < base.pool_tokens
    [line] = [ln for ln in graphs.report() if "activations reserve" in ln]
    assert "CUDA graphs 0." in line and "prefill chunk" in line and "logits" in line
    cpu = plan_memory(gpu_inputs(device="cpu", graph_batch=256, free_before_weights=20 * GiB, free_after_weights=19 * GiB))
    assert cpu.workspace.graphs == 0 and cpu.workspace.fixed == 0


def test_no_room_names_the_fraction_that_fits():
    with pytest.raises(ConfigError, match=r"raise mem_fraction_static from 0.22 to at least (0\.\d+)") as err:
        plan_memory(gpu_inputs(), mem_fraction_static=0.22, max_running_requests=4096)
    fits = float(err.value.args[0].split("to at least ")[1].split(",")[0])
    assert plan_memory(gpu_inputs(), mem_fraction_static=fits, max_running_requests=4096).pool_tokens >= 16
    with pytest.raises(ConfigError):
        plan_memory(gpu_inputs(), mem_fraction_static=fits - 0.01, max_running_requests=4096)
    with pytest.raises(ConfigError, match="no mem_fraction_static up to 0.95 fits"):
        plan_memory(gpu_inputs(free_after_weights=1 * GiB), mem_fraction_static=0.9)


def test_headroom_check_says_how_far_to_lower_the_fraction():
    plan = plan_memory(gpu_inputs(), mem_fraction_static=0.9, context_length=8192)
    check_headroom(plan, plan.workspace.transient, "cuda:0")  # exactly enough: fine
    short = 3 * GiB
    with pytest.raises(ConfigError, match=r"lower mem_fraction_static from 0.9 to (0\.\d+)") as err:
        check_headroom(plan, plan.workspace.transient - short, "cuda:0")
    fits = float(err.value.args[0].split("from 0.9 to ")[1].split(" ")[0])
    lower = plan_memory(gpu_inputs(), mem_fraction_static=fits, context_length=8192)
    assert (plan.pool_tokens - lower.pool_tokens) * LLAMA8B_KV >= short  # the pool gives the bytes back
    assert "chunked_prefill_size (now 8192)" in str(err.value)


def test_out_of_memory_advice_reads_what_torch_tried_to_allocate():
    plan = plan_memory(gpu_inputs(), mem_fraction_static=0.9, context_length=8192)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has 79 GiB")
    assert out_of_memory_advice(oom, plan) == (
        f"; the memory plan left too little for this step: {plan.lower_fraction_advice(512 * 1024**2)}")
    assert "to 0.88 " in out_of_memory_advice(oom, plan)  # 0.5 GiB of 79 GiB is 0.0063; a hundredth of margin
    assert out_of_memory_advice(RuntimeError("a bug"), plan) == "" and out_of_memory_advice(oom, None) == ""


def test_cpu_pool_buffers_start_a_cache_line() -> None:
    # calloc's large blocks start 16 bytes past a page: a head row would straddle an extra line (issue 35)
    from xinf_sglang.runtime.mem_cache.kv_pool import zeros

    for n, dtype in ((3, torch.float32), (200_000, torch.bfloat16), (200_001, torch.float16)):
        t = zeros((n, 3, 64), dtype, torch.device("cpu"))
        assert t.data_ptr() % 64 == 0 and t.shape == (n, 3, 64) and t.is_contiguous() and not t.any()
