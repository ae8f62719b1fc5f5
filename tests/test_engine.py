"""Engine behaviour end to end on a tiny model: streaming, aborts at every stage, stops, seeds, validation,
budgets. Every test ends by checking the idle invariant (``free + evictable == total``, nothing held)."""

from __future__ import annotations

import asyncio

import pytest

from xinf_sglang.runtime import ConfigError, EngineConfig, InvalidRequestError, SamplingParams

from .engine_helpers import hf_greedy, make_engine, varied_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "overlap"])
def engine(model_dir, request):
    """The shared engine, once with each schedule: every test using it must hold with overlap too."""
    eng = make_engine(model_dir, overlap_schedule=request.param)
    yield eng
    eng.shutdown()


async def _collect(engine, **kwargs):
    chunks = [c async for c in engine.generate_stream(**kwargs)]
    return chunks


def test_concurrent_streams_equal_offline_results(engine, model_dir):
    prompts = varied_prompts(model_dir, 16, max_len=60)
    params = SamplingParams(max_new_tokens=24, **GREEDY)
    offline = engine.generate(input_ids=prompts, sampling_params=params)

    async def main():
        return await asyncio.gather(*(_collect(engine, input_ids=p, sampling_params=params) for p in prompts))

    for chunks, ref in zip(asyncio.run(main()), offline):
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        last = chunks[-1]
        assert last.finish_reason == "length"
        assert sum((c.token_ids for c in chunks), []) == ref.token_ids
        assert "".join(c.text for c in chunks) == ref.text
        assert last.completion_tokens == 24 and last.prompt_tokens == ref.prompt_tokens


def test_text_prompt_and_usage(engine):
    [out] = engine.generate(prompt="def main():", sampling_params=SamplingParams(max_new_tokens=5, **GREEDY))
    assert out.prompt_tokens == len(engine.tokenizer.encode("def main():", add_special_tokens=False))
    assert out.completion_tokens == len(out.token_ids) == 5
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_never_emitted_even_across_tokens(engine, model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=30, max_len=30)[0]
    [free] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=40, **GREEDY))
    text = free.text
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [engine.tokenizer.decode([t]) for t in free.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start : start + 4]
    assert len(stop) == 4

    chunks = asyncio.run(_collect(engine, input_ids=prompt, sampling_params=SamplingParams(max_new_tokens=40, stop=stop, **GREEDY)))
    streamed = "".join(c.text for c in chunks)
    assert streamed == text[: text.index(stop)]
    assert stop not in streamed
    assert chunks[-1].finish_reason == "stop" and chunks[-1].matched_stop == stop


def test_stop_token_ids_and_min_new_tokens(engine, model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=20, max_len=20)[0]
    [free] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=30, **GREEDY))
    stop_tok = free.token_ids[3]
    first = free.token_ids.index(stop_tok)
    [out] = engine.generate(
        input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=30, stop_token_ids=[stop_tok], **GREEDY)
    )
    assert out.finish_reason == "stop" and out.matched_stop == stop_tok
    assert out.token_ids == free.token_ids[: first + 1]  # the stop token is part of the tokens, not of the text
    assert out.text == engine.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)

    [late] = engine.generate(
        input_ids=[prompt],
        sampling_params=SamplingParams(max_new_tokens=30, min_new_tokens=first + 3, stop_token_ids=[stop_tok], **GREEDY),
    )
    assert len(late.token_ids) >= first + 3
    assert stop_tok not in late.token_ids[: first + 3 - 1]


