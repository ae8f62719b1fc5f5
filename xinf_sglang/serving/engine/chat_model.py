"""``SgliteChatModel``: sglite serving a chat family (``/v1/chat/completions``, and completions inherited).

The chat path itself (template, stops, parsers, conversions) is :class:`xinf_sglang.openai_api.chat.ChatPath`; this
class runs it around the runtime. It is also Xinference's ``ChatModelMixin``, as Xinference's contract wants: the
mixin's renderer and conversions are what ``ChatPath`` calls on it, and Xinference's own ``LLM.count_tokens`` uses
them with ``_tokenizer``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from xinference.model.llm.utils import ChatModelMixin

from ...openai_api import forced_tools
from ...openai_api.chat import ChatPath, Tools
from ...openai_api.request_mapping import RequestOptions
from ...registration.engine_name import declare_in_virtualenv
from ...registration.matching import match_model
from .errors import SgliteRequestError, request_errors
from .model import SgliteModel
from .request_input import map_config
from .streams import Completion

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2, LLMSpecV1


class SgliteChatModel(SgliteModel, ChatModelMixin):
    """sglite serving a chat family: ``/v1/chat/completions`` (+ completions, inherited)."""

    def __init__(self, *args: Any, **kwargs: Any):
        SgliteModel.__init__(self, *args, **kwargs)
        ChatModelMixin.__init__(self)
        self._chat: Optional[ChatPath] = None  # built by load()

    @classmethod
    def match_json(
        cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str
    ) -> Union[bool, Tuple[bool, str]]:
        declare_in_virtualenv(llm_family)
        return match_model(llm_family, llm_spec, quantization, need_chat=True)

    def load(self) -> None:
        """Load the runtime (see ``SgliteModel.load``), then the chat path: parsers, template, stops."""
        super().load()
        self._chat = ChatPath.load(self, self._tokenizer, self.model_path, self._reasoning_content,
                                   self._enable_thinking)

    def stop(self) -> None:
        self._chat = None
        super().stop()

    async def async_chat(
        self,
        messages: List[Dict[str, Any]],
        generate_config: Optional[Dict[str, Any]] = None,
        request_id: Optional[str] = None,
    ) -> Completion:
        """``/v1/chat/completions``: a ``ChatCompletion`` dict, or an async generator of chunk dicts."""
        chat = self._chat_path()
        config = dict(generate_config or {})
        if forced_tools.is_forced(config):  # the call's JSON enforced by the grammar, parsed into tool_calls
            with request_errors(forced_tools.ToolChoiceError):
                return await forced_tools.forced_tool_chat(self.async_chat, messages, config, request_id)
        sampling, opts = map_config(config, "chat")
        tools = self._chat_tools(chat, opts)
        template_kwargs = chat.begin(opts.chat_template_kwargs)
        render_kwargs = {**template_kwargs, "tools": tools} if tools else dict(template_kwargs)
        _, request_input, _ = self._loaded()
        request_input.check_messages(messages, tools)
        # Rendered and tokenized on a thread (the context variable travels with it): a slow request must not
        # stall the model actor's event loop, which every other request of this model goes through.
        input_ids = await asyncio.to_thread(self._render_and_encode, chat, messages, render_kwargs)
        sampling = chat.apply_stops(sampling, tools)
        completion = await self._start(input_ids, sampling, opts, request_id)
        n = sampling.get("n") or 1  # valid: _start built the SamplingParams
        ctx = {**template_kwargs, "_anthropic_request": bool(config.get("_anthropic_request", False))}
        return self._handed_over(chat.convert(completion, n, tools, ctx, opts.parallel_tool_calls))

    def _chat_path(self) -> ChatPath:
        if self._chat is None:  # built by load() right after the engine
            raise RuntimeError(f"model {self.model_uid} is not loaded")
        return self._chat

    def _chat_tools(self, chat: ChatPath, opts: RequestOptions) -> Tools:
        """The request's tools; refused when the family cannot call tools."""
        if opts.tools and not chat.supports_tools():
            raise SgliteRequestError(f"model family {self.model_family.model_name} does not support tools")
        return opts.tools or None

    def _render_and_encode(self, chat: ChatPath, messages: List[Dict[str, Any]],
                           render_kwargs: Dict[str, Any]) -> List[int]:
        """The chat prompt's token ids (runs on a worker thread)."""
        try:
            prompt = chat.render(messages, render_kwargs)
        except Exception as e:  # a template that rejects the messages (roles, order) is the client's error
            raise SgliteRequestError(f"the chat template could not render these messages: {e}") from None
        _, request_input, _ = self._loaded()
        request_input.check_text(prompt, "the rendered chat prompt")
        # The rendered template already holds BOS / chat markers: encode without adding special tokens.
        return request_input.encode(prompt, add_special_tokens=False)
