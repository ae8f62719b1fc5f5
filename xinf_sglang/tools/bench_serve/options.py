"""The arguments of ``sglite bench serve`` and the typed options they become.

Lengths are ``A:B`` ranges drawn uniformly, inclusive (``sglite bench offline``'s syntax); every random draw comes
from ``random.Random`` seeded with ``--seed`` (run ``i`` of a sweep uses ``seed + i``, see :mod:`.command`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Literal

from ..arg_types import length_range

HELP = "load a served model over its OpenAI-compatible HTTP API (Xinference first): latency, throughput, cache hits"
DATASETS = ("random-ids", "shared-prefix", "multi-turn")
DatasetName = Literal["random-ids", "shared-prefix", "multi-turn"]
ApiName = Literal["completions", "chat"]


@dataclass(frozen=True)
class DatasetOptions:
    """What to send: the dataset and its shape (each dataset reads only its own fields)."""

    name: DatasetName = "random-ids"
    api: ApiName | None = None  # None: completions, chat for multi-turn (datasets.api_of)
    num_prompts: int = 64  # random-ids
    input_len: tuple[int, int] = (32, 256)  # random-ids: the prompt; multi-turn: each user message
    output_len: tuple[int, int] = (32, 128)  # every dataset: max_tokens, with ignore_eos
    num_groups: int = 4  # shared-prefix
    prompts_per_group: int = 8
    system_prompt_len: int = 512
    question_len: tuple[int, int] = (32, 128)
    num_conversations: int = 8  # multi-turn
    num_turns: int = 5


@dataclass(frozen=True)
class ServeOptions:
    """The whole command: where, what, how hard, and where the results go."""

    base_url: str
    model: str
    tokenizer: str
    dataset: DatasetOptions
    baseline: str | None = None
    request_rate: float = math.inf  # requests (multi-turn: conversations) per second, Poisson; inf = all at once
    concurrency_levels: tuple[int | None, ...] = (None,)  # None: no cap
    warmup_requests: int = 2
    seed: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None
    output_file: str | None = None
    plot_dir: str | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` mode's arguments."""
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:9997 (a trailing /v1 is fine)")
    p.add_argument("--model", required=True, help="the model uid to load")
    p.add_argument("--baseline", metavar="UID",
                   help="another model uid on the same server (e.g. Xinference's Transformers engine): the same "
                        "workload, interleaved with --model at every concurrency level")
    p.add_argument("--tokenizer", required=True,
                   help="a tokenizer.json or a folder holding one: prompts are random text of its vocabulary")
    p.add_argument("--dataset", choices=DATASETS, default="random-ids")
    p.add_argument("--api", choices=["completions", "chat"], default=None,
                   help="endpoint: /v1/completions (default; multi-turn needs chat) or /v1/chat/completions, where a "
                        "prompt is one user message after the system prompt (Xinference 4.1's Transformers engine "
                        "serves chat only)")
    p.add_argument("--num-prompts", type=int, default=64, help="random-ids: requests (default 64)")
    p.add_argument("--input-len", type=length_range, default=(32, 256),
                   help="random-ids: prompt tokens; multi-turn: tokens per user message; A:B, uniform (default 32:256)")
    p.add_argument("--output-len", type=length_range, default=(32, 128),
                   help="output tokens (max_tokens, EOS ignored), A:B, uniform (default 32:128)")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: system prompts (default 4)")
    p.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix: questions per system prompt")
    p.add_argument("--system-prompt-len", type=int, default=512, help="shared-prefix: tokens of each system prompt")
    p.add_argument("--question-len", type=length_range, default=(32, 128), help="shared-prefix: A:B (default 32:128)")
    p.add_argument("--num-conversations", type=int, default=8, help="multi-turn: conversations (default 8)")
    p.add_argument("--num-turns", type=int, default=5, help="multi-turn: turns per conversation (default 5)")
    p.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="Poisson arrivals per second (multi-turn: conversation starts); inf = all at once (default)")
    p.add_argument("--max-concurrency", type=_positive, default=None, help="requests in flight at most")
    p.add_argument("--sweep", type=_levels, default=None, metavar="C1,C2,...",
                   help="one run per max-concurrency level, e.g. 1,4,16,64 (overrides --max-concurrency)")
    p.add_argument("--warmup-requests", type=int, default=2, help="short requests per model before its first run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--output-file", help="append one JSON line per run here (they are printed too)")
    p.add_argument("--plot-dir", help="write the PNG plots here")


def options_from_args(args: argparse.Namespace, api_key: str | None) -> ServeOptions:
    """The parsed arguments as :class:`ServeOptions` (``api_key``: the resolved key, flag or environment)."""
    for name in ("num_prompts", "num_groups", "prompts_per_group", "num_conversations", "num_turns"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.system_prompt_len < 1 or args.warmup_requests < 0:
        raise SystemExit("--system-prompt-len must be >= 1 and --warmup-requests >= 0")
    dataset = DatasetOptions(
        args.dataset, args.api, args.num_prompts, args.input_len, args.output_len, args.num_groups,
        args.prompts_per_group, args.system_prompt_len, args.question_len, args.num_conversations, args.num_turns,
    )
    levels = tuple(args.sweep) if args.sweep else (args.max_concurrency,)
    return ServeOptions(
        args.base_url, args.model, args.tokenizer, dataset, args.baseline, args.request_rate, levels,
        args.warmup_requests, args.seed, args.timeout, api_key, args.output_file, args.plot_dir,
    )


def _rate(text: str) -> float:
    rate = float(text)  # float("inf") parses "inf"
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 or inf, got {text!r}")
    return rate


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _levels(text: str) -> list[int]:
    try:
        return [_positive(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
