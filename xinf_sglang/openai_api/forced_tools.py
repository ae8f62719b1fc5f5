"""Forced tool calls (``tool_choice: "required"`` or a named function) through sglite's JSON-schema enforcement.

Xinference 4.1 ships the idea for its MLX engine in ``xinference.model.llm.tool_controls``: the tools the choice
allows become one JSON schema (an array of ``{"name": <const>, "arguments": <the tool's parameters>}``, at most
one item when ``parallel_tool_calls`` is false), an instruction naming the tools goes into the system message,
and the constrained JSON reply is parsed back into OpenAI ``tool_calls``. sglite uses those helpers as they are:
the grammar makes the reply valid JSON of that schema token by token, so the parse cannot fail on a finished
reply. A reply cut off by ``max_tokens`` (finish ``length``) is no executable call: content and tool calls stay
empty, as in Xinference's engines.

Streaming sends the whole call in one chunk once it is complete (then the usage chunk if asked): partial
arguments never reach a client, and no ``<tool_call`` text can leak into ``content``.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Awaitable, Callable, Dict, List, Optional, Tuple, Union

ChatResult = Union[Dict[str, Any], AsyncGenerator[Dict[str, Any], None]]
ChatFn = Callable[[List[Dict[str, Any]], Dict[str, Any], Optional[str]], Awaitable[ChatResult]]


def is_forced(config: Dict[str, Any]) -> bool:
    """Whether ``config`` forces a tool call (``tool_choice`` ``"required"`` or ``{"function": {"name": ...}}``)."""
    choice = config.get("tool_choice")
    return choice == "required" or isinstance(choice, dict)


class ToolChoiceError(ValueError):
    """A forced ``tool_choice`` that cannot be honoured; the message says why (a 400 for the client)."""


def prepare(messages: List[Dict[str, Any]], config: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The messages with the tool instruction and the config with the JSON-schema constraint (not streamed).

    Raises:
        ToolChoiceError: no tools given, the named function is not among them, or a tool is not a function with
            an object schema for its parameters (the message says which).
    """
    from xinference.model.llm.tool_controls import prepare_forced_tools

    choice = config.get("tool_choice")
    tools = config.get("tools")
    # Xinference's REST layer hands tools over as an iterator: read it once, into a list
    tools = list(tools) if tools is not None and not isinstance(tools, (str, bytes, dict)) else tools
    if not isinstance(tools, list) or not tools:
        raise ToolChoiceError(f"tool_choice={choice!r} needs tools: declare the function(s) in tools")
    declared = [((t or {}).get("function") or {}).get("name") if isinstance(t, dict) else None for t in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in declared:
            raise ToolChoiceError(f"tool_choice names function {name!r}, which is not among the tools: {declared}")
    try:
        messages, constrained = prepare_forced_tools(messages, {**config, "tools": tools})
    except (KeyError, TypeError, ValueError) as e:
        raise ToolChoiceError(f"tool_choice={choice!r}: the tools cannot be forced ({type(e).__name__}: {e}); "
                              "each needs a function with a name and an object schema as parameters") from None
    constrained.pop("_require_structured_output", None)  # sglite always enforces the schema it is given
    constrained["stream"] = False
    constrained.pop("stream_options", None)
    return messages, constrained


async def forced_tool_chat(
    chat: ChatFn, messages: List[Dict[str, Any]], config: Dict[str, Any], request_id: Optional[str]
) -> ChatResult:
    """Run ``chat`` (the model's own ``async_chat``) constrained to the tool-call schema and return its reply as
    ``tool_calls``: a ``ChatCompletion`` dict, or, when ``config`` streams, an async generator of chunks."""
    from xinference.model.llm.tool_controls import convert_forced_completion, iter_forced_completion

    stream = bool(config.get("stream"))
    include_usage = bool((config.get("stream_options") or {}).get("include_usage", False))
    forced_messages, constrained = prepare(messages, config)
    completion = await chat(forced_messages, constrained, request_id)
    assert isinstance(completion, dict)
    result = convert_forced_completion(completion)
    if not stream:
        return result

    async def chunks() -> AsyncGenerator[Dict[str, Any], None]:
        for chunk in iter_forced_completion(result, include_usage):
            yield dict(chunk)

    return chunks()
