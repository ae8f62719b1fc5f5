"""``sglite bench serve``: statistics, datasets, the SSE client and the checks as unit tests (no server, the
HTTP side on ``httpx.MockTransport``), then the real command against a real Xinference serving the tiny model:
a ``--sweep 1,2`` of every dataset with a ``--baseline`` uid, its JSON lines and its PNGs. No timing assertions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from xinf_sglang import cli
from xinf_sglang.tools.bench_serve.client import RequestOutcome, api_root, check_models, request_body, send
from xinf_sglang.tools.bench_serve.datasets import Conversation, Turn, Workload, make_workload, warmup_workload
from xinf_sglang.tools.bench_serve.options import DatasetOptions
from xinf_sglang.tools.bench_serve.runner import RunOutcomes, RunSpec, arrival_offsets, run_workload
from xinf_sglang.tools.bench_serve.stats import distribution_ms, summarize
from xinf_sglang.tools.bench_serve.text import RandomText, load_tokenizer

from .xinference_server import BIN, LAUNCH_TIMEOUT, Server, free_port, http, server_env

SGLANG_KEYS = {
    "completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput", "input_throughput",
    "output_throughput", "total_throughput", "concurrency", "max_concurrency", "request_rate",
    *(f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p90", "p99")
      for name in ("ttft", "tpot", "itl", "e2e_latency")),
}


# ---- statistics ----


def test_distribution_in_milliseconds_and_empty_is_zero() -> None:
    d = distribution_ms([0.001, 0.002, 0.003, 0.004])
    assert (d.mean, d.median) == pytest.approx((2.5, 2.5))
    assert d.p90 == pytest.approx(3.7) and d.p99 == pytest.approx(3.97)  # numpy's linear percentiles
    assert d.std == pytest.approx(math.sqrt(1.25))
    assert distribution_ms([]) == distribution_ms(()) and distribution_ms([]).p99 == 0.0


def test_tpot_excludes_the_first_token() -> None:
    assert RequestOutcome(True, ttft_s=0.1, e2e_s=1.1, completion_tokens=11).tpot_s == pytest.approx(0.1)
    assert RequestOutcome(True, ttft_s=0.1, e2e_s=1.1, completion_tokens=1).tpot_s is None


def test_summarize_counts_tokens_cache_hits_per_turn_and_failures() -> None:
    outcomes = [
        RequestOutcome(True, ttft_s=0.1, itl_s=[0.01, 0.03], e2e_s=0.2, prompt_tokens=10, completion_tokens=3,
                       cached_tokens=0, turn=0),
        RequestOutcome(True, ttft_s=0.2, itl_s=[0.02], e2e_s=0.4, prompt_tokens=30, completion_tokens=2,
                       cached_tokens=24, turn=1),
        RequestOutcome(False, "HTTP 500: boom", turn=0),
        RequestOutcome(False, "not sent: turn 0 failed", turn=1),
    ]
    r = summarize(RunOutcomes(outcomes, duration_s=2.0), "m", "model", "multi-turn", math.inf, 4)
    assert (r.completed, r.failed, r.first_error) == (2, 2, "HTTP 500: boom")
    assert (r.total_input_tokens, r.total_output_tokens, r.total_cached_tokens) == (40, 5, 24)
    assert r.cache_hit_rate == pytest.approx(0.6) and r.cache_hit_rate_per_turn == [0.0, pytest.approx(0.8)]
    assert r.itl.mean == pytest.approx(20.0) and r.e2e_latency.median == pytest.approx(300.0)
    assert r.concurrency == pytest.approx(0.3)
    line = json.loads(json.dumps(r.as_json(), allow_nan=False))  # strict JSON: inf is written as "inf"
    assert SGLANG_KEYS <= set(line) and line["request_rate"] == "inf"
    assert line["output_throughput"] == pytest.approx(2.5) and line["request_throughput"] == pytest.approx(1.0)


def test_no_cached_tokens_reported_means_no_hit_rate() -> None:
    done = RequestOutcome(True, e2e_s=0.1, prompt_tokens=5, completion_tokens=1)
    r = summarize(RunOutcomes([done], 1.0), "m", "baseline", "random-ids", 2.0, None)
    assert r.cache_hit_rate is None and r.total_cached_tokens is None and r.cache_hit_rate_per_turn == [None]


def test_poisson_arrivals_are_seeded_and_inf_is_all_at_once() -> None:
    assert arrival_offsets(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(2000, 4.0, random.Random(7))
    assert offsets == arrival_offsets(2000, 4.0, random.Random(7)) and offsets[0] == 0.0
    assert offsets == sorted(offsets) and offsets[-1] / 1999 == pytest.approx(0.25, rel=0.1)


# ---- prompt text and datasets ----


@pytest.fixture(scope="module")
def text(qwen2_dir: Path) -> RandomText:
    return RandomText(load_tokenizer(str(qwen2_dir)))


def test_random_text_is_deterministic_printable_and_about_n_tokens(text: RandomText, qwen2_dir: Path) -> None:
    tokenizer = load_tokenizer(str(qwen2_dir / "tokenizer.json"))
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    assert special and not special & set(text.vocab)
    a, b = text.text(random.Random(3), 40), text.text(random.Random(3), 40)
    assert a == b and a != text.text(random.Random(4), 40)
    assert 20 <= text.count(a) <= 40 and "\ufffd" not in a


def test_load_tokenizer_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_random_ids_lengths_and_seed(text: RandomText) -> None:
    options = DatasetOptions("random-ids", num_prompts=6, input_len=(5, 9), output_len=(2, 3))
    w = make_workload(options, text, seed=1)
    assert (w.api, w.num_requests) == ("completions", 6) and w == make_workload(options, text, seed=1)
    assert all(len(c.turns) == 1 and 2 <= c.turns[0].output_len <= 3 for c in w.conversations)
    assert all(1 <= text.count(c.turns[0].text) <= 9 for c in w.conversations)
    assert w != make_workload(options, text, seed=2)


def test_shared_prefix_interleaves_groups(text: RandomText) -> None:
    options = DatasetOptions("shared-prefix", num_groups=3, prompts_per_group=2, system_prompt_len=20,
                             question_len=(4, 6), output_len=(2, 2))
    w = make_workload(options, text, seed=0)
    systems = [c.system for c in w.conversations]
    assert w.num_requests == 6 and len(set(systems)) == 3 and all(systems[i] == systems[i % 3] for i in range(6))
    assert make_workload(dataclasses.replace(options, api="chat"), text, seed=0).api == "chat"


def test_multi_turn_shape(text: RandomText) -> None:
    options = DatasetOptions("multi-turn", num_conversations=2, num_turns=5, input_len=(3, 4), output_len=(2, 5))
    w = make_workload(options, text, seed=0)
    assert (w.api, w.num_requests) == ("chat", 10) and all(len(c.turns) == 5 for c in w.conversations)
    assert len({t.text for c in w.conversations for t in c.turns}) == 10
    with pytest.raises(SystemExit, match="needs --api chat"):
        make_workload(dataclasses.replace(options, api="completions"), text, seed=0)


def test_warmup_shares_nothing_with_the_workload(text: RandomText) -> None:
    w = warmup_workload(text, 3, seed=0, api="completions")
    measured = make_workload(DatasetOptions("random-ids", num_prompts=3), text, seed=0)
    assert w.num_requests == 3 and not {c.turns[0].text for c in w.conversations} & {
        c.turns[0].text for c in measured.conversations}


# ---- the HTTP client, on a mock transport ----


def _sse(*events: Any) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _send(handler, api: str = "completions") -> RequestOutcome:
    async def go() -> RequestOutcome:
        async with httpx.AsyncClient(base_url="http://x/v1", transport=httpx.MockTransport(handler)) as client:
            return await send(client, api, request_body(api, "m", "hi", 3))

    return asyncio.run(go())


def test_send_times_content_chunks_and_reads_usage() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}
    body = _sse({"choices": [{"text": ""}]}, {"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
                {"choices": [{"text": "c", "finish_reason": "length"}]}, {"choices": [], "usage": usage}, "[DONE]")
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=body)

    o = _send(handler)
    assert o.ok and o.text == "abc" and len(o.itl_s) == 2 and 0 <= o.ttft_s <= o.e2e_s
    assert (o.prompt_tokens, o.completion_tokens, o.cached_tokens) == (7, 3, 4)
    assert seen[0]["stream_options"] == {"include_usage": True} and seen[0]["ignore_eos"] is True


def test_send_reads_chat_deltas_and_counts_chunks_without_usage() -> None:
    body = _sse({"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "x"}}]},
                {"choices": [{"delta": {"content": "y"}}]}, "[DONE]")
    o = _send(lambda request: httpx.Response(200, content=body), api="chat")
    assert o.ok and o.text == "xy" and o.completion_tokens == 2 and o.cached_tokens is None


def test_send_turns_errors_into_failed_outcomes() -> None:
    o = _send(lambda request: httpx.Response(400, json={"detail": "prompt too long"}))
    assert not o.ok and "HTTP 400" in o.error and "prompt too long" in o.error
    o = _send(lambda request: httpx.Response(200, content=_sse({"error": "engine died"})))
    assert not o.ok and "engine died" in o.error


def _run(workload: Workload, cap: int | None) -> tuple[RunOutcomes, list[dict]]:
    """``workload`` on a mock server whose answer to request ``k`` (in arrival order) is ``"answer k"``."""
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        answer = {"choices": [{"delta": {"content": f"answer {len(bodies) - 1}"}, "text": f"answer {len(bodies) - 1}"}]}
        return httpx.Response(200, content=_sse(answer, "[DONE]"))

    async def go() -> RunOutcomes:
        async with httpx.AsyncClient(base_url="http://x/v1", transport=httpx.MockTransport(handler)) as client:
            return await run_workload(client, workload, RunSpec("m", cap, math.inf, 0))

    return asyncio.run(go()), bodies


def test_runner_sends_each_turn_with_the_answers_so_far() -> None:
    conversation = Conversation((Turn("q0", 2), Turn("q1", 3)), system="sys")
    run, bodies = _run(Workload("multi-turn", "chat", (conversation,)), cap=1)
    assert [o.turn for o in run.outcomes] == [0, 1] and all(o.ok for o in run.outcomes)
    assert bodies[1]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q0"},
                                     {"role": "assistant", "content": "answer 0"}, {"role": "user", "content": "q1"}]
    assert [b["max_tokens"] for b in bodies] == [2, 3]
    run, bodies = _run(Workload("shared-prefix", "completions", (conversation,)), cap=None)
    assert [b["prompt"] for b in bodies] == ["sys\nq0", "sys\nq1"]


def _check(handler, uids: list[str]) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url="http://x/v1", transport=httpx.MockTransport(handler)) as client:
            await check_models(client, uids)

    asyncio.run(go())


def test_check_models_names_a_missing_model_and_what_is_served() -> None:
    served = {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}
    _check(lambda request: httpx.Response(200, json=served), ["a", "b"])
    with pytest.raises(SystemExit, match=r"model uid 'c' is not served at http://x/v1/models; it serves: \['a', 'b'\]"):
        _check(lambda request: httpx.Response(200, json=served), ["a", "c"])
    with pytest.raises(SystemExit, match="not an OpenAI-compatible model list"):
        _check(lambda request: httpx.Response(200, text="<html>"), ["a"])


def test_api_root_accepts_host_or_v1() -> None:
    assert api_root("http://h:1") == api_root("http://h:1/") == api_root("http://h:1/v1/") == "http://h:1/v1"


def test_bad_url_fails_before_any_load(qwen2_dir: Path, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SystemExit, match=f"cannot reach {url}/v1/models: ConnectError"):
        cli.main(["bench", "serve", "--base-url", url, "--model", "m", "--tokenizer", str(qwen2_dir)])


def test_bad_lengths_and_rates_are_refused(capsys) -> None:
    for bad in (["--input-len", "0:3"], ["--request-rate", "0"], ["--sweep", "1,x"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "serve", "--base-url", "u", "--model", "m", "--tokenizer", "t", *bad])
        assert "error:" in capsys.readouterr().err


# ---- the command against a real Xinference ----


def _launch(server: Server, model_name: str, uid: str, engine: str, *options: str) -> None:
    """``xinference launch`` of one model, to completion."""
    launch = subprocess.run(
        [str(BIN / "xinference"), "launch", "--model-engine", engine, "--model-name", model_name,
         "--model-uid", uid, *options, "-e", server.endpoint],
        env=server_env(server.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert launch.returncode == 0, f"{launch.stdout}\n{server.log_tail()}"


@pytest.fixture(scope="module")
def uids(server: Server, custom_model: str) -> tuple[str, str]:
    """The tiny model launched with the CLI twice: on sglite, and on Xinference's Transformers engine (the
    baseline; its 4.1 batching path fails every /v1/completions request, so it is benchmarked through chat).
    One after the other: two launches of one custom model at once race in Xinference 4.1's cache, both linking
    the model's cache folder ("[Errno 17] File exists")."""
    pair = ("bench-sglite", "bench-hf")
    try:
        _launch(server, custom_model, pair[0], "sglite", "--mem_fraction_static", "0.3", "--context-length", "2048")
        _launch(server, custom_model, pair[1], "Transformers")
        yield pair
    finally:
        for uid in pair:
            http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)


