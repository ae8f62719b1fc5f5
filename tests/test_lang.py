"""``xinf_sglang.lang`` on the embedded engine (``sgl.Runtime``): the programs of issue 19 point 7 on the real
SmolLM2-135M-Instruct and on tiny random models, checked against HF transformers where a value can be (greedy
text, choice log probabilities, chat-template rendering), plus the language's own contracts (order, threads,
streaming, errors before any model work)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading

import pytest
import torch

import xinf_sglang.lang as sgl

from .lang_programs import (
    SHARED_PREFIX, branches, capital, check_constrained, constrained, copy_word, few_shot, multi_turn, numbered,
    react, tool_loop,
)

METHODS = [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized]


def _runtime(path) -> sgl.Runtime:
    return sgl.Runtime(model_path=str(path), device="cpu", max_total_tokens=16384)


@pytest.fixture(scope="module")
def smol(smollm2):
    rt = _runtime(smollm2.hf_dir)
    yield rt
    assert rt.engine.check_invariants() == []
    rt.shutdown()


@pytest.fixture(scope="module")
def tiny(tiny_model):
    rt = _runtime(tiny_model(arch="qwen2", seed=0))
    yield rt
    assert rt.engine.check_invariants() == []
    rt.shutdown()


def _hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_import_loads_neither_torch_nor_xinference() -> None:
    code = "import sys, xinf_sglang.lang; print(sorted(m for m in ('torch', 'xinference') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("which", [pytest.param("smol", marks=pytest.mark.real_model), "tiny"])
def test_roles_render_with_the_models_own_template(which: str, request) -> None:
    rt = request.getfixturevalue(which)
    state = multi_turn.run("Hi there.", "And then?", backend=rt, temperature=0, max_new_tokens=8)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == state["a1"] and messages[3]["content"] == state["a2"]
    assert state.text() == rt.tokenizer.apply_chat_template(messages, tokenize=False)
    # The second turn's prompt starts with everything the first turn computed: the radix cache serves it (a
    # random model's output may re-tokenize differently from the tokens it sampled: then only its prompt).
    meta1, meta2 = state.get_meta_info("a1"), state.get_meta_info("a2")
    reused = meta1["prompt_tokens"] + (meta1["completion_tokens"] - 2 if which == "smol" else 0)
    assert meta2["cached_tokens"] >= reused


def test_few_shot_completion_stops_at_the_stop_string(smol) -> None:
    state = few_shot.run("house", backend=smol, temperature=0)
    french = state["french"]
    assert french.strip() and "\n" not in french
    assert state.get_meta_info("french")["finish_reason"] == {"type": "stop", "matched": "\n"}
    assert state.text().endswith("English: house\nFrench:" + french)


def test_multi_turn_answer_equals_hf_greedy(smol, smollm2) -> None:
    state = multi_turn.run("What is the capital of France?", "Why?", backend=smol, temperature=0)
    tok, model = _hf(smollm2.hf_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert state["a1"] == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in state["a1"]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_select_scores_whole_choices(method, smol) -> None:
    state = capital.run(method, backend=smol)
    assert state["city"] == "Paris"  # token by token, "B" of Berlin would win
    assert state.text().endswith("<|im_start|>assistant\nParis<|im_end|>\n")
    meta = state.get_meta_info("city")
    assert all(t.logprob is not None and t.logprob <= 0 for s in meta["input_token_logprobs"] for t in s)
    assert ["".join(t.text for t in s) for s in meta["input_token_logprobs"]] == ["Berlin", "Madrid", "Paris"]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_select_copy_forced(method, smol) -> None:
    assert copy_word.run(method, backend=smol)["copy"] == " pebble"


@pytest.mark.parametrize("which", ["smol", "tiny"])
def test_select_logprobs_equal_hf(which: str, request, smollm2, tiny_model) -> None:
    rt = request.getfixturevalue(which)
    path = smollm2.hf_dir if which == "smol" else tiny_model(arch="qwen2", seed=0)
    state = copy_word.run(sgl.unconditional_likelihood_normalized, backend=rt)
    tok, model = _hf(path)
    prefix = state.text()[: -len(state["copy"])]
    meta = state.get_meta_info("copy")
    for choice, scored in zip([" banana", " pebble", " ostrich"], meta["input_token_logprobs"]):
        ids = tok.encode(prefix + choice, return_tensors="pt")
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(scored)
        expected = [logprobs[p - 1, ids[0, p]].item() for p in range(ids.shape[1] - n, ids.shape[1])]
        assert [t.token_id for t in scored] == ids[0, -n:].tolist()
        assert [t.logprob for t in scored] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("which", [pytest.param("smol", marks=pytest.mark.real_model), "tiny"])
def test_regex_json_and_int_gens(which: str, request) -> None:
    state = constrained.run(backend=request.getfixturevalue(which), temperature=0)
    check_constrained(state)
    if which == "smol":
        assert state["person"] == '{"name":"John","age":31}'


@pytest.mark.parametrize("join_mode", ["gather_variable", "concate_and_append"])
def test_fork_join_shares_the_prefix(join_mode: str, tiny) -> None:
    topics = ["cats", "owls", "bees", "ants"]
    state = branches.run(topics, join_mode, backend=tiny, temperature=0)
    prefix_tokens = len(tiny.encode(SHARED_PREFIX))
    if join_mode == "gather_variable":
        facts = state["fact"]
        assert isinstance(facts, list) and len(facts) == 4
        assert state.text() == SHARED_PREFIX + "\nDone."
    else:
        assert state.text().startswith(SHARED_PREFIX + "A short fact about cats:")
        assert all(f"A short fact about {t}:" in state.text() for t in topics)
    # Run the same branches again alone to read their meta info: every branch finds the prefix cached.
    before = tiny.engine.metrics()
    branches.run(topics, "gather_variable", backend=tiny, temperature=0)
    after = tiny.engine.metrics()
    cached = after["cached_prompt_tokens_total"] - before["cached_prompt_tokens_total"]
    assert cached >= 4 * (prefix_tokens - 1), (cached, prefix_tokens)


def test_fork_branches_read_their_cached_tokens(tiny) -> None:
    @sgl.function
    def prog(s):
        s += SHARED_PREFIX + "Now:"
        forks = s.fork(3)
        forks += [" one", " two", " three"]
        forks += sgl.gen("x", max_tokens=3)
        s["metas"] = [f.get_meta_info("x") for f in forks]
        forks.join()

    state = prog.run(backend=tiny, temperature=0)
    prefix_tokens = len(tiny.encode(SHARED_PREFIX + "Now:"))
    cached = [m["cached_tokens"] for m in state["metas"]]
    assert len(state["x"]) == 3
    print("branch cached tokens", cached, "of a", prefix_tokens, "token prefix")
    # The first branch to reach the engine may compute the prefix; the others reuse it.
    assert all(c >= prefix_tokens - 1 for c in sorted(cached)[1:]), cached


def test_tool_use_loop(smol) -> None:
    state = tool_loop.run("What is 12 times 7?", backend=smol, temperature=0)
    calls = [json.loads(state[f"call{i}"]) for i in range(2)]
    assert calls[0] == {"a": 12, "op": "*", "b": 7}
    results = [m["content"] for m in state.messages() if m["content"].startswith("Result:")]
    assert results[0] == "Result: 84. Call again or answer."
    assert len(results) == 2 and state.text().endswith(f"The answer is {state['answer']}<|im_end|>\n")


def test_react_loop(smol) -> None:
    state = react.run("What is the capital of France?", backend=smol, temperature=0)
    actions = [state[f"action{i}"] for i in range(3) if f"action{i}" in state]
    assert actions and set(actions) <= {"search", "finish"}
    for i, action in enumerate(actions):
        if action == "search":
            assert f"Observation {i}: " in state.text()
    assert "answer" in state


def test_run_batch_keeps_input_order(tiny) -> None:
    states = numbered.run_batch([{"index": i} if i % 2 else (i,) for i in range(8)], backend=tiny, temperature=0)
    assert [s.text().split(":")[0] for s in states] == [f"Item {i}" for i in range(8)]
    single = [numbered.run(i, backend=tiny, temperature=0)["text"] for i in range(8)]
    assert [s["text"] for s in states] == single


@pytest.mark.parametrize("threads", [1, 4])
def test_run_batch_thread_count(threads: int, tiny) -> None:
    lock, running, peak = threading.Lock(), [0], [0]
    barrier = threading.Barrier(4, timeout=60)

    @sgl.function
    def prog(s, i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if threads == 4:
            barrier.wait()  # passes only if four programs run at the same time
        s += f"{i}:" + sgl.gen("x", max_tokens=2)
        s.sync()
        with lock:
            running[0] -= 1

    prog.run_batch([(i,) for i in range(4)], backend=tiny, num_threads=threads)
    assert peak[0] == threads


def test_streaming_equals_non_streaming(smol) -> None:
    args = ("Name a fruit.", "Another one?")
    plain = multi_turn.run(*args, backend=smol, temperature=0)
    streamed = multi_turn.run(*args, backend=smol, temperature=0, stream=True)
    a1_pieces = list(streamed.text_iter("a1"))
    assert "".join(a1_pieces) == plain["a1"]
    assert "".join(streamed.text_iter()) == plain.text()
    assert streamed["a2"] == plain["a2"]

    async def collect() -> str:
        state = multi_turn.run(*args, backend=smol, temperature=0, stream=True)
        return "".join([piece async for piece in state.text_async_iter("a2")])

    assert asyncio.run(collect()) == plain["a2"]


def test_bad_input_is_refused_with_what_is_allowed(tiny) -> None:
    with pytest.raises(sgl.LangError, match="dtype must be one of int, float, bool, str"):
        sgl.gen("x", dtype=list)
    with pytest.raises(sgl.LangError, match="at most one of dtype, regex, json_schema"):
        sgl.gen("x", regex="a", json_schema={"type": "object"})
    with pytest.raises(sgl.LangError, match="does not compile"):
        sgl.gen("x", regex="(")
    with pytest.raises(sgl.LangError, match="temperature must be 0"):
        sgl.select("x", ["a", "b"], temperature=0.5)
    with pytest.raises(sgl.LangError, match="distinct"):
        sgl.select("x", ["a", "a"])
    with pytest.raises(sgl.LangError, match="first parameter .* must be 's'"):
        sgl.function(lambda x: None)
    with pytest.raises(sgl.LangError, match="has no parameter"):
        numbered.bind(nope=1)
    with pytest.raises(sgl.LangError, match="unexpected keyword|missing"):
        numbered.run(backend=tiny, colour=1)
    with pytest.raises(sgl.LangError, match="num_threads must be 'auto' or an integer >= 1"):
        numbered.run_batch([(1,)], backend=tiny, num_threads=0)
    with pytest.raises(sgl.LangError, match="fork takes a number of branches >= 1"):
        sgl.function(lambda s: s.fork(0)).run(backend=tiny)
    with pytest.raises(sgl.LangError, match="no backend"):
        numbered.run(1)
    with pytest.raises(sgl.LangError, match="EngineConfig|device"):
        sgl.Runtime(model_path="/nonexistent", device="tpu")

    @sgl.function
    def nested(s):
        with s.user():
            s += sgl.assistant("x")

    with pytest.raises(sgl.ProgramError, match="roles do not nest"):
        nested.run(backend=tiny)
    with pytest.raises(sgl.LangError, match="max_new_tokens must be an integer >= 0; got -1"):
        numbered.run(1, backend=tiny, max_new_tokens=-1)
    with pytest.raises(sgl.ProgramError, match="top_p must be a number in"):
        sgl.function(lambda s: s.__iadd__(sgl.gen("x", top_p=2.0))).run(backend=tiny)


def test_bind_fixes_arguments(tiny) -> None:
    bound = numbered.bind(index=5)
    assert bound.run(backend=tiny, temperature=0).text().startswith("Item 5:")


# SGLang's python/sglang/lang/ir.py (REGEX_INT, REGEX_FLOAT, REGEX_BOOL, REGEX_STR), copied as strings: a program
# ported from SGLang must be constrained to the same text (issue 28 point 8).
SGLANG_DTYPE_REGEX = {
    "int": r"[-+]?[0-9]+[ \n]*",
    "float": r"[-+]?[0-9]*\.?[0-9]+[ \n]*",
    "bool": r"(True|False)",
    "str": r"\"[\w\d\s]*\"",
}


@pytest.mark.parametrize("dtype", [int, float, bool, str], ids=lambda t: t.__name__)
def test_dtype_regexes_are_sglangs(dtype) -> None:
    want = SGLANG_DTYPE_REGEX[dtype.__name__]
    for expr in (sgl.gen("x", dtype=dtype), sgl.gen("x", dtype=dtype.__name__)):
        assert expr.params.regex == want
    if dtype is int:
        assert sgl.gen_int("x").params.regex == want
    if dtype is str:
        assert sgl.gen_string("x").params.regex == want


def test_dtype_gens_match_sglangs_regexes_on_the_engine(tiny) -> None:
    @sgl.function
    def typed(s):
        s += "Number: " + sgl.gen_int("n", max_tokens=6) + "\nWord: " + sgl.gen_string("w", max_tokens=8)
        s += "\nReal: " + sgl.gen("f", dtype=float, max_tokens=6)

    state = typed.run(backend=tiny, temperature=0)
    for name, kind in (("n", "int"), ("w", "str"), ("f", "float")):
        text, finish = state[name], state.get_meta_info(name)["finish_reason"]["type"]
        # Cut by max_tokens, a string may lack its closing quote; everything the grammar allowed still matches.
        assert re.fullmatch(SGLANG_DTYPE_REGEX[kind], text + ('"' if finish == "length" and kind == "str" else "")), (
            name, text, finish)
