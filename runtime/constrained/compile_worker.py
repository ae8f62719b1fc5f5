"""Grammar compilation that can be stopped: a worker process the backend kills when a compile runs too long.

llguidance cannot cancel a compilation once it started (it runs in Rust, outside Python's control), and a
pathological grammar can keep a thread busy for minutes. So the backend first compiles each new grammar here, in a
child process, under the time limit: if the child does not answer in time it is killed (and a fresh one started
for the next grammar), which really stops the work and frees the slot. Only a grammar that compiled in time in the
child is compiled again in the server process, where its matcher template is needed (llguidance objects cannot
be pickled across processes); that second compile is known to finish in about the same time.

This module is also the child's program (``python -I compile_worker.py FD``): it imports nothing from the runtime
(a child must not pay for torch), so it holds the grammar-definition helpers both sides share. Errors those raise
are `GrammarDefinitionError`; the backend turns them into request errors.

Protocol on the socket ``FD`` (pickled messages): the parent sends ``("init", tokens, special_ids, eos_ids,
n_vocab)`` once, the child answers ``("ready",)``; then per grammar ``("compile", kind, text)`` -> ``("done",
seconds)`` (whether or not the grammar is valid: the server-side compile reports errors). EOF ends the child.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

logger = logging.getLogger(__name__)

LLGUIDANCE_JSON_OPTIONS = MappingProxyType(
    {
        "whitespace_flexible": False,
        "item_separator": ",",
        "key_separator": ":",
        "lenient": False,
        "coerce_one_of": False,
    }
)
"""JSON-schema compile options passed to llguidance as overrides (see llguidance_backend.py's docstring for why)."""

_GBNF_RULE = re.compile(r"(?m)^[ \t]*[A-Za-z_][A-Za-z0-9_-]*[ \t]*::=")
_LARK_START = re.compile(r"(?m)^[ \t]*(?:%llguidance\b|\??start[ \t]*:(?!:=))")


class GrammarDefinitionError(ValueError):
    """A constraint that cannot even be turned into an llguidance grammar (the message is for the client)."""


def grammar_definition(kind: str, text: str) -> str:
    """llguidance's grammar definition for a spec's ``(kind, text)`` (GBNF is translated to Lark here).

    Raises:
        GrammarDefinitionError: a regex ending in a lone backslash, GBNF that cannot be translated.
        ValueError: llguidance's own errors (e.g. a schema it cannot read).
    """
    from llguidance import LLMatcher

    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(text, overrides=dict(LLGUIDANCE_JSON_OPTIONS))
    if kind == "regex":
        return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(text)}/")
    if kind == "ebnf":
        return LLMatcher.grammar_from_lark(ebnf_to_lark(text))
    return LLMatcher.grammar_from_lark(text)  # choices: already a Lark grammar


def ebnf_to_lark(text: str) -> str:
    """The grammar in llguidance's Lark dialect: Lark as is, GBNF (``root ::= ...``) translated.

    Raises:
        GrammarDefinitionError: GBNF that cannot be translated.
    """
    if _LARK_START.search(text) or not _GBNF_RULE.search(text):
        return text  # Lark (llguidance reports a missing start rule itself)
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(text)
    except Exception as exc:  # the translator raises plain Exception for missing rules
        raise GrammarDefinitionError(f"ebnf grammar (GBNF dialect, `name ::= ...`) is malformed: {exc}") from None


def regex_to_lark(pattern: str) -> str:
    """The regex as a Lark ``/.../`` body, with ``\\d`` / ``\\D`` meaning ASCII ``[0-9]`` / ``[^0-9]``.

    Rust's ``\\d`` is every Unicode decimal digit (Arabic-Indic, fullwidth, ...): a model could fill a phone
    number pattern with digits no program parses. ``\\w`` and ``\\s`` keep their Unicode meaning.

    Raises:
        GrammarDefinitionError: the pattern ends with a lone backslash (llguidance's converter would drop it).
    """
    from llguidance import regex_to_lark as convert

    if re.search(r"(?<!\\)(?:\\\\)*\\$", pattern):
        raise GrammarDefinitionError("regex does not compile: it ends with a lone backslash (escape it as \\\\)")
    return convert(pattern, "d")


