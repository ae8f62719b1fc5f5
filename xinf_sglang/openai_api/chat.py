"""Chat handling of the sglite engine: which chat template renders a prompt, which tokens and strings end a turn,
and how a finished completion becomes a chat reply with tool calls and reasoning split out.

Rendering, tool-call parsing and reasoning parsing are Xinference's own (``ChatModelMixin`` and the parsers that
``LLM.prepare_parse_*`` set up), used as its other engines use them; this module chooses and combines them. The
functions here take the engine object as ``model``; request errors are raised by the engine
(:mod:`xinf_sglang.serving.engine`), never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2

Tools = Optional[List[Dict[str, Any]]]


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


def prepare_parsers(model: Any, reasoning_content: bool, enable_thinking: bool) -> None:
    """Set up the family's reasoning and tool-call parsers on ``model`` (Xinference's own ``LLM`` helpers)."""
    family = model.model_family
    if family.reasoning_start_tag or family.reasoning_end_tag or "reasoning" in family.model_ability:
        model.prepare_parse_reasoning_content(reasoning_content, enable_thinking=enable_thinking)
    model.prepare_parse_tool_calls()


def supports_tools(model: Any) -> bool:
    """Whether the family declares tool use and Xinference has a parser for its tool-call format."""
    return "tools" in model.model_family.model_ability and model.tool_parser is not None


def thinking_enabled(model: Any) -> bool:
    """Whether replies may open with reasoning that the reasoning parser splits off."""
    parser = model.reasoning_parser
    return bool(parser and parser.reasoning_end_tag and parser.is_enable_thinking())


def template_kwargs(model: Any, chat_template_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The request's ``chat_template_kwargs`` as Xinference passes them to templates and the reasoning parser
    (``enable_thinking`` and the like)."""
    config = {"chat_template_kwargs": chat_template_kwargs} if chat_template_kwargs else None
    return model._get_chat_template_kwargs_from_generate_config(config, model.reasoning_parser) or {}


def render_prompt(
    model: Any, messages: List[Dict[str, Any]], template: str, tokenizer: Any, render_kwargs: Dict[str, Any]
) -> str:
    """The chat prompt of ``messages`` rendered with ``template`` (``render_kwargs``: the template kwargs, plus
    ``tools``), through Xinference's message pre-fill and renderer; raises what the template raises."""
    return model.get_full_context(model.prefill_messages(messages), template, tokenizer=tokenizer, **render_kwargs)


def chat_stream(
    model: Any, completion: AsyncGenerator[Dict[str, Any], None], tools: Tools, ctx: Dict[str, Any], parallel: bool
) -> AsyncGenerator[Dict[str, Any], None]:
    """A ``CompletionChunk`` stream as ``ChatCompletionChunk`` dicts: tool calls parsed when ``tools`` are given,
    reasoning split off otherwise; at most one tool call when not ``parallel``."""
    if tools:
        chunks = model._async_to_tool_completion_chunks(completion, ctx, tools)
    else:
        chunks = model._async_to_chat_completion_chunks(completion, model.reasoning_parser, ctx)
    if parallel:
        return chunks
    from xinference.model.llm.tool_controls import single_tool_stream

    return single_tool_stream(chunks)


def chat_reply(model: Any, completion: Dict[str, Any], tools: Tools, parallel: bool) -> Dict[str, Any]:
    """A ``Completion`` dict as a ``ChatCompletion`` dict, parsed as :func:`chat_stream` parses a stream."""
    if tools:
        result = model._post_process_completion(model.model_family, model.model_uid, completion, tools)
    else:
        result = model._to_chat_completion(completion, model.reasoning_parser)
    if parallel:
        return result
    from xinference.model.llm.tool_controls import single_tool_completion

    return single_tool_completion(result)