def test_seed_gives_same_output_in_any_batch(engine, model_dir):
    prompts = varied_prompts(model_dir, 6, max_len=40)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, seed=1234, ignore_eos=True)
    alone = engine.generate(input_ids=[prompts[0]], sampling_params=seeded)[0]
    mixed = engine.generate(
        input_ids=prompts, sampling_params=[seeded] + [SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True)] * 5
    )[0]
    assert alone.token_ids == mixed.token_ids
    other = engine.generate(input_ids=[prompts[0]], sampling_params=seeded.model_copy(update={"seed": 99}))[0]
    assert other.token_ids != alone.token_ids


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_abort_waiting_prefilling_and_decoding_requests(model_dir, overlap):
    """With one running slot, request B waits while A decodes; aborting each leaves everything free and the
    others unaffected."""
    prompts = varied_prompts(model_dir, 3, min_len=40, max_len=80)
    ref = hf_greedy(model_dir, prompts[2], 12)
    with make_engine(model_dir, max_running_requests=1, chunked_prefill_size=16, overlap_schedule=overlap) as engine:

        async def main():
            long = SamplingParams(max_new_tokens=400, **GREEDY)
            a = engine.generate_stream(input_ids=prompts[0], sampling_params=long, request_id="A")
            b = engine.generate_stream(input_ids=prompts[1], sampling_params=long, request_id="B")
            c = engine.generate_stream(input_ids=prompts[2], sampling_params=SamplingParams(max_new_tokens=12, **GREEDY), request_id="C")
            first_a = await a.__anext__()  # A is decoding now; B and C wait behind it
            task_b = asyncio.ensure_future(_drain(b))
            task_c = asyncio.ensure_future(_drain(c))
            await asyncio.sleep(0.05)
            engine.abort("B")  # waiting
            chunks_b = await task_b
            await a.aclose()  # decoding: closing the stream aborts it
            chunks_c = await task_c
            return first_a, chunks_b, chunks_c

        first_a, chunks_b, chunks_c = asyncio.run(main())
        assert first_a.finish_reason is None
        assert chunks_b[-1].finish_reason == "abort" and chunks_b[-1].completion_tokens == 0
        assert sum((c.token_ids for c in chunks_c), []) == ref  # unaffected by its neighbours' aborts
        m = engine.metrics()
        assert m["aborted_requests"] == 2
        assert engine.check_invariants() == []

        # abort in the middle of a chunked prefill: checked and done on the scheduler thread between two steps,
        # so the request is certainly half-prefilled when it is aborted
        def abort_if_chunked(sched) -> bool:
            if sched.chunked is not None and sched.chunked.rid == "D" and sched.chunked.kv_len > 0:
                assert sched.abort("D")
                return True
            return False

        async def mid_prefill():
            s = engine.generate_stream(input_ids=prompts[1] * 3, sampling_params=SamplingParams(max_new_tokens=4, **GREEDY), request_id="D")
            task = asyncio.ensure_future(_drain(s))
            while not engine.run_on_scheduler(abort_if_chunked):
                await asyncio.sleep(0)
            return await task

        chunks_d = asyncio.run(mid_prefill())
        assert chunks_d[-1].finish_reason == "abort" and chunks_d[-1].completion_tokens == 0
        assert engine.check_invariants() == []


async def _drain(stream):
    return [c async for c in stream]


def test_budgets_bound_batches(model_dir):
    prompts = varied_prompts(model_dir, 10, min_len=30, max_len=60)
    with make_engine(model_dir, max_running_requests=3, max_prefill_tokens=64, chunked_prefill_size=64) as engine:
        engine.generate(input_ids=prompts, sampling_params=SamplingParams(max_new_tokens=8, **GREEDY))
        m = engine.metrics()
        assert m["peak_running_requests"] == 3
        assert m["peak_prefill_tokens"] <= 64
        assert m["finished_requests"] == 10


def test_lpm_policy_serves_everything(model_dir):
    prompts = varied_prompts(model_dir, 8, min_len=10, max_len=40)
    shared = prompts[0]
    batch = [shared + p for p in prompts]
    refs = [hf_greedy(model_dir, p, 8) for p in batch]
    with make_engine(model_dir, schedule_policy="lpm") as engine:
        engine.generate(input_ids=[shared + [5]], sampling_params=SamplingParams(max_new_tokens=1, **GREEDY))
        outs = engine.generate(input_ids=batch, sampling_params=SamplingParams(max_new_tokens=8, **GREEDY))
        assert [o.token_ids for o in outs] == refs
        assert all(o.cached_tokens >= len(shared) for o in outs)


def test_lone_request_filling_the_pool_finishes_with_length(model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=40, max_len=40)[0]
    with make_engine(model_dir, max_total_tokens=64) as engine:
        [out] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=200, **GREEDY))
        assert out.finish_reason == "length"
        assert len(prompt) + len(out.token_ids) == 64 + 1  # every slot used, the last token needs none
        assert engine.check_invariants() == []


def test_max_new_tokens_clamped_to_context(model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=60, max_len=60)[0]
    with make_engine(model_dir, context_length=64) as engine:
        [out] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=100, **GREEDY))
        assert out.finish_reason == "length" and len(out.token_ids) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=[[]]), "empty"),
        (dict(input_ids=[[1] * 5000]), "context_length is 2048"),
        (dict(input_ids=[[10**6]]), "out of range"),
        (dict(prompt="x", input_ids=[[1]]), "exactly one"),
        (dict(prompt=["a", "b"], sampling_params=[SamplingParams()]), "1 entries for 2 prompts"),
        (dict(prompt="a", sampling_params=SamplingParams(stop_token_ids=[10**6])), "stop_token_ids"),
    ],
)
def test_invalid_requests_are_rejected_before_queueing(engine, kwargs, message):
    before = engine.metrics()
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(**kwargs)
    after = engine.metrics()
    assert after["waiting_requests"] == 0 and after["finished_requests"] == before["finished_requests"]


