"""``ProgramState`` (the ``s`` of a program) and ``ProgramStateGroup`` (the branches of ``s.fork(n)``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import LangError
from .executor import StreamExecutor
from .ir import ConcatAndAppend, Expr, ExprList, RoleBegin, RoleEnd, VarScopeBegin, VarScopeEnd

_DONE = object()


class ProgramState:
    """What a program appends to (``s += ...``) and reads from (``s["name"]``, ``s.text()``)."""

    def __init__(self, executor: StreamExecutor) -> None:
        self.stream_executor = executor
        self.ret_value: Any = None

    # ---- writing ----

    def __iadd__(self, other: Any) -> ProgramState:
        if other is None:
            raise LangError("cannot append None to a program state")
        self.stream_executor.submit(other)
        return self

    def _role(self, role: str, expr: Any = None) -> Any:
        if expr is not None:
            self.stream_executor.submit(ExprList.of(RoleBegin(role), expr, RoleEnd(role)))
            return None
        return self._role_scope(role)

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self.stream_executor.submit(RoleBegin(role))
        yield
        self.stream_executor.submit(RoleEnd(role))

    def system(self, expr: Any = None) -> Any:
        """Append a system message (``expr``), or open one: ``with s.system(): ...``."""
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        """Append a user message (``expr``), or open one: ``with s.user(): ...``."""
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        """Append an assistant message (``expr``, typically a ``gen``), or open one: ``with s.assistant(): ...``."""
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """The text appended inside the block becomes the variable ``name``."""
        self.stream_executor.submit(VarScopeBegin(name))
        yield
        self.stream_executor.submit(VarScopeEnd(name))

    def fork(self, size: int = 1) -> ProgramStateGroup:
        """``size`` branches continuing from this state; they run concurrently and share its prefix."""
        branches = [ProgramState(e) for e in self.stream_executor.fork(size)]
        return ProgramStateGroup(branches, self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """One branch, joined (variables gathered) at the end of the block."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading ----

    def text(self) -> str:
        """The whole text so far, after every queued expression ran."""
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, str]]:
        """The closed role blocks as OpenAI chat messages."""
        self.stream_executor.sync()
        return list(self.stream_executor.messages_)

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        """The failure that stopped this state, if any (without raising it)."""
        self.stream_executor._queue.join()
        return self.stream_executor.error_

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        """What produced ``name``: token counts and finish reason of a gen, the scores of a select."""
        return self.stream_executor.get_meta_info(name)

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"

    # ---- streaming ----

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or variable ``var_name``) as it grows; for a program run without ``stream=True``, one
        piece once it is complete."""
        exe = self.stream_executor
        if not exe.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        sent = 0
        while True:
            with exe.changed:
                exe.changed.wait_for(lambda: _grown(exe, var_name, sent) or _complete(exe, var_name))
                current = exe.text_ if var_name is None else exe.variables.get(var_name, "")
                delta, complete = current[sent:], _complete(exe, var_name)
            sent += len(delta)
            if delta:
                yield delta
            if complete and sent >= len(current):
                exe.raise_error()
                return

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """``text_iter`` for asyncio: the waiting happens on a worker thread, never on the event loop."""
        pieces = self.text_iter(var_name)
        while True:
            piece = await asyncio.to_thread(next, pieces, _DONE)
            if piece is _DONE:
                return
            yield piece


def _grown(exe: StreamExecutor, var_name: str | None, sent: int) -> bool:
    current = exe.text_ if var_name is None else exe.variables.get(var_name)
    return isinstance(current, str) and len(current) > sent


def _complete(exe: StreamExecutor, var_name: str | None) -> bool:
    if exe.error_ is not None or exe.finished:
        return True
    if var_name is None:
        return False
    event = exe._pending.get(var_name)
    return event is not None and event.is_set()


class ProgramStateGroup:
    """The branches of one fork. ``group += expr`` appends to every branch (a callable gets the branch index)."""

    def __init__(self, states: list[ProgramState], source: ProgramState) -> None:
        self.states, self.source = states, source

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise LangError(f"{len(other)} expressions for {len(self.states)} branches")
            parts: Callable[[int], Any] = lambda i: other[i]  # noqa: E731
        elif callable(other) and not isinstance(other, Expr):
            parts = other
        else:
            parts = lambda i: other  # noqa: E731
        for i, state in enumerate(self.states):
            state += parts(i)
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """End the branches. ``gather_variable``: each variable the branches created becomes, in the source, the
        list of the branches' values; ``concate_and_append``: the branches' texts since the fork are appended to
        the source, in branch order."""
        if mode == "gather_variable":
            known = set(self.source.stream_executor.variables)
            for state in self.states:
                state.stream_executor.sync()
            gathered: dict[str, list[Any]] = {}
            for state in self.states:
                for name, value in state.stream_executor.variables.items():
                    if name not in known:
                        gathered.setdefault(name, []).append(value)
            for name, values in gathered.items():
                self.source.set_var(name, values)
        elif mode == "concate_and_append":
            self.source += ConcatAndAppend(self.states)
            self.source.sync()
        else:
            raise LangError(f"join mode must be gather_variable or concate_and_append; got {mode!r}")
        for state in self.states:
            state.stream_executor.end()

