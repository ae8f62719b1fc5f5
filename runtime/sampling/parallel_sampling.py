"""Parallel sampling (``SamplingParams.n > 1``): one request, n sequences from the same prompt.

The engine turns such a request into n *sibling* requests before queueing them (`expand`): the same prompt, each
with ``n=1`` and its own seed stream, request ids ``"<id>#<i>"``. The scheduler never sees ``n``. The siblings are
queued as one message, so they reach the same prefill batch where the budgets allow, and the prompt is computed
once: the first sibling computes it and the others borrow its fresh K/V in that forward (in-batch sharing,
runtime/mem_cache/prefix_sharing.py) or, when admitted in a later step, match it in the radix cache (unfinished inserts).
Each sibling still computes its prompt's last token (the cache always leaves one uncached, for the logits), so a
sibling after the first reports ``cached_tokens = prompt_tokens - 1`` where nothing was cached before.

Seeds: with ``seed=s``, sibling 0 uses ``s`` itself (so n=1 and the first of n give the same tokens) and sibling
``i`` a seed mixed from ``(s, i)`` (`sibling_seed`), so the n samples differ and the same request reproduces them;
without a seed every sibling draws from the shared generator (independent). Greedy siblings are identical.

`SiblingGroups` is the engine's side: parent id -> sibling ids for aborts, and the sink that relabels the
siblings' chunks with the parent's id and the choice ``index``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import InvalidRequestError
from ..engine.messages import NewRequest
from ..engine.outputs import StreamChunk

__all__ = ["SiblingGroups", "check_n", "expand", "sibling_id", "sibling_seed"]

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment

Sink = Callable[[StreamChunk], None]


def sibling_seed(seed: int | None, index: int) -> int | None:
    """The seed of sibling ``index`` of a request seeded with ``seed``: ``seed`` itself for sibling 0, otherwise a
    splitmix64 mix of ``(seed, index)`` (not ``seed + index``: that would make sibling 1 of seed 1 equal sibling 0 of
    seed 2). None stays None (no seed: independent draws)."""
    if seed is None or index == 0:
        return seed
    z = (seed + index * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sibling_id(rid: str, index: int) -> str:
    """The scheduler-side request id of sibling ``index`` of request ``rid``."""
    return f"{rid}#{index}"


def check_n(params: Any, max_running_requests: int) -> None:
    """Refuse more sequences than the engine runs at once: the n siblings of a request are meant to decode together
    (and to share the prompt's K/V while they do), not to queue behind each other.

    Raises:
        InvalidRequestError: ``params.n`` exceeds ``max_running_requests``.
    """
    n = getattr(params, "n", 1)
    if isinstance(n, int) and n > max_running_requests:
        raise InvalidRequestError(
            f"n={n} is more than this engine's max_running_requests={max_running_requests}: the n sequences of a "
            f"request run together; send n <= {max_running_requests} or relaunch with a larger max_running_requests"
        )


def expand(new: NewRequest) -> list[NewRequest]:
    """The sibling requests of ``new`` (``new.params.n`` of them; ``[new]`` itself when n is 1), in index order."""
    n = new.params.n
    if n == 1:
        return [new]
    # Shallow copies: the siblings share the parent's stop list, logit_bias map and grammar, which nothing changes
    # after validation (the request's params are already the scheduler's own copy); n deep copies of a 300-entry
    # bias would cost the event loop n times that work for nothing.
    return [
        dataclasses.replace(
            new,
            rid=sibling_id(new.rid, i),
            params=new.params.model_copy(update={"n": 1, "seed": sibling_seed(new.params.seed, i)}),
        )
        for i in range(n)
    ]


class SiblingGroups:
    """The live parallel-sampling requests of an engine: parent id -> its siblings' ids. Thread-safe.

    A group lives from `expand` until its last sibling's final chunk was relabeled (or `discard`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, tuple[str, ...]] = {}

    def expand(self, reqs: Sequence[NewRequest], sink: Sink) -> tuple[list[NewRequest], Sink]:
        """What to queue for ``reqs`` (each request with n > 1 replaced by its siblings, in place) and the sink for
        their chunks: it hands ``sink`` a sibling's chunk with ``request_id`` = the parent's and ``index`` set, and
        every other chunk as it is.

        Raises:
            InvalidRequestError: a request with n > 1 has the id of a live group (or of another one in ``reqs``).
        """
        queued: list[NewRequest] = []
        labels: dict[str, tuple[str, int]] = {}  # sibling id -> (parent id, index)
        left: dict[str, int] = {}  # parent id -> siblings not finished yet
        with self._lock:
            for req in reqs:
                siblings = expand(req)
                queued.extend(siblings)
                if len(siblings) == 1:
                    continue
                if req.rid in self._groups or req.rid in left:
                    self._forget(left)
                    raise InvalidRequestError(f"request id {req.rid!r} is already in use by a running request")
                self._groups[req.rid] = tuple(s.rid for s in siblings)
                left[req.rid] = len(siblings)
                labels.update((s.rid, (req.rid, i)) for i, s in enumerate(siblings))
        if not labels:
            return queued, sink

        def deliver(chunk: StreamChunk) -> None:  # on the routing thread
            label = labels.get(chunk.request_id)
            if label is None:
                sink(chunk)
                return
            parent, index = label
            if chunk.finish_reason is not None:
                with self._lock:
                    left[parent] -= 1
                    if left[parent] == 0:
                        self._groups.pop(parent, None)
            sink(dataclasses.replace(chunk, request_id=parent, index=index))

        return queued, deliver

    def discard(self, reqs: Sequence[NewRequest]) -> None:
        """Forget the groups of ``reqs`` (their siblings could not be queued)."""
        with self._lock:
            self._forget([r.rid for r in reqs if r.params.n > 1])

    def members(self, rid: str) -> tuple[str, ...]:
        """The scheduler-side ids that request ``rid`` stands for: its siblings, or ``rid`` itself."""
        with self._lock:
            return self._groups.get(rid, (rid,))

    def _forget(self, parents: Iterable[str]) -> None:
        for parent in parents:
            self._groups.pop(parent, None)
