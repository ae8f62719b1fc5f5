"""Log probabilities through a real ``xinference-local`` with the OpenAI client, on the real SmolLM2-135M-Instruct
(float32 HF folder): chat ``logprobs=True, top_logprobs=5`` and completions ``logprobs=5``, streaming and not,
against HF transformers' log-softmax on the same checkpoint (1e-3 absolute, float32 on CPU: see ``TOL``); completions
``echo=True`` with ``logprobs`` (prompt tokens first, the first one ``None``) and ``max_tokens=0`` scoring.

Greedy decoding throughout, so the reply's tokens are HF's greedy tokens and one HF forward over prompt + reply
gives every expected value.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")

from .xinference_server import LAUNCH_TIMEOUT, Server, http, openai_client, registered_model  # noqa: E402

UID = "smol-logprobs"
# float32 through the server: the model process prefills in its own chunks and thread count, and a request whose
# prompt is in the radix cache recomputes only its last token, so sglite's value for one position moves by ~1e-4
# between a cold and a cached request (CI machine, stop 25: -1.346184 vs -1.346286 for "The") and HF's one forward
# differs by up to 2.2e-4. A wrong position, token or normalisation is off by > 1e-2, far outside 1e-3.
TOL = 1e-3
TOP = 5
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(server: Server, smollm2) -> str:
    with registered_model(server, smollm2.hf_dir, "sglite-smollm2-lp") as name:
        status, body = http("POST", server.endpoint + "/v1/models", {
            "model_name": name, "model_engine": "sglite", "model_uid": UID, "max_total_tokens": "4096",
        }, timeout=LAUNCH_TIMEOUT)
        assert status == 200, f"{body}\n{server.log_tail()}"
        yield UID
        http("DELETE", f"{server.endpoint}/v1/models/{UID}", timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def client(server: Server) -> "openai.OpenAI":
    return openai_client(server)


@functools.lru_cache(maxsize=4)
def _hf(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()


def hf_greedy_logprobs(model_dir: Path, prompt_ids: list[int], new_tokens: int):
    """HF greedy continuation of ``prompt_ids`` and the [len, V] log-softmax over prompt + continuation."""
    import torch

    tok, model = _hf(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0].tolist()
        logprobs = torch.log_softmax(model(torch.tensor([out])).logits[0].float(), dim=-1)
    return out[len(prompt_ids):], logprobs


def text_of(model_dir: Path, token_id: int) -> str:
    return _hf(str(model_dir))[0].decode([token_id])


def assert_entry(model_dir, token: str, logprob: float, top: dict[str, float], row, want_id: int) -> None:
    """One position: the token's text and logprob, and the top-k texts and values, as HF's ``row`` has them."""
    assert token == text_of(model_dir, want_id)
    assert abs(logprob - row[want_id].item()) < TOL
    assert list(top.values()) == sorted(top.values(), reverse=True)
    # HF's top-k up to near-ties: every returned token has HF's value within TOL, and none HF ranks clearly above
    # the k-th (by more than TOL) is missing. Texts key the dict, so ids decoding to one text count once.
    best = row.topk(TOP + 8)
    hf_value: dict[str, float] = {}
    for i, v in zip(best.indices.tolist(), best.values.tolist()):
        hf_value.setdefault(text_of(model_dir, i), v)
    assert 1 <= len(top) <= TOP
    assert all(t in hf_value and abs(v - hf_value[t]) < TOL for t, v in top.items()), (top, hf_value)
    kth = sorted(hf_value.values(), reverse=True)[len(top) - 1]
    assert all(t in top for t, v in hf_value.items() if v > kth + TOL), (top, hf_value)


def chat_prompt_ids(model_dir: Path) -> list[int]:
    tok = _hf(str(model_dir))[0]
    return tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def check_chat_content(smollm2, content) -> None:
    prompt = chat_prompt_ids(smollm2.hf_dir)
    tokens, ref = hf_greedy_logprobs(smollm2.hf_dir, prompt, len(content) + 1)
    assert content, "no logprobs content"
    for i, entry in enumerate(content):
        assert entry.bytes == list(entry.token.encode("utf-8"))
        top = {t.token: t.logprob for t in entry.top_logprobs}
        assert_entry(smollm2.hf_dir, entry.token, entry.logprob, top, ref[len(prompt) - 1 + i], tokens[i])


def test_chat_logprobs_match_hf(client, model, smollm2) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=TOP)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    check_chat_content(smollm2, content)


def test_chat_stream_equals_non_streaming(client, model, smollm2) -> None:
    kwargs = dict(model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=TOP)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kwargs) for choice in chunk.choices
                if choice.logprobs and choice.logprobs.content for e in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    check_chat_content(smollm2, streamed)


def test_chat_without_logprobs_has_none(client, model) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)
    assert reply.choices[0].logprobs is None


def prompt_ids(smollm2) -> list[int]:
    return _hf(str(smollm2.hf_dir))[0].encode(PROMPT)  # completions add the model's special tokens (none here)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_logprobs_match_hf(client, model, smollm2, stream) -> None:
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=TOP)
    if stream:
        parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
                 if c.choices and c.choices[0].logprobs]
        lp = {k: [v for p in parts for v in getattr(p, k)] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                        "text_offset")}
    else:
        got = client.completions.create(**kwargs).choices[0].logprobs
        lp = {k: getattr(got, k) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    prompt = prompt_ids(smollm2)
    tokens, ref = hf_greedy_logprobs(smollm2.hf_dir, prompt, 6)
    assert len(lp["tokens"]) == 6
    for i in range(6):
        assert_entry(smollm2.hf_dir, lp["tokens"][i], lp["token_logprobs"][i], lp["top_logprobs"][i],
                     ref[len(prompt) - 1 + i], tokens[i])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]


@pytest.mark.parametrize("max_tokens", [0, 3])  # 0: through xinf_sglang.compat.sampling_fields (Xinference wants >= 1)
def test_completions_echo_scores_the_prompt(client, model, smollm2, max_tokens) -> None:
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                    logprobs=TOP, echo=True).choices[0]
    prompt = prompt_ids(smollm2)
    tokens, ref = hf_greedy_logprobs(smollm2.hf_dir, prompt, max(max_tokens, 1))
    lp = got.logprobs
    assert got.text.startswith(PROMPT)
    assert len(lp.tokens) == len(prompt) + max_tokens
    assert lp.tokens[0] == text_of(smollm2.hf_dir, prompt[0])
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    full = prompt + tokens[:max_tokens]
    for p in range(1, len(full)):
        assert_entry(smollm2.hf_dir, lp.tokens[p], lp.token_logprobs[p], lp.top_logprobs[p], ref[p - 1], full[p])
    if max_tokens == 0:
        assert got.text == PROMPT and got.finish_reason == "length"


def test_bad_logprob_values_are_400(client, model) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, logprobs=21)
    assert "logprobs must be an integer in [0, 20]" in err.value.response.text, err.value.response.text
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=21)
    assert "top_logprobs must be an integer in [0, 20]" in err.value.response.text, err.value.response.text
