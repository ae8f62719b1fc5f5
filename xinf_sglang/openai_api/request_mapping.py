"""OpenAI request fields -> runtime ``SamplingParams`` fields, with nothing a client sends silently ignored.

Xinference calls an engine with one ``generate_config`` dict per request: the OpenAI fields the client set
(after Xinference's REST layer parsed them), plus a few Xinference keys. :func:`map_request` splits it into

- ``sampling``: keyword arguments for ``SamplingParams`` (sampling, stops, structured output),
- ``RequestOptions``: what the plugin itself acts on (streaming, usage chunk, tools, echo, chat template kwargs)
  and what it passes to the runtime beside the sampling (``priority``, an extra body field, as in vLLM and SGLang),

and raises :class:`RequestMappingError` for fields sglite cannot honour (``best_of``, ``suffix``, LoRA,
forced tool choice, ...) or does not know. Pure functions, no Xinference or torch import: unit-testable.

Structured output: ``response_format`` ``json_object`` / ``json_schema``, ``guided_json``,
``guided_json_object``, ``guided_regex`` / ``regex``, ``guided_grammar`` / ``ebnf``, ``guided_choice`` /
``choice`` / ``choices`` become one of ``json_schema``, ``regex``, ``ebnf``, ``choices``; the runtime enforces
them (or rejects them clearly). Note: Xinference 4.1's REST layer keeps only the fields its pydantic request
models declare (plus the vLLM-style ``guided_*`` fields), so over HTTP ``regex``, ``ebnf``, ``choice``,
``min_p``, ``min_tokens``, ``priority``, ``n`` and ``logit_bias`` never reach an engine unpatched;
:mod:`xinf_sglang.compat.patches` forwards ``regex`` / ``ebnf`` / ``choice`` as ``guided_*`` and ``priority`` /
``min_p`` / ``min_tokens`` as they are, and ``n`` / ``logit_bias`` for sglite models (by default).

A literal ``extra_body`` object in a request's JSON (what curl users write; the OpenAI client merges its
``extra_body`` argument into the top level instead) reaches engines as one field. Its entries are read like
top-level fields, except those Xinference's REST layer has already copied to the top level (the ``guided_*``
names and their aliases); an entry that contradicts the same top-level field is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

RequestKind = Literal["chat", "completion"]

MAX_TOP_LOGPROBS = 20  # the runtime's SamplingParams limit (OpenAI's too); no runtime import here


class RequestMappingError(ValueError):
    """A request field sglite cannot honour as asked; the message says which and what to do instead."""


@dataclass
class RequestOptions:
    """Per-request settings the plugin acts on itself (not sampling)."""

    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a final chunk with choices=[] and usage
    echo: bool = False  # completions: prepend the prompt to the output
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens_given: bool = False  # whether the client set max_tokens (else: fill the context)
    priority: int | None = None  # extra body field; non-zero needs the engine's schedule_policy=priority
    stream_interval: int | None = None  # Xinference's field: tokens per streamed chunk (None: the launch option)


# OpenAI / Xinference name -> SamplingParams name, for fields that map one to one.
_DIRECT = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "min_tokens": "min_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "n": "n",  # over HTTP only with xinference_compat's patch (Xinference 4.1's REST layer drops it otherwise)
    "logit_bias": "logit_bias",  # JSON object keys are strings; SamplingParams reads them as token ids
}
_MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "max_new_tokens")

# Structured-output request fields -> the SamplingParams field they fill.
_STRUCTURED = {
    "guided_json": "json_schema",
    "json_schema": "json_schema",
    "guided_regex": "regex",
    "regex": "regex",
    "guided_grammar": "ebnf",
    "ebnf": "ebnf",
    "guided_choice": "choices",
    "choice": "choices",
    "choices": "choices",
}

# Fields that do not change what is generated: accepted, and deliberately without effect.
_NO_EFFECT = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "request_id",  # the actor passes the request id separately
    "guided_decoding_backend",  # sglite has one grammar backend; the constraint means the same
    "model",
}

# Fields sglite refuses when set to anything that would change the result, with what to do instead.
_UNSUPPORTED = {
    "best_of": "best_of is not supported by sglite; send separate requests",
    "suffix": "suffix (fill-in-the-middle) is not supported by sglite",
    "lora_name": "LoRA adapters are not supported by sglite",
    "functions": "the deprecated functions/function_call fields are not supported; use tools",
    "function_call": "the deprecated functions/function_call fields are not supported; use tools",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported; sglite uses compact JSON",
    "reasoning_effort": "reasoning_effort is not supported by sglite; use chat_template_kwargs",
    "modalities": "sglite serves text-only models",
    "audio": "sglite serves text-only models",
    "prediction": "predicted outputs are not supported by sglite",
    "web_search_options": "web search is not supported by sglite",
    "mm_processor_kwargs": "sglite serves text-only models",
    "cache_salt": "cache_salt is not supported by sglite",
    "_pd_kv_transfer_params": "prefill/decode disaggregation is not supported by sglite",
}
# Values of unsupported fields that mean "not asked for" (OpenAI clients often send the defaults).
_NEUTRAL = {"best_of": (None, 1)}

# extra_body entries Xinference's REST layer (with sglite's compat patch) copies to the top level: entry -> copy.
_LIFTED_FROM_EXTRA_BODY = {
    "guided_json": "guided_json",
    "guided_regex": "guided_regex",
    "guided_choice": "guided_choice",
    "guided_grammar": "guided_grammar",
    "guided_json_object": "guided_json_object",
    "guided_decoding_backend": "guided_decoding_backend",
    "guided_whitespace_pattern": "guided_whitespace_pattern",
    "regex": "guided_regex",
    "ebnf": "guided_grammar",
    "choice": "guided_choice",
}

# Xinference-internal keys added on the way to the engine, and harmless to drop.
_INTERNAL = {"_anthropic_request", "_anthropic_cache_control"}


def map_request(config: dict[str, Any] | None, kind: RequestKind) -> tuple[dict[str, Any], RequestOptions]:
    """Split an Xinference ``generate_config`` into ``SamplingParams`` kwargs and :class:`RequestOptions`.

    ``max_new_tokens`` is only in the result when the client set ``max_tokens``; the caller fills the rest of
    the context otherwise. Raises :class:`RequestMappingError` for fields that cannot be honoured.
    """
    cfg = {k: v for k, v in (config or {}).items() if k not in _INTERNAL}
    sampling: dict[str, Any] = {}
    opts = RequestOptions()
    problems: list[str] = []
    _merge_extra_body(cfg, problems)

    _map_max_tokens(cfg, sampling, opts)
    for key, target in _DIRECT.items():
        value = cfg.pop(key, None)
        if value is not None:
            sampling[target] = value
    if isinstance(sampling.get("stop_token_ids"), int):
        sampling["stop_token_ids"] = [sampling["stop_token_ids"]]
    if sampling.get("stop") == []:
        del sampling["stop"]

    _map_structured(cfg, sampling, problems)
    opts.priority = _priority(cfg.pop("priority", None), problems)
    opts.stream_interval = _stream_interval(cfg.pop("stream_interval", None), problems)

    opts.stream = bool(cfg.pop("stream", False))
    opts.include_usage = _include_usage(cfg.pop("stream_options", None), problems)
    opts.echo = bool(cfg.pop("echo", False))
    if opts.echo and kind == "chat":
        problems.append("echo applies to completions only")
    _map_logprobs(cfg, sampling, kind, opts.echo, problems)

    opts.chat_template_kwargs = _chat_template_kwargs(cfg.pop("chat_template_kwargs", None), problems)
    _map_tools(cfg, opts, kind, problems)

    for key in list(cfg):
        value = cfg.pop(key)
        if key in _NO_EFFECT:
            continue
        if key in _UNSUPPORTED:
            if value in _NEUTRAL.get(key, (None,)):
                continue
            problems.append(f"{key}={value!r}: {_UNSUPPORTED[key]}")
        else:
            problems.append(f"unknown request field {key!r}")
    if problems:
        raise RequestMappingError("; ".join(problems))
    return sampling, opts


def _map_logprobs(
    cfg: dict[str, Any], sampling: dict[str, Any], kind: RequestKind, echo: bool, problems: list[str]
) -> None:
    """OpenAI's log probability fields -> ``logprobs`` / ``top_logprobs`` / ``prompt_logprobs_start``.

    Chat: ``logprobs`` (true/false) and ``top_logprobs`` (0..20, only with ``logprobs``). Completions:
    ``logprobs`` is the number of alternatives (0..20; 0 = the sampled token's logprob only), and with ``echo``
    the prompt tokens are scored too (from position 0, as OpenAI and vLLM do).
    """
    logprobs, top = cfg.pop("logprobs", None), cfg.pop("top_logprobs", None)
    if kind == "completion":
        if top is not None:
            problems.append("top_logprobs applies to chat completions; completions take logprobs=<number of "
                            "alternatives, 0..20>")
        if logprobs is None:
            return
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] for completions (the number of "
                            f"alternatives per token); got {logprobs!r:.40}")
            return
        sampling.update(logprobs=True, top_logprobs=logprobs)
        if echo:
            sampling["prompt_logprobs_start"] = 0
        return
    if logprobs not in (None, True, False):
        problems.append(f"logprobs must be true or false for chat completions; got {logprobs!r:.40}")
        return
    if top not in (None, 0) and not logprobs:
        problems.append(f"top_logprobs={top!r:.40} needs logprobs=true")
        return
    if logprobs:
        sampling["logprobs"] = True
        if top is not None:
            sampling["top_logprobs"] = top  # SamplingParams checks the type and range, naming top_logprobs


def _map_max_tokens(cfg: dict[str, Any], sampling: dict[str, Any], opts: RequestOptions) -> None:
    """The first of the max-tokens spellings that is set becomes ``max_new_tokens``; all are consumed."""
    for key in _MAX_TOKENS_KEYS:
        value = cfg.pop(key, None)
        if value is not None and "max_new_tokens" not in sampling:
            sampling["max_new_tokens"] = value
            opts.max_tokens_given = True


def _include_usage(stream_options: Any, problems: list[str]) -> bool:
    stream_options = stream_options or {}
    if not isinstance(stream_options, dict):
        problems.append(f"stream_options must be an object, got {stream_options!r}")
        return False
    return bool(stream_options.get("include_usage", False))


def _merge_extra_body(cfg: dict[str, Any], problems: list[str]) -> None:
    """Read a literal ``extra_body`` object's entries as top-level fields (see the module docstring)."""
    extra = cfg.pop("extra_body", None)
    if extra is None:
        return
    if not isinstance(extra, dict):
        problems.append(f"extra_body must be an object, got {extra!r}")
        return
    for key, value in extra.items():
        lifted = _LIFTED_FROM_EXTRA_BODY.get(key)
        if lifted is not None and lifted in cfg and cfg[lifted] == value:
            continue  # already at the top level, copied by Xinference's REST layer
        if cfg.get(key) is None:  # None: not set (Xinference fills some fields with None, e.g. max_tokens)
            cfg[key] = value
        elif cfg[key] != value:
            problems.append(f"{key!r} is given both at the top level and in extra_body, with different values")


def _map_structured(cfg: dict[str, Any], sampling: dict[str, Any], problems: list[str]) -> None:
    given: dict[str, tuple[str, Any]] = {}  # request field -> (SamplingParams field, value)

    response_format = cfg.pop("response_format", None)
    if response_format is not None:
        schema = _schema_from_response_format(response_format, problems)
        if schema is not None:
            given["response_format"] = ("json_schema", schema)
    if cfg.pop("guided_json_object", None):
        given["guided_json_object"] = ("json_schema", {"type": "object"})
    for key, target in _STRUCTURED.items():
        value = cfg.pop(key, None)
        if value is None:
            continue
        if target == "json_schema" and isinstance(value, str):
            value = _parse_json_schema(key, value, problems)
        given[key] = (target, value)

    if len(given) > 1:
        problems.append(
            "at most one structured-output constraint per request; got " + ", ".join(sorted(given))
        )
    elif given:
        (target, value), = given.values()
        sampling[target] = value


def _schema_from_response_format(response_format: Any, problems: list[str]) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for; ``None`` for plain text."""
    if not isinstance(response_format, dict):
        problems.append(f"response_format must be an object, got {response_format!r}")
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}  # any JSON object
    if kind == "json_schema":
        block = response_format.get("json_schema")
        # Xinference's request model renames "schema" to "schema_" (a pydantic alias); accept both.
        schema = (block or {}).get("schema_", (block or {}).get("schema")) if isinstance(block, dict) else None
        if isinstance(schema, str):
            schema = _parse_json_schema("response_format.json_schema.schema", schema, problems)
        if not isinstance(schema, dict):
            problems.append("response_format json_schema needs json_schema.schema (a JSON schema object)")
            return None
        return schema
    problems.append(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")
    return None


def _parse_json_schema(key: str, text: str, problems: list[str]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{key} is not valid JSON: {e}")
    except RecursionError:  # Python's parser gives up far beyond the runtime's schema depth limit
        problems.append(f"{key} is nested too deeply (more than a thousand levels) to be read as JSON")
    return None


def _priority(value: Any, problems: list[str]) -> int | None:
    """The request's scheduling priority (an integer; the runtime checks its range and the engine's policy)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    problems.append(
        f"priority must be an integer (larger runs first when the model is launched with schedule_policy "
        f"priority); got {value!r:.40}"
    )
    return None