def _bench_serve(server: Server, qwen2_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sglite"), "bench", "serve", "--base-url", server.endpoint,
                           "--tokenizer", str(qwen2_dir), *args], capture_output=True, text=True, timeout=300)


DATASET_ARGS = {
    "random-ids": ["--num-prompts", "4", "--input-len", "8:24", "--output-len", "4:8"],
    "shared-prefix": ["--num-groups", "2", "--prompts-per-group", "2", "--system-prompt-len", "64",
                      "--question-len", "4:8", "--output-len", "4"],
    "multi-turn": ["--num-conversations", "2", "--num-turns", "3", "--input-len", "8:16", "--output-len", "4"],
}
REQUESTS = {"random-ids": 4, "shared-prefix": 4, "multi-turn": 6}


@pytest.mark.parametrize(("dataset", "api", "with_baseline"), [
    ("random-ids", "completions", False), ("shared-prefix", "completions", False), ("multi-turn", "chat", True)])
def test_live_sweep_writes_json_lines_and_pngs(dataset: str, api: str, with_baseline: bool, server: Server,
                                               qwen2_dir: Path, uids: tuple[str, str], tmp_path: Path) -> None:
    out, plots = tmp_path / "runs.jsonl", tmp_path / "plots"
    baseline = ["--baseline", uids[1]] if with_baseline else []
    done = _bench_serve(server, qwen2_dir, "--model", uids[0], *baseline, "--dataset", dataset, "--api", api,
                        *DATASET_ARGS[dataset], "--sweep", "1,2", "--warmup-requests", "1",
                        "--output-file", str(out), "--plot-dir", str(plots))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(line) for line in done.stdout.splitlines()] == lines
    models = uids if with_baseline else uids[:1]
    assert [(r["model_id"], r["max_concurrency"]) for r in lines] == [(m, c) for c in (1, 2) for m in models]
    for r in lines:
        assert SGLANG_KEYS <= set(r) and r["dataset_name"] == dataset
        assert (r["completed"], r["failed"]) == (REQUESTS[dataset], 0), r["first_error"]
        assert 0 < r["mean_ttft_ms"] <= r["mean_e2e_latency_ms"] and r["p99_ttft_ms"] <= r["p99_e2e_latency_ms"]
        assert r["total_output_tokens"] > 0 and r["total_input_tokens"] > 0
        if dataset != "random-ids" and r["role"] == "model":
            assert r["total_cached_tokens"] > 0 and r["cache_hit_rate"] > 0
    if dataset == "multi-turn":
        assert all(r["cache_hit_rate_per_turn"][2] > 0 for r in lines if r["role"] == "model")
    names = {"throughput.png", "latency_p99.png"} | ({"cache_hit_per_turn.png"} if dataset == "multi-turn" else set())
    assert {p.name for p in plots.iterdir()} == names
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert "completed, 0 failed" in done.stderr  # a progress line per run


def test_live_uid_not_served_is_refused_before_any_load(server: Server, qwen2_dir: Path, uids: tuple[str, str]) -> None:
    done = _bench_serve(server, qwen2_dir, "--model", uids[0], "--baseline", "no-such-uid")
    assert done.returncode != 0 and not done.stdout
    assert "model uid 'no-such-uid' is not served at" in done.stderr and uids[0] in done.stderr
