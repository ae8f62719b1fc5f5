"""One run of a workload against one model: arrivals, the concurrency cap, conversations turn after turn.

Conversations arrive as a Poisson process (exponential gaps of mean ``1 / request_rate``, drawn from their own
seeded ``random.Random``; ``inf``: all at once). Each conversation then sends its turns one after the other: a
chat turn carries the whole conversation so far, previous answers included, so it waits for that answer. The cap
(``max_concurrency``) bounds the requests in flight, not the conversations: a conversation holds no slot while it
builds its next turn (SGLang ``bench_serving``'s semaphore around each request).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .client import RequestOutcome, request_body, send
from .datasets import Api, Conversation, Workload


@dataclass(frozen=True)
class RunSpec:
    """How one run loads one model."""

    model: str
    max_concurrency: int | None  # None: no cap
    request_rate: float  # conversations per second; math.inf: all at once
    seed: int  # of the arrival times


@dataclass(frozen=True)
class RunOutcomes:
    """Every request's outcome (conversation by conversation, turn by turn) and the run's wall time."""

    outcomes: list[RequestOutcome]
    duration_s: float


Sender = Callable[[Any, Api, dict[str, Any], int], Awaitable[RequestOutcome]]
"""``sender(target, api, body, turn)`` sends one request and times it: :func:`client.send` over HTTP (the
default), or ``direct.send_direct`` to an in-process engine."""


def arrival_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each of ``count`` conversations starts: 0, then exponential gaps."""
    if math.isinf(rate):
        return [0.0] * count
    offsets, t = [], 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def run_workload(client: httpx.AsyncClient | Any, workload: Workload, spec: RunSpec,
                       sender: Sender = send) -> RunOutcomes:
    """Send ``workload`` to ``spec.model`` as ``spec`` says, each request through ``sender(client, ...)``;
    returns when every request has ended."""
    cap = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    offsets = arrival_offsets(len(workload.conversations), spec.request_rate, random.Random(spec.seed))
    start = time.perf_counter()
    per_conversation = await asyncio.gather(*(
        _conversation(client, workload.api, spec.model, conversation, start + offset, cap, sender)
        for conversation, offset in zip(workload.conversations, offsets)
    ))
    duration = time.perf_counter() - start
    return RunOutcomes([o for outcomes in per_conversation for o in outcomes], duration)


async def _conversation(client: httpx.AsyncClient | Any, api: Api, model: str, conversation: Conversation, at: float,
                        cap: asyncio.Semaphore | None, sender: Sender) -> list[RequestOutcome]:
    """The conversation's turns in order; after a failed turn the rest are failed unsent (they need its answer)."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    history: list[dict[str, str]] = []
    outcomes: list[RequestOutcome] = []
    for index, turn in enumerate(conversation.turns):
        if outcomes and not outcomes[-1].ok:
            outcomes.append(RequestOutcome(False, f"not sent: turn {index - 1} failed", turn=index))
            continue
        history.append({"role": "user", "content": turn.text})
        prompt = _prompt(api, conversation.system, history)
        async with cap or contextlib.nullcontext():
            outcome = await sender(client, api, request_body(api, model, prompt, turn.output_len), index)
        outcomes.append(outcome)
        history.append({"role": "assistant", "content": outcome.text})
    return outcomes


def _prompt(api: Api, system: str, history: list[dict[str, str]]) -> str | list[dict[str, str]]:
    """A completions prompt (system prompt, newline, the one turn's text) or the chat messages so far."""
    if api == "completions":
        return f"{system}\n{history[-1]['content']}" if system else history[-1]["content"]
    return ([{"role": "system", "content": system}] if system else []) + history
