"""The chat path of the sglite engine: which chat template renders a prompt, which tokens and strings end a turn,
and how a finished completion (or a completion stream) becomes a chat reply with tool calls and reasoning split out.

Rendering, tool-call parsing and reasoning parsing are Xinference's own, used as its other engines use them: the
``ChatModelMixin`` conversions and the parsers that ``LLM.prepare_parse_*`` set up. Those are methods of the engine
object (Xinference's contract: the engine *is* the mixin, and reads ``model_family``, ``model_uid`` and the parsers
off itself), so :class:`ChatPath` is handed the engine as an :class:`XinferenceChat`, the protocol that lists every
member it uses, and nothing else of the engine. Request errors are raised by the engine
(:mod:`xinf_sglang.serving.engine`), never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, List, Optional, Protocol, Tuple, Union

from . import choices

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2

Tools = Optional[List[Dict[str, Any]]]
Chunk = Dict[str, Any]
Stream = AsyncGenerator[Chunk, None]


class XinferenceChat(Protocol):
    """What crosses from the engine object into the chat path: Xinference's ``LLM`` parser set-up, its
    ``ChatModelMixin`` renderer and conversions, and the state they read (family, uid, parsers)."""

    model_family: "LLMFamilyV2"
    model_uid: str
    reasoning_parser: Any
    tool_parser: Any

    def prepare_parse_reasoning_content(self, reasoning_content: bool, enable_thinking: bool = True) -> None: ...
    def prepare_parse_tool_calls(self) -> None: ...
    def prefill_messages(self, messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]: ...
    def get_full_context(self, messages: List[Any], chat_template: Optional[str], tokenizer: Any = None,
                         **kwargs: Any) -> str: ...
    def _get_chat_template_kwargs_from_generate_config(self, generate_config: Any,
                                                       reasoning_parser: Any = None) -> Optional[dict]: ...
    def _async_to_tool_completion_chunks(self, chunks: Stream, ctx: Any = None, tools: Tools = None) -> Stream: ...
    def _async_to_chat_completion_chunks(self, chunks: Stream, reasoning_parser: Any = None,
                                         ctx: Any = None) -> Stream: ...
    def _post_process_completion(self, model_family: Any, model_uid: Any, c: Chunk, tools: Tools = None) -> Chunk: ...
    def _to_chat_completion(self, completion: Chunk, reasoning_parser: Any = None) -> Chunk: ...


def select_chat_template(family: "LLMFamilyV2", tokenizer: Any, model_uid: str, model_path: str) -> str:
    """The family's template, or the checkpoint's own when the family has none.

    A custom registration without ``chat_template`` gets its ``model_family`` *name* as template from Xinference;
    that is not Jinja, so the checkpoint's template (tokenizer_config / chat_template.jinja) is used instead.
    Raises ``ValueError`` (a failed launch) when neither has one.
    """
    template = family.chat_template
    if template and ("{{" in template or "{%" in template):
        return template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: take the default one
        own = own.get("default") or next(iter(own.values()), None)
    if not own:
        raise ValueError(
            f"{model_uid}: the model family has no chat template and the checkpoint at {model_path} "
            "ships none; register the model with a chat_template"
        )
    return own


@dataclass(frozen=True)
class ChatStops:
    """What ends a chat turn for one checkpoint: token ids (always added) and strings (used when the client gave
    no ``stop``)."""

    token_ids: Tuple[int, ...] = ()
    strings: Tuple[str, ...] = ()

    @classmethod
    def of_family(cls, family: "LLMFamilyV2", tokenizer: Any) -> "ChatStops":
        """The family's stops resolved against this checkpoint's tokenizer.

        A family's ``stop_token_ids`` are only valid for the checkpoints it was written for (a built-in family
        launched with ``--model-path`` on another tokenizer may not have them); its ``stop`` strings are mapped
        to this tokenizer's ids when they are single tokens (chat markers such as ``<|im_end|>``), which also
        works when special tokens are skipped from the text.
        """
        vocab = len(tokenizer)
        ids: set[int] = set()
        strings: List[str] = []
        for s in family.stop or []:
            token_id = tokenizer.convert_tokens_to_ids(s)
            if isinstance(token_id, int) and 0 <= token_id < vocab and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
            else:
                strings.append(s)
        stop_strings = set(family.stop or [])
        for i in family.stop_token_ids or []:
            # Trust a family id only if it names one of the family's stop strings in *this* vocabulary.
            if 0 <= i < vocab and (not stop_strings or tokenizer.convert_ids_to_tokens(i) in stop_strings):
                ids.add(i)
        return cls(tuple(sorted(ids)), tuple(strings))

    def apply(self, sampling: Dict[str, Any], keep_special_tokens: bool) -> Dict[str, Any]:
        """``sampling`` (SamplingParams kwargs) with these stops added; ``keep_special_tokens``: a parser reads
        the text (tool calls, reasoning), so special tokens stay in it unless the client chose otherwise."""
        sampling = dict(sampling)
        ids = list(sampling.get("stop_token_ids") or [])
        sampling["stop_token_ids"] = ids + [i for i in self.token_ids if i not in ids]
        if self.strings and not sampling.get("stop"):
            sampling["stop"] = list(self.strings)
        if keep_special_tokens and "skip_special_tokens" not in sampling:
            # Tool-call and reasoning markers can be special tokens; the parsers need to see them.
            sampling["skip_special_tokens"] = False
        return sampling


class ChatPath:
    """One loaded chat model's way from messages to a prompt and from a completion to a chat reply.

    Built by :meth:`load` once the tokenizer exists; every request then goes :meth:`begin` (template kwargs),
    :meth:`render`, :meth:`apply_stops`, and after the runtime :meth:`convert`.
    """

    def __init__(self, xinference: XinferenceChat, tokenizer: Any, template: str, stops: ChatStops) -> None:
        self._xinference = xinference
        self._tokenizer = tokenizer
        self.template = template
        self.stops = stops

    @classmethod
    def load(cls, xinference: XinferenceChat, tokenizer: Any, model_path: str, reasoning_content: bool,
             enable_thinking: bool) -> "ChatPath":
        """Set up the family's reasoning and tool-call parsers (Xinference's own ``LLM`` helpers, which keep them
        on the engine object), choose the template and resolve the stops. Raises ``ValueError`` (a failed launch)
        when there is no chat template."""
        family = xinference.model_family
        if family.reasoning_start_tag or family.reasoning_end_tag or "reasoning" in family.model_ability:
            xinference.prepare_parse_reasoning_content(reasoning_content, enable_thinking=enable_thinking)
        xinference.prepare_parse_tool_calls()
        template = select_chat_template(family, tokenizer, xinference.model_uid, model_path)
        return cls(xinference, tokenizer, template, ChatStops.of_family(family, tokenizer))

    def supports_tools(self) -> bool:
        """Whether the family declares tool use and Xinference has a parser for its tool-call format."""
        return "tools" in self._xinference.model_family.model_ability and self._xinference.tool_parser is not None

    def begin(self, chat_template_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The request's ``chat_template_kwargs`` as Xinference passes them to templates (``enable_thinking`` and
        the like), also set as Xinference's per-request chat context, where its reasoning parser reads them."""
        config = {"chat_template_kwargs": chat_template_kwargs} if chat_template_kwargs else None
        reasoning = self._xinference.reasoning_parser
        kwargs = self._xinference._get_chat_template_kwargs_from_generate_config(config, reasoning) or {}
        from xinference.model.llm.core import chat_context_var

        chat_context_var.set(kwargs)
        return kwargs

    def render(self, messages: List[Dict[str, Any]], render_kwargs: Dict[str, Any]) -> str:
        """The chat prompt of ``messages`` (``render_kwargs``: the template kwargs, plus ``tools``), through
        Xinference's message pre-fill and renderer; raises what the template raises."""
        xinference = self._xinference
        messages = xinference.prefill_messages(messages)
        return xinference.get_full_context(messages, self.template, tokenizer=self._tokenizer, **render_kwargs)

    def apply_stops(self, sampling: Dict[str, Any], tools: Tools) -> Dict[str, Any]:
        """``sampling`` with the chat stops; special tokens kept when a parser reads the text (call after
        :meth:`begin`: whether thinking is on is read from the request's chat context)."""
        return self.stops.apply(sampling, keep_special_tokens=bool(tools) or self._thinking_enabled())

    def _thinking_enabled(self) -> bool:
        parser = self._xinference.reasoning_parser
        return bool(parser and parser.reasoning_end_tag and parser.is_enable_thinking())

    def convert(self, completion: Union[Chunk, Stream], n: int, tools: Tools, ctx: Dict[str, Any],
                parallel: bool) -> Union[Chunk, Stream]:
        """A ``Completion`` dict or ``CompletionChunk`` stream with ``n`` choices as its chat counterpart.

        Xinference's conversions serve one choice at a time (:mod:`xinf_sglang.openai_api.choices`), so for
        ``n > 1`` each choice is converted on its own and the results merged."""
        if isinstance(completion, dict):
            if n == 1:
                return self.reply(completion, tools, parallel)
            replies = [self.reply(one, tools, parallel) for one in choices.split_completion(completion)]
            return choices.merge_replies(replies, completion["usage"])

        def convert_one(stream: Stream) -> Stream:
            return self.stream(stream, tools, ctx, parallel)

        return convert_one(completion) if n == 1 else choices.per_choice_stream(completion, n, convert_one)

    def stream(self, completion: Stream, tools: Tools, ctx: Dict[str, Any], parallel: bool) -> Stream:
        """A one-choice ``CompletionChunk`` stream as ``ChatCompletionChunk`` dicts: tool calls parsed when
        ``tools`` are given, reasoning split off otherwise; at most one tool call when not ``parallel``."""
        xinference = self._xinference
        if tools:
            chunks = xinference._async_to_tool_completion_chunks(completion, ctx, tools)
        else:
            chunks = xinference._async_to_chat_completion_chunks(completion, xinference.reasoning_parser, ctx)
        if parallel:
            return chunks
        from xinference.model.llm.tool_controls import single_tool_stream

        return single_tool_stream(chunks)

    def reply(self, completion: Chunk, tools: Tools, parallel: bool) -> Chunk:
        """A one-choice ``Completion`` dict as a ``ChatCompletion`` dict, parsed as :meth:`stream` parses a stream."""
        xinference = self._xinference
        if tools:
            result = xinference._post_process_completion(xinference.model_family, xinference.model_uid, completion,
                                                         tools)
        else:
            result = xinference._to_chat_completion(completion, xinference.reasoning_parser)
        if parallel:
            return result
        from xinference.model.llm.tool_controls import single_tool_completion

        return single_tool_completion(result)
