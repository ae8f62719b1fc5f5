"""The argument shapes ``Engine.generate`` and ``Engine.generate_stream`` accept, normalised to one entry per prompt.

Pure functions: wrong shapes and types raise ``InvalidRequestError`` naming the argument and what was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidRequestError

__all__ = ["as_list", "as_prompt_list", "is_integer", "request_ids"]


def as_prompt_list(prompt: Any, input_ids: Any, single: bool = False) -> list[str | list[int]]:
    """The prompts of a call, each a string or a list of token ids; ``single``: exactly one (streams).

    Raises:
        InvalidRequestError: neither or both given, or a value of the wrong type (a bool is not a token id).
    """
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError("give exactly one of prompt (text) or input_ids (token ids)")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt]
        if single or not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            wanted = "a string" if single else "a string or a non-empty list of strings"
            raise InvalidRequestError(f"prompt must be {wanted}; got {_type_name(prompt)}")
        return list(prompt)
    if not isinstance(input_ids, (list, tuple)):
        raise InvalidRequestError(f"input_ids must be a list of token ids; got {_type_name(input_ids)}")
    if all(is_integer(t) for t in input_ids):  # one prompt (possibly empty, which validation rejects)
        return [[int(t) for t in input_ids]]
    if single:
        batch = all(isinstance(p, (list, tuple)) for p in input_ids)
        got = f"a batch of {len(input_ids)} lists (use generate for batches)" if batch else _describe_ids(input_ids)
        raise InvalidRequestError(f"input_ids of a stream must be one list of token ids (integers, not bools); got {got}")
    if not input_ids or not all(isinstance(p, (list, tuple)) and all(is_integer(t) for t in p) for p in input_ids):
        raise InvalidRequestError(
            "input_ids must be a list of token ids or a list of such lists (integers, not bools); "
            f"got {_describe_ids(input_ids)}"
        )
    return [[int(t) for t in p] for p in input_ids]


def request_ids(request_id: Any, n: int) -> list[str | None]:
    """One request id per prompt: None (ids are generated), one string for one prompt, or n strings."""
    if request_id is None:
        return [None] * n
    if isinstance(request_id, str) and n == 1:
        ids = [request_id]
    elif isinstance(request_id, (list, tuple)) and len(request_id) == n:
        ids = list(request_id)
    else:
        wanted = "a non-empty string" if n == 1 else f"a list of {n} non-empty strings (one per prompt)"
        raise InvalidRequestError(f"request_id must be {wanted}; got {request_id!r:.40} ({_type_name(request_id)})")
    for rid in ids:
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError(f"request_id must be a non-empty string; got {rid!r:.40} ({_type_name(rid)})")
    return ids


def as_list(value: Any, n: int, name: str) -> list:
    """``value`` once per prompt: a list or tuple must have ``n`` entries; anything else is repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def is_integer(value: Any) -> bool:
    """An integer that is not a bool (pydantic and ``int()`` read True as 1; a client sending it has a bug)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe_ids(ids: Sequence[Any]) -> str:
    """The first entry that is not a token id, looking inside nested lists (for error messages)."""
    for entry in ids:
        inner = entry if isinstance(entry, (list, tuple)) and entry else [entry]
        bad = next((t for t in inner if not is_integer(t)), None)
        if bad is not None or not is_integer(inner[0]):
            return f"an entry {bad!r:.40} of type {_type_name(bad)}"
    return "an empty list"


def _type_name(value: Any) -> str:
    return type(value).__name__