def test_invalid_sampling_params_name_the_field():
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)


def test_stream_rejects_bad_input_at_first_iteration(engine):
    async def main():
        async for _ in engine.generate_stream(input_ids=[]):
            pass

    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(main())


def test_duplicate_request_id_rejected(engine, model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=10, max_len=10)[0]

    async def main():
        s = engine.generate_stream(input_ids=prompt, sampling_params=SamplingParams(max_new_tokens=50, **GREEDY), request_id="dup")
        await s.__anext__()
        with pytest.raises(InvalidRequestError, match="already in use"):
            await engine.generate_stream(input_ids=prompt, request_id="dup").__anext__()
        await s.aclose()

    asyncio.run(main())


def test_flush_cache_empties_the_radix_cache(engine, model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=30, max_len=30)[0]
    engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=4, **GREEDY))
    assert engine.metrics()["kv_evictable_tokens"] > 0
    assert engine.flush_cache() > 0
    m = engine.metrics()
    assert m["kv_evictable_tokens"] == 0 and m["kv_free_tokens"] == m["kv_total_tokens"]
    [again] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=4, **GREEDY))
    assert again.cached_tokens == 0


def test_metrics_report_the_pool(engine):
    m = engine.metrics()
    for key in ("kv_total_tokens", "kv_free_tokens", "kv_evictable_tokens", "running_requests",
                "waiting_requests", "cache_hit_rate", "retractions"):
        assert key in m
    assert m["kv_total_tokens"] == engine.memory_plan.pool_tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mem_fraction_static=1.5), "mem_fraction_static"),
        (dict(no_such_option=1), "unknown option 'no_such_option'. Valid options: .*chunked_prefill_size"),
        (dict(schedule_policy="random"), "schedule_policy"),
    ],
)
def test_bad_engine_config(model_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(model_path=str(model_dir), **kwargs)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ConfigError, match="sglite supports .*LlamaForCausalLM"):
        make_engine(tmp_path)


def test_missing_tensor_is_named(tmp_path, model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    for f in model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="model.layers.1.mlp.gate_up_proj.weight shard 1"):
        make_engine(tmp_path)


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("failing_call", [1, 4], ids=["prefill", "decode"])
def test_a_failing_step_aborts_its_requests_and_the_engine_keeps_serving(model_dir, overlap, failing_call):
    """A forward that raises (the first one, a prefill, or a later decode) fails the requests in flight with the
    error; the engine frees everything and the next request is served normally."""
    prompts = varied_prompts(model_dir, 3, min_len=10, max_len=30)
    with make_engine(model_dir, overlap_schedule=overlap) as engine:
        runner = engine.run_on_scheduler(lambda s: s.runner)
        real_forward = runner.forward
        calls = []

        def broken_forward(batch):
            calls.append(batch.mode)
            if len(calls) < failing_call:
                return real_forward(batch)
            runner.forward = real_forward  # fail exactly once
            raise RuntimeError("simulated device failure")

        runner.forward = broken_forward
        outs = engine.generate(input_ids=prompts, sampling_params=SamplingParams(max_new_tokens=8, **GREEDY))
        assert all(o.finish_reason == "abort" and "simulated device failure" in o.error for o in outs)
        assert engine.check_invariants() == []
        [ok] = engine.generate(input_ids=prompts[:1], sampling_params=SamplingParams(max_new_tokens=8, **GREEDY))
        assert ok.finish_reason == "length" and len(ok.token_ids) == 8


def test_a_shut_down_engine_keeps_nothing_of_its_scheduler_alive(model_dir):
    """After shutdown no reference reaches the scheduler (it owns the KV pool and the model runner): on a GPU each
    engine's pool takes most of the device's memory, so a process that starts engines one after another (tests,
    benchmarks, a relaunch) must get it back."""
    import gc
    import weakref

    engine = make_engine(model_dir)
    refs = engine.run_on_scheduler(lambda s: (weakref.ref(s), weakref.ref(s.runner)))
    engine.shutdown()
    gc.collect()
    assert [r() for r in refs] == [None, None]
