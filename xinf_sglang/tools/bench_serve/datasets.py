"""The workloads of ``sglite bench serve``: conversations of turns, built deterministically from a seed.

Seed rule (``sglite bench offline``'s): one ``random.Random(seed)``; every prompt's length is drawn, then its text,
in request order; the output lengths are drawn after all the texts, in the same order.

- ``random-ids``: ``num_prompts`` single-turn completions of ``input_len`` random tokens.
- ``shared-prefix``: ``num_groups`` system prompts of ``system_prompt_len`` tokens; ``num_groups *
  prompts_per_group`` requests, request ``i`` being system prompt ``i % num_groups`` and its own
  ``question_len``-token question (SGLang's generated-shared-prefix; interleaved groups, as in ``bench offline``).
- ``multi-turn``: ``num_conversations`` chats of ``num_turns`` user messages of ``input_len`` tokens each; turn
  ``t`` sends the whole conversation so far, previous answers included (the runner appends them).

Endpoint: ``/v1/completions`` (the prompt is the system prompt, a newline and the turn's text), or with ``api``
``chat`` (multi-turn's only choice) ``/v1/chat/completions`` (a system message, then the user messages).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Literal

from .options import DatasetOptions
from .text import RandomText

Api = Literal["completions", "chat"]
WARMUP_PROMPT_LEN = 8
WARMUP_OUTPUT_LEN = 4


@dataclass(frozen=True)
class Turn:
    """One request's own text (a completions prompt, or a chat user message) and its output length."""

    text: str
    output_len: int


@dataclass(frozen=True)
class Conversation:
    """Turns sent one after the other; ``system`` precedes the text of every turn (shared-prefix)."""

    turns: tuple[Turn, ...]
    system: str = ""


@dataclass(frozen=True)
class Workload:
    """What one run sends, and through which endpoint."""

    dataset: str
    api: Api
    conversations: tuple[Conversation, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def make_workload(options: DatasetOptions, text: RandomText, seed: int) -> Workload:
    """The workload ``options.name`` names, drawn with ``random.Random(seed)``, sent to :func:`api_of`."""
    workload = _BUILDERS[options.name](options, text, random.Random(seed))
    return dataclasses.replace(workload, api=api_of(options))


def api_of(options: DatasetOptions) -> Api:
    """``options.api``, by default completions (chat for multi-turn, whose turns send the conversation so far)."""
    if options.name == "multi-turn" and options.api == "completions":
        raise SystemExit("--dataset multi-turn needs --api chat (each turn sends the conversation so far)")
    return options.api or ("chat" if options.name == "multi-turn" else "completions")


def warmup_workload(text: RandomText, num_requests: int, seed: int, api: Api) -> Workload:
    """Short random requests to ``api`` that share nothing with the measured prompts (their own seed stream)."""
    rng = random.Random(f"warmup-{seed}")
    turns = [Turn(text.text(rng, WARMUP_PROMPT_LEN), WARMUP_OUTPUT_LEN) for _ in range(num_requests)]
    return Workload("warmup", api, tuple(Conversation((t,)) for t in turns))


def random_ids(options: DatasetOptions, text: RandomText, rng: random.Random) -> Workload:
    prompts = [text.text(rng, rng.randint(*options.input_len)) for _ in range(options.num_prompts)]
    outputs = _output_lens(options, rng, len(prompts))
    return Workload("random-ids", "completions", tuple(Conversation((Turn(p, n),)) for p, n in zip(prompts, outputs)))


def shared_prefix(options: DatasetOptions, text: RandomText, rng: random.Random) -> Workload:
    systems = [text.text(rng, options.system_prompt_len) for _ in range(options.num_groups)]
    count = options.num_groups * options.prompts_per_group
    questions = [text.text(rng, rng.randint(*options.question_len)) for _ in range(count)]
    outputs = _output_lens(options, rng, count)
    conversations = (Conversation((Turn(q, n),), systems[i % len(systems)])
                     for i, (q, n) in enumerate(zip(questions, outputs)))
    return Workload("shared-prefix", "completions", tuple(conversations))


def multi_turn(options: DatasetOptions, text: RandomText, rng: random.Random) -> Workload:
    shape = (options.num_conversations, options.num_turns)
    messages = [[text.text(rng, rng.randint(*options.input_len)) for _ in range(shape[1])] for _ in range(shape[0])]
    outputs = [_output_lens(options, rng, shape[1]) for _ in range(shape[0])]
    conversations = (Conversation(tuple(Turn(m, n) for m, n in zip(ms, ns))) for ms, ns in zip(messages, outputs))
    return Workload("multi-turn", "chat", tuple(conversations))


def _output_lens(options: DatasetOptions, rng: random.Random, count: int) -> list[int]:
    return [rng.randint(*options.output_len) for _ in range(count)]


_BUILDERS: dict[str, Callable[[DatasetOptions, RandomText, random.Random], Workload]] = {
    "random-ids": random_ids,
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
}