def tokenizer_description(lltok: Any) -> tuple[list[bytes], list[int], list[int], int]:
    """``(tokens, special_ids, eos_ids, n_vocab)`` of an ``llguidance.LLTokenizer``: enough to rebuild an
    equivalent token table in a worker (`rebuild_tokenizer`), whatever the original was built from."""
    n_vocab = int(lltok.vocab_size)
    tokens = [lltok.decode_bytes([i]) for i in range(n_vocab)]
    special = [i for i in range(n_vocab) if lltok.is_special_token(i)]
    return tokens, special, [int(i) for i in lltok.eos_tokens], n_vocab


class _TokenTable:
    """The duck-typed ``TokenizerWrapper`` llguidance builds an ``LLTokenizer`` from (token bytes + ids)."""

    is_tokenizer_wrapper = True
    bos_token_id = None

    def __init__(self, tokens: list[bytes], special_ids: list[int], eos_ids: list[int]) -> None:
        self.tokens = tokens
        self.special_token_ids = special_ids
        self.eos_token_id = eos_ids[0]

    def __call__(self, text: Any) -> list[int]:
        # Compiling never tokenizes text; a worker has no BPE model to do it with.
        raise NotImplementedError("the compile worker's token table cannot tokenize text")


def rebuild_tokenizer(tokens: list[bytes], special_ids: list[int], eos_ids: list[int], n_vocab: int) -> Any:
    """An ``llguidance.LLTokenizer`` from a `tokenizer_description`."""
    import llguidance

    return llguidance.LLTokenizer(_TokenTable(tokens, special_ids, eos_ids), n_vocab=n_vocab, eos_token=eos_ids)