def _stream_interval(value: Any, problems: list[str]) -> int | None:
    """Xinference's ``stream_interval``: a streamed sequence's first token at once, then a chunk every this many
    tokens, always its last (SGLang's rule); None when the client did not set it (the launch option applies)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    problems.append(f"stream_interval must be an integer >= 1; got {value!r:.40}")
    return None


def _chat_template_kwargs(value: Any, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            problems.append("chat_template_kwargs must be a JSON object")
            return {}
    if not isinstance(value, dict):
        problems.append("chat_template_kwargs must be a JSON object")
        return {}
    return dict(value)


def _map_tools(cfg: dict[str, Any], opts: RequestOptions, kind: RequestKind, problems: list[str]) -> None:
    tools = cfg.pop("tools", None)
    tool_choice = cfg.pop("tool_choice", None)
    parallel = cfg.pop("parallel_tool_calls", None)
    if kind == "completion":
        for name, value in (("tools", tools), ("tool_choice", tool_choice), ("parallel_tool_calls", parallel)):
            if value is not None:
                problems.append(f"{name} applies to chat completions only")
        return
    if parallel is not None:
        opts.parallel_tool_calls = bool(parallel)
    if tool_choice == "none":
        tools = None  # OpenAI: the model must not call a tool; render without them
    elif tool_choice not in (None, "auto"):
        problems.append(
            f"tool_choice={tool_choice!r} is handled by the chat endpoint before mapping (xinf_sglang."
            "forced_tools); here only 'auto' and 'none' are accepted"
        )
    if tools is not None:
        # Xinference's REST layer hands tools over as an iterator, not a list: accept any iterable of objects.
        items = list(tools) if isinstance(tools, Iterable) and not isinstance(tools, (str, bytes, dict)) else None
        if items is None or not all(isinstance(t, dict) for t in items):
            problems.append(f"tools must be a list of tool objects; got {tools!r:.80}")
            return
        tools = items
    opts.tools = tools or None
