"""``StreamExecutor``: runs one program state's expressions in order, on its own thread.

``s += gen(...)`` returns at once: the expression is queued and a worker thread executes it, so the program's
Python code runs ahead until it reads a value (``s["name"]``, ``s.text()``), and forked branches generate at the
same time. Every change of the text or of a variable notifies one condition, which is what streaming readers
wait on. The first failure stops the executor: later expressions are skipped, waiting readers are woken, and
reading the state raises ``ProgramError`` (nothing is silently dropped).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from .backends.base import Backend
from .choices import TokenScore
from .errors import LangError, ProgramError
from .ir import (
    ConcatAndAppend, Expr, ExprList, Gen, GenParams, RoleBegin, RoleEnd, Select, Text, VarScopeBegin, VarScopeEnd,
    as_expr,
)

_END = object()  # queued by end(): the worker stops after it


class StreamExecutor:
    """The state of one program (or one fork branch) and the thread that advances it."""

    def __init__(self, backend: Backend, defaults: GenParams, stream: bool) -> None:
        self.backend, self.defaults, self.stream = backend, defaults, stream
        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: str | None = None
        self.role_begin = 0
        self.fork_start = 0
        self.error_: BaseException | None = None
        self.finished = False
        self.changed = threading.Condition()
        self._pending: dict[str, threading.Event] = {}
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self._children: list[StreamExecutor] = []
        self._worker = threading.Thread(target=self._work, name="sgl-program", daemon=True)
        self._worker.start()

    # ---- the program's side ----

    def submit(self, expr: Any) -> None:
        """Queue ``expr`` (a string or an expression); names it assigns become pending at once."""
        expr = as_expr(expr)
        if self._ended:
            raise LangError("this program state has ended (a joined branch or a finished program); append to the parent")
        with self.changed:
            for name in _names(expr):
                self._pending[name] = threading.Event()
        self._queue.put(expr)

    def sync(self) -> None:
        """Wait until every queued expression ran; raise ``ProgramError`` if one failed."""
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error_ is not None:
            raise ProgramError(f"the program failed: {self.error_}", self) from self.error_

    def get_var(self, name: str) -> Any:
        """The value of ``name``, waiting for the expression that assigns it."""
        event = self._pending.get(name)
        if event is not None:
            event.wait()
        if name not in self.variables:
            self.raise_error()
            raise KeyError(f"the program has no variable {name!r}; it has {sorted(self.variables)}")
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        with self.changed:
            self.variables[name] = value
            self.changed.notify_all()

    def get_meta_info(self, name: str) -> Any:
        self.get_var(name)
        return self.meta_info.get(name)

    def fork(self, size: int) -> list[StreamExecutor]:
        """``size`` branches that continue from this state's current text, roles and variables."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise LangError(f"fork takes a number of branches >= 1; got {size!r}")
        self.sync()
        branches = [StreamExecutor(self.backend, self.defaults, self.stream) for _ in range(size)]
        for b in branches:
            b.text_, b.messages_, b.variables = self.text_, list(self.messages_), dict(self.variables)
            b.cur_role, b.role_begin, b.fork_start = self.cur_role, self.role_begin, len(self.text_)
        self._children.extend(branches)
        return branches

    def end(self) -> None:
        """No more expressions: the worker stops once the queued ones ran (branches not joined end too)."""
        if not self._ended:
            self._ended = True
            self._queue.put(_END)
        for child in self._children:
            child.end()

    def fail(self, error: BaseException) -> None:
        """Stop this state with ``error`` (the first failure wins); wakes everyone waiting on it."""
        with self.changed:
            if self.error_ is None:
                self.error_ = error
            for event in self._pending.values():
                event.set()
            self.changed.notify_all()

    # ---- the worker ----

    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is _END:
                    break
                if self.error_ is None:
                    self._execute(expr)
                else:  # skipped after a failure: its readers must not wait forever
                    for name in _names(expr):
                        self._pending[name].set()
            except BaseException as e:  # noqa: BLE001 - reported to every reader of this state
                self.fail(e)
            finally:
                if expr is not _END:
                    self._queue.task_done()
                self._notify()
        with self.changed:
            self.finished = True
            self.changed.notify_all()
        self._queue.task_done()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def _append(self, text: str) -> None:
        with self.changed:
            self.text_ += text
            self.changed.notify_all()

    def _assign(self, name: str | None, value: Any, meta: Any) -> None:
        if name is None:
            return
        with self.changed:
            self.variables[name], self.meta_info[name] = value, meta
            self._pending[name].set()
            self.changed.notify_all()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, ExprList):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self.variables[expr.name] = len(self.text_)
        elif isinstance(expr, VarScopeEnd):
            self._assign(expr.name, self.text_[self.variables[expr.name]:], None)
        elif isinstance(expr, ConcatAndAppend):
            for state in expr.states:
                state.stream_executor.sync()
            self._append("".join(s.stream_executor.text_[s.stream_executor.fork_start:] for s in expr.states))
        else:  # pragma: no cover - as_expr admits only the types above
            raise LangError(f"unknown expression {expr!r}")

    def _gen(self, expr: Gen) -> None:
        params = expr.params.over(self.defaults).with_stops(self.backend.chat_template.stop_strings)
        if not self.stream:
            result = self.backend.generate(self.text_, params)
            self._append(result.text)
            self._assign(expr.name, result.text, result.meta_info)
            return
        if expr.name is not None:
            self.set_var(expr.name, "")
        meta: dict[str, Any] = {}
        for delta in self.backend.generate_stream(self.text_, params):
            with self.changed:
                self.text_ += delta.text
                if expr.name is not None:
                    self.variables[expr.name] += delta.text
                meta = delta.meta_info or meta
                self.changed.notify_all()
        if expr.name is not None:
            self._assign(expr.name, self.variables[expr.name], meta)

    def _select(self, expr: Select) -> None:
        scores = self.backend.score(self.text_, expr.choices)
        unconditional: list[list[TokenScore]] | None = None
        if expr.method.needs_unconditional:
            # A neutral context: the opening of the current role (or of an assistant turn) with no conversation.
            context = self.backend.chat_template.markers(self.cur_role or "assistant", [])[0]
            unconditional = self.backend.score(context, expr.choices)
        decision = expr.method(expr.choices, scores, unconditional)
        self._append(decision.decision)
        self._assign(expr.name, decision.decision, decision.meta_info)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise LangError(f"roles do not nest: {role} began inside {self.cur_role}")
        opening, _ = self.backend.chat_template.markers(role, self.messages_)
        self._append(opening)
        self.cur_role, self.role_begin = role, len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise LangError(f"{role} ended while {self.cur_role or 'no role'} was open")
        _, closing = self.backend.chat_template.markers(role, self.messages_)
        content = self.text_[self.role_begin:]
        self._append(closing)
        self.messages_.append({"role": role, "content": content})
        self.cur_role = None


def _names(expr: Expr) -> list[str]:
    """The variables ``expr`` assigns."""
    if isinstance(expr, ExprList):
        return [n for item in expr.items for n in _names(item)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeBegin):
        return [expr.name]
    return []
