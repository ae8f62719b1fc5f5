"""``n``, ``logit_bias``, ``min_p`` and ``min_tokens`` through a real Xinference with the OpenAI client.

Xinference 4.1's REST layer drops ``n`` and answers ``logit_bias`` with 501 for every engine; sglite's compat
patch (xinf_sglang/compat/sampling_fields.py) forwards both to sglite models only. The session's shared server, with
the tiny model on sglite and on Xinference's Transformers engine (which must keep Xinference's behaviour).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")

from xinf_sglang.compat import sampling_fields as compat_sampling_fields  # noqa: E402

from .engine_helpers import _hf_model  # noqa: E402
from .xinference_server import (  # noqa: E402
    BIN, LAUNCH_TIMEOUT, Server, http, metrics, openai_client, server_env, wait_idle,
)

SGLITE, HF = "nlb-sglite", "nlb-hf"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something."}]
SAMPLED = dict(temperature=1.0, seed=5, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def uids(server: Server, custom_model: str):
    """The tiny model on sglite and on the Transformers engine, launched at the same time."""
    launches = [
        subprocess.Popen(
            [str(BIN / "xinference"), "launch", "--model-engine", engine, "--model-name", custom_model,
             "--model-uid", uid, *options, "-e", server.endpoint],
            env=server_env(server.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for engine, uid, options in [("sglite", SGLITE, ("--mem_fraction_static", "0.3", "--context-length", "2048")),
                                     ("Transformers", HF, ())]
    ]
    for launch in launches:
        output, _ = launch.communicate(timeout=LAUNCH_TIMEOUT)
        assert launch.returncode == 0, f"{output}\n{server.log_tail()}"
    yield SGLITE, HF
    for uid in (SGLITE, HF):
        http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)


def _stream_by_choice(stream) -> tuple[dict[int, str], dict[int, str], Any]:
    """Texts and finish reasons per choice index, and the usage, of a completions or chat stream."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    return texts, finishes, usage


def test_completions_n3_streaming_and_not(server: Server, uids) -> None:
    client = openai_client(server)
    before = metrics(server, SGLITE)
    prompt = PROMPT + " jumps"  # not cached yet
    full = client.completions.create(model=SGLITE, prompt=prompt, n=3, **SAMPLED)
    after = metrics(server, SGLITE)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert len({c.text for c in full.choices}) == 3  # three samples at temperature 1
    single = client.completions.create(model=SGLITE, prompt=prompt, **SAMPLED)
    assert single.choices[0].text == full.choices[0].text  # choice 0 keeps the request's seed
    usage = full.usage
    assert usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert usage.completion_tokens == 3 * 8  # summed over the choices
    assert usage.prompt_tokens_details.cached_tokens == 0  # nothing of it was cached before the request
    # The prompt ran through the model once: the other two choices computed its last token only.
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] == usage.prompt_tokens + 2

    stream = client.completions.create(model=SGLITE, prompt=prompt, n=3, stream=True,
                                       stream_options={"include_usage": True}, **SAMPLED)
    texts, finishes, stream_usage = _stream_by_choice(stream)
    assert texts == {c.index: c.text for c in full.choices}  # the same seed: the same three samples
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert (stream_usage.prompt_tokens, stream_usage.completion_tokens) == (usage.prompt_tokens, 24)
    wait_idle(server, SGLITE)


def test_chat_n3_streaming_and_not(server: Server, uids) -> None:
    client = openai_client(server)
    full = client.chat.completions.create(model=SGLITE, messages=MESSAGES, n=3, **SAMPLED)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert len({c.message.content for c in full.choices}) == 3
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in full.choices)
    assert full.usage.completion_tokens == 24 and full.usage.total_tokens == full.usage.prompt_tokens + 24

    stream = client.chat.completions.create(model=SGLITE, messages=MESSAGES, n=3, stream=True,
                                            stream_options={"include_usage": True}, **SAMPLED)
    texts, finishes, usage = _stream_by_choice(stream)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 24)

    greedy = client.chat.completions.create(model=SGLITE, messages=MESSAGES, n=2, temperature=0, max_tokens=6)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content  # greedy: identical choices
    wait_idle(server, SGLITE)


