"""Runtime metrics (issue 18): exact counters and histogram counts for a known workload, read through the engine's
Prometheus endpoint; the endpoint's format and errors; the periodic stats line, written while busy and never while
idle; the histogram arithmetic."""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.metrics.collector import Histogram

from .engine_helpers import hf_greedy, make_engine, varied_prompts
from .prometheus_text import scrape

LABELS = {"model_uid": "tiny", "replica_index": "0", "engine": "sglite"}
STATS_LINE = re.compile(
    r"Decode batch\. #running-req: \d+, #token: \d+, token usage: \d\.\d\d, cache hit rate: (n/a|\d\.\d\d), "
    r"gen throughput \(token/s\): \d+\.\d\d, #queue-req: \d+, queue time p50 \(s\): (n/a|\d+\.\d{3})$"
)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _cached(prompt: list[int], done: list[list[int]]) -> int:
    """What the radix cache serves of ``prompt`` after the sequences ``done`` (each prompt + output but its last
    token) were inserted: the longest common prefix, one prompt token always left to compute."""
    return max((_common(prompt[:-1], seq) for seq in done), default=0)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


def test_counters_and_histograms_are_exact_for_a_known_workload(model_dir):
    [p, x, q, d] = varied_prompts(model_dir, 4, min_len=30, max_len=30, seed=3)
    a, b = p[:24], p[:16] + [t for t in x if t != p[16]][:8]  # b shares exactly a's first 16 tokens
    stop_token = hf_greedy(model_dir, q[:12], 1)[0]
    with make_engine(model_dir, metrics_port=0, stats_interval_s=0) as engine:
        assert engine.metrics_endpoint is not None
        out_a = engine.generate(input_ids=a, sampling_params=SamplingParams(temperature=0, max_new_tokens=5,
                                                                               ignore_eos=True))[0]
        out_b = engine.generate(input_ids=b, sampling_params=SamplingParams(temperature=0, max_new_tokens=3,
                                                                               ignore_eos=True))[0]
        out_c = engine.generate(input_ids=q[:12], sampling_params=SamplingParams(
            temperature=0, max_new_tokens=50, ignore_eos=True, stop_token_ids=[stop_token]))[0]
        assert [o.finish_reason for o in (out_a, out_b, out_c)] == ["length", "length", "stop"]
        done = [a + out_a.token_ids[:-1], b + out_b.token_ids[:-1]]
        cached = _cached(b, done[:1]) + _cached(q[:12], done)
        assert _cached(b, done[:1]) == 16

        s = scrape(engine.metrics_endpoint.url)
        v = s.value
        assert v("sglite_prompt_tokens_total") == 24 + 24 + 12
        assert v("sglite_cached_prompt_tokens_total") == cached
        assert v("sglite_generated_tokens_total") == 5 + 3 + 1
        assert {r: v("sglite_finished_requests_total", finish_reason=r) for r in ("stop", "length", "abort")} == {
            "stop": 1, "length": 2, "abort": 0}
        assert v("sglite_queue_time_seconds_count") == 3  # one first admission each
        assert v("sglite_time_to_first_token_seconds_count") == 3
        assert v("sglite_inter_token_latency_seconds_count") == (5 - 1) + (3 - 1) + (1 - 1)
        assert v("sglite_e2e_request_latency_seconds_count") == 3
        assert v("sglite_time_to_first_token_seconds_sum") > 0 and v("sglite_e2e_request_latency_seconds_sum") > 0
        assert v("sglite_batch_size_count", mode="prefill") == v("sglite_prefill_steps_total") == 3
        assert v("sglite_batch_size_count", mode="decode") == v("sglite_decode_steps_total") == 4 + 2
        assert v("sglite_running_requests") == 0 and v("sglite_waiting_requests") == 0
        assert v("sglite_kv_total_tokens") == engine.memory_plan.pool_tokens
        assert v("sglite_memory_plan_bytes", component="weights") == engine.memory_plan.weights_bytes
        assert v("sglite_memory_plan_bytes", component="kv_pool") == engine.memory_plan.kv_pool_bytes
        assert v("sglite_process_resident_memory_bytes") > engine.memory_plan.weights_bytes
        # One place for each number: the offline metrics() reads the same counters.
        m = engine.metrics()
        assert (m["prompt_tokens_total"], m["cached_prompt_tokens_total"], m["generated_tokens_total"]) == (
            60, cached, 9)

        async def abort_after_two_chunks() -> None:
            stream = engine.generate_stream(input_ids=d[:20], sampling_params=SamplingParams(max_new_tokens=500,
                                                                                             ignore_eos=True))
            for _ in range(2):
                await stream.__anext__()
            await stream.aclose()

        asyncio.run(abort_after_two_chunks())
        assert engine.check_invariants() == []
        s = scrape(engine.metrics_endpoint.url)
        assert s.value("sglite_finished_requests_total", finish_reason="abort") == 1
        assert s.value("sglite_e2e_request_latency_seconds_count") == 4
        assert s.value("sglite_prompt_tokens_total") == 60 + 20


