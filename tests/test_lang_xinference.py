"""``xinf_sglang.lang`` through a real ``xinference-local`` (``sgl.OpenAI`` on ``/v1/completions`` with the official
client): the programs of issue 19 point 7 on the real SmolLM2-135M-Instruct and a tiny random qwen2, each run on
both backends at temperature 0 and giving the same text; roles rendered with the template the server registered.
The session's shared server; the embedded engines run in this process beside it."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")

import xinf_sglang.lang as sgl  # noqa: E402

from .lang_programs import (  # noqa: E402
    branches, capital, check_constrained, constrained, copy_word, few_shot, multi_turn, numbered, react, tool_loop,
)
from .xinference_server import LAUNCH_TIMEOUT, Server, http, registered_model, wait_idle  # noqa: E402

UIDS = {"smol": "lang-smol", "tiny": "lang-tiny"}
METHODS = [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized]


def _launch(server: Server, name: str, uid: str) -> None:
    status, body = http("POST", server.endpoint + "/v1/models", {
        "model_name": name, "model_engine": "sglite", "model_uid": uid, "max_total_tokens": "16384",
    }, timeout=LAUNCH_TIMEOUT)
    assert status == 200, f"{body}\n{server.log_tail()}"


@pytest.fixture(scope="module")
def served(server: Server, smollm2, tiny_model) -> dict[str, str]:
    """SmolLM2 and the tiny qwen2 registered with their chat templates and launched on sglite."""
    with registered_model(server, smollm2.hf_dir, "lang-smollm2", chat_template=True) as smol_name, \
            registered_model(server, tiny_model(arch="qwen2", seed=0), "lang-tiny-qwen2", chat_template=True) as tiny_name:
        _launch(server, smol_name, UIDS["smol"])
        _launch(server, tiny_name, UIDS["tiny"])
        yield UIDS
        for uid in UIDS.values():
            http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def backends(server: Server, served, smollm2, tiny_model):
    """{model: (embedded Runtime, OpenAI backend)}."""
    pairs = {
        "smol": sgl.Runtime(model_path=str(smollm2.hf_dir), device="cpu", max_total_tokens=16384),
        "tiny": sgl.Runtime(model_path=str(tiny_model(arch="qwen2", seed=0)), device="cpu", max_total_tokens=16384),
    }
    result = {k: (rt, sgl.OpenAI(served[k], base_url=server.endpoint + "/v1")) for k, rt in pairs.items()}
    yield result
    for rt, _ in result.values():
        assert rt.engine.check_invariants() == []
        rt.shutdown()


def _both(backends, model: str, program, *args, **kwargs):
    embedded, remote = backends[model]
    local = program.run(*args, backend=embedded, temperature=0, **kwargs)
    served = program.run(*args, backend=remote, temperature=0, **kwargs)
    assert served.text() == local.text()
    return local, served


def test_chat_template_is_the_registered_one(backends) -> None:
    for embedded, remote in backends.values():
        assert remote.chat_template.template == embedded.tokenizer.chat_template


@pytest.mark.parametrize("model", ["smol", "tiny"])
def test_few_shot_and_multi_turn(model: str, backends) -> None:
    local, served = _both(backends, model, few_shot, "house")
    assert "\n" not in served["french"]
    local, served = _both(backends, model, multi_turn, "What is the capital of France?", "Why?")
    assert served.messages() == local.messages()
    assert served.get_meta_info("a2")["cached_tokens"] > 0  # the first turn came from the server's prefix cache
    if model == "smol":
        assert "Paris" in served["a1"]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_select_each_method(method, backends) -> None:
    local, served = _both(backends, "smol", capital, method)
    assert served["city"] == "Paris"
    scores_local = local.get_meta_info("city")["normalized_prompt_logprobs"]
    scores_served = served.get_meta_info("city")["normalized_prompt_logprobs"]
    assert scores_served == pytest.approx(scores_local, abs=1e-3)
    assert _both(backends, "smol", copy_word, method)[1]["copy"] == " pebble"
    _both(backends, "tiny", copy_word, method)


@pytest.mark.parametrize("model", ["smol", "tiny"])
def test_regex_and_json(model: str, backends) -> None:
    local, served = _both(backends, model, constrained)
    check_constrained(served)
    if model == "smol":
        assert json.loads(served["person"]) == {"name": "John", "age": 31}


@pytest.mark.parametrize("join_mode", ["gather_variable", "concate_and_append"])
def test_fork_join(join_mode: str, backends) -> None:
    local, served = _both(backends, "tiny", branches, ["cats", "owls", "bees"], join_mode)
    if join_mode == "gather_variable":
        assert served["fact"] == local["fact"] and len(served["fact"]) == 3


def test_tool_use_and_react_loops(backends) -> None:
    local, served = _both(backends, "smol", tool_loop, "What is 12 times 7?")
    assert json.loads(served["call0"]) == {"a": 12, "op": "*", "b": 7}
    local, served = _both(backends, "smol", react, "What is the capital of France?")
    assert "answer" in served


def test_run_batch_order_and_streaming(backends) -> None:
    embedded, remote = backends["tiny"]
    states = numbered.run_batch([(i,) for i in range(6)], backend=remote, temperature=0, num_threads=3)
    assert [s["text"] for s in states] == [numbered.run(i, backend=embedded, temperature=0)["text"] for i in range(6)]
    embedded, remote = backends["smol"]
    plain = multi_turn.run("Name a fruit.", "Another one?", backend=remote, temperature=0)
    streamed = multi_turn.run("Name a fruit.", "Another one?", backend=remote, temperature=0, stream=True)
    assert "".join(streamed.text_iter("a1")) == plain["a1"]
    assert "".join(streamed.text_iter()) == plain.text()


def test_errors_name_the_cause(server: Server, backends, served) -> None:
    _, remote = backends["tiny"]
    with pytest.raises(sgl.ProgramError, match="top_p"):
        sgl.function(lambda s: s.__iadd__(sgl.gen("x", top_p=2.0))).run(backend=remote)
    with pytest.raises(sgl.LangError, match="serves no model 'no-such-model'"):
        sgl.OpenAI("no-such-model", base_url=server.endpoint + "/v1")
    for uid in served.values():
        wait_idle(server, uid)
