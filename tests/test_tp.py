"""Tensor parallelism on CPU: the engine's process is rank 0 and the other ranks are gloo processes.

Greedy tokens equal HF transformers' for the tiny llama / qwen2 / qwen3 models and the mixtures of experts
(Qwen3-MoE, Qwen2-MoE, Mixtral: experts split along their intermediate dimension) over 2 ranks (together, from the
radix cache, in small prefill chunks and under retraction), with fewer KV heads than ranks (replicated), and for
SmolLM2-135M (9 query / 3 KV heads) over 3 ranks; constrained output holds; killing rank 1 mid-decode fails the
requests with an error naming it, stops the other ranks and leaves no process behind; so does shutdown; a rank
that dies while the engine idles is found by the launcher's check (what the Xinference plugin polls). A size
the model cannot split into is refused before any process starts, with the sizes that would work.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading

import psutil
import pytest

from xinf_sglang import cli
from xinf_sglang.runtime import EngineConfig, SamplingParams
from xinf_sglang.runtime.errors import ConfigError

from .engine_helpers import hf_greedy, make_engine, varied_prompts

pytestmark = pytest.mark.slow  # ~100 s on the 2-core machine: every test starts gloo rank processes

ARCHS = ["llama", "qwen2", "qwen3"]
NUM_PROMPTS = 12
NEW_TOKENS = 48  # as tests/test_parity.py: its pool of 260 tokens retracts for every arch
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
WAIT_S = 120  # a bound on waits (a hang fails the test instead of blocking it), not a timing assertion


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_model):
    """(model dir, prompts of 3-150 tokens, HF greedy references) for one architecture."""
    model_dir = tiny_model(request.param)
    prompts = varied_prompts(model_dir, NUM_PROMPTS, min_len=3, max_len=150)
    return model_dir, prompts, [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]


def _assert_parity(outs, refs) -> None:
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.error is None, out.error
        assert out.token_ids == ref, f"prompt {i}: runtime {out.token_ids} != HF {ref}"


def _assert_gone(pids: list[int]) -> None:
    """Every one of ``pids`` has exited and been reaped (no orphan, no zombie)."""
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"tensor-parallel ranks left running: {alive}"
    assert not any(psutil.pid_exists(pid) for pid in pids), "a rank was not reaped"


def test_together_then_cached_match_hf(case):
    model_dir, prompts, refs = case
    engine = make_engine(model_dir, tp_size=2)
    pids = engine.tp.pids
    try:
        assert len(pids) == 1 and psutil.Process(pids[0]).is_running()
        first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        second = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        _assert_parity(first, refs)
        _assert_parity(second, refs)
        assert [o.cached_tokens for o in second] == [len(p) - 1 for p in prompts]
        assert engine.tp.group.stats.all_reduces > 0  # the ranks really summed their partial outputs
        assert engine.check_invariants() == []
        assert [r.rank for r in engine.rank_memory] == [0, 1]
        assert all(r.kv_pool_bytes == engine.memory_plan.kv_pool_bytes for r in engine.rank_memory)
    finally:
        engine.shutdown()
    _assert_gone(pids)


def test_chunked_prefill_matches_hf(case):
    model_dir, prompts, refs = case
    with make_engine(model_dir, tp_size=2, chunked_prefill_size=16, max_prefill_tokens=32) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        assert engine.metrics()["prefill_steps"] > NUM_PROMPTS  # long prompts really went in several chunks
        assert engine.check_invariants() == []


def test_retraction_matches_hf(case):
    model_dir, prompts, refs = case
    # Big enough for the longest request alone (150 + 48), far too small for all twelve at once.
    with make_engine(model_dir, tp_size=2, max_total_tokens=260) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        assert engine.metrics()["retractions"] > 0
        assert engine.check_invariants() == []


def test_overlap_schedule_with_retraction_matches_hf(tiny_model):
    """Step t+1 launched before step t's tokens are processed (the CUDA default): chained decode inputs and
    retracted requests' re-prefills reach the other rank the same way."""
    model_dir = tiny_model("qwen2")
    prompts = varied_prompts(model_dir, NUM_PROMPTS, min_len=3, max_len=150)
    refs = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    with make_engine(model_dir, tp_size=2, overlap_schedule="on", max_total_tokens=260) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        m = engine.metrics()
        assert m["overlapped_steps"] > NEW_TOKENS // 2 and m["retractions"] > 0
        assert engine.check_invariants() == []


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_experts_split_over_ranks_match_hf(arch, tiny_model):
    """Every expert's intermediate dimension split over 2 ranks (a shared expert too; DeepSeek's attention heads
    too, its latent cache replicated): in prefill chunks, under
    retraction (a pool of 260 tokens), then again (what the small pool kept cached)."""
    model_dir = tiny_model(arch)
    prompts = varied_prompts(model_dir, NUM_PROMPTS, min_len=3, max_len=150)
    refs = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    with make_engine(model_dir, tp_size=2, chunked_prefill_size=16, max_total_tokens=260) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        m = engine.metrics()
        assert m["retractions"] > 0 and m["prefill_steps"] > NUM_PROMPTS
        assert engine.check_invariants() == []