def test_endpoint_labels_format_and_errors(model_dir):
    config = EngineConfig(model_path=str(model_dir), device="cpu", metrics_port=0, stats_interval_s=0)
    with Engine(config, metric_labels=LABELS) as engine:
        url = engine.metrics_endpoint.url
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        engine.generate(input_ids=[[5] * 10], sampling_params=SamplingParams(max_new_tokens=3, ignore_eos=True))
        s = scrape(url)
        assert all(set(LABELS.items()) <= set(labels) for (_, labels) in s.samples)
        assert s.types["sglite_queue_time_seconds"] == "histogram"
        assert s.types["sglite_generated_tokens_total"] == "counter"
        assert s.types["sglite_running_requests"] == "gauge"
        buckets = s.buckets("sglite_inter_token_latency_seconds")
        assert buckets[-1] == (float("inf"), 2) and [c for _, c in buckets] == sorted(c for _, c in buckets)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=30)
        assert err.value.code == 404
    with pytest.raises(urllib.error.URLError):  # closed with the engine
        urllib.request.urlopen(url, timeout=5)


def test_port_in_use_fails_before_loading(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}.*metrics_port"):
            make_engine(model_dir / "missing-checkpoint", metrics_port=port)  # the bind fails before the load


def test_stats_line_while_busy_and_never_when_idle(model_dir, caplog):
    prompts = varied_prompts(model_dir, 4, min_len=8, max_len=40, seed=4)
    busy = SamplingParams(max_new_tokens=64, ignore_eos=True)
    caplog.set_level(logging.INFO, logger="xinf_sglang.runtime.scheduler")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Decode batch.")]

    with make_engine(model_dir, stats_interval_s=0.2) as engine:
        for _ in range(50):  # work until a line is due (how long that takes depends on the machine)
            engine.generate(input_ids=prompts, sampling_params=busy)
            if lines():
                break
        assert lines(), "no stats line after 50 busy rounds"
        assert all(STATS_LINE.match(line) for line in lines()), lines()
        assert engine.check_invariants() == []
        before = len(lines())
        time.sleep(1.0)  # five intervals of idling
        assert len(lines()) == before
    caplog.clear()
    with make_engine(model_dir, stats_interval_s=0) as engine:  # 0: never
        for _ in range(3):
            engine.generate(input_ids=prompts, sampling_params=busy)
    assert lines() == []


def test_snapshot_pickles_for_the_scheduler_process(model_dir):
    with make_engine(model_dir) as engine:
        engine.generate(input_ids=[[5] * 10], sampling_params=SamplingParams(max_new_tokens=3, ignore_eos=True))
        snap = engine.metrics_snapshot()
        assert pickle.loads(pickle.dumps(snap)) == snap
        assert snap.latency.time_to_first_token.count == 1


def test_histogram_buckets_and_quantile():
    h = Histogram((0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 1.0, 20.0):  # a value on a bound belongs to that bound's bucket (le)
        h.observe(value)
    snap = h.snapshot()
    assert snap.counts == (2, 2, 0, 1) and snap.cumulative() == [2, 4, 4, 5] and snap.count == 5
    assert snap.quantile(0.2) == pytest.approx(0.05)  # rank 1 of 2 in (0, 0.1]
    assert snap.quantile(0.6) == pytest.approx(0.1 + 0.9 * 0.5)  # rank 3: the middle of (0.1, 1.0]
    assert snap.quantile(1.0) == 10.0  # above every bound: the highest finite one
    later = Histogram((0.1, 1.0, 10.0))
    assert later.snapshot().quantile(0.5) is None
    assert snap.minus(later.snapshot()) == snap


def test_tensor_parallel_engine_exports_rank0_counters(model_dir):
    """Under tensor parallelism rank 0 owns the scheduler and the endpoint; the counters are the requests'."""
    with make_engine(model_dir, tp_size=2, metrics_port=0, stats_interval_s=0) as engine:
        engine.generate(input_ids=[[5] * 20, [6] * 12], sampling_params=SamplingParams(max_new_tokens=7,
                                                                                       ignore_eos=True))
        s = scrape(engine.metrics_endpoint.url)
        assert s.value("sglite_prompt_tokens_total") == 32
        assert s.value("sglite_generated_tokens_total") == 14
        assert s.value("sglite_time_to_first_token_seconds_count") == 2
        assert s.value("sglite_inter_token_latency_seconds_count") == 2 * 6
        assert s.value("sglite_memory_plan_bytes", component="kv_pool") == engine.memory_plan.kv_pool_bytes


def test_an_idle_connection_is_closed_after_the_socket_timeout():
    """A client that connects and sends nothing must not hold the endpoint's thread forever (issue 28 point 6)."""
    from xinf_sglang.runtime.metrics.server import SOCKET_TIMEOUT_S, MetricsEndpoint

    assert 0 < SOCKET_TIMEOUT_S <= 30
    endpoint = MetricsEndpoint("127.0.0.1", 0, socket_timeout_s=0.5)
    endpoint.serve(lambda: "sglite_up 1\n")
    try:
        host, port = endpoint.url.removeprefix("http://").removesuffix("/metrics").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            start = time.monotonic()
            assert idle.recv(1) == b""  # closed by the server, not by our 10 s timeout
            assert time.monotonic() - start < 5
        with urllib.request.urlopen(endpoint.url, timeout=10) as reply:  # still serving
            assert reply.read() == b"sglite_up 1\n"
    finally:
        endpoint.close()
