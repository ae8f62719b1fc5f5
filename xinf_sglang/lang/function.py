"""``@function``: a program, run once (``run``), over a batch of inputs (``run_batch``), or with some arguments
fixed (``bind``)."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .backends.base import Backend
from .errors import LangError
from .executor import StreamExecutor
from .ir import GenParams, as_stops
from .state import ProgramState


class _DefaultBackend:
    """The backend of ``set_default_backend``: the one place a process-wide choice is kept (SGLang's API)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backend: Backend | None = None

    def set(self, backend: Backend | None) -> None:
        if backend is not None and not isinstance(backend, Backend):
            raise LangError(f"a backend is sgl.Runtime(...) or sgl.OpenAI(...); got {type(backend).__name__}")
        with self._lock:
            self._backend = backend

    def resolve(self, backend: Backend | None) -> Backend:
        chosen = backend if backend is not None else self._backend
        if chosen is None:
            raise LangError("no backend: pass backend=sgl.Runtime(...) / sgl.OpenAI(...) or call set_default_backend")
        if not isinstance(chosen, Backend):
            raise LangError(f"a backend is sgl.Runtime(...) or sgl.OpenAI(...); got {type(chosen).__name__}")
        return chosen


DEFAULT_BACKEND = _DefaultBackend()


def set_default_backend(backend: Backend | None) -> None:
    """The backend programs run on when ``run`` is given none."""
    DEFAULT_BACKEND.set(backend)


def sampling_defaults(
    max_new_tokens: int = 128, stop: Any = None, stop_token_ids: Sequence[int] | None = None,
    temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
    frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
    return_logprob: bool = False, top_logprobs_num: int = 0,
) -> GenParams:
    """The program-wide sampling settings of ``run`` / ``run_batch`` (SGLang's defaults)."""
    return GenParams(
        max_new_tokens=max_new_tokens, min_new_tokens=0, stop=as_stops(stop) or (),
        stop_token_ids=tuple(stop_token_ids or ()), temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, ignore_eos=ignore_eos,
        return_logprob=return_logprob, top_logprobs_num=top_logprobs_num,
    )


_SAMPLING_NAMES = tuple(inspect.signature(sampling_defaults).parameters)


class SglFunction:
    """A program: a Python function whose first parameter ``s`` is the program state."""

    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None) -> None:
        self.func = func
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters)
        if not params or params[0] != "s":
            raise LangError(f"the first parameter of an sgl.function must be 's'; {func.__name__} has {params[:1]}")
        self.arg_names = params[1:]
        self.bind_arguments = dict(bind_arguments or {})
        unknown = set(self.bind_arguments) - set(self.arg_names)
        if unknown:
            raise LangError(f"bind: {func.__name__} has no parameter {sorted(unknown)}; it has {self.arg_names}")

    def bind(self, **kwargs: Any) -> SglFunction:
        """This program with ``kwargs`` fixed."""
        return SglFunction(self.func, {**self.bind_arguments, **kwargs})

    def run(self, *args: Any, stream: bool = False, backend: Backend | None = None, **kwargs: Any) -> ProgramState:
        """Run the program on ``args`` / ``kwargs`` (sampling keywords — ``max_new_tokens``, ``stop``,
        ``temperature``, ... — are its defaults for every gen). ``stream=True`` returns at once; read the state
        with ``text_iter``. Without it, the state is complete when returned, or ``ProgramError`` is raised."""
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_NAMES}
        defaults = sampling_defaults(**sampling)
        chosen = DEFAULT_BACKEND.resolve(backend)
        chosen.check(defaults)
        bound = self._bind(args, kwargs)
        state = ProgramState(StreamExecutor(chosen, defaults, stream))
        if stream:
            threading.Thread(target=self._execute, args=(state, bound, False), daemon=True).start()
        else:
            self._execute(state, bound, True)
        return state

    __call__ = run

    def run_batch(
        self, batch_kwargs: Sequence[dict[str, Any] | Sequence[Any]], *, backend: Backend | None = None,
        num_threads: int | str = "auto", progress_bar: bool = False, **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per input (a dict of arguments, or a tuple of positional ones), up to
        ``num_threads`` at a time ("auto": up to 16 per CPU core, at least 96); states in input order."""
        if not isinstance(batch_kwargs, (list, tuple)):
            raise LangError(f"run_batch takes a list of argument dicts or tuples; got {type(batch_kwargs).__name__}")
        unknown = set(sampling) - set(_SAMPLING_NAMES)
        if unknown:
            raise LangError(f"run_batch: unknown keyword {sorted(unknown)}; sampling keywords are {list(_SAMPLING_NAMES)}")
        inputs = [self._as_kwargs(item, i) for i, item in enumerate(batch_kwargs)]
        if not inputs:
            return []
        threads = _thread_count(num_threads, len(inputs))
        chosen = DEFAULT_BACKEND.resolve(backend)

        def one(kwargs: dict[str, Any]) -> ProgramState:
            return self.run(backend=chosen, **sampling, **kwargs)

        bar = _progress(progress_bar, len(inputs))
        with ThreadPoolExecutor(threads, thread_name_prefix="sgl-batch") as pool:
            futures = [pool.submit(one, kwargs) for kwargs in inputs]
            if bar is not None:
                for f in futures:
                    f.add_done_callback(lambda _: bar.update())
            states = [f.result() for f in futures]
        if bar is not None:
            bar.close()
        return states

    # ---- helpers ----

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(None, *args, **{**self.bind_arguments, **kwargs})
        except TypeError as e:
            raise LangError(f"{self.func.__name__}{self.signature}: {e}") from None
        return bound

    def _as_kwargs(self, item: Any, index: int) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)):
            if len(item) > len(self.arg_names):
                raise LangError(f"run_batch input {index}: {len(item)} values for parameters {self.arg_names}")
            return dict(zip(self.arg_names, item))
        raise LangError(f"run_batch input {index} must be a dict or a tuple of arguments; got {type(item).__name__}")

    def _execute(self, state: ProgramState, bound: inspect.BoundArguments, wait: bool) -> None:
        exe = state.stream_executor
        try:
            state.ret_value = self.func(state, *bound.args[1:], **bound.kwargs)
        except BaseException as e:
            exe.fail(e)  # a streaming reader sees it too
            if wait:
                raise
        finally:
            exe.end()
        if wait:
            exe.sync()


def _thread_count(num_threads: int | str, n: int) -> int:
    if num_threads == "auto":
        return min(n, max(96, (os.cpu_count() or 1) * 16))
    if isinstance(num_threads, int) and not isinstance(num_threads, bool) and num_threads >= 1:
        return min(n, num_threads)
    raise LangError(f"num_threads must be 'auto' or an integer >= 1; got {num_threads!r}")


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    import tqdm

    return tqdm.tqdm(total=total)


def function(func: Callable[..., Any] | None = None) -> Any:
    """Decorator: ``@sgl.function`` (or ``@sgl.function()``) makes ``func(s, ...)`` a program."""
    if func is None:
        return SglFunction
    return SglFunction(func)