def test_fewer_kv_heads_than_ranks_are_replicated(tiny_model):
    model_dir = tiny_model("llama", num_key_value_heads=1)
    prompts = varied_prompts(model_dir, 3, min_len=5, max_len=60)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    refs = [hf_greedy(model_dir, p, 16) for p in prompts]
    with make_engine(model_dir, tensor_parallel_size=2) as engine:  # vLLM's name for tp_size
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=params), refs)
        # each rank stores the one KV head its query heads read (K and V, float32, every layer)
        mc = engine.model_config
        assert engine.memory_plan.kv_bytes_per_token == 1 * mc.head_dim * 2 * 4 * mc.num_layers


def test_smollm2_over_three_ranks_matches_hf(smollm2):
    """9 query heads and 3 KV heads over 3 ranks: 3 query heads and 1 KV head each; prefill chunks smaller than
    the prompts, then the same prompts from the radix cache."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])
               for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    new_tokens = 12
    refs = [hf_greedy(smollm2.hf_dir, p, new_tokens) for p in prompts]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    with make_engine(smollm2.hf_dir, tp_size=3, max_total_tokens=2048, chunked_prefill_size=16,
                     max_prefill_tokens=32) as engine:
        assert len(engine.tp.pids) == 2
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=params), refs)
        again = engine.generate(input_ids=prompts, sampling_params=params)
        _assert_parity(again, refs)
        assert [o.cached_tokens for o in again] == [len(p) - 1 for p in prompts]
        assert engine.check_invariants() == []


def test_constrained_output_under_tp(tiny_model):
    with make_engine(tiny_model("qwen2"), tp_size=2) as engine:
        params = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=s, regex=r"[0-9]{3}-[a-c]{2,4}")
                  for s in range(3)]
        outs = engine.generate(prompt=["Number: "] * 3, sampling_params=params)
        for out in outs:
            assert out.error is None and re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", out.text), out.text
        choice = engine.generate(prompt="Pick: ", sampling_params=SamplingParams(choices=["red", "green"]))[0]
        assert choice.text in ("red", "green")
        assert engine.check_invariants() == []


def test_killing_rank_one_mid_decode_fails_requests_clearly_and_leaves_no_process(tiny_model):
    model_dir = tiny_model("llama")
    engine = make_engine(model_dir, tp_size=2)
    pids = engine.tp.pids
    try:
        outs: list = []
        long = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
        worker = threading.Thread(target=lambda: outs.extend(engine.generate(input_ids=[[5, 6, 7]] * 2,
                                                                              sampling_params=long)))
        worker.start()
        _wait_for_decode(engine)
        os.kill(pids[0], signal.SIGKILL)
        worker.join(WAIT_S)
        assert not worker.is_alive(), "the engine hung after a rank died"
        for out in outs:
            assert out.finish_reason == "abort"
            assert "rank 1" in out.error and "SIGKILL" in out.error and "relaunched" in out.error, out.error
            assert len(out.token_ids) < 1500
        # the engine stays failed with the same error: a new request is not silently run on rank 0 alone
        [later] = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)
        assert later.finish_reason == "abort" and "rank 1" in later.error
    finally:
        engine.shutdown()
    _assert_gone(pids)


def test_a_rank_dying_while_the_engine_idles_is_found_by_check(tiny_model):
    with _engine_over_two_ranks(tiny_model("llama")) as engine:
        assert engine.tp.check() is None  # every rank runs: no failure
        [rank] = engine.tp.pids
        os.kill(rank, signal.SIGKILL)
        failure = _wait_for_check(engine)  # no step runs: only check can notice
        assert "rank 1" in str(failure) and "SIGKILL" in str(failure), failure
        assert engine.tp.check() is failure  # the group stays failed with the first error
        [later] = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)
        assert later.finish_reason == "abort" and "rank 1" in later.error and "SIGKILL" in later.error, later.error


@contextlib.contextmanager
def _engine_over_two_ranks(model_dir):
    """An engine with tp_size=2, shut down on exit; then none of its ranks may be left."""
    engine = make_engine(model_dir, tp_size=2)
    pids = engine.tp.pids
    try:
        yield engine
    finally:
        engine.shutdown()
    _assert_gone(pids)


def test_shutdown_is_not_a_failure(tiny_model):
    engine = make_engine(tiny_model("llama"), tp_size=2)
    pids = engine.tp.pids
    engine.shutdown()
    _assert_gone(pids)
    assert engine.tp.check() is None  # ranks ended by stop: the plugin's watch must not end the process


def test_a_hung_rank_fails_the_step_after_tp_timeout_s_and_is_ended(tiny_model):
    engine = make_engine(tiny_model("llama"), tp_size=2, tp_timeout_s=2)
    pids = engine.tp.pids
    try:
        outs: list = []
        long = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
        worker = threading.Thread(target=lambda: outs.extend(engine.generate(input_ids=[5, 6, 7],
                                                                              sampling_params=long)))
        worker.start()
        _wait_for_decode(engine)
        os.kill(pids[0], signal.SIGSTOP)  # alive but never answers: only the collective's timeout can tell
        worker.join(WAIT_S)
        assert not worker.is_alive(), "the engine hung on a stopped rank"
        [out] = outs
        assert out.finish_reason == "abort" and "timed out" in out.error and "relaunched" in out.error, out.error
    finally:
        engine.shutdown()
    _assert_gone(pids)


def _wait_for_check(engine):
    """The launcher's failure once its check finds the killed rank gone (a process with many threads takes a
    moment to exit after SIGKILL on a loaded machine: it is a zombie before its parent can reap it)."""
    import time

    deadline = time.monotonic() + WAIT_S
    while (failure := engine.tp.check()) is None:
        assert time.monotonic() < deadline, "check did not find the killed rank"
        time.sleep(0.05)
    return failure


def _wait_for_decode(engine) -> None:
    """Until the engine has run some decode steps."""
    import time

    deadline = time.monotonic() + WAIT_S
    while engine.metrics()["decode_steps"] < 5:
        assert time.monotonic() < deadline, "no decode step happened"
        time.sleep(0.05)


def test_a_size_the_model_cannot_split_into_is_refused_before_any_process_starts(tiny_model):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) is not divisible by 3.*work for this model: "
                                          r"1, 2, 4"):
        make_engine(tiny_model("llama"), tp_size=3)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    with pytest.raises(ConfigError, match="tp_size or tensor_parallel_size, not both"):
        EngineConfig(model_path="x", tp_size=2, tensor_parallel_size=2)


def test_bench_offline_prints_per_rank_memory_and_all_reduce_time(tiny_model, capsys):
    argv = ["bench", "offline", "--model", str(tiny_model("llama")), "--device", "cpu", "--num-prompts", "2",
            "--input-len", "4:9", "--output-len", "4:4", "--baseline", "none", "--engine-arg", "tp_size=2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"tp rank 0: weights [0-9.]+ MiB, KV pool [0-9.]+ MiB, peak host RSS", printed)
    assert "tp rank 1: weights" in printed
    assert re.search(r"tp all-reduce: [0-9.]+ ms per step \(5 all-reduces per step", printed)  # 2 layers x 2 + embedding