def compile_once(lltok: Any, limits: Any, kind: str, text: str) -> None:
    """Do all the work of compiling ``(kind, text)`` (definition, matcher, first mask); errors are ignored."""
    import llguidance
    import numpy as np

    try:
        matcher = llguidance.LLMatcher(lltok, grammar_definition(kind, text), log_level=0, limits=limits)
        if not matcher.is_error():
            scratch = np.empty((lltok.vocab_size + 31) // 32, dtype=np.int32)
            matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
    except Exception:  # the server-side compile reports the error; here only the time matters
        pass


class WorkerCrashed(RuntimeError):
    """The compile worker died while compiling a grammar (e.g. the grammar engine aborted or ran out of memory)."""


class CompileProcess:
    """One worker process (started on first use) that compiles grammars under a time limit.

    Not thread-safe: one thread drives one `CompileProcess` (the backend keeps one per compile thread).

    Args:
        description: the `tokenizer_description` the worker rebuilds its token table from.
        start_timeout_s: longest the worker may take to start (not counted against any grammar).
    """

    def __init__(self, description: tuple[list[bytes], list[int], list[int], int], start_timeout_s: float = 120.0):
        self._description = description
        self._start_timeout_s = start_timeout_s
        self._proc: Any = None
        self._conn: Any = None

    def run(self, kind: str, text: str, timeout_s: float) -> bool:
        """Compile ``(kind, text)`` in the worker; True if it finished within ``timeout_s`` (counted from now),
        False if it did not (the worker is then killed; the next call starts a fresh one).

        Raises:
            WorkerCrashed: the worker died on this grammar.
            OSError, RuntimeError: the worker could not be started.
        """
        conn = self._started()
        try:
            conn.send(("compile", kind, text))
            if not conn.poll(timeout_s):
                self.close()
                return False
            conn.recv()
            return True
        except (EOFError, OSError) as exc:
            code = self._proc.poll() if self._proc is not None else None
            self.close()
            raise WorkerCrashed(f"the compile worker died (exit status {code})") from exc

    def close(self) -> None:
        """Kill the worker (if running) and release its socket. Idempotent."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def _started(self) -> Any:
        if self._proc is not None and self._proc.poll() is None:
            return self._conn
        self.close()
        import subprocess
        from multiprocessing import Pipe

        parent, child = Pipe()
        try:
            # -I: the worker imports only llguidance and numpy (no user site, no PYTHONPATH, no script dir), from
            # the folders this process found them in (a PYTHONPATH-only install would otherwise hide them).
            self._proc = subprocess.Popen(
                [sys.executable, "-I", __file__, str(child.fileno()), _import_roots("llguidance", "numpy")],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self._conn = parent
        try:
            parent.send(("init", *self._description))
            if parent.poll(self._start_timeout_s):
                parent.recv()
                return parent
            why = f"did not start within {self._start_timeout_s:g} s"
        except (EOFError, OSError):
            why = f"exited while starting (status {self._proc.poll()})"
        self.close()
        raise RuntimeError(f"the grammar compile worker {why}")


class WorkerSlots:
    """One `CompileProcess` per compile thread, created on the thread's first compile; all killed on `close`.

    ``describe`` builds the tokenizer description the workers need (once, on first use: it walks the vocabulary).
    """

    def __init__(self, describe: Callable[[], tuple[list[bytes], list[int], list[int], int]]) -> None:
        self._describe = describe
        self._description: Any = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[CompileProcess] = []
        self._broken: str | None = None  # why workers cannot be started here (then constrained requests are refused)
        self._closed = False

    @property
    def broken(self) -> str | None:
        """Why no worker can be started here (None while they can)."""
        return self._broken

    def mine(self) -> CompileProcess | None:
        """This thread's worker, started if needed (a failed start is tried once more); None when workers cannot
        be started on this host (`broken` says why; it stays so) or the slots are closed."""
        worker = getattr(self._local, "worker", None)
        if worker is not None:
            return worker
        with self._lock:
            if self._closed or self._broken is not None:
                return None
            if self._description is None:
                self._description = self._describe()
            worker = CompileProcess(self._description)
            self._all.append(worker)
        for attempt in (1, 2):
            try:
                # Start it now, with a trivial grammar, so that no request's time limit pays for the start.
                if worker.run("regex", "a", timeout_s=60.0):
                    self._local.worker = worker
                    return worker
                why = "the compile worker did not compile a trivial grammar within 60 s"
            except (OSError, RuntimeError) as exc:
                why = str(exc)
            logger.warning("grammar compile worker failed to start (attempt %d of 2): %s", attempt, why)
        with self._lock:
            self._broken = why
        logger.error("grammar compile workers unavailable (%s): constrained requests are refused", why)
        return None

    def close(self) -> None:
        """Kill every worker. Idempotent; later `mine` calls return None."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()


def _import_roots(*modules: str) -> str:
    """The ``sys.path`` folders that hold ``modules`` in this process, joined with ``os.pathsep``."""
    import importlib.util

    roots = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            root = os.path.dirname(os.path.dirname(spec.origin))  # .../site/llguidance/__init__.py -> .../site
            if root not in roots:
                roots.append(root)
    return os.pathsep.join(roots)


def _serve(fd: int) -> None:
    import llguidance
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    _, tokens, special, eos, n_vocab = conn.recv()
    lltok = rebuild_tokenizer(tokens, special, eos, n_vocab)
    limits = llguidance.LLParserLimits(verbose_errors=False)
    # Pay first-use costs (numpy's import, llguidance's lazy set-up) before saying ready: they would otherwise be
    # counted against the first grammar a fresh worker gets, the one right after a timed-out compile was killed.
    compile_once(lltok, limits, "regex", "a")
    conn.send(("ready",))
    while True:
        try:
            _, kind, text = conn.recv()
        except (EOFError, OSError):
            return  # the server closed the socket (or died): nothing left to do
        start = time.perf_counter()
        compile_once(lltok, limits, kind, text)
        conn.send(("done", time.perf_counter() - start))


if __name__ == "__main__":
    sys.path[:0] = [p for p in (sys.argv[2] if len(sys.argv) > 2 else "").split(os.pathsep) if p]
    _serve(int(sys.argv[1]))
