"""Hostile and unlucky clients through a real Xinference (issue 13): pathological constraints and prompts are a 400
naming the field on chat and completions (a stream's error event names it too, and the OpenAI client shows
sglite's message), a 10 MB body is refused by its size while a tiny chat is served, and after 500 streams
disconnected mid-way the plugin's bookkeeping and the KV pool are exact.

The session's shared ``xinference-local`` serves the module (Xinference's defaults, auth off); nothing is mocked.
"""

from __future__ import annotations

import http.client as httpclient
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")


from .hostile_helpers import (  # noqa: E402
    LONE_SURROGATE_PROMPT,
    TEN_THOUSAND_CHOICES,
    nested_array_schema,
    nested_array_schema_text,
)
from .xinference_server import metrics, openai_client as client, wait_idle  # noqa: E402
from .xinference_server import LAUNCH_TIMEOUT, REQUEST_TIMEOUT, Server, http  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hi."}]
CONTEXT = 512


@pytest.fixture(scope="module")
def model(server: Server, custom_model: str) -> str:
    uid = "tiny-hostile"
    status, body = http(
        "POST",
        server.endpoint + "/v1/models",
        {"model_name": custom_model, "model_engine": "sglite", "model_uid": uid, "mem_fraction_static": "0.3",
         "context_length": CONTEXT, "max_running_requests": "32"},
        timeout=LAUNCH_TIMEOUT,
    )
    assert status == 200, f"{body}\n{server.log_tail()}"
    yield uid
    http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)








def post_text(server: Server, path: str, body: str) -> tuple[int, str]:
    """POST a JSON body given as text (for bodies ``json.dumps`` cannot write: 2,000 levels deep)."""
    url = urlparse(server.endpoint)
    conn = httpclient.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", path, body=body.encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


# (chat fields, completions fields, words the 400 names)
REFUSED = [
    ({"guided_choice": TEN_THOUSAND_CHOICES}, {"guided_choice": TEN_THOUSAND_CHOICES}, "grammar_max_choices is 1000"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested_array_schema(200)}}},
     {"guided_json": nested_array_schema(200)}, "grammar_max_schema_depth is 64"),
    ({"guided_json": nested_array_schema_text(2000)}, {"guided_json": nested_array_schema_text(2000)},
     "guided_json is nested too deeply"),
    ({"guided_regex": "a{1000}{1000}"}, {"guided_regex": "a{1000}{1000}"}, "grammar_max_regex_repetition is 10000"),
    ({"messages": [{"role": "user", "content": LONE_SURROGATE_PROMPT}]}, {"prompt": LONE_SURROGATE_PROMPT},
     "lone surrogate"),
]
IDS = ["choices-10000", "schema-depth-200", "schema-depth-2000", "regex-a{1000}{1000}", "lone-surrogate"]


@pytest.mark.parametrize("chat_fields, completion_fields, expected", REFUSED, ids=IDS)
def test_refused_up_front_with_a_400_naming_the_field(server: Server, model: str, chat_fields, completion_fields,
                                                       expected) -> None:
    chat = {"model": model, "messages": MESSAGES, "max_tokens": 4, **chat_fields}
    completion = {"model": model, "prompt": "hi", "max_tokens": 4, **completion_fields}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        status, answer = post_text(server, path, json.dumps(body))
        assert status == 400 and expected in json.loads(answer)["detail"], (path, status, answer[:500])
        # A stream has answered 200 before the engine is called: the reason is its error event.
        status, answer = post_text(server, path, json.dumps({**body, "stream": True}))
        assert status == 200 and "error" in answer and expected in answer, (path, answer[:500])


@pytest.mark.xfail(strict=True, reason="Xinference 4.1's REST layer parses the body with json.loads and answers 500 "
                   "for a body nested ~1,000+ levels deep, before any engine is called (as a JSON string, "
                   "guided_json 2,000 deep is sglite's 400: see above)")
