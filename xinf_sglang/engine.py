"""The Xinference engine classes of sglite: ``SgliteModel`` (completions) and ``SgliteChatModel`` (chat).

Xinference creates the engine object in the worker process (``__init__``: launch options are validated there,
before any weight is read), pickles it into the model subprocess and calls ``load()`` there, then serves
requests through ``async_generate`` / ``async_chat`` on the model actor's event loop. ``allow_batch = True``
tells the model actor not to serialise requests behind a lock, so concurrent requests reach the runtime
together and share its continuous batch.

Request errors: Xinference 4.1's REST layer turns exactly one exception type from an engine into an HTTP 400,
``xinference.model.llm.context_length.ContextLengthExceeded`` (everything else is a 500). So invalid requests
raise :class:`SgliteRequestError`, a subclass of it. Xinference's chat endpoint replaces the detail of that 400
by a fixed "Request exceeds the model's configured context length." text; :mod:`xinf_sglang.xinference_compat`
patches that so sglite's own message is shown there too (messages of this class must stay free of credentials
and worker internals: they are shown to clients).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, List, Optional, Tuple, Union

from xinference.model.llm.context_length import ContextLengthExceeded
from xinference.model.llm.core import LLM, chat_context_var
from xinference.model.llm.utils import ChatModelMixin

from .launch_options import LaunchOptions, split_model_config, to_engine_config
from .registration import ENGINE_NAME, complete_late_registration, declare_in_virtualenv
from .request_mapping import RequestMappingError, RequestOptions, map_request

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2, LLMSpecV1

    from .runtime import Engine, StreamChunk

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_FORMAT = "pytorch"  # Xinference's name for unquantized HF checkpoints (safetensors or .bin)
GGUF_FORMAT = "ggufv2"  # llama.cpp files; dequantized at load
# GGUF file quantizations (llama.cpp's names) whose tensor types the runtime dequantizes (runtime.models.gguf)
GGUF_QUANTIZATIONS = re.compile(r"(?i)^(F32|F16|BF16|Q8_0|Q4_0|Q4_1|Q5_0|Q5_1|Q2_K(_S)?|Q3_K_[SML]|Q4_K_[SM]|Q5_K_[SM]|Q6_K)$")
_TEXT_ONLY_BLOCKERS = ("vision", "audio", "omni", "embed")


class SgliteRequestError(ContextLengthExceeded):
    """An invalid request (bad sampling value, unsupported field, prompt too long). Becomes an HTTP 400.

    Subclasses ``ContextLengthExceeded`` only because that is the one engine exception Xinference 4.1's REST
    layer maps to 400; the message says what was actually wrong.
    """


class SgliteModel(LLM):
    """sglite serving a generate-only family (``/v1/completions``); base of :class:`SgliteChatModel`."""

    # Let Xinference's model actor run requests concurrently (no per-model lock): the runtime batches them.
    allow_batch = True

    def __init__(
        self,
        model_uid: str,
        model_family: "LLMFamilyV2",
        model_path: str,
        model_config: Optional[Dict[str, Any]] = None,
        peft_model: Optional[List[Any]] = None,
    ):
        super().__init__(model_uid, model_family, model_path)
        if peft_model:
            raise ValueError("sglite does not support LoRA adapters; launch without --lora-modules")
        # With per-model virtualenvs Xinference may pick an engine listed in a family's virtualenv markers
        # without running its compatibility check ("bypassing engine compatibility checks"): check here, in
        # the worker, before anything is loaded.
        ok = type(self).match_json(model_family, self.model_spec, self.quantization)
        if ok is not True:
            raise ValueError(ok[1] if isinstance(ok, tuple) else f"{ENGINE_NAME} cannot serve this model")
        # Validates every option (unknown keys, ranges); raises LaunchOptionsError (a ValueError -> HTTP 400).
        self._options, xinference_keys = split_model_config(model_config)
        self._reasoning_content = _as_bool(xinference_keys.get("reasoning_content"), False)
        self._enable_thinking = _as_bool(xinference_keys.get("enable_thinking"), False)
        self._engine: Optional["Engine"] = None
        self._tokenizer: Any = None
        self._context_length = 0
        self._active_requests: set[str] = set()
        self._aborted_by_client = 0  # streams closed before they finished (client disconnects, aborts)
        logger.info("%s: launch options for %s: %s", ENGINE_NAME, model_uid, self._options.model_dump())

    # ---- Xinference engine contract: discovery ----

    @classmethod
    def check_lib(cls) -> Union[bool, Tuple[bool, str]]:
        """Whether the runtime's dependencies are importable (checked without importing torch)."""
        missing = [m for m in ("torch", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"sglite needs {', '.join(missing)}; reinstall xinf-sglang"
        return True

    @classmethod
    def match(cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str) -> bool:
        # Called for every family when Xinference builds its engine table (start-up, catalog refresh, custom
        # registration): the place to declare sglite in families that restrict engines by virtualenv markers.
        declare_in_virtualenv(llm_family)
        return super().match(llm_family, llm_spec, quantization)

    @classmethod
    def match_json(
        cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str
    ) -> Union[bool, Tuple[bool, str]]:
        """Whether sglite can serve this family + spec; ``(False, reason)`` otherwise (shown in the web UI)."""
        declare_in_virtualenv(llm_family)  # also reached from the engine listing, which calls match_json directly
        return _match_model(llm_family, llm_spec, quantization, need_chat=False)

    # ---- lifecycle ----

    def load(self) -> None:
        """Create the runtime engine (in the model subprocess). ``device=auto`` picks CUDA when available."""
        import torch  # noqa: F401  (import here: the worker and the supervisor never need torch)

        from .runtime import Engine
        from .runtime.errors import ConfigError

        options = self._options
        if options.device == "auto":
            options = options.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
        started = time.monotonic()
        try:
            self._engine = Engine(to_engine_config(options, self._checkpoint_path()))
        except ConfigError as e:
            raise ValueError(f"sglite cannot load {self.model_path}: {e}") from None
        self._tokenizer = self._engine.tokenizer
        self._context_length = int(self._engine.context_length)
        self._prepare_parsers()
        logger.info(
            "%s: %s loaded on %s in %.1fs, context_length=%d",
            ENGINE_NAME, self.model_uid, options.device, time.monotonic() - started, self._context_length,
        )

    def _checkpoint_path(self) -> str:
        """What the runtime opens: the model folder, or for ``ggufv2`` the spec's GGUF file in it."""
        if self.model_spec.model_format == GGUF_FORMAT:
            return gguf_file(self.model_path, self.model_spec)
        return self.model_path

    def _prepare_parsers(self) -> None:
        """Reasoning / tool-call parsers of the family (Xinference's own, as the other engines use them)."""
        family = self.model_family
        if family.reasoning_start_tag or family.reasoning_end_tag or "reasoning" in family.model_ability:
            self.prepare_parse_reasoning_content(self._reasoning_content, enable_thinking=self._enable_thinking)
        self.prepare_parse_tool_calls()

    def stop(self) -> None:
        """Shut the runtime down (aborts what is left and frees the KV pool and the weights)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            logger.info("%s: %s stopped", ENGINE_NAME, self.model_uid)

    def wait_for_load(self) -> None:
        """Loading is synchronous in ``load``; nothing to wait for."""

    # ---- observability (callable on the model actor: ModelActor forwards unknown attributes here) ----

    def sglite_metrics(self) -> Dict[str, Any]:
        """Runtime counters (KV pool, running/waiting requests, cache hit rate) plus this plugin's own.

        Reach it through Xinference's model actor, e.g. ``xinf_sglang.metrics.get_runtime_metrics``.
        """
        if self._engine is None:
            raise RuntimeError(f"model {self.model_uid} is not loaded")
        metrics: Dict[str, Any] = dict(self._engine.metrics())
        metrics.update(
            plugin_active_requests=len(self._active_requests),
            plugin_client_aborts=self._aborted_by_client,
            context_length=self._context_length,
            launch_options=self._options.model_dump(),
            pid=os.getpid(),
        )
        return metrics

    # ---- requests ----

    async def abort_request(self, request_id: str) -> str:
        """Abort a running request (Xinference's ``/v1/models/{uid}/requests/{id}/abort``)."""
        if self._engine is None or request_id not in self._active_requests:
            return "NO_OP"
        self._engine.abort(request_id)
        return "DONE"

    async def async_generate(
        self,
        prompt: str,
        generate_config: Optional[Dict[str, Any]] = None,
        request_id: Optional[str] = None,
    ) -> Union[Dict[str, Any], AsyncGenerator[Dict[str, Any], None]]:
        """``/v1/completions``: a ``Completion`` dict, or an async generator of ``CompletionChunk`` dicts."""
        sampling, opts = _map(generate_config, "completion")
        if not isinstance(prompt, str):
            raise SgliteRequestError("sglite completions take one prompt string per request")
        self._check_text(prompt, "prompt")
        # Completions follow the HF convention of the model's own BOS handling (add_special_tokens=True).
        # Tokenized on a thread: a long prompt must not stall the model actor's loop, which serves everyone.
        input_ids = await asyncio.to_thread(self._encode, prompt, True)
        echo = prompt if opts.echo else ""
        return await self._run(input_ids, sampling, opts, request_id, echo=echo)

    def _encode(self, text: str, add_special_tokens: bool) -> List[int]:
        self._require_loaded()
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _check_text(self, text: str, field: str) -> None:
        """Refuse text no prompt can hold (lone surrogate, longer than any prompt that fits) before any work."""
        from .runtime.errors import InvalidRequestError

        self._require_loaded()
        try:
            self._engine.check_prompt_text(text, field)
        except InvalidRequestError as e:
            raise SgliteRequestError(str(e)) from None

    def _require_loaded(self) -> None:
        if self._engine is None:
            raise RuntimeError(f"model {self.model_uid} is not loaded")

    async def _run(
        self,
        input_ids: List[int],
        sampling: Dict[str, Any],
        opts: RequestOptions,
        request_id: Optional[str],
        echo: str = "",
    ) -> Union[Dict[str, Any], AsyncGenerator[Dict[str, Any], None]]:
        """Start one request; validation errors raise here, before anything streams."""
        self._require_loaded()
        params = self._sampling_params(sampling, opts, len(input_ids))
        request_id = request_id or uuid.uuid4().hex
        stream = self._stream(input_ids, params, request_id)
        # Prime the stream: the runtime validates (length vs context, stop ids, grammar) on the first step of
        # the iterator, so this turns a bad request into an exception of this call, not of the stream.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:  # pragma: no cover - the runtime always ends with a finish chunk
            raise RuntimeError("sglite returned no output")
        chunks = _completion_chunks(first, stream, request_id, self.model_uid, opts.include_usage, echo)
        if opts.stream:
            return chunks
        return await _collect_completion(chunks, request_id, self.model_uid)

    def _sampling_params(self, sampling: Dict[str, Any], opts: RequestOptions, prompt_tokens: int) -> Any:
        from .runtime import SamplingParams
        from .runtime.errors import InvalidRequestError

        sampling = dict(sampling)
        if not opts.max_tokens_given:
            # OpenAI semantics: no max_tokens means "up to the context length" (Xinference's
            # XINFERENCE_MAX_TOKENS caps it when set, as it does for the other engines).
            sampling["max_new_tokens"] = _default_max_tokens(self._context_length, prompt_tokens)
        try:
            return SamplingParams(**sampling)
        except InvalidRequestError as e:
            raise SgliteRequestError(str(e)) from None

    async def _stream(self, input_ids: List[int], params: Any, request_id: str) -> AsyncGenerator["StreamChunk", None]:
        """The runtime's stream for one request, with bookkeeping; closing it early aborts the request."""
        from .runtime.errors import InvalidRequestError

        assert self._engine is not None
        # on_finish: the request leaves the bookkeeping when the runtime finishes it, even if this generator is
        # never resumed or closed (Xinference leaves a stream abandoned by a client disconnect to the garbage
        # collector, which may not run for a long time in an idle model process).
        engine_stream = self._engine.generate_stream(
            input_ids=input_ids, sampling_params=params, request_id=request_id,
            on_finish=self._active_requests.discard,
        )
        received = finished = False
        self._active_requests.add(request_id)
        try:
            async for chunk in engine_stream:
                if chunk.error:
                    raise _stream_error(request_id, chunk.error)
                received = True
                finished = chunk.finish_reason is not None
                yield chunk
        except InvalidRequestError as e:
            raise SgliteRequestError(str(e)) from None
        finally:
            self._active_requests.discard(request_id)
            # aclose() the runtime's iterator now rather than at garbage collection: its finally aborts the
            # request in the scheduler, which frees the request's KV slots.
            await engine_stream.aclose()
            if received and not finished:
                self._aborted_by_client += 1
                logger.info("%s: request %s closed before it finished; aborted, KV freed", ENGINE_NAME, request_id)


class SgliteChatModel(SgliteModel, ChatModelMixin):
    """sglite serving a chat family: ``/v1/chat/completions`` (+ completions, inherited)."""

    def __init__(self, *args: Any, **kwargs: Any):
        SgliteModel.__init__(self, *args, **kwargs)
        ChatModelMixin.__init__(self)
        self._chat_template: Optional[str] = None
        self._chat_stop_token_ids: List[int] = []
        self._chat_stop_strings: List[str] = []

    @classmethod
    def match_json(
        cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str
    ) -> Union[bool, Tuple[bool, str]]:
        declare_in_virtualenv(llm_family)
        return _match_model(llm_family, llm_spec, quantization, need_chat=True)

    def load(self) -> None:
        super().load()
        self._chat_template = self._select_chat_template()
        self._chat_stop_token_ids, self._chat_stop_strings = self._family_stops()

    def _select_chat_template(self) -> str:
        """The family's template, or the checkpoint's own when the family has none.

        A custom registration without ``chat_template`` gets its ``model_family`` *name* as template from
        Xinference; that is not Jinja, so the checkpoint's template (tokenizer_config / chat_template.jinja)
        is used instead.
        """
        template = self.model_family.chat_template
        if template and ("{{" in template or "{%" in template):
            return template
        own = getattr(self._tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: take the default one
            own = own.get("default") or next(iter(own.values()), None)
        if not own:
            raise ValueError(
                f"{self.model_uid}: the model family has no chat template and the checkpoint at {self.model_path} "
                "ships none; register the model with a chat_template"
            )
        return own

    def _family_stops(self) -> Tuple[List[int], List[str]]:
        """Token ids / strings that end a chat turn, resolved against this checkpoint's tokenizer.

        A family's ``stop_token_ids`` are only valid for the checkpoints it was written for (a built-in family
        launched with ``--model-path`` on another tokenizer may not have them); its ``stop`` strings are mapped
        to this tokenizer's ids when they are single tokens (chat markers such as ``<|im_end|>``), which also
        works when special tokens are skipped from the text.
        """
        tok = self._tokenizer
        vocab = len(tok)
        ids: set[int] = set()
        strings: List[str] = []
        for s in self.model_family.stop or []:
            token_id = tok.convert_tokens_to_ids(s)
            if isinstance(token_id, int) and 0 <= token_id < vocab and token_id != tok.unk_token_id:
                ids.add(token_id)
            else:
                strings.append(s)
        stop_strings = set(self.model_family.stop or [])
        for i in self.model_family.stop_token_ids or []:
            # Trust a family id only if it names one of the family's stop strings in *this* vocabulary.
            if 0 <= i < vocab and (not stop_strings or tok.convert_ids_to_tokens(i) in stop_strings):
                ids.add(i)
        return sorted(ids), strings

    async def async_chat(
        self,
        messages: List[Dict[str, Any]],
        generate_config: Optional[Dict[str, Any]] = None,
        request_id: Optional[str] = None,
    ) -> Union[Dict[str, Any], AsyncGenerator[Dict[str, Any], None]]:
        """``/v1/chat/completions``: a ``ChatCompletion`` dict, or an async generator of chunk dicts."""
        self._require_loaded()
        config = dict(generate_config or {})
        anthropic = bool(config.get("_anthropic_request", False))
        sampling, opts = _map(config, "chat")
        tools = opts.tools if self._family_supports_tools() else None
        if opts.tools and tools is None:
            raise SgliteRequestError(f"model family {self.model_family.model_name} does not support tools")

        template_kwargs = self._get_chat_template_kwargs_from_generate_config(
            {"chat_template_kwargs": opts.chat_template_kwargs} if opts.chat_template_kwargs else None,
            self.reasoning_parser,
        ) or {}
        chat_context_var.set(template_kwargs)
        render_kwargs = dict(template_kwargs)
        if tools:
            render_kwargs["tools"] = tools
        self._check_messages(messages, tools)
        # Rendered and tokenized on a thread (the context variable travels with it): a slow request must not
        # stall the model actor's event loop, which every other request of this model goes through.
        input_ids = await asyncio.to_thread(self._render_and_encode, messages, render_kwargs)

        sampling = self._with_chat_stops(sampling, tools)
        parallel = opts.parallel_tool_calls
        want_stream = opts.stream
        completion = await self._run(input_ids, sampling, opts, request_id)
        ctx = {**template_kwargs, "_anthropic_request": anthropic}
        if want_stream:
            assert not isinstance(completion, dict)
            if tools:
                chunks = self._async_to_tool_completion_chunks(completion, ctx, tools)
            else:
                chunks = self._async_to_chat_completion_chunks(completion, self.reasoning_parser, ctx)
            if not parallel:
                from xinference.model.llm.tool_controls import single_tool_stream

                return single_tool_stream(chunks)
            return chunks
        assert isinstance(completion, dict)
        if tools:
            result = self._post_process_completion(self.model_family, self.model_uid, completion, tools)
        else:
            result = self._to_chat_completion(completion, self.reasoning_parser)
        if not parallel:
            from xinference.model.llm.tool_controls import single_tool_completion

            result = single_tool_completion(result)
        return result

    def _check_messages(self, messages: Any, tools: Optional[List[Dict[str, Any]]]) -> None:
        """Cheap bounds before templating: no more messages than context tokens, every string valid Unicode,
        and all their text together no longer than any prompt that fits (templates add text, never remove it)."""
        if not isinstance(messages, list):
            raise SgliteRequestError(f"messages must be a list; got {type(messages).__name__}")
        if len(messages) > self._context_length:
            raise SgliteRequestError(
                f"messages has {len(messages)} entries; context_length is {self._context_length} tokens, "
                "and every message takes at least one"
            )
        total = 0
        for field, text in _strings(messages, "messages") + _strings(tools or [], "tools"):
            self._check_text(text, field)
            total += len(text)
        self._check_text_length(total, "messages")

    def _check_text_length(self, chars: int, field: str) -> None:
        limit = self._engine.max_prompt_chars
        if chars > limit:
            raise SgliteRequestError(
                f"{field} hold {chars} characters of text; with context_length {self._context_length} a prompt "
                f"can have at most {limit}"
            )

    def _render_and_encode(self, messages: List[Dict[str, Any]], render_kwargs: Dict[str, Any]) -> List[int]:
        """The chat prompt's token ids (runs on a worker thread)."""
        try:
            prompt = self.get_full_context(
                self.prefill_messages(messages), self._chat_template, tokenizer=self._tokenizer, **render_kwargs
            )
        except Exception as e:  # a template that rejects the messages (roles, order) is the client's error
            raise SgliteRequestError(f"the chat template could not render these messages: {e}") from None
        self._check_text(prompt, "the rendered chat prompt")
        # The rendered template already holds BOS / chat markers: encode without adding special tokens.
        return self._encode(prompt, add_special_tokens=False)

    def _family_supports_tools(self) -> bool:
        return "tools" in self.model_family.model_ability and self.tool_parser is not None

    def _with_chat_stops(self, sampling: Dict[str, Any], tools: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
        """Add the family's end-of-turn tokens (always) and its other stop strings (when the client gave none)."""
        sampling = dict(sampling)
        ids = list(sampling.get("stop_token_ids") or [])
        sampling["stop_token_ids"] = ids + [i for i in self._chat_stop_token_ids if i not in ids]
        if self._chat_stop_strings and not sampling.get("stop"):
            sampling["stop"] = list(self._chat_stop_strings)
        if (tools or self._thinking_enabled()) and "skip_special_tokens" not in sampling:
            # Tool-call and reasoning markers can be special tokens; the parsers need to see them.
            sampling["skip_special_tokens"] = False
        return sampling

    def _thinking_enabled(self) -> bool:
        parser = self.reasoning_parser
        return bool(parser and parser.reasoning_end_tag and parser.is_enable_thinking())


# ---------------------------------------------------------------------------------------------------------
# helpers


def _match_model(
    family: "LLMFamilyV2", spec: "LLMSpecV1", quantization: str, need_chat: bool
) -> Union[bool, Tuple[bool, str]]:
    archs = _architectures(family, spec)
    serves = (
        f"sglite serves {SUPPORTED_FORMAT} (safetensors) and {GGUF_FORMAT} checkpoints of "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )
    fmt = spec.model_format
    if fmt not in (SUPPORTED_FORMAT, GGUF_FORMAT):
        return False, f"{serves}; this spec is {fmt}"
    if fmt == SUPPORTED_FORMAT and quantization not in (None, "", "none"):
        return False, f"{serves}; {fmt} specs without quantization only, this one is quantized ({quantization})"
    if fmt == GGUF_FORMAT and not GGUF_QUANTIZATIONS.match(quantization or ""):
        return False, (
            f"sglite dequantizes GGUF files of types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K quants "
            f"Q2_K..Q6_K; this spec is {quantization}"
        )
    if not archs:
        return False, (
            f"{serves}; the architecture of {family.model_name} is unknown: add "
            f'"architectures": ["Qwen2ForCausalLM"] (or another one) to the model registration'
        )
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return False, f"{serves}; {family.model_name} is {', '.join(archs)}"
    abilities = set(family.model_ability or [])
    blocked = [a for a in _TEXT_ONLY_BLOCKERS if a in abilities]
    if blocked:
        return False, f"sglite serves text-only models; {family.model_name} has {', '.join(blocked)} ability"
    if need_chat and "chat" not in abilities:
        return False, "the sglite chat engine needs a family with chat ability"
    if not need_chat and "generate" not in abilities and "chat" not in abilities:
        return False, "sglite needs a family with generate or chat ability"
    return True


def _architectures(family: "LLMFamilyV2", spec: "LLMSpecV1") -> List[str]:
    """The family's architectures, else those of a local checkpoint's config.json (custom registrations)."""
    resolve = getattr(family, "_resolve_architectures", None)
    archs = resolve() if callable(resolve) else getattr(family, "architectures", None)
    if archs:
        return list(archs)
    uri = getattr(spec, "model_uri", None) or ""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if path and spec.model_format == GGUF_FORMAT:
        return _gguf_architectures(path, spec)
    config = os.path.join(path, "config.json") if path else ""
    if config and os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                return list(json.load(f).get("architectures") or [])
        except (OSError, ValueError):
            return []
    return []


def _gguf_architectures(path: str, spec: "LLMSpecV1") -> List[str]:
    """The architecture of a local GGUF file, read from its header (no torch, a few hundred bytes)."""
    from .runtime.models.gguf_header import hf_architecture

    try:
        arch = hf_architecture(gguf_file(path, spec))
    except (OSError, ValueError):
        return []
    return [arch] if arch else []


def gguf_file(model_path: str, spec: "LLMSpecV1") -> str:
    """The GGUF file Xinference means: ``model_path`` itself, or the spec's file (first part of a split file)
    in the ``model_path`` folder, as Xinference's llama.cpp engine resolves it."""
    if os.path.isfile(model_path):
        return model_path
    quantization = spec.quantization
    parts = (getattr(spec, "quantization_parts", None) or {}).get(quantization)
    split_template = getattr(spec, "model_file_name_split_template", None)
    if split_template and parts:
        return os.path.join(model_path, split_template.format(quantization=quantization, part=parts[0]))
    return os.path.join(model_path, spec.model_file_name_template.format(quantization=quantization))


def _strings(value: Any, where: str) -> List[Tuple[str, str]]:
    """``(path, text)`` of every string inside ``value`` (messages, tools), walked without recursion."""
    found: List[Tuple[str, str]] = []
    stack: List[Tuple[str, Any]] = [(where, value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            found.append((path, node))
        elif isinstance(node, dict):
            stack.extend((f"{path}.{k}", v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
    return found


# Runtime abort messages caused by the request's own constraint (a 400), as opposed to engine failures (a 500,
# whose text may name internals and stays in the server log).
_REQUEST_ABORTS = ("grammar rejected token",)


def _stream_error(request_id: str, error: str) -> Exception:
    """The exception for a request the runtime aborted mid-stream."""
    if error.startswith(_REQUEST_ABORTS):
        return SgliteRequestError(f"sglite stopped request {request_id}: {error}")
    return RuntimeError(f"sglite aborted request {request_id}: {error}")


def _map(config: Optional[Dict[str, Any]], kind: str) -> Tuple[Dict[str, Any], RequestOptions]:
    try:
        return map_request(config, kind)  # type: ignore[arg-type]
    except RequestMappingError as e:
        raise SgliteRequestError(str(e)) from None


def _as_bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _default_max_tokens(context_length: int, prompt_tokens: int) -> int:
    from xinference.constants import XINFERENCE_MAX_TOKENS

    room = max(context_length - prompt_tokens, 0)
    return min(room, XINFERENCE_MAX_TOKENS) if XINFERENCE_MAX_TOKENS else room


def _usage(chunk: "StreamChunk") -> Dict[str, Any]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens},
    }


def _completion_chunk(
    request_id: str, model_uid: str, text: Optional[str], finish_reason: Optional[str], usage: Optional[Dict]
) -> Dict[str, Any]:
    choices = [] if text is None else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]
    chunk: Dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_uid,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def _completion_chunks(
    first: "StreamChunk",
    rest: AsyncGenerator["StreamChunk", None],
    request_id: str,
    model_uid: str,
    include_usage: bool,
    echo: str,
) -> AsyncGenerator[Dict[str, Any], None]:
    """Runtime stream chunks -> OpenAI ``CompletionChunk`` dicts (usage on the final one, cached tokens too).

    Closing this generator closes ``rest`` (the runtime stream), which aborts the request.
    """
    try:
        chunk: Optional["StreamChunk"] = first
        pending_echo = echo
        while chunk is not None:
            text = pending_echo + chunk.text
            pending_echo = ""
            if chunk.finish_reason is not None:
                usage = _usage(chunk)
                yield _completion_chunk(request_id, model_uid, text, chunk.finish_reason, usage)
                if include_usage:
                    yield _completion_chunk(request_id, model_uid, None, None, usage)
                return
            if text:
                yield _completion_chunk(request_id, model_uid, text, None, None)
            chunk = await rest.__anext__()
    finally:
        await rest.aclose()


async def _collect_completion(
    chunks: AsyncGenerator[Dict[str, Any], None], request_id: str, model_uid: str
) -> Dict[str, Any]:
    """Drain a completion stream into one ``Completion`` dict."""
    text: List[str] = []
    finish_reason: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None
    try:
        async for chunk in chunks:
            for choice in chunk["choices"]:
                text.append(choice.get("text") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = chunk.get("usage") or usage
    finally:
        await chunks.aclose()
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_uid,
        "choices": [{"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }


# If xinference.model was bootstrapped by this module's own import (a model subprocess unpickling its engine),
# the registration hook had to wait for the classes above.
complete_late_registration([SgliteChatModel, SgliteModel])

__all__ = ["SUPPORTED_ARCHITECTURES", "LaunchOptions", "SgliteChatModel", "SgliteModel", "SgliteRequestError"]
