"""The strings of a chat request's messages and tools, walked under budgets before any templating.

A message is whatever JSON the client sent, and the walk runs on the model actor's event loop, so its cost must
be bounded by the budgets, never by the body's shape: the walk stops at the value that breaks the count budget or
the characters budget (dict keys count, since templates render them), and a value's path
(``messages[0].content[3].text``) is only written out for the one value an error names. Building every path up
front cost key length x children: a message nesting 3,000 strings under a 300,000-character key took 832 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

from ...runtime.errors import brief
from .errors import SgliteRequestError

__all__ = ["MAX_MESSAGE_VALUES", "Place", "TextBudget", "walk_strings"]

MAX_MESSAGE_VALUES = 100_000
"""Most JSON values (strings, numbers, lists, objects; keys not counted) a chat's messages and tools hold together."""

_KEY_CHARS = 40  # a longer dict key shows in a path by its start and length (see `brief`)


@dataclass(frozen=True)
class Place:
    """Where a value sits: its parent's place and its key there (a dict key or a list index; a root's name)."""

    parent: Optional["Place"]
    key: Union[str, int]

    def path(self) -> str:
        """``messages[0].content`` (long keys shortened): built only for a value an error names."""
        parts: List[str] = []
        place: Optional[Place] = self
        while place is not None:
            key = place.key
            if place.parent is None:
                parts.append(str(key))
            elif isinstance(key, int):
                parts.append(f"[{key}]")
            else:
                parts.append(f".{key}" if len(key) <= _KEY_CHARS else f".{brief(key, _KEY_CHARS)}")
            place = place.parent
        return "".join(reversed(parts))


@dataclass(frozen=True)
class TextBudget:
    """What one walk may visit: ``max_values`` JSON values and ``max_chars`` characters of strings and keys;
    ``limits_text`` says where ``max_chars`` comes from (it ends the error of a walk that breaks it)."""

    max_values: int
    max_chars: int
    limits_text: str


def walk_strings(roots: List[Tuple[str, Any]], budget: TextBudget) -> Iterator[Tuple[str, Place]]:
    """Each string (values and dict keys) under the named ``roots``, with its place, in bounded work.

    Raises:
        SgliteRequestError: the roots hold more values than ``budget.max_values``, one string is longer than
            ``budget.max_chars`` (named by its path), or all strings together are.
    """
    walk = _Walk(budget)
    stack: List[Tuple[Place, Any]] = []
    for name, value in roots:
        walk.count(1, lambda: name)
        stack.append((Place(None, name), value))
    while stack:
        place, node = stack.pop()
        if isinstance(node, str):
            walk.add_chars(node, place)
            yield node, place
        elif isinstance(node, dict):
            walk.count(len(node), place.path)  # before any child is touched: the stack stays within the budget
            for key, child in node.items():
                key_place = Place(place, key if isinstance(key, str) else str(key))
                if isinstance(key, str):
                    walk.add_chars(key, key_place)
                    yield key, key_place
                stack.append((key_place, child))
        elif isinstance(node, (list, tuple)):
            walk.count(len(node), place.path)
            stack.extend((Place(place, i), child) for i, child in enumerate(node))


class _Walk:
    """The running totals of one walk against its budget."""

    def __init__(self, budget: TextBudget) -> None:
        self.budget = budget
        self.values = 0
        self.chars = 0

    def count(self, n: int, where: Callable[[], str]) -> None:
        self.values += n
        if self.values > self.budget.max_values:
            raise SgliteRequestError(
                f"messages and tools hold more than {self.budget.max_values} values (strings, numbers, lists and "
                f"objects; the walk stopped at {where()}); at most {self.budget.max_values} are allowed"
            )

    def add_chars(self, text: str, place: Place) -> None:
        self.chars += len(text)
        if self.chars <= self.budget.max_chars:
            return
        if len(text) > self.budget.max_chars:
            raise SgliteRequestError(
                f"{place.path()} has {len(text)} characters; {self.budget.limits_text}"
            )
        raise SgliteRequestError(
            f"messages and tools hold more than {self.budget.max_chars} characters of text (dict keys included; "
            f"the walk stopped at {place.path()}); {self.budget.limits_text}"
        )
