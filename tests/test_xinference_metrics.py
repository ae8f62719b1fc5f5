"""sglite's metrics through a real Xinference (issue 18): each replica's Prometheus endpoint under load from the
OpenAI client, its labels, and per-replica runtime metrics that leave Xinference's request routing alone.

The session's shared ``xinference-local`` serves the module; the tiny custom model runs as two replicas on its one
worker, each with ``metrics_port=0`` (a free port each, found through ``get_runtime_metrics(..., replica=...)``).
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("openai")
pytest.importorskip("xinference")

from xinf_sglang.serving.metrics import get_runtime_metrics, model_replicas  # noqa: E402

from .prometheus_text import Scrape, scrape  # noqa: E402
from .xinference_server import LAUNCH_TIMEOUT, Server, http, log_mark, logs_since, openai_client  # noqa: E402

UID = "tiny-metrics"
REPLICAS = 2


@pytest.fixture(scope="module")
def replicated(server: Server, custom_model: str) -> list[str]:
    """The model launched with two replicas and a metrics endpoint each; returns their URLs, by replica."""
    status, body = http("POST", server.endpoint + "/v1/models", {
        "model_name": custom_model, "model_engine": "sglite", "model_uid": UID, "replica": REPLICAS,
        "metrics_port": 0, "max_total_tokens": 4096, "stats_interval_s": 1,
    }, timeout=LAUNCH_TIMEOUT)
    assert status == 200, f"{body}\n{server.log_tail()}"
    urls = [get_runtime_metrics(server.endpoint, UID, timeout=60, replica=r)["prometheus_url"] for r in range(REPLICAS)]
    yield urls
    http("DELETE", f"{server.endpoint}/v1/models/{UID}", timeout=LAUNCH_TIMEOUT)


def _total(scrapes: list[Scrape], name: str, **labels: str) -> float:
    return sum(s.value(name, **labels) for s in scrapes)


def _finished(s: Scrape) -> float:
    return sum(s.value("sglite_finished_requests_total", finish_reason=r) for r in ("stop", "length", "abort"))


def test_each_replica_has_its_own_labelled_endpoint(server: Server, replicated: list[str]):
    rows = model_replicas(server.endpoint, UID)
    assert [r["replica_id"] for r in rows] == list(range(REPLICAS))
    infos = [get_runtime_metrics(server.endpoint, UID, timeout=60, replica=r) for r in range(REPLICAS)]
    assert [i["replica_model_uid"] for i in infos] == [r["replica_model_uid"] for r in rows]
    assert len({i["pid"] for i in infos}) == REPLICAS and len(set(replicated)) == REPLICAS
    for replica, url in enumerate(replicated):
        assert url.startswith("http://127.0.0.1:")  # bound to the loopback unless metrics_host says otherwise
        s = scrape(url)
        labels = {"model_uid": UID, "replica_index": str(replica), "engine": "sglite"}
        assert all(set(labels.items()) <= set(ls) for (_, ls) in s.samples)
    with pytest.raises(ValueError, match=r"has 2 replicas \[0, 1\]; pass replica="):
        get_runtime_metrics(server.endpoint, UID, timeout=60)
    with pytest.raises(ValueError, match=r"has no replica 5; its replicas are \[0, 1\]"):
        get_runtime_metrics(server.endpoint, UID, timeout=60, replica=5)


def test_metrics_move_under_openai_load(server: Server, replicated: list[str]):
    before = [scrape(u) for u in replicated]
    usages: list = []
    errors: list = []

    def load() -> None:
        client = openai_client(server)
        try:
            for i in range(8):
                stream = client.chat.completions.create(
                    model=UID, messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=24, stream=True,
                    stream_options={"include_usage": True},
                )
                usages.append([c.usage for c in stream if c.usage is not None][-1])  # the final usage
        except Exception as e:  # reported by the test, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    during: list[list[Scrape]] = []
    while any(t.is_alive() for t in threads):
        during.append([scrape(u) for u in replicated])
    for t in threads:
        t.join()
    assert not errors, errors
    after = [scrape(u) for u in replicated]
    assert len(usages) == 24
    generated = [_total(ss, "sglite_generated_tokens_total") for ss in [before, *during, after]]
    assert generated == sorted(generated) and generated[-1] > generated[0]  # counters only grow, and did
    # Through Xinference the counters are still exact: what the clients were told is what the replicas counted.
    assert generated[-1] - generated[0] == sum(u.completion_tokens for u in usages)
    prompt = _total(after, "sglite_prompt_tokens_total") - _total(before, "sglite_prompt_tokens_total")
    assert prompt == sum(u.prompt_tokens for u in usages)
    ttft = _total(after, "sglite_time_to_first_token_seconds_count") - _total(
        before, "sglite_time_to_first_token_seconds_count")
    assert ttft == 24
    assert sum(_finished(s) for s in after) - sum(_finished(s) for s in before) == 24
    busy = max(_total(ss, "sglite_running_requests") for ss in during) if during else 0
    print(f"scrapes during load: {len(during)}, most running requests seen: {busy}")


def test_stats_line_reaches_xinference_log(server: Server, replicated: list[str]):
    client = openai_client(server)
    mark = log_mark(server)  # earlier modules' models wrote stats lines too: only this test's lines count

    def new_lines() -> list[str]:
        return [ln for ln in logs_since(server, mark).splitlines() if "Decode batch. #running-req:" in ln]

    def one(i: int) -> None:
        client.chat.completions.create(model=UID, messages=[{"role": "user", "content": f"go {i}"}], max_tokens=64)

    for round_ in range(20):  # busy until a line is due (stats_interval_s=1; how long that takes depends on the box)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if new_lines():
            break
    lines = new_lines()
    assert lines, "no stats line in Xinference's log after 20 busy rounds"
    assert "xinf_sglang.runtime.scheduler" in lines[0] and "gen throughput (token/s):" in lines[0]


def test_reading_a_replica_does_not_move_the_routing(server: Server, replicated: list[str]):
    """Xinference routes each request to the next replica of a cycle; reading one replica's metrics between
    requests must not advance that cycle, so 4 requests still land 2 and 2."""
    client = openai_client(server)
    before = [_finished(scrape(u)) for u in replicated]
    for i in range(4):
        client.chat.completions.create(model=UID, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2)
        get_runtime_metrics(server.endpoint, UID, timeout=60, replica=0)
    served = [_finished(scrape(u)) - b for u, b in zip(replicated, before)]
    assert served == [2, 2]