def test_closing_an_n3_stream_frees_every_choice(server: Server, uids) -> None:
    stream = openai_client(server).chat.completions.create(
        model=SGLITE, messages=MESSAGES, n=3, stream=True, temperature=1.0, max_tokens=1500,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 4:
            break
    stream.close()
    assert wait_idle(server, SGLITE)["plugin_active_requests"] == 0


def _detail(err: pytest.ExceptionInfo) -> str:
    """The 400's message as Xinference sends it (``{"detail": ...}``, which the OpenAI client does not show)."""
    return err.value.response.json()["detail"]


def test_bad_n_is_a_400(server: Server, uids) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(server).completions.create(model=SGLITE, prompt=PROMPT, n=129, max_tokens=2)
    assert "n must be an integer in [1, 128]" in _detail(err)


def _token(qwen2_dir: Path, text: str) -> int:
    from transformers import AutoTokenizer

    [token] = AutoTokenizer.from_pretrained(qwen2_dir).encode(text, add_special_tokens=False)
    return token


def _hf_next_tokens(qwen2_dir: Path, prompt: str) -> list[int]:
    """The token ids HF ranks first and second after ``prompt`` (tokenized as sglite's completions do)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(qwen2_dir)(prompt).input_ids
    with torch.no_grad():
        logits = _hf_model(str(qwen2_dir))(torch.tensor([ids])).logits[0, -1]
    return logits.topk(2).indices.tolist()


def test_logit_bias_forces_and_bans_tokens(server: Server, uids, qwen2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_dir)
    client = openai_client(server)
    forced = _token(qwen2_dir, "e")
    chat = client.chat.completions.create(model=SGLITE, messages=MESSAGES, temperature=0, max_tokens=4,
                                          logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == tok.decode([forced] * 4)
    stream = client.completions.create(model=SGLITE, prompt=PROMPT, temperature=1.0, max_tokens=4, stream=True,
                                       logit_bias={str(forced): 100})
    assert _stream_by_choice(stream)[0] == {0: tok.decode([forced] * 4)}

    first, second = _hf_next_tokens(qwen2_dir, PROMPT)
    plain = client.completions.create(model=SGLITE, prompt=PROMPT, temperature=0, max_tokens=1)
    assert plain.choices[0].text == tok.decode([first])
    banned = client.completions.create(model=SGLITE, prompt=PROMPT, temperature=0, max_tokens=1,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text == tok.decode([second])  # the greedy token banned: the runner-up
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=SGLITE, prompt=PROMPT, max_tokens=1, logit_bias={"99999999": 5})
    assert "logit_bias keys must be token ids" in _detail(err)


def test_other_engines_keep_xinference_behaviour(server: Server, uids) -> None:
    client = openai_client(server)
    reply = client.chat.completions.create(model=HF, messages=MESSAGES, n=3, max_tokens=4)
    assert len(reply.choices) == 1  # Xinference drops n for its own engines
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=HF, messages=MESSAGES, max_tokens=4, logit_bias={"5": 10})
    assert err.value.status_code == 501
    # sglite's SGLang aliases are not applied for it: a regex contradicting guided_regex is no 400 of sglite's,
    # Xinference hands its own guided_regex to the engine (which the Transformers engine ignores).
    reply = client.chat.completions.create(model=HF, messages=MESSAGES, max_tokens=2,
                                           extra_body={"regex": "a", "guided_regex": "b"})
    assert len(reply.choices) == 1


def test_min_p_and_min_tokens_are_still_forwarded(server: Server, uids) -> None:
    client = openai_client(server)
    for field, value, named in [("min_p", 2.0, "min_p must be"), ("min_tokens", -1, "min_new_tokens must be")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=SGLITE, prompt=PROMPT, max_tokens=2, extra_body={field: value})
        assert named in _detail(err)  # the engine saw the value
    reply = client.completions.create(model=SGLITE, prompt=PROMPT, max_tokens=6, temperature=0,
                                      extra_body={"min_tokens": 6, "min_p": 0.5})
    assert reply.usage.completion_tokens == 6


# ---- the patch's switch, on the handler itself (no server) ----


class _Supervisor:
    """Stands in for Xinference's supervisor actor: the one call the patch makes."""

    async def describe_model(self, model_uid: str) -> dict[str, Any]:
        return {"model_engine": {"s": "sglite", "t": "transformers"}[model_uid]}


def _api() -> type:
    """A fresh class with the two handlers the patch wraps, in the shape of Xinference 4.1's."""

    class API:
        async def _get_supervisor_ref(self) -> _Supervisor:
            return _Supervisor()

        async def create_completion(self, request) -> dict[str, Any]:
            body = await request.json()  # what Xinference's handler does first
            return {"body": dict(body), "forwarded": compat_sampling_fields.forwarded_fields()}

        async def create_chat_completion(self, request) -> dict[str, Any]:
            return await self.create_completion(request)

    return API


def _post(api: type, body: dict[str, Any]) -> dict[str, Any]:
    import json

    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/v1/completions"}, receive)
    return asyncio.run(api().create_completion(request))


def test_the_patch_takes_the_fields_for_sglite_models_only(monkeypatch) -> None:
    from fastapi import HTTPException

    monkeypatch.delenv(compat_sampling_fields.FORWARD_ENV, raising=False)
    api = _api()
    assert compat_sampling_fields.install(api, "sglite") and compat_sampling_fields.install(api, "sglite")
    got = _post(api, {"model": "s", "n": 3, "logit_bias": {"1": 5}})
    assert got == {"body": {"model": "s"}, "forwarded": {"n": 3, "logit_bias": {"1": 5}}}
    other = {"model": "t", "n": 3, "logit_bias": {"1": 5}}
    assert _post(api, other) == {"body": other, "forwarded": {}}  # another engine: untouched
    assert _post(api, {"model": "s", "n": 1}) == {"body": {"model": "s", "n": 1}, "forwarded": {}}

    monkeypatch.setenv(compat_sampling_fields.FORWARD_ENV, "0")
    with pytest.raises(HTTPException) as err:
        _post(api, {"model": "s", "n": 3})
    assert err.value.status_code == 400 and "SGLITE_XINFERENCE_N_LOGIT_BIAS=0" in err.value.detail
    lb = {"model": "s", "logit_bias": {"1": 5}}
    assert _post(api, lb) == {"body": lb, "forwarded": {}}  # left to Xinference's own 501
    assert _post(api, other) == {"body": other, "forwarded": {}}

    class Changed:
        async def create_completion(self, request, extra):  # another signature: not patched
            pass

    assert not compat_sampling_fields.install(Changed, "sglite")


def test_sglang_fields_reach_the_generate_config_of_sglite_models_only(monkeypatch) -> None:
    """Patch 2's aliases and forwarded fields (regex/ebnf/choice, priority, min_p, min_tokens) are added to the
    generate config only when the model is sglite's; another engine's model gets Xinference's own config."""
    from xinf_sglang.compat import patches as xinference_compat

    monkeypatch.delenv(compat_sampling_fields.FORWARD_ENV, raising=False)
    monkeypatch.delenv(xinference_compat.DISABLE_ENV, raising=False)

    class API(_api()):
        @staticmethod
        def handle_request_limit_error(e: Exception, *, sanitize: bool = False):
            raise e

        @staticmethod
        def extract_guided_params(raw_body: dict) -> dict:  # Xinference's: the guided_* fields only
            return {k: v for k, v in raw_body.items() if k.startswith("guided_")}

        async def create_completion(self, request) -> dict[str, Any]:
            body = await request.json()
            return {"body": dict(body), "config": self.extract_guided_params(raw_body=body)}

        async def create_chat_completion(self, request) -> dict[str, Any]:
            return await self.create_completion(request)

    assert xinference_compat.install(API, version="4.1.0") == {
        "errors": True, "field_aliases": True, "n_logit_bias": True}
    fields = {"regex": "a+", "priority": 3, "min_p": 0.1, "min_tokens": 2, "extra_body": {"choice": ["x"]}}
    assert _post(API, {"model": "s", **fields})["config"] == {
        "guided_regex": "a+", "guided_choice": ["x"], "priority": 3, "min_p": 0.1, "min_tokens": 2}
    assert _post(API, {"model": "t", **fields})["config"] == {}
    conflict = {"regex": "a", "guided_regex": "b"}
    assert _post(API, {"model": "t", **conflict})["config"] == {"guided_regex": "b"}  # no sglite 400 for it
    with pytest.raises(Exception, match="'regex' and 'guided_regex'"):
        _post(API, {"model": "s", **conflict})
    monkeypatch.setenv(compat_sampling_fields.FORWARD_ENV, "0")  # n / logit_bias off: the aliases still reach sglite
    got = _post(API, {"model": "s", "ebnf": "root ::= x", "logit_bias": {"1": 5}})
    assert got == {"body": {"model": "s", "ebnf": "root ::= x", "logit_bias": {"1": 5}},
                   "config": {"guided_grammar": "root ::= x"}}
