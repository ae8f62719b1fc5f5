"""The Xinference engine classes of sglite: ``SgliteModel`` (completions) and ``SgliteChatModel`` (chat).

Xinference creates the engine object in the worker process (``__init__``: launch options are validated there,
before any weight is read), pickles it into the model subprocess and calls ``load()`` there, then serves
requests through ``async_generate`` / ``async_chat`` on the model actor's event loop. ``allow_batch = True``
tells the model actor not to serialise requests behind a lock, so concurrent requests reach the runtime
together and share its continuous batch.

This module is the adapter: discovery (``match_json``, via :mod:`xinf_sglang.registration.matching`), load and lifecycle, and
request dispatch with its bookkeeping. Chat templates, stops, tools and reasoning are in :mod:`xinf_sglang.openai_api.chat`;
the OpenAI payloads built from the runtime's stream in :mod:`xinf_sglang.openai_api.chunks`.

Request errors: Xinference 4.1's REST layer turns exactly one exception type from an engine into an HTTP 400,
``xinference.model.llm.context_length.ContextLengthExceeded`` (everything else is a 500). So invalid requests
raise :class:`SgliteRequestError`, a subclass of it. Xinference's chat endpoint replaces the detail of that 400
by a fixed "Request exceeds the model's configured context length." text; :mod:`xinf_sglang.compat.patches`
patches that so sglite's own message is shown there too (messages of this class must stay free of credentials
and worker internals: they are shown to clients).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, List, Optional, Tuple, Union

from xinference.model.llm.context_length import ContextLengthExceeded
from xinference.model.llm.core import LLM, chat_context_var
from xinference.model.llm.utils import ChatModelMixin

from ..openai_api import chat, choices
from .engine_failure import FailureWatch
from ..openai_api import forced_tools
from .launch_options import LaunchOptions, split_model_config, to_engine_config
from ..openai_api.logprobs import LogprobFormatter
from ..registration.matching import GGUF_FORMAT, SUPPORTED_ARCHITECTURES, gguf_file, match_model
from .metrics import metric_labels, replica_model_uid
from ..openai_api.chunks import collect_completion, completion_chunks
from ..registration.engine_tables import ENGINE_NAME, complete_late_registration, declare_in_virtualenv
from ..openai_api.request_mapping import RequestMappingError, RequestOptions, map_request

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2, LLMSpecV1

    from ..runtime import Engine, StreamChunk

logger = logging.getLogger(__name__)


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
        self._failure_watch: Optional[FailureWatch] = None  # tensor parallelism: ends the process on a rank failure
        self._tokenizer: Any = None
        self._token_texts: Dict[int, str] = {}  # token id -> its own decode (logprobs), filled as met
        self._context_length = 0
        self._active_requests: set[str] = set()
        self._aborted_by_client = 0  # streams closed before they finished (client disconnects, aborts)
        self._replica_model_uid = model_uid  # this process's replica (<uid>-rep<n>), found at load
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
        return match_model(llm_family, llm_spec, quantization, need_chat=False)

    # ---- lifecycle ----

    def load(self) -> None:
        """Create the runtime engine (in the model subprocess). ``device=auto`` picks CUDA when available."""
        import torch  # noqa: F401  (import here: the worker and the supervisor never need torch)

        from ..runtime import Engine
        from ..runtime.errors import ConfigError

        options = self._options
        if options.device == "auto":
            options = options.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
        started = time.monotonic()
        try:
            self._replica_model_uid = replica_model_uid(self.model_uid)
            labels = metric_labels(self._replica_model_uid, self.model_family.model_name)
            self._engine = Engine(to_engine_config(options, self._checkpoint_path()), metric_labels=labels)
        except ConfigError as e:
            raise ValueError(f"sglite cannot load {self.model_path}: {e}") from None
        self._tokenizer = self._engine.tokenizer
        self._context_length = int(self._engine.context_length)
        if self._engine.tp is not None:
            self._failure_watch = FailureWatch(self.model_uid, self._engine.tp, lambda: len(self._active_requests),
                                               self._engine.shutdown)
        chat.prepare_parsers(self, self._reasoning_content, self._enable_thinking)
        if self._engine.metrics_endpoint is not None:
            logger.info("%s: %s serves Prometheus metrics at %s", ENGINE_NAME, self._replica_model_uid,
                        self._engine.metrics_endpoint.url)
        logger.info(
            "%s: %s loaded on %s in %.1fs, context_length=%d",
            ENGINE_NAME, self.model_uid, options.device, time.monotonic() - started, self._context_length,
        )

    def _checkpoint_path(self) -> str:
        """What the runtime opens: the model folder, or for ``ggufv2`` the spec's GGUF file in it."""
        if self.model_spec.model_format == GGUF_FORMAT:
            return gguf_file(self.model_path, self.model_spec)
        return self.model_path

    def stop(self) -> None:
        """Shut the runtime down (aborts what is left and frees the KV pool and the weights)."""
        engine, self._engine = self._engine, None
        if self._failure_watch is not None:
            self._failure_watch.stop()
        if engine is not None:
            engine.shutdown()
            logger.info("%s: %s stopped", ENGINE_NAME, self.model_uid)

    def wait_for_load(self) -> None:
        """Loading is synchronous in ``load``; nothing to wait for."""

    # ---- observability (callable on the model actor: ModelActor forwards unknown attributes here) ----

    def sglite_metrics(self) -> Dict[str, Any]:
        """Runtime counters (KV pool, running/waiting requests, cache hit rate) plus this plugin's own.

        Reach it through Xinference's model actor, e.g. ``xinf_sglang.serving.metrics.get_runtime_metrics`` (per replica).
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
            replica_model_uid=self._replica_model_uid,
            prometheus_url=self._engine.metrics_endpoint.url if self._engine.metrics_endpoint is not None else None,
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
        from ..runtime.errors import InvalidRequestError

        self._require_loaded()
        try:
            self._engine.check_prompt_text(text, field)
        except InvalidRequestError as e:
            raise SgliteRequestError(str(e)) from None

    def _require_loaded(self) -> None:
        if self._engine is None:
            raise RuntimeError(f"model {self.model_uid} is not loaded")

    def _raise_if_failed(self) -> None:
        """Refuse requests once the engine failed for good (the process is about to end: `engine_failure`)."""
        error = self._failure_watch.error() if self._failure_watch is not None else None
        if error is not None:
            raise error

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
        self._raise_if_failed()
        params = self._sampling_params(sampling, opts, len(input_ids))
        request_id = request_id or uuid.uuid4().hex
        stream = self._stream(input_ids, params, request_id, opts.priority)
        # Prime the stream: the runtime validates (length vs context, stop ids, grammar) on the first step of
        # the iterator, so this turns a bad request into an exception of this call, not of the stream.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:  # pragma: no cover - the runtime always ends with a finish chunk
            raise RuntimeError("sglite returned no output")
        chunks = completion_chunks(first, stream, request_id, self.model_uid, opts.include_usage, echo, params.n,
                                   self._logprob_formatter(params, input_ids))
        if opts.stream:
            return chunks
        return await collect_completion(chunks, request_id, self.model_uid)

    def _logprob_formatter(self, params: Any, input_ids: List[int]) -> Optional[Any]:
        """Makes each choice's OpenAI ``logprobs`` builder, when the request asked for logprobs (with the prompt's
        ids when it is echoed with them); None otherwise."""
        if not (params.wants_output_logprobs or params.wants_prompt_logprobs):
            return None
        prompt = input_ids if params.wants_prompt_logprobs else None
        return functools.partial(LogprobFormatter, self._token_text, prompt)

    def _token_text(self, token_id: int) -> str:
        """A token's own text (special tokens included), as logprobs show it."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _sampling_params(self, sampling: Dict[str, Any], opts: RequestOptions, prompt_tokens: int) -> Any:
        from ..runtime import SamplingParams
        from ..runtime.errors import InvalidRequestError

        sampling = dict(sampling)
        if not opts.max_tokens_given:
            # OpenAI semantics: no max_tokens means "up to the context length" (Xinference's
            # XINFERENCE_MAX_TOKENS caps it when set, as it does for the other engines).
            sampling["max_new_tokens"] = _default_max_tokens(self._context_length, prompt_tokens)
        try:
            return SamplingParams(**sampling)
        except InvalidRequestError as e:
            raise SgliteRequestError(str(e)) from None

    async def _stream(
        self, input_ids: List[int], params: Any, request_id: str, priority: Optional[int]
    ) -> AsyncGenerator["StreamChunk", None]:
        """The runtime's stream for one request, with bookkeeping; closing it early aborts the request."""
        from ..runtime.errors import InvalidRequestError

        assert self._engine is not None
        # on_finish: the request leaves the bookkeeping when the runtime finishes it, even if this generator is
        # never resumed or closed (Xinference leaves a stream abandoned by a client disconnect to the garbage
        # collector, which may not run for a long time in an idle model process).
        engine_stream = self._engine.generate_stream(
            input_ids=input_ids, sampling_params=params, request_id=request_id, priority=priority,
            on_finish=self._active_requests.discard,
        )
        received = finished = False
        self._active_requests.add(request_id)
        try:
            async for chunk in engine_stream:
                if chunk.error:
                    self._raise_if_failed()
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
        self._chat_stops = chat.ChatStops()

    @classmethod
    def match_json(
        cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str
    ) -> Union[bool, Tuple[bool, str]]:
        declare_in_virtualenv(llm_family)
        return match_model(llm_family, llm_spec, quantization, need_chat=True)

    def load(self) -> None:
        """Load the runtime (see :meth:`SgliteModel.load`), then the chat template and the chat stops."""
        super().load()
        self._chat_template = chat.select_chat_template(
            self.model_family, self._tokenizer, self.model_uid, self.model_path
        )
        self._chat_stops = chat.ChatStops.of_family(self.model_family, self._tokenizer)

    async def async_chat(
        self,
        messages: List[Dict[str, Any]],
        generate_config: Optional[Dict[str, Any]] = None,
        request_id: Optional[str] = None,
    ) -> Union[Dict[str, Any], AsyncGenerator[Dict[str, Any], None]]:
        """``/v1/chat/completions``: a ``ChatCompletion`` dict, or an async generator of chunk dicts."""
        self._require_loaded()
        config = dict(generate_config or {})
        if forced_tools.is_forced(config):  # the call's JSON enforced by the grammar, parsed into tool_calls
            try:
                return await forced_tools.forced_tool_chat(self.async_chat, messages, config, request_id)
            except forced_tools.ToolChoiceError as e:
                raise SgliteRequestError(str(e)) from None
        anthropic = bool(config.get("_anthropic_request", False))
        sampling, opts = _map(config, "chat")
        tools = self._chat_tools(opts)
        template_kwargs = chat.template_kwargs(self, opts.chat_template_kwargs)
        chat_context_var.set(template_kwargs)
        render_kwargs = {**template_kwargs, "tools": tools} if tools else dict(template_kwargs)
        self._check_messages(messages, tools)
        # Rendered and tokenized on a thread (the context variable travels with it): a slow request must not
        # stall the model actor's event loop, which every other request of this model goes through.
        input_ids = await asyncio.to_thread(self._render_and_encode, messages, render_kwargs)
        sampling = self._chat_stops.apply(sampling, keep_special_tokens=bool(tools) or chat.thinking_enabled(self))
        completion = await self._run(input_ids, sampling, opts, request_id)
        n = sampling.get("n") or 1  # valid: _run built the SamplingParams
        if opts.stream:
            assert not isinstance(completion, dict)
            ctx = {**template_kwargs, "_anthropic_request": anthropic}

            def convert(stream: AsyncGenerator[Dict[str, Any], None]) -> AsyncGenerator[Dict[str, Any], None]:
                return chat.chat_stream(self, stream, tools, ctx, opts.parallel_tool_calls)

            # n > 1: Xinference's conversions serve one choice per stream, so each choice gets its own
            return convert(completion) if n == 1 else choices.per_choice_stream(completion, n, convert)
        assert isinstance(completion, dict)
        if n == 1:
            return chat.chat_reply(self, completion, tools, opts.parallel_tool_calls)
        replies = [chat.chat_reply(self, one, tools, opts.parallel_tool_calls)
                   for one in choices.split_completion(completion)]
        return choices.merge_replies(replies, completion["usage"])

    def _chat_tools(self, opts: RequestOptions) -> Optional[List[Dict[str, Any]]]:
        """The request's tools; refused when the family cannot call tools."""
        if opts.tools and not chat.supports_tools(self):
            raise SgliteRequestError(f"model family {self.model_family.model_name} does not support tools")
        return opts.tools or None

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
            prompt = chat.render_prompt(self, messages, self._chat_template, self._tokenizer, render_kwargs)
        except Exception as e:  # a template that rejects the messages (roles, order) is the client's error
            raise SgliteRequestError(f"the chat template could not render these messages: {e}") from None
        self._check_text(prompt, "the rendered chat prompt")
        # The rendered template already holds BOS / chat markers: encode without adding special tokens.
        return self._encode(prompt, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------
# helpers


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


# If xinference.model was bootstrapped by this module's own import (a model subprocess unpickling its engine),
# the registration hook had to wait for the classes above.
complete_late_registration([SgliteChatModel, SgliteModel])

__all__ = ["SUPPORTED_ARCHITECTURES", "LaunchOptions", "SgliteChatModel", "SgliteModel", "SgliteRequestError"]
