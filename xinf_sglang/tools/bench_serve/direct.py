"""The runtime ``Engine`` in this process as a ``bench serve`` target: the same workload and the same timing as
over HTTP, with no server in between, so that a REST run and an engine-direct run of the same requests show what
the HTTP path (Xinference's REST layer, its actor calls, the plugin, SSE) adds to TTFT and ITL.

``send_direct(engine, api, body, turn)`` has the signature of :func:`client.send` and is passed to
:func:`runner.run_workload` as its ``sender``. It reads the body :func:`client.request_body` builds: a completions
prompt is sent as text (the engine tokenizes it, as the plugin does); chat messages are rendered with the
tokenizer's own chat template first. Timing follows :mod:`client`: TTFT to the first chunk with text, ITL between
later chunks with text, E2E to the last chunk; token counts from the engine's chunks (its usage).
"""

from __future__ import annotations

import time
from typing import Any

from .client import ERROR_CHARS, RequestOutcome
from .datasets import Api


async def send_direct(engine: Any, api: Api, body: dict[str, Any], turn: int = 0) -> RequestOutcome:
    """Run one request of ``body`` on ``engine`` (a ``runtime.Engine``) and time it like :func:`client.send`."""
    from ...runtime import SamplingParams  # torch and the runtime only when an engine is benchmarked

    params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body.get("temperature", 0.0),
                            ignore_eos=body.get("ignore_eos", False))
    prompt = body["prompt"] if api == "completions" else _render_chat(engine, body["messages"])
    start = time.perf_counter()
    arrivals: list[float] = []
    texts: list[str] = []
    last = None
    try:
        async for chunk in engine.generate_stream(prompt=prompt, sampling_params=params):
            if chunk.error:
                return RequestOutcome(False, f"engine error: {chunk.error[:ERROR_CHARS]}", turn=turn)
            if chunk.text:
                arrivals.append(time.perf_counter())
                texts.append(chunk.text)
            last = chunk
    except Exception as e:  # a refused request is a failed outcome, as an HTTP 400 is
        return RequestOutcome(False, f"{type(e).__name__}: {str(e)[:ERROR_CHARS]}", turn=turn)
    end = time.perf_counter()
    first = arrivals[0] if arrivals else end
    return RequestOutcome(
        ok=True, ttft_s=first - start, itl_s=[b - a for a, b in zip(arrivals, arrivals[1:])], e2e_s=end - start,
        prompt_tokens=last.prompt_tokens if last else 0, completion_tokens=last.completion_tokens if last else 0,
        cached_tokens=last.cached_tokens if last else None, text="".join(texts), turn=turn,
    )


def _render_chat(engine: Any, messages: list[dict[str, str]]) -> str:
    """The messages as the model's chat template renders them, ready for the assistant's answer."""
    if engine.tokenizer is None:
        raise ValueError("chat needs a tokenizer; this engine was started with skip_tokenizer_init")
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
