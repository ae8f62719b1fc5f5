"""Fast checks of the Xinference plugin's pieces: launch options, request mapping, registration, start-up hook.

No server here (``test_xinference.py`` runs the real one). Registration checks run in fresh interpreters so
that they see exactly what an Xinference process sees at start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest

from xinf_sglang.serving.launch_options import (
    LaunchOptions,
    LaunchOptionsError,
    split_model_config,
    to_engine_config,
)
from xinf_sglang.openai_api.request_mapping import RequestMappingError, map_request

# ---- launch options ----


def test_launch_options_accept_typed_and_string_values() -> None:
    typed, _ = split_model_config({"mem_fraction_static": 0.8, "max_running_requests": 8, "disable_radix_cache": True})
    strings, _ = split_model_config(
        {"mem_fraction_static": "0.8", "max_running_requests": "8", "disable_radix_cache": "true"}
    )
    assert typed == strings
    assert strings.mem_fraction_static == 0.8 and strings.max_running_requests == 8 and strings.disable_radix_cache


@pytest.mark.parametrize("unset", [None, "None", "none", "", "null"])
def test_unset_values_mean_default(unset) -> None:
    opts, _ = split_model_config({"max_total_tokens": unset, "seed": unset, "schedule_policy": unset})
    assert opts == LaunchOptions()


def test_normalised_spellings() -> None:
    opts = LaunchOptions.parse({"dtype": "BF16", "device": "CPU", "schedule_policy": "LPM"})
    assert (opts.dtype, opts.device, opts.schedule_policy) == ("bfloat16", "cpu", "lpm")


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"mem_fraction_static": 1.5}, "mem_fraction_static=1.5"),
        ({"mem_fraction_static": "0"}, "mem_fraction_static='0'"),
        ({"max_running_requests": 0}, "max_running_requests=0"),
        ({"schedule_policy": "random"}, "allowed: fcfs|lpm"),
        ({"device": "tpu"}, "allowed: auto|cuda|cpu"),
        ({"max_total_tokens": "lots"}, "max_total_tokens='lots'"),
        ({"no_such_option": 1}, "unknown option 'no_such_option'"),
    ],
)
def test_bad_options_are_rejected_with_the_valid_ones(options, expected) -> None:
    with pytest.raises(LaunchOptionsError) as err:
        split_model_config(options)
    message = str(err.value)
    assert expected in message
    assert "Valid options: context_length" in message and "mem_fraction_static (number > 0.0, < 1.0)" in message


def test_xinference_keys_are_consumed_not_dropped() -> None:
    opts, xkeys = split_model_config(
        {"enable_thinking": False, "trust_remote_code": True, "reasoning_content": "true", "context_length": 512}
    )
    assert opts.context_length == 512
    assert xkeys == {"enable_thinking": False, "trust_remote_code": True, "reasoning_content": "true"}


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"quantization_config": {"load_in_4bit": True}}, "quantization_config"),
        ({"draft_model_path": "/x"}, "speculative decoding"),
        ({"n_worker": 2}, "n_worker=2"),
    ],
)
def test_xinference_options_sglite_cannot_honour(options, expected) -> None:
    with pytest.raises(LaunchOptionsError, match=expected):
        split_model_config(options)


def test_to_engine_config_is_the_one_translation(tmp_path: Path) -> None:
    opts = LaunchOptions.parse({"mem_fraction_static": "0.5", "context_length": 1024, "schedule_policy": "lpm"})
    cfg = to_engine_config(opts, str(tmp_path))
    assert cfg.model_path == str(tmp_path)
    assert (cfg.mem_fraction_static, cfg.context_length, cfg.schedule_policy) == (0.5, 1024, "lpm")
    # Every launch option has a home in EngineConfig: nothing is accepted and then lost.
    assert set(LaunchOptions.model_fields) <= set(type(cfg).model_fields)


# ---- request mapping ----


def test_openai_fields_map_to_sampling_params() -> None:
    sampling, opts = map_request(
        {
            "max_tokens": 16,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "min_p": 0.1,
            "frequency_penalty": 0.2,
            "presence_penalty": 0.3,
            "repetition_penalty": 1.1,
            "seed": 7,
            "stop": ["END"],
            "stop_token_ids": 3,
            "ignore_eos": True,
            "min_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
        },
        "chat",
    )
    assert sampling == {
        "max_new_tokens": 16, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "frequency_penalty": 0.2,
        "presence_penalty": 0.3, "repetition_penalty": 1.1, "seed": 7, "stop": ["END"], "stop_token_ids": [3],
        "ignore_eos": True, "min_new_tokens": 2,
    }
    assert opts.stream and opts.include_usage and opts.max_tokens_given


def test_max_tokens_none_means_fill_the_context() -> None:
    sampling, opts = map_request({"max_tokens": None, "stop": []}, "completion")
    assert sampling == {} and not opts.max_tokens_given


@pytest.mark.parametrize(
    "config, field, value",
    [
        ({"response_format": {"type": "json_object"}}, "json_schema", {"type": "object"}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema_": {"type": "array"}}}},
         "json_schema", {"type": "array"}),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string"}}}},
         "json_schema", {"type": "string"}),
        ({"guided_json": '{"type": "integer"}'}, "json_schema", {"type": "integer"}),
        ({"guided_json_object": True}, "json_schema", {"type": "object"}),
        ({"guided_regex": "[ab]+"}, "regex", "[ab]+"),
        ({"regex": "x*"}, "regex", "x*"),
        ({"guided_grammar": 'root ::= "a"'}, "ebnf", 'root ::= "a"'),
        ({"ebnf": 'root ::= "b"'}, "ebnf", 'root ::= "b"'),
        ({"guided_choice": ["yes", "no"]}, "choices", ["yes", "no"]),
        ({"choice": ["a"]}, "choices", ["a"]),
    ],
)
def test_structured_output_fields_are_passed_through(config, field, value) -> None:
    sampling, _ = map_request(config, "chat")
    assert sampling == {field: value}


def test_plain_text_response_format_is_no_constraint() -> None:
    assert map_request({"response_format": {"type": "text"}}, "chat")[0] == {}


@pytest.mark.parametrize(
    "config, kind, expected",
    [
        ({"logprobs": 21}, "completion", r"logprobs must be an integer in \[0, 20\] for completions"),
        ({"logprobs": True}, "completion", "logprobs must be an integer"),
        ({"top_logprobs": 2}, "completion", "top_logprobs applies to chat completions"),
        ({"logprobs": 3}, "chat", "logprobs must be true or false for chat completions"),
        ({"top_logprobs": 3}, "chat", "top_logprobs=3 needs logprobs=true"),
        ({"best_of": 3}, "completion", "best_of"),
        ({"lora_name": "adapter"}, "chat", "LoRA"),
        ({"tool_choice": "required", "tools": [{"type": "function"}]}, "chat", "tool_choice='required'"),
        ({"tools": [{"type": "function"}]}, "completion", "chat completions only"),
        ({"echo": True}, "chat", "echo applies to completions only"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "chat", "at most one structured-output constraint"),
        ({"response_format": {"type": "xml"}}, "chat", "response_format type 'xml'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "chat", "json_schema.schema"),
        ({"frobnicate": 1}, "chat", "unknown request field 'frobnicate'"),
    ],
)
def test_fields_that_would_change_results_are_refused(config, kind, expected) -> None:
    with pytest.raises(RequestMappingError, match=expected):
        map_request(config, kind)


@pytest.mark.parametrize(
    "config, kind, expected",
    [
        ({"logprobs": True, "top_logprobs": 5}, "chat", {"logprobs": True, "top_logprobs": 5}),
        ({"logprobs": True}, "chat", {"logprobs": True}),
        ({"logprobs": 0}, "completion", {"logprobs": True, "top_logprobs": 0}),
        ({"logprobs": 5, "echo": True}, "completion", {"logprobs": True, "top_logprobs": 5, "prompt_logprobs_start": 0}),
        ({"echo": True}, "completion", {}),
    ],
)
def test_logprob_fields_map_to_sampling(config, kind, expected) -> None:
    assert map_request(config, kind)[0] == expected


def test_neutral_values_of_unsupported_fields_are_fine() -> None:
    sampling, opts = map_request({"logprobs": False, "top_logprobs": 0, "tool_choice": "none",
                                  "tools": [{"type": "function"}], "_anthropic_request": False}, "chat")
    assert sampling == {} and opts.tools is None  # tool_choice none: render without tools


def test_n_and_logit_bias_are_sampling_parameters() -> None:
    sampling, _ = map_request({"n": 3, "logit_bias": {"42": 100, "7": -100}}, "completion")
    assert sampling == {"n": 3, "logit_bias": {"42": 100, "7": -100}}
    from xinf_sglang.runtime import SamplingParams

    assert SamplingParams(**sampling).logit_bias == {42: 100.0, 7: -100.0}  # JSON's string keys read as token ids


# ---- registration ----


def _family(**kw):
    defaults = dict(
        model_name="fam", architectures=["Qwen2ForCausalLM"], model_ability=["chat"], model_family=None,
        virtualenv=None,
    )
    defaults.update(kw)
    return SimpleNamespace(**defaults)


def _spec(fmt="pytorch", uri=None):
    return SimpleNamespace(model_format=fmt, model_uri=uri, quantization="none")


def test_match_reasons() -> None:
    from xinf_sglang.serving.engine import SgliteChatModel, SgliteModel

    assert SgliteChatModel.match_json(_family(), _spec(), "none") is True
    for fmt in ("mlx", "bnb"):
        ok, reason = SgliteChatModel.match_json(_family(), _spec(fmt), "none")
        assert not ok and reason.startswith("sglite serves pytorch (safetensors; awq, gptq, fp8 quantized for dense "
                                            "models) and ggufv2 checkpoints of ")
        assert reason.endswith(f"this spec is {fmt}")
    # awq / gptq / fp8 (tests/test_quantization_matching.py has the details)
    assert SgliteChatModel.match_json(_family(), _spec("awq"), "Int4") is True
    ok, reason = SgliteChatModel.match_json(_family(), _spec(), "4-bit")
    assert not ok and "quantized (4-bit)" in reason
    # GGUF: the file types the runtime dequantizes, by llama.cpp's quantization names
    for quantization in ("Q4_K_M", "Q8_0", "q5_k_s", "F16", "Q6_K", "Q2_K"):
        assert SgliteChatModel.match_json(_family(), _spec("ggufv2"), quantization) is True, quantization
    for quantization in ("IQ2_XXS", "IQ4_NL", "TQ1_0", "MXFP4", "none"):
        ok, reason = SgliteChatModel.match_json(_family(), _spec("ggufv2"), quantization)
        assert not ok and reason.endswith(f"this spec is {quantization}") and "Q4_K" not in reason.split(";")[1]
    ok, reason = SgliteChatModel.match_json(_family(architectures=["GemmaForCausalLM"]), _spec(), "none")
    assert not ok and "fam is GemmaForCausalLM" in reason
    ok, reason = SgliteChatModel.match_json(_family(model_ability=["chat", "vision"]), _spec(), "none")
    assert not ok and "text-only" in reason
    ok, reason = SgliteChatModel.match_json(_family(model_ability=["generate"]), _spec(), "none")
    assert not ok and "chat ability" in reason
    assert SgliteModel.match_json(_family(model_ability=["generate"]), _spec(), "none") is True


def test_architecture_read_from_a_local_checkpoint(tmp_path: Path) -> None:
    from xinf_sglang.serving.engine import SgliteChatModel

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    family = _family(architectures=None)
    assert SgliteChatModel.match_json(family, _spec(uri=str(tmp_path)), "none") is True
    ok, reason = SgliteChatModel.match_json(family, _spec(uri=str(tmp_path / "missing")), "none")
    assert not ok and '"architectures"' in reason


def test_virtualenv_marker_is_added_once_and_only_where_engines_are_restricted() -> None:
    from xinf_sglang.registration.engine_name import VIRTUALENV_MARKER, declare_in_virtualenv

    restricted = _family(virtualenv=SimpleNamespace(packages=['#vllm_dependencies# ; #engine# == "vllm"']))
    declare_in_virtualenv(restricted)
    declare_in_virtualenv(restricted)
    assert restricted.virtualenv.packages.count(VIRTUALENV_MARKER) == 1
    plain = _family(virtualenv=SimpleNamespace(packages=["numpy"]))
    declare_in_virtualenv(plain)
    assert plain.virtualenv.packages == ["numpy"]
    declare_in_virtualenv(_family())  # no virtualenv at all: nothing to do



# ---- engine pieces, without a model ----


class _FakeXinference:
    """The members of the engine object the chat path may use (openai_api.chat.XinferenceChat), recorded."""

    def __init__(self, abilities: tuple[str, ...] = ("chat",)) -> None:
        self.model_family = _family(model_ability=list(abilities), chat_template="{{ messages }}", stop=[],
                                    stop_token_ids=[], reasoning_start_tag=None, reasoning_end_tag=None)
        self.model_uid, self.reasoning_parser, self.tool_parser = "uid", None, None
        self.calls: list[str] = []

    def prefill_messages(self, messages):
        self.calls.append("prefill")
        return messages

    def get_full_context(self, messages, chat_template, tokenizer=None, **kwargs):
        return f"{chat_template}:{len(messages)}:{sorted(kwargs)}"

    def _get_chat_template_kwargs_from_generate_config(self, config, reasoning_parser=None):
        return dict(config["chat_template_kwargs"]) if config else None

    def _to_chat_completion(self, completion, reasoning_parser=None):
        (choice,) = completion["choices"]  # Xinference's conversions serve one choice
        return {"choices": [{"index": choice["index"], "message": {"content": choice["text"]}}],
                "usage": completion["usage"]}

    async def _async_to_chat_completion_chunks(self, chunks, reasoning_parser=None, ctx=None):
        async for chunk in chunks:
            yield {"choices": [{"index": c["index"], "delta": {"content": c["text"]}} for c in chunk["choices"]]}


def test_chat_path_uses_only_what_it_is_handed() -> None:
    import asyncio

    from xinf_sglang.openai_api.chat import ChatPath, ChatStops

    xinference = _FakeXinference()
    chat = ChatPath(xinference, tokenizer=None, template="T", stops=ChatStops(token_ids=(7,)))
    assert not chat.supports_tools()  # no tools ability, no parser
    assert chat.begin({"enable_thinking": False}) == {"enable_thinking": False} and chat.begin(None) == {}
    assert chat.render([{"role": "user", "content": "hi"}], {"tools": []}) == "T:1:['tools']"
    assert xinference.calls == ["prefill"]
    assert chat.apply_stops({"stop_token_ids": [3]}, tools=None) == {"stop_token_ids": [3, 7]}
    completion = {"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}], "usage": {"total_tokens": 5}}
    merged = chat.convert(completion, 2, None, {}, parallel=True)  # n=2: one conversion per choice, merged
    assert [c["message"]["content"] for c in merged["choices"]] == ["a", "b"] and merged["usage"]["total_tokens"] == 5

    async def stream():
        for i, text in ((0, "x"), (1, "y")):
            yield {"choices": [{"index": i, "text": text, "finish_reason": "stop"}]}

    async def drain(chunks):
        return sorted([(c["choices"][0]["index"], c["choices"][0]["delta"]["content"]) async for c in chunks])

    assert asyncio.run(drain(chat.convert(stream(), 2, None, {}, parallel=True))) == [(0, "x"), (1, "y")]


class _FakeEngine:
    """A runtime engine's request surface: one stream of ``chunks`` per request, aborts recorded."""

    def __init__(self, *chunks: SimpleNamespace) -> None:
        self.chunks, self.aborted, self.closed = chunks, [], 0

    def generate_stream(self, input_ids, sampling_params, request_id, priority, on_finish, stream_interval=None):
        async def stream():
            try:
                for chunk in self.chunks:
                    yield chunk
            finally:
                self.closed += 1

        return stream()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _chunk(finish: str | None = None, error: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(text="t", finish_reason=finish, error=error)


def test_request_tracker_counts_aborts_and_frees_requests_however_they_end() -> None:
    import asyncio

    from xinf_sglang.serving.engine import SgliteRequestError
    from xinf_sglang.serving.engine.streams import RequestTracker

    async def scenario() -> None:
        tracker, engine = RequestTracker(), _FakeEngine(_chunk(), _chunk(), _chunk("stop"))
        stream = tracker.stream(engine, [1], None, "r1", None, lambda: None)
        await stream.__anext__()
        assert len(tracker) == 1 and tracker.abort(engine, "r1") and not tracker.abort(engine, "other")
        await stream.aclose()  # the client left before the end
        assert (len(tracker), tracker.client_aborts, engine.aborted, engine.closed) == (0, 1, ["r1"], 1)
        assert [c.finish_reason async for c in tracker.stream(engine, [1], None, "r2", None, lambda: None)][-1]
        assert (len(tracker), tracker.client_aborts, engine.closed) == (0, 1, 2)  # a finished one is no abort

        rejected = _FakeEngine(_chunk(error="grammar rejected token 5"))
        with pytest.raises(SgliteRequestError, match="stopped request r3: grammar rejected"):
            await tracker.stream(rejected, [1], None, "r3", None, lambda: None).__anext__()
        failed = RuntimeError("engine failed for good")
        with pytest.raises(RuntimeError, match="engine failed for good"):  # the failure's error wins
            await tracker.stream(rejected, [1], None, "r4", None, lambda: failed).__anext__()
        assert len(tracker) == 0

    asyncio.run(scenario())


def test_a_stream_whose_pulling_task_is_cancelled_after_its_item_is_closed_without_the_garbage_collector() -> None:
    """Xinference's model actor pulls each chunk in a task of its own and, once it has the chunk, hops to threads;
    a client disconnect that cancels the pull there must close the stream (abort the request) at once, although
    the stream object stays referenced (as xoscar's cancelled call keeps it until a garbage collection)."""
    import asyncio

    from xinf_sglang.serving.engine.streams import RequestTracker, closed_when_abandoned

    async def scenario() -> None:
        tracker, engine = RequestTracker(), _FakeEngine(*[_chunk()] * 4, _chunk("stop"))
        stream = closed_when_abandoned(tracker.stream(engine, [1], None, "r1", None, lambda: None))
        took, hop = asyncio.Event(), asyncio.Event()  # `hop` is never set: the thread hop the cancellation meets

        async def pull(then_hop: bool) -> None:
            await stream.__anext__()
            took.set()
            if then_hop:
                await hop.wait()

        await asyncio.create_task(pull(False))  # a pull that ends normally leaves the stream open
        await asyncio.create_task(pull(False))
        assert (len(tracker), engine.closed) == (1, 0)
        took.clear()
        puller = asyncio.create_task(pull(True))
        await took.wait()
        puller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await puller
        for _ in range(3):  # event-loop turns for the close it started, not time
            await asyncio.sleep(0)
        assert (len(tracker), tracker.client_aborts, engine.closed) == (0, 1, 1)
        assert [c async for c in stream] == []  # a later pull finds it ended
        await stream.aclose()
        assert engine.closed == 1

    asyncio.run(scenario())

# ---- the start-up hook, in fresh interpreters ----


def _python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_pth_file_is_installed() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / "xinf_sglang_autoload.pth"
    assert pth.is_file(), "reinstall the package (pip install -e .): the start-up hook is missing"
    assert "xinf_sglang._autoload" in pth.read_text()


def test_engine_registered_at_xinference_bootstrap() -> None:
    out = _python(
        "import json, xinference.model.llm as llm\n"
        "from xinference.model.llm.context_length import CONTEXT_LENGTH_KEYS\n"
        "from xinference.model.llm.llm_family import get_llm_family_by_name\n"
        "print(json.dumps({'engines': list(llm.SUPPORTED_ENGINES),"
        " 'qwen': list(llm.LLM_ENGINES['qwen2.5-instruct']),"
        " 'ctx': CONTEXT_LENGTH_KEYS.get('sglite'),"
        " 'gguf': [llm.check_format_with_engine('ggufv2', e) for e in ('sglite', 'Transformers')],"
        " 'venv': get_llm_family_by_name('qwen2.5-instruct').virtualenv.packages[-1]}))"
    )
    got = json.loads(out.splitlines()[-1])
    assert got["engines"][-1] == "sglite" and "sglite" in got["qwen"]
    assert got["ctx"] == "context_length"
    assert got["gguf"] == [True, False]  # compat.gguf_format: sglite only, the original answers the rest
    assert got["venv"] == '#sglite_dependencies# ; #engine# == "sglite"'


@pytest.mark.parametrize("first", ["xinf_sglang.serving.engine", "xinf_sglang.serving.engine.chat_model",
                                   "xinf_sglang.serving.engine.errors"])
def test_engine_registered_when_the_engine_module_bootstraps_xinference(first: str) -> None:
    # A model subprocess starts by unpickling its engine object (the REST process: a request error), so a module of
    # the engine package is imported before xinference.model; the package bootstraps Xinference before any of its
    # class modules start, so the hook registers complete classes at once.
    out = _python(
        f"import {first}, xinf_sglang.serving.engine as e\n"
        "from xinference.model.llm.llm_family import SUPPORTED_ENGINES, LLM_ENGINES\n"
        "print(SUPPORTED_ENGINES['sglite'] == [e.SgliteChatModel, e.SgliteModel],"
        " 'sglite' in LLM_ENGINES['qwen2.5-instruct'])"
    )
    assert out.splitlines()[-1] == "True True"


def test_hook_is_cheap_and_can_be_switched_off() -> None:
    code = "import sys; print(any('sglite' in repr(f) for f in sys.meta_path), 'xinference' in sys.modules)"
    assert _python(code).splitlines()[-1] == "True False"  # installed, and imports nothing heavy
    assert _python(code, SGLITE_XINFERENCE_AUTOLOAD="0").splitlines()[-1] == "False False"