def test_schema_2000_deep_as_an_object_is_a_400(server: Server, model: str) -> None:
    schema = nested_array_schema_text(2000)
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4, '
            '"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": %s}}}') % (model, schema)
    status, answer = post_text(server, "/v1/chat/completions", body)
    assert status == 400, answer[:500]


def test_chat_stream_error_reaches_the_openai_client_with_sglites_message(server: Server, model: str) -> None:
    with pytest.raises(openai.APIError) as err:
        list(client(server).chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4, stream=True, extra_body={"guided_regex": "a{1000}{1000}"}))
    assert "grammar_max_regex_repetition is 10000" in err.value.message, err.value.message
    assert "address=" not in err.value.message


def test_big_body_is_refused_by_size_while_a_tiny_chat_is_served(server: Server, model: str) -> None:
    huge = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "x" * 10_000_000}]}
    tiny = {"model": model, "max_tokens": 4, "messages": MESSAGES}
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post_text, server, "/v1/chat/completions", json.dumps(huge))
        small = pool.submit(post_text, server, "/v1/chat/completions", json.dumps(tiny))
        (big_status, big_answer), (small_status, small_answer) = big.result(), small.result()
    # Refused by its character count: the body was never templated into a prompt and tokenized.
    assert big_status == 400 and "10000000 characters" in big_answer, big_answer[:300]
    assert small_status == 200, small_answer[:300]
    status, body = http("POST", server.endpoint + "/v1/chat/completions",
                        {**tiny, "messages": [{"role": "user", "content": "hi"}] * (CONTEXT + 1)})
    assert status == 400 and "messages has 513 entries" in body["detail"], body


def test_strings_under_a_long_key_do_not_grow_the_model_process(server: Server, model: str) -> None:
    """Issue 28 point 1: 3,000 strings under a 300,000-character key grew the model process by 832 MB (every
    string's path was written out before any size check); the budgeted walk answers without that."""
    psutil = pytest.importorskip("psutil")
    process = psutil.Process(metrics(server, model)["pid"])
    before = process.memory_info().rss
    wide = {"k" * 300_000: [f"s{i}" for i in range(3_000)]}
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi.", "extra": wide}]}
    status, answer = post_text(server, "/v1/chat/completions", json.dumps(body))
    grown = process.memory_info().rss - before
    assert status in (200, 400), answer[:300]
    if status == 400:
        assert "300000 characters" in answer and len(answer) < 1000, answer[:1000]
    assert grown < 100 * 2**20, f"the model process grew by {grown / 2**20:.0f} MB"


def _disconnect_mid_stream(server: Server, model: str, seed: int) -> None:
    """Start a streamed chat or completion, read a random part of it, then drop the connection."""
    rng = random.Random(seed)
    url = urlparse(server.endpoint)
    chat = rng.random() < 0.5
    body = {"model": model, "max_tokens": rng.randint(4, 48), "stream": True, "temperature": 1.0}
    body.update({"messages": MESSAGES} if chat else {"prompt": "Once"})
    conn = httpclient.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions" if chat else "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        if rng.random() < 0.2:
            return  # gone before the response even started
        response = conn.getresponse()
        for _ in range(rng.randint(0, 6)):
            if not response.readline():
                break
    finally:
        conn.sock and conn.sock.close()  # abrupt: no reading to the end
        conn.close()


def test_500_disconnects_leave_the_bookkeeping_exact(server: Server, model: str) -> None:
    before = wait_idle(server, model)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            _disconnect_mid_stream(server, model, seed)
        except OSError as e:  # the server may reset a connection we are closing: fine, keep going
            with lock:
                errors.append(e)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(500)))
    after = wait_idle(server, model)  # plugin_active_requests == 0, KV free or cached, nothing running
    assert after["plugin_active_requests"] == 0 and after["running_requests"] == after["waiting_requests"] == 0
    assert after["kv_used_tokens"] <= after["kv_evictable_tokens"], after
    assert len(errors) < 50, errors[:3]
    # Still serving.
    r = client(server).chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert after["finished_requests"] > before["finished_requests"]
